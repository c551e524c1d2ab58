"""The torch paged attention (the CPU path) against a dense float64 attention written from scratch.

The Triton kernels are tested against this backend, and the engine's batched-equals-solo
tests rest on its batch invariance, so both are pinned here: values to a naive per-sequence
softmax(QK^T)V with the bottom-right causal mask, and bits of each sequence alone vs batched.
"""

from __future__ import annotations

import random

import pytest
import torch

from engine.layers.attention import AttentionMetadata, paged_attention_torch
from tests.test_kernels import make_batch


def dense_reference(batch) -> torch.Tensor:
    """Gather each sequence's keys through its block table, attend in float64."""
    m = batch.meta
    q = batch.q.double()
    block_size, num_kv_heads = batch.k_cache.shape[1], batch.k_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    out = torch.empty_like(q)
    start = 0
    for s, (query_len, seq_len) in enumerate(zip(m.query_lens_cpu, m.seq_lens_cpu)):
        slots = [
            int(m.block_tables[s, p // block_size]) * block_size + p % block_size
            for p in range(seq_len)
        ]
        keys = batch.k_cache.reshape(-1, num_kv_heads, batch.k_cache.shape[-1])[slots].double()
        values = batch.v_cache.reshape(-1, num_kv_heads, batch.v_cache.shape[-1])[slots].double()
        keys = keys.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, L, D]
        values = values.repeat_interleave(group, dim=1).transpose(0, 1)
        queries = q[start : start + query_len].transpose(0, 1)  # [H, T, D]
        scores = queries @ keys.transpose(1, 2) * batch.scale
        visible = torch.ones(query_len, seq_len, dtype=torch.bool).tril(seq_len - query_len)
        scores = scores.masked_fill(~visible, float("-inf"))
        out[start : start + query_len] = (scores.softmax(-1) @ values).transpose(0, 1)
        start += query_len
    return out


def attend(batch) -> torch.Tensor:
    return paged_attention_torch(batch.q, batch.k_cache, batch.v_cache, batch.meta, batch.scale)


def mixed_pairs(rng: random.Random) -> list[tuple[int, int]]:
    """Decodes of equal and of different lengths, a fresh prompt, chunks after cached prefixes
    (ending mid-block and on a block edge), shuffled."""
    pairs = [(1, 37), (1, 37), (1, 37), (1, 5), (1, 64)]
    pairs.append((n := rng.randrange(2, 40), n))
    pairs.append((rng.randrange(2, 30), 0))
    pairs[-1] = (pairs[-1][0], pairs[-1][0] + rng.randrange(1, 50))
    pairs.append((16, 48))
    rng.shuffle(pairs)
    return pairs


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("group", [1, 4])
def test_torch_attention_matches_dense_reference(seed, group):
    batch = make_batch(
        mixed_pairs(random.Random(seed)),
        num_kv_heads=2,
        group=group,
        head_dim=64,
        block_size=16,
        dtype=torch.float32,
        seed=seed,
        device="cpu",
    )
    torch.testing.assert_close(attend(batch).double(), dense_reference(batch), rtol=1e-5, atol=1e-5)


def test_long_chunk_after_long_prefix_matches_dense_reference():
    batch = make_batch(
        [(300, 1000), (1, 700)],
        num_kv_heads=2,
        group=2,
        head_dim=128,
        block_size=32,
        dtype=torch.float32,
        seed=7,
        device="cpu",
    )
    torch.testing.assert_close(attend(batch).double(), dense_reference(batch), rtol=1e-5, atol=1e-5)


def _single(batch, s: int):
    """Sequence s of the batch as a batch of its own (same cache, same block table row)."""
    m = batch.meta
    start = sum(m.query_lens_cpu[:s])
    query_len, seq_len = m.query_lens_cpu[s], m.seq_lens_cpu[s]
    meta = AttentionMetadata(
        slot_mapping=m.slot_mapping[start : start + query_len],
        query_start_loc=torch.tensor([0, query_len], dtype=torch.int32),
        seq_lens=torch.tensor([seq_len], dtype=torch.int32),
        block_tables=m.block_tables[s : s + 1],
        max_query_len=query_len,
        max_seq_len=seq_len,
        query_lens_cpu=[query_len],
        seq_lens_cpu=[seq_len],
    )
    return batch.q[start : start + query_len], meta, start


@pytest.mark.parametrize("seed", range(3))
def test_each_sequence_gets_the_same_bits_alone_and_batched(seed):
    batch = make_batch(
        mixed_pairs(random.Random(seed)),
        num_kv_heads=2,
        group=4,
        head_dim=64,
        block_size=16,
        dtype=torch.float32,
        seed=seed,
        device="cpu",
    )
    batched = attend(batch)
    for s in range(batch.meta.num_seqs):
        q, meta, start = _single(batch, s)
        alone = paged_attention_torch(q, batch.k_cache, batch.v_cache, meta, batch.scale)
        assert torch.equal(alone, batched[start : start + q.shape[0]]), f"sequence {s} differs"


@pytest.mark.parametrize("seed", range(2))
def test_native_bf16_decode_is_close_and_batch_invariant(seed):
    """PAGECHAT_CPU_ATTENTION=native: bf16 decodes in bf16 stay within bf16 rounding of the
    float64 reference and keep their bits whatever their batch mates."""
    batch = make_batch(
        mixed_pairs(random.Random(seed)),
        num_kv_heads=2,
        group=4,
        head_dim=64,
        block_size=16,
        dtype=torch.bfloat16,
        seed=seed,
        device="cpu",
    )
    native = paged_attention_torch(
        batch.q, batch.k_cache, batch.v_cache, batch.meta, batch.scale, native_decode=True
    )
    torch.testing.assert_close(native.double(), dense_reference(batch), rtol=2e-2, atol=2e-2)
    for s in range(batch.meta.num_seqs):
        q, meta, start = _single(batch, s)
        alone = paged_attention_torch(
            q, batch.k_cache, batch.v_cache, meta, batch.scale, native_decode=True
        )
        assert torch.equal(alone, native[start : start + q.shape[0]]), f"sequence {s} differs"


def test_cpu_attention_setting(monkeypatch):
    from pydantic import ValidationError

    from engine.config import EngineConfig
    from engine.layers.attention import TorchAttentionBackend, get_attention_backend

    monkeypatch.delenv("PAGECHAT_CPU_ATTENTION", raising=False)
    assert EngineConfig().cpu_attention == "auto"
    backend = get_attention_backend("torch", EngineConfig().cpu_attention)
    assert isinstance(backend, TorchAttentionBackend)
    assert (backend.native_decode, backend.native_prefill) == (False, True)
    monkeypatch.setenv("PAGECHAT_CPU_ATTENTION", "float32")
    backend = get_attention_backend("torch", EngineConfig().cpu_attention)
    assert isinstance(backend, TorchAttentionBackend)
    assert (backend.native_decode, backend.native_prefill) == (False, False)
    monkeypatch.setenv("PAGECHAT_CPU_ATTENTION", "native")
    backend = get_attention_backend("torch", EngineConfig().cpu_attention)
    assert isinstance(backend, TorchAttentionBackend)
    assert (backend.native_decode, backend.native_prefill) == (True, True)
    monkeypatch.setenv("PAGECHAT_CPU_ATTENTION", "bogus")
    with pytest.raises(ValidationError, match="cpu_attention"):
        EngineConfig()
