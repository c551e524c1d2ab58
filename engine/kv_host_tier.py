"""Host-memory tier of the KV cache: blocks evicted from the device pool, kept for a later hit.

A pool of up to `num_blocks` host blocks (pinned on CUDA, so copies run asynchronously on a
side stream) with an LRU index by block key (engine.kv_keys). The memory is allocated in chunks
of CHUNK_BLOCKS as the tier fills: tens of GiB of pinned memory would otherwise cost seconds at
every start and be held before anything is evicted. The scheduler offers it every
registered block that leaves the device pool's LRU end and asks it for the continuation of a
prefix the device pool lacks; the model runner does the copies (`ModelRunner.copy_kv`) in the
order the scheduler decided them, before the step's forward pass.

A slot chosen as the source of a copy back to the device is pinned until that copy has been
issued (`release_pins`), so a later eviction in the same step cannot overwrite it first.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

CHUNK_BLOCKS = 64  # host blocks allocated at once (Qwen3-4B in bf16: 151 MB)


class HostKVCache:
    """LRU of KV blocks in host memory, keyed by block key; each entry keeps its token ids."""

    def __init__(
        self, num_blocks: int, block_shape: tuple[int, ...], dtype: torch.dtype, pin: bool
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"the host KV tier needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_shape = block_shape
        self.dtype = dtype
        self.pinned_memory = pin
        numel = 1
        for dim in block_shape:
            numel *= dim
        self.block_bytes = numel * torch.empty((), dtype=dtype).element_size()
        # Slot i is block i % CHUNK_BLOCKS of chunk i // CHUNK_BLOCKS, shaped like the device
        # cache's block (k|v, layer, slot, kv_head, head_dim); chunks are made on first use.
        self._chunks: list[torch.Tensor] = []
        self._entries: OrderedDict[bytes, tuple[int, tuple[int, ...]]] = OrderedDict()  # LRU first
        self._free_slots = list(range(num_blocks - 1, -1, -1))
        self._pinned: set[int] = set()

    def block(self, slot: int) -> torch.Tensor:
        """The host memory of `slot` (its chunk is allocated on first use)."""
        chunk, index = divmod(slot, CHUNK_BLOCKS)
        while len(self._chunks) <= chunk:
            first = len(self._chunks) * CHUNK_BLOCKS
            size = min(CHUNK_BLOCKS, self.num_blocks - first)
            self._chunks.append(
                torch.empty(
                    (size, *self.block_shape), dtype=self.dtype, pin_memory=self.pinned_memory
                )
            )
        return self._chunks[chunk][index]

    @property
    def allocated_bytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self._chunks)

    @property
    def num_used_blocks(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def lookup(self, key: bytes, token_ids: tuple[int, ...]) -> int | None:
        """The slot holding this block (tokens checked too), now most recently used; or None."""
        entry = self._entries.get(key)
        if entry is None or entry[1] != token_ids:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def pin(self, slot: int) -> None:
        """Keep `slot` from being overwritten until `release_pins` (a copy from it is pending)."""
        self._pinned.add(slot)

    def release_pins(self) -> None:
        self._pinned.clear()

    def slot_for(self, key: bytes, token_ids: tuple[int, ...]) -> int | None:
        """A slot to copy a block leaving the device into, evicting the LRU entry if needed.

        None when the block is here already (it is only marked recently used) or every slot is
        pinned by a pending copy (the block is then dropped: it can still be recomputed).
        """
        if key in self._entries:
            self._entries.move_to_end(key)
            return None
        if self._free_slots:
            slot = self._free_slots.pop()
        else:
            victim = next((k for k, (s, _) in self._entries.items() if s not in self._pinned), None)
            if victim is None:
                return None
            slot, _ = self._entries.pop(victim)
        self._entries[key] = (slot, token_ids)
        return slot
