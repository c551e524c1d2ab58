"""Block pool and prefix cache invariants, driven directly (no scheduler, no model)."""

from __future__ import annotations

import hashlib

import pytest

import engine.block_manager as block_manager
from engine.block_manager import BlockManager, hash_block
from engine.kv_keys import chain_root
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

BS = 16


def make_seq(tokens: list[int], rid: str = "r") -> Sequence:
    return Sequence(rid, tokens, SamplingParams())


def admit_and_compute(bm: BlockManager, seq: Sequence, first_time: bool = True) -> list[int]:
    """What the scheduler does for a sequence whose whole token list is then computed."""
    hits = bm.find_cached_prefix(seq)
    bm.admit(seq, hits, first_time)
    start = seq.num_computed_tokens
    bm.allocate(seq, seq.num_tokens)
    bm.register_computed(seq, start, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    return hits


def check(bm: BlockManager, *holders: Sequence) -> None:
    bm.check_integrity(list(holders))


def test_hash_is_chained_and_stable():
    a, b, c = list(range(BS)), list(range(100, 100 + BS)), list(range(200, 200 + BS))
    root = chain_root(b"", None)
    h_a = hash_block(root, a)
    # Stable across processes: an independent BLAKE2b over the documented bytes gives the key.
    expected = hashlib.blake2b(
        root + b"".join(t.to_bytes(4, "little") for t in a), digest_size=32, person=b"pagechat.block"
    )
    assert h_a == expected.digest()
    assert hash_block(h_a, b) == hash_block(hash_block(root, a), b)
    # Block b after a differs from block b after c: the hash names the whole prefix.
    assert hash_block(h_a, b) != hash_block(hash_block(root, c), b)
    assert hash_block(root, b) != hash_block(h_a, b)


def test_a_cache_salt_separates_otherwise_equal_prefixes():
    bm = BlockManager(num_blocks=64, block_size=BS)
    tokens = list(range(3 * BS + 1))

    def salted(rid: str, salt: str | None) -> Sequence:
        return Sequence(rid, tokens, SamplingParams(cache_salt=salt))

    alice = salted("alice", "tenant-a")
    admit_and_compute(bm, alice)
    assert bm.find_cached_prefix(salted("alice-again", "tenant-a")) == alice.block_table[:3]
    for rid, salt in [("bob", "tenant-b"), ("unsalted", None)]:
        other = salted(rid, salt)
        assert bm.find_cached_prefix(other) == [], salt
        admit_and_compute(bm, other)  # its own copy: the same tokens, another chain
        assert not set(other.block_table) & set(alice.block_table)
        check(bm, alice, other)
        bm.free(other)
    bm.free(alice)
    check(bm)


def test_the_model_digest_roots_every_key():
    tokens = list(range(2 * BS + 1))
    seqs = []
    for digest in (b"model-a", b"model-b"):
        bm = BlockManager(num_blocks=8, block_size=BS, model_digest=digest)
        seq = make_seq(tokens, digest.decode())
        admit_and_compute(bm, seq)
        seqs.append(seq)
    assert not set(seqs[0].block_hashes) & set(seqs[1].block_hashes)


def test_chained_hits_and_misses():
    bm = BlockManager(num_blocks=32, block_size=BS)
    base = list(range(1000, 1000 + 3 * BS + 5))  # 3 full blocks and a partial one
    first = make_seq(base, "first")
    assert admit_and_compute(bm, first) == []
    check(bm, first)
    assert bm.num_cached_blocks == 3

    same_two = make_seq(base[: 2 * BS] + [7] * (BS + 3), "same-two")
    hits = bm.find_cached_prefix(same_two)
    assert hits == first.block_table[:2]

    # Same second and third blocks after a different first block: no hit at all (chained).
    other_first = make_seq([5] * BS + base[BS:], "other-first")
    assert bm.find_cached_prefix(other_first) == []

    # A change in the middle of block 1 keeps only block 0.
    changed = list(base)
    changed[BS + 4] += 1
    assert bm.find_cached_prefix(make_seq(changed, "changed")) == first.block_table[:1]
    bm.free(first)
    check(bm)


def test_hit_on_block_in_use_shares_it_and_one_copy_for_four_requests():
    bm = BlockManager(num_blocks=64, block_size=BS)
    prefix = list(range(5000, 5200))  # 200 tokens: 12 full blocks + 8 tokens
    seqs = [make_seq(prefix + [i] * (3 + i), f"r{i}") for i in range(4)]
    admit_and_compute(bm, seqs[0])
    for seq in seqs[1:]:
        hits = admit_and_compute(bm, seq)
        assert hits == seqs[0].block_table[:12]
        assert seq.num_computed_tokens == seq.num_tokens
        check(bm, *seqs[: seqs.index(seq) + 1])
    for block_id in seqs[0].block_table[:12]:
        assert bm.blocks[block_id].ref_count == 4
    # 12 shared blocks plus one private tail block each.
    assert bm.num_used_blocks == 12 + 4
    assert len({b for s in seqs for b in s.block_table}) == 16
    for seq in seqs:
        bm.free(seq)
    check(bm)
    assert bm.num_used_blocks == 0


def test_hit_on_freed_block_takes_it_back_from_the_free_list():
    bm = BlockManager(num_blocks=8, block_size=BS)
    tokens = list(range(2 * BS + 1))
    first = make_seq(tokens, "a")
    admit_and_compute(bm, first)
    cached = first.block_table[:2]
    bm.free(first)
    check(bm)
    assert bm.num_free_blocks == 8 and bm.num_cached_blocks == 2

    again = make_seq(tokens, "b")
    hits = bm.find_cached_prefix(again)
    assert hits == cached
    assert bm.num_free_among(hits) == 2
    bm.admit(again, hits, first_time=True)
    assert bm.num_free_blocks == 6
    assert [bm.blocks[b].ref_count for b in hits] == [1, 1]
    assert again.num_computed_tokens == 2 * BS
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (4, 2)  # 2 looked up twice
    check(bm, again)
    bm.allocate(again, again.num_tokens)
    check(bm, again)
    bm.free(again)
    check(bm)


def test_eviction_is_lru_and_a_sequence_tail_goes_first():
    bm = BlockManager(num_blocks=9, block_size=BS)
    a = make_seq(list(range(4 * BS)) + [1], "a")  # 4 full blocks + 1 token
    b = make_seq(list(range(500, 500 + 3 * BS)) + [1], "b")
    admit_and_compute(bm, a)
    admit_and_compute(bm, b)
    assert bm.num_free_blocks == 0
    bm.free(a)  # a freed first: least recently used
    bm.free(b)
    check(bm)

    def cached_blocks(tokens: list[int]) -> int:
        return len(bm.find_cached_prefix(make_seq(tokens + [9], "probe")))

    a_tokens, b_tokens = a.token_ids[:-1], b.token_ids[:-1]
    assert (cached_blocks(a_tokens), cached_blocks(b_tokens)) == (4, 3)
    # The never-hashed tail blocks (a's and b's last partial blocks) are handed out first.
    c = make_seq([7] * (2 * BS), "c")
    bm.admit(c, [], True)
    bm.allocate(c, 2 * BS)
    assert (cached_blocks(a_tokens), cached_blocks(b_tokens)) == (4, 3)
    # Then a's blocks, tail first: its prefix survives longest.
    expected_a = [3, 2, 1, 0]
    for left in expected_a:
        bm.allocate(c, (len(c.block_table) + 1) * BS)
        assert cached_blocks(a_tokens) == left
        assert cached_blocks(b_tokens) == 3
        check(bm, c)
    bm.allocate(c, (len(c.block_table) + 1) * BS)
    assert cached_blocks(b_tokens) == 2
    bm.free(c)
    check(bm)


def test_no_partial_block_is_shared():
    bm = BlockManager(num_blocks=16, block_size=BS)
    first = make_seq(list(range(BS + 10)), "a")  # one full block + 10 tokens, all computed
    admit_and_compute(bm, first)
    assert bm.num_cached_blocks == 1
    longer = make_seq(list(range(BS + 10)) + [99] * 20, "b")
    assert bm.find_cached_prefix(longer) == first.block_table[:1]
    bm.free(first)
    check(bm)


def test_the_block_with_the_last_token_is_always_recomputed():
    bm = BlockManager(num_blocks=16, block_size=BS)
    tokens = list(range(2 * BS))
    first = make_seq(tokens, "a")
    admit_and_compute(bm, first)
    assert bm.num_cached_blocks == 2
    # The identical prompt must still compute its last token: only block 0 is reused.
    same = make_seq(tokens, "b")
    assert bm.find_cached_prefix(same) == first.block_table[:1]
    one_more = make_seq(tokens + [5], "c")
    assert bm.find_cached_prefix(one_more) == first.block_table[:2]
    single = make_seq(tokens[:1], "d")
    assert bm.find_cached_prefix(single) == []
    bm.free(first)
    check(bm)


def test_a_hit_needs_equal_token_ids_not_only_an_equal_hash(monkeypatch):
    monkeypatch.setattr(block_manager, "hash_block", lambda parent, tokens: b"\0" * 32)
    bm = BlockManager(num_blocks=16, block_size=BS)
    first = make_seq(list(range(2 * BS)) + [1], "a")
    admit_and_compute(bm, first)
    # Every block collides; only block 0 could be registered, and only equal tokens hit it.
    assert bm.num_cached_blocks == 1
    other = make_seq([42] * (2 * BS) + [1], "b")
    assert bm.find_cached_prefix(other) == []
    same_start = make_seq(list(range(BS)) + [42] * BS + [1], "c")
    assert bm.find_cached_prefix(same_start) == first.block_table[:1]
    bm.free(first)
    check(bm)


def test_concurrent_copies_of_one_prefix_collapse_into_one_on_registration():
    bm = BlockManager(num_blocks=32, block_size=BS)
    prefix = list(range(3 * BS))
    a, b = make_seq(prefix + [1, 2], "a"), make_seq(prefix + [3], "b")
    # Both admitted before either registered anything (same step): each computes its own copy.
    for seq in (a, b):
        bm.admit(seq, bm.find_cached_prefix(seq), True)
        bm.allocate(seq, seq.num_tokens)
    assert bm.num_used_blocks == 8
    for seq in (a, b):
        bm.register_computed(seq, 0, seq.num_tokens)
        seq.num_computed_tokens = seq.num_tokens
    check(bm, a, b)
    assert a.block_table[:3] == b.block_table[:3]
    assert bm.num_used_blocks == 5
    bm.free(a)
    bm.free(b)
    check(bm)


def test_prefix_caching_off_never_hits_or_registers():
    bm = BlockManager(num_blocks=16, block_size=BS, enable_prefix_caching=False)
    tokens = list(range(3 * BS + 1))
    first = make_seq(tokens, "a")
    admit_and_compute(bm, first)
    assert bm.num_cached_blocks == 0
    assert bm.find_cached_prefix(make_seq(tokens, "b")) == []
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (0, 0)
    bm.free(first)
    check(bm)


def test_allocation_beyond_the_pool_raises_and_changes_nothing():
    bm = BlockManager(num_blocks=2, block_size=BS)
    seq = make_seq(list(range(3 * BS)), "a")
    with pytest.raises(RuntimeError, match="needs 3 blocks, only 2 free"):
        bm.allocate(seq, 3 * BS)
    assert seq.block_table == [] and bm.num_free_blocks == 2
    check(bm, seq)


def test_check_integrity_catches_corruption():
    bm = BlockManager(num_blocks=4, block_size=BS)
    seq = make_seq(list(range(BS + 1)), "a")
    admit_and_compute(bm, seq)
    check(bm, seq)
    bm.blocks[seq.block_table[0]].ref_count += 1
    with pytest.raises(AssertionError, match="ref 2, held by 1"):
        check(bm, seq)
    bm.blocks[seq.block_table[0]].ref_count -= 1
    with pytest.raises(AssertionError, match="held by 0"):
        check(bm)  # a holder not reported: its blocks look leaked
    bm.free(seq)
    check(bm)
