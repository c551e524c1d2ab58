"""The KV cache's lower tiers behind the device pool: host memory, then disk.

`KVTiers` is what the scheduler and the block manager talk to; it decides, the model runner
copies. Its three duties:

- Eviction: a registered block leaving the device pool's LRU end (BlockManager.on_evict) gets a
  host slot; the copy device -> host is queued for this step.
- Lookup: after the device pool's hits, the scheduler asks `lower_hits` for the continuation of
  a prompt's prefix in the host tier (each hit gets a fresh device block and a copy in). When
  the disk holds more of the prefix, the request waits in the scheduler's loading state while
  the disk tier's thread reads it (`start_load`), and the engine keeps stepping the others. The
  request gets the device blocks for those disk blocks when the load starts (allocated, not
  registered: no other request sees them, none can evict them). On the CPU the pool is host
  memory (`HostPool`): the loader reads each file straight into its pool block, one buffer per
  (k|v, layer) segment, so a landed block needs no copy at all. On CUDA the loader reads into a
  staging buffer and landing (`land_load`) queues the copies from it into the blocks. A landed
  load's verified blocks are then registered like computed ones (engine.scheduler), and the
  request is admitted with them as device hits.
- Write-through: every block the block manager registers (BlockManager.on_register) joins a
  queue, in registration order (a prompt's blocks in chain order); after each step the engine
  gathers as many of them to the CPU as the disk writer has room for and hands them over. A
  disk slower than the prefill (a GPU reads 10K+ tokens a second) only delays blocks that stay
  in the device pool; a block evicted before its turn is skipped. Blocks that came from disk
  are on disk already and are not written again.

The copies of one step (`KVCopy`, in the order they were decided) run before its forward pass:
an eviction's copy out always precedes a later copy into the same device block.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal

import torch

from engine.config import EngineConfig
from engine.kv_disk_tier import DiskKVStore
from engine.kv_host_tier import HostKVCache
from engine.kv_keys import BlockRef

logger = logging.getLogger(__name__)

GiB = 1 << 30
# Default host tier on CUDA: a quarter of the machine's memory, at most this much.
DEFAULT_CUDA_HOST_GB = 32.0


@dataclass
class KVCopy:
    """One block copy the model runner performs before the step's forward pass.

    `on_device` copies the first `num_slots` slots of device block `src_block` into `block_id`:
    a prompt's last, partial block that a running sequence computed already (the scheduler's
    copy on write, engine.scheduler).
    """

    kind: Literal["to_host", "from_host", "from_cpu", "on_device"]
    block_id: int  # the device block
    host_slot: int = -1  # to_host / from_host
    tensor: torch.Tensor | None = None  # from_cpu: a block loaded from disk (CUDA: staged)
    src_block: int = -1  # on_device
    num_slots: int = 0  # on_device


@dataclass
class LowerHit:
    """A block of a prompt's prefix found in a host tier slot."""

    ref: BlockRef
    host_slot: int


class HostPool:
    """The device KV pool when it is host memory (on the CPU), as the disk loader writes it.

    The pool is (k|v, layer, block, slot, kv_head, head_dim), contiguous; one block is the
    2 * layers segments (k|v, layer, block) of `block_size * kv_heads * head_dim` values, and
    a block file's payload holds them in that order (engine.kv_disk_tier)."""

    def __init__(self, kv_cache: torch.Tensor) -> None:
        if kv_cache.device.type != "cpu" or not kv_cache.is_contiguous():
            raise ValueError("the disk tier reads only into a contiguous pool in host memory")
        self.num_blocks = kv_cache.shape[2]
        self.num_segments = kv_cache.shape[0] * kv_cache.shape[1]
        self.segment_bytes = kv_cache[0, 0, 0].nbytes
        # Slices of one memoryview cost ~0.1 us each; a tensor view per segment ~10 us.
        self._bytes = kv_cache.view(-1).view(torch.uint8).numpy().data

    def segments(self, block_id: int) -> list[memoryview]:
        """Block `block_id`'s bytes in the pool, in the order of a block file's payload."""
        size, stride = self.segment_bytes, self.num_blocks * self.segment_bytes
        first = block_id * size
        return [
            self._bytes[first + j * stride : first + j * stride + size]
            for j in range(self.num_segments)
        ]


