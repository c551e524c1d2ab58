"""Paged KV blocks: allocation, reference counts and the hash-chained prefix cache.

A full block is content-addressed by `H(parent block's hash, its token ids)`, so a block's hash
names the whole prefix up to its end; the first block's parent is the chain root of the model's
fingerprint and the request's `cache_salt` (engine.kv_keys defines all three), so requests of
different tenants never share a block, and the keys mean the same in every process. A request first walks its prompt's full blocks through the
cache and shares every hit (reference count + 1); a hit counts only if the block's own token ids
match too. Blocks are registered only after their KV has been written, for prompt and generated
tokens alike. A block whose count drops to 0 keeps its hash and stays hittable in the free list
until it reaches the least-recently-freed end and is handed out again (lazy LRU eviction).

Lower KV tiers (engine.kv_tiers) hook in at three points: `on_evict` sees a registered block
just before it is handed out again (its KV still intact), `on_register` sees every block entered
into the cache after its KV was computed, and `admit` takes blocks found in the host tier,
giving each a fresh block registered at once (the caller copies their KV in before the step).
Blocks a disk load fills are plain fresh blocks (`allocate`) until it lands; the verified ones
are then registered by `register_computed`, like computed blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from collections.abc import Sequence as Seq

from engine.kv_keys import BlockRef, chain_root
from engine.kv_keys import block_key as hash_block
from engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None  # set once the block is full, written and registered
        self.token_ids: tuple[int, ...] | None = None

    def reset(self) -> None:
        self.hash = None
        self.token_ids = None


class BlockManager:
    """Owns the pool of `num_blocks` blocks of `block_size` tokens; the scheduler decides policy."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        model_digest: bytes = b"",
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # The model fingerprint's digest (engine.kv_keys.ModelFingerprint): roots every key chain.
        self.model_digest = model_digest
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order: the first is handed out (and its cache entry dropped) first.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[bytes, int] = {}  # block hash -> block id
        # Prefix-cache statistics over requests' first admissions: full blocks looked up / found.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        # Lower KV tiers' hooks (engine.kv_tiers.KVTiers): a block leaving the pool, a new block.
        self.on_evict: Callable[[int, BlockRef], None] | None = None
        self.on_register: Callable[[int, BlockRef], None] | None = None

    # ---- accounting -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` still lacks to cover positions [0, num_tokens)."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    # ---- prefix cache lookup ----------------------------------------------------------------

    def _block_tokens(self, seq: Sequence, index: int) -> list[int]:
        return seq.token_ids[index * self.block_size : (index + 1) * self.block_size]

    def block_hash(self, seq: Sequence, index: int) -> bytes:
        """Chained hash of the seq's full block `index`, memoized on the sequence."""
        hashes = seq.block_hashes
        while len(hashes) <= index:
            i = len(hashes)
            parent = hashes[i - 1] if i else chain_root(self.model_digest, seq.params.cache_salt)
            hashes.append(hash_block(parent, self._block_tokens(seq, i)))
        return hashes[index]

    def block_ref(self, seq: Sequence, index: int) -> BlockRef:
        """Key and token ids of seq's full block `index` (what the lower tiers look up)."""
        return BlockRef(self.block_hash(seq, index), tuple(self._block_tokens(seq, index)))

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of seq's tokens (read-only).

        Only full blocks are shared, and never the block holding the last token: at least one
        token is always computed, so the step has logits to sample from.
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        for i in range((seq.num_tokens - 1) // self.block_size):
            block_id = self._cached.get(self.block_hash(seq, i))
            if block_id is None or self.blocks[block_id].token_ids != tuple(
                self._block_tokens(seq, i)
            ):
                break
            hits.append(block_id)
        return hits

    def find_partial(self, seq: Sequence, holders: Iterable[Sequence]) -> tuple[int, int] | None:
        """A holder's block with the KV of seq's tokens after its cacheable full blocks, up to
        (not including) its last token: `(block id, slots)` to copy into a fresh block of seq.

        Call when every cacheable full block of seq is a hit. The holder (a running sequence,
        e.g. choice 0 of an `n > 1` request) must continue the same chain (equal key of the
        block before), hold the same token ids there and have computed them; its slots there
        never change again, so a copy before the step's forward pass is exact. None if no
        holder fits or there is nothing to copy.
        """
        if not self.enable_prefix_caching:
            return None
        bs = self.block_size
        index = (seq.num_tokens - 1) // bs
        start, end = index * bs, seq.num_tokens - 1
        if end == start:
            return None
        tokens = seq.token_ids[start:end]

        def parent_key(s: Sequence) -> bytes:
            return (
                self.block_hash(s, index - 1)
                if index
                else chain_root(self.model_digest, s.params.cache_salt)
            )

        key = parent_key(seq)
        for other in holders:
            if (
                other is not seq
                and other.num_computed_tokens >= end
                and len(other.block_table) > index
                and other.token_ids[start:end] == tokens
                and parent_key(other) == key
            ):
                return other.block_table[index], end - start
        return None

    def num_free_among(self, block_ids: list[int]) -> int:
        """How many of these (cached) blocks sit in the free list: taking them uses free blocks."""
        return sum(1 for b in block_ids if self.blocks[b].ref_count == 0)

    def num_max_cacheable_blocks(self, seq: Sequence) -> int:
        return (seq.num_tokens - 1) // self.block_size if self.enable_prefix_caching else 0

    # ---- allocation -------------------------------------------------------------------------

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _pop_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict: the cache entry dies with the block's contents
            if self._cached.get(block.hash) == block_id:
                del self._cached[block.hash]
                if self.on_evict is not None:
                    assert block.token_ids is not None
                    self.on_evict(block_id, BlockRef(block.hash, block.token_ids))
            block.reset()
        block.ref_count = 1
        return block_id

    def admit(
        self,
        seq: Sequence,
        cached_block_ids: list[int],
        first_time: bool,
        lower: Seq[BlockRef] = (),
    ) -> list[int]:
        """Give a sequence with no blocks the cached prefix found by `find_cached_prefix`.

        `lower` continues that prefix with blocks found in a lower tier: each gets a fresh
        block, registered now; their ids are returned, and the caller must have their KV
        copied in before the step's forward pass.
        """
        assert not seq.block_table, f"{seq} already holds blocks"
        if len(lower) > len(self._free) - self.num_free_among(cached_block_ids):
            raise RuntimeError(f"{seq} needs {len(lower)} blocks for its lower-tier hits")
        for block_id in cached_block_ids:
            self._take(block_id)
        filled: list[int] = []
        for ref in lower:
            block_id = self._pop_free()
            block = self.blocks[block_id]
            block.hash, block.token_ids = ref.key, ref.token_ids
            self._cached[ref.key] = block_id
            filled.append(block_id)
        seq.block_table = [*cached_block_ids, *filled]
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        if first_time and self.enable_prefix_caching:
            self.prefix_cache_queries += self.num_max_cacheable_blocks(seq)
            self.prefix_cache_hits += len(seq.block_table)
        return filled

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Extend seq's block table to cover positions [0, num_tokens) with fresh blocks."""
        need = self.num_new_blocks(seq, num_tokens)
        if need > len(self._free):
            raise RuntimeError(f"{seq} needs {need} blocks, only {len(self._free)} free")
        seq.block_table.extend(self._pop_free() for _ in range(need))

    def free(self, seq: Sequence) -> None:
        """Release seq's blocks, tail first, so a sequence's tail is evicted before its prefix."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self._release(block_id)
        seq.block_table = []

    def _release(self, block_id: int) -> None:
        self._free[block_id] = None
        if self.blocks[block_id].hash is None:  # nothing to reuse: hand it out first
            self._free.move_to_end(block_id, last=False)

    # ---- registration -----------------------------------------------------------------------

    def register_computed(self, seq: Sequence, old_computed: int, new_computed: int) -> None:
        """Enter the blocks that became full between the two computed counts into the cache.

        Call only once their KV is written. If an identical block is already cached (another
        request computed the same prefix in the same steps), the sequence switches to it and
        its own copy is released, so concurrent requests end up holding one physical copy.
        """
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(old_computed // bs, new_computed // bs):
            block_id = seq.block_table[i]
            block = self.blocks[block_id]
            if block.hash is not None:  # already registered (a cache hit)
                continue
            h = self.block_hash(seq, i)
            tokens = tuple(self._block_tokens(seq, i))
            existing = self._cached.get(h)
            if existing is None:
                block.hash, block.token_ids = h, tokens
                self._cached[h] = block_id
                if self.on_register is not None:
                    self.on_register(block_id, BlockRef(h, tokens))
            elif self.blocks[existing].token_ids == tokens:
                assert block.ref_count == 1, f"unregistered block {block_id} is shared"
                self._take(existing)
                seq.block_table[i] = existing
                block.ref_count = 0
                self._release(block_id)

    # ---- checks -----------------------------------------------------------------------------

    def check_integrity(self, seqs: Iterable[Sequence] | None = None) -> None:
        """Assert the pool's invariants; given `seqs` (every holder), that ref counts match them."""
        assert len(self._free) + self.num_used_blocks == self.num_blocks
        for block in self.blocks:
            in_free = block.block_id in self._free
            assert in_free == (block.ref_count == 0), (
                f"block {block.block_id}: ref {block.ref_count}, free {in_free}"
            )
            assert block.ref_count >= 0
            assert (block.hash is None) == (block.token_ids is None)
        for h, block_id in self._cached.items():
            block = self.blocks[block_id]
            assert block.hash == h, f"cache entry for block {block_id} has a stale hash"
            assert block.token_ids is not None and len(block.token_ids) == self.block_size
        if seqs is None:
            return
        counts = [0] * self.num_blocks
        for seq in seqs:
            assert len(set(seq.block_table)) == len(seq.block_table), f"{seq} repeats a block"
            assert len(seq.block_table) >= self.blocks_for(seq.num_computed_tokens)
            for i, block_id in enumerate(seq.block_table):
                counts[block_id] += 1
                block = self.blocks[block_id]
                if block.hash is not None:  # a cached block must hold exactly this prefix
                    assert block.hash == self.block_hash(seq, i), f"{seq} block {i} hash mismatch"
                    assert (i + 1) * self.block_size <= seq.num_computed_tokens
        for block in self.blocks:
            assert counts[block.block_id] == block.ref_count, (
                f"block {block.block_id}: ref {block.ref_count}, held by {counts[block.block_id]}"
            )