@dataclass
class KVTierStats:
    """Counters of the tiers (engine.stats().kv_tiers); hit tokens count first admissions."""

    device_hit_tokens: int = 0
    host_hit_tokens: int = 0
    disk_hit_tokens: int = 0
    host_blocks_used: int = 0
    host_blocks_total: int = 0
    host_bytes_out: int = 0  # device -> host
    host_bytes_in: int = 0  # host -> device
    disk_blocks: int = 0
    disk_bytes: int = 0
    disk_capacity_bytes: int = 0
    disk_bytes_written: int = 0
    disk_bytes_read: int = 0
    disk_bytes_in: int = 0  # blocks loaded from disk into the device pool
    disk_load_seconds: float = 0.0
    disk_bad_files: int = 0
    disk_write_errors: int = 0
    disk_blocks_dropped: int = 0  # not saved: the disk writer was too far behind
    num_loading: int = 0  # requests waiting for a disk load


@dataclass
class KVTiers:
    """Host and disk tiers of one engine (either may be None) and this step's pending work."""

    host: HostKVCache | None
    disk: DiskKVStore | None
    block_bytes: int
    # The device pool when it is host memory (the CPU): disk loads read straight into it.
    pool: HostPool | None = None
    copies: list[KVCopy] = field(default_factory=list)
    # Registered blocks not yet handed to the disk writer, oldest first (block id, what it held).
    unsaved: deque[tuple[int, BlockRef]] = field(default_factory=deque)
    # Beyond this many the oldest are forgotten: a disk that far behind has lost them to
    # eviction anyway (the scheduler sets it from the pool size).
    max_unsaved: int = 1 << 20
    stats: KVTierStats = field(default_factory=KVTierStats)

    # ---- block manager hooks -----------------------------------------------------------------

    def on_evict(self, block_id: int, ref: BlockRef) -> None:
        """A registered block is about to be reused: keep its KV in the host tier."""
        if self.host is None:
            return
        slot = self.host.slot_for(ref.key, ref.token_ids)
        if slot is not None:
            self.copies.append(KVCopy("to_host", block_id, host_slot=slot))
            self.stats.host_bytes_out += self.block_bytes

    def on_register(self, block_id: int, ref: BlockRef) -> None:
        """A block's KV was just computed: write it to disk after this step."""
        if self.disk is not None and ref.key not in self.disk:
            if len(self.unsaved) >= self.max_unsaved:
                self.unsaved.popleft()
            self.unsaved.append((block_id, ref))

    # ---- lookup ---------------------------------------------------------------------------------

    def lower_hits(self, refs: Iterable[BlockRef]) -> list[LowerHit]:
        """The leading blocks of `refs` found in the host tier (pinned until this step's copies)."""
        hits: list[LowerHit] = []
        if self.host is None:
            return hits
        for ref in refs:
            slot = self.host.lookup(ref.key, ref.token_ids)
            if slot is None:
                break
            self.host.pin(slot)  # a copy from it may follow
            hits.append(LowerHit(ref, slot))
        return hits

    def copy_in(self, hit: LowerHit, block_id: int) -> None:
        """Queue the copy of a host tier hit into the device block the request got for it."""
        self.copies.append(KVCopy("from_host", block_id, host_slot=hit.host_slot))
        self.stats.host_bytes_in += self.block_bytes

    def count_hits(self, device: int, host: int, disk: int, block_size: int) -> None:
        """A first admission's cached prefix, in blocks by the tier they came from."""
        self.stats.device_hit_tokens += device * block_size
        self.stats.host_hit_tokens += host * block_size
        self.stats.disk_hit_tokens += disk * block_size

    # ---- disk loads -----------------------------------------------------------------------------

    def start_load(
        self, refs: Sequence[BlockRef], block_ids: Sequence[int], stop: threading.Event
    ) -> Future[int] | Future[list[torch.Tensor]]:
        """Load blocks `refs` from disk for device blocks `block_ids` (allocated, unregistered,
        untouched by anyone until the future is done); finish with `land_load`."""
        assert self.disk is not None
        pool = self.pool
        if pool is None:
            return self.disk.load(refs, stop)
        ids = list(block_ids)
        return self.disk.load_into(refs, lambda i: pool.segments(ids[i]), stop)

    def land_load(self, result: int | list[torch.Tensor], block_ids: Sequence[int]) -> int:
        """How many of a finished load's blocks, from the first, verified. On CUDA their copies
        from the staging buffer into `block_ids` are queued for this step; on the CPU the loader
        wrote the pool already."""
        if isinstance(result, int):
            loaded = result
        else:
            loaded = len(result)
            for kv, block_id in zip(result, block_ids):
                self.copies.append(KVCopy("from_cpu", block_id, tensor=kv))
        self.stats.disk_bytes_in += loaded * self.block_bytes
        return loaded

    def take_copies(self) -> list[KVCopy]:
        """This step's copies, in order; the host slots they read may be reused after them."""
        copies, self.copies = self.copies, []
        if self.host is not None:
            self.host.release_pins()
        return copies

    def take_unsaved(
        self, limit: int, still_holds: Callable[[int, bytes], bool]
    ) -> list[tuple[int, BlockRef]]:
        """Up to `limit` of the oldest unsaved blocks whose device block still holds their KV."""
        taken: list[tuple[int, BlockRef]] = []
        while self.unsaved and len(taken) < limit:
            block_id, ref = self.unsaved.popleft()
            if still_holds(block_id, ref.key):
                taken.append((block_id, ref))
        return taken

    # ---- lifecycle ------------------------------------------------------------------------------

    def snapshot(self, num_loading: int) -> KVTierStats:
        s = KVTierStats(**vars(self.stats))
        if self.host is not None:
            s.host_blocks_used = self.host.num_used_blocks
            s.host_blocks_total = self.host.num_blocks
        if self.disk is not None:
            d = self.disk
            s.disk_blocks, s.disk_bytes = d.num_files, d.num_bytes
            s.disk_capacity_bytes = d.capacity_bytes
            s.disk_bytes_written, s.disk_bytes_read = d.bytes_written, d.bytes_read
            s.disk_load_seconds = d.load_seconds
            s.disk_bad_files, s.disk_write_errors = d.bad_files, d.write_errors
            s.disk_blocks_dropped = d.blocks_dropped
        s.num_loading = num_loading
        return s

    def close(self) -> None:
        """Write the blocks still queued for disk and stop the tiers' threads."""
        if self.disk is not None:
            self.disk.close()


def host_tier_gb(config: EngineConfig, device: torch.device) -> float:
    """PAGECHAT_KV_HOST_GB, or its default: on CUDA a quarter of RAM up to 32 GiB; on the CPU
    0 (the device pool is host memory already: give PAGECHAT_KV_CACHE_MEMORY_GB more instead)."""
    if config.kv_host_gb is not None:
        return config.kv_host_gb
    if device.type != "cuda":
        return 0.0
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0.0
    return min(DEFAULT_CUDA_HOST_GB, ram / 4 / GiB)


def build_kv_tiers(
    config: EngineConfig,
    device: torch.device,
    block_shape: tuple[int, ...],
    dtype: torch.dtype,
    fingerprint: bytes,
    host_pool: torch.Tensor | None = None,
) -> KVTiers | None:
    """The tiers the configuration asks for (None when neither is on or prefix caching is off).

    `host_pool` is the device KV pool when it is host memory (ModelRunner.host_kv_pool, on the
    CPU): disk loads then read straight into its blocks."""
    if not config.enable_prefix_caching:
        return None
    numel = 1
    for dim in block_shape:
        numel *= dim
    block_bytes = numel * torch.empty((), dtype=dtype).element_size()
    host: HostKVCache | None = None
    host_blocks = int(host_tier_gb(config, device) * GiB) // block_bytes
    if host_blocks > 0:
        host = HostKVCache(host_blocks, block_shape, dtype, pin=device.type == "cuda")
        logger.info(
            "KV host tier: up to %d blocks (%.2f GiB%s, allocated as it fills)",
            host_blocks,
            host_blocks * block_bytes / GiB,
            ", pinned" if device.type == "cuda" else "",
        )
    disk: DiskKVStore | None = None
    if config.kv_disk_dir is not None and config.kv_disk_gb > 0:
        try:
            disk = DiskKVStore(
                config.kv_disk_dir, int(config.kv_disk_gb * GiB), fingerprint, block_shape, dtype
            )
        except OSError as exc:
            logger.warning("KV disk tier off: cannot use %s (%s)", config.kv_disk_dir, exc)
    if host is None and disk is None:
        return None
    pool = HostPool(host_pool) if disk is not None and host_pool is not None else None
    return KVTiers(host, disk, block_bytes, pool=pool)
