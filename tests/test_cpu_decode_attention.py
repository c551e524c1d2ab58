"""The C decode attention (engine.cpu_kernels.paged_attention) against float64 and against the
gather + sdpa path it replaces, for float32 and bfloat16 caches."""

from __future__ import annotations

import random

import pytest
import torch

from engine.cpu_kernels import paged_attention as cpu_decode_attention
from engine.cpu_kernels.build import compiler, load
from engine.layers.attention import paged_attention_torch
from tests.test_attention_torch import _single, dense_reference
from tests.test_kernels import make_batch

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C compiler on this machine")


def decode_batch(dtype: torch.dtype, seed: int, group: int = 2, block_size: int = 16, head_dim: int = 128):
    rng = random.Random(seed)
    pairs = [(1, rng.randrange(2, 300)) for _ in range(5)] + [(1, 17), (1, 17), (1, 2)]
    return make_batch(
        pairs,
        num_kv_heads=2,
        group=group,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        seed=seed,
        device="cpu",
    )


def test_the_kernel_serves_float32_and_bfloat16_cpu_caches():
    for dtype in (torch.float32, torch.bfloat16):
        batch = decode_batch(dtype, 0)
        assert cpu_decode_attention.available(batch.q, batch.k_cache)
    half = decode_batch(torch.float16, 0)
    assert not cpu_decode_attention.available(half.q, half.k_cache)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("group,block_size", [(1, 16), (2, 16), (8, 32)])
def test_float32_decodes_match_float64(seed, group, block_size):
    batch = decode_batch(torch.float32, seed, group, block_size)
    out = paged_attention_torch(batch.q, batch.k_cache, batch.v_cache, batch.meta, batch.scale)
    torch.testing.assert_close(out.double(), dense_reference(batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_bfloat16_decodes_are_float32_math_on_the_bf16_cache(seed):
    """bf16 q/K/V widened exactly, float32 math, one rounding of the output to bf16."""
    batch = decode_batch(torch.bfloat16, seed)
    out = paged_attention_torch(batch.q, batch.k_cache, batch.v_cache, batch.meta, batch.scale)
    assert out.dtype == torch.bfloat16
    reference = dense_reference(batch)  # float64 of the same bf16 values
    torch.testing.assert_close(out.double(), reference, rtol=2**-8, atol=1e-4)


def test_the_kernel_agrees_with_the_gather_and_sdpa_path(monkeypatch):
    batch = decode_batch(torch.float32, 4)
    fast = paged_attention_torch(batch.q, batch.k_cache, batch.v_cache, batch.meta, batch.scale)
    monkeypatch.setattr(cpu_decode_attention, "available", lambda q, k: False)
    slow = paged_attention_torch(batch.q, batch.k_cache, batch.v_cache, batch.meta, batch.scale)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)


def test_bits_do_not_depend_on_batch_mates_or_thread_count():
    batch = decode_batch(torch.bfloat16, 5)
    batched = paged_attention_torch(batch.q, batch.k_cache, batch.v_cache, batch.meta, batch.scale)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = paged_attention_torch(
            batch.q, batch.k_cache, batch.v_cache, batch.meta, batch.scale
        )
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(batched, one_thread)
    for s in range(batch.meta.num_seqs):
        q, meta, start = _single(batch, s)
        alone = paged_attention_torch(q, batch.k_cache, batch.v_cache, meta, batch.scale)
        assert torch.equal(alone, batched[start : start + 1]), f"sequence {s} differs"


@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16", "AMX"),
    reason="the AVX2 build runs here only on an AVX512 CPU (elsewhere it is the native one)",
)
@pytest.mark.parametrize("head_dim", [128, 36])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_an_avx2_cpu_runs_matches_float64(dtype, head_dim):
    """The kernel as an AVX2 CPU compiles it: its AVX2 intrinsics where the head size is a
    multiple of 8 (128), else the portable loops (36) that other CPUs (ARM) run too."""
    lib = load("x86-64-v3")
    assert lib is not None
    batch = decode_batch(dtype, 6, group=4, head_dim=head_dim)
    m = batch.meta
    rows = torch.tensor([sum(m.query_lens_cpu[:s]) for s in range(m.num_seqs)])
    out = torch.zeros_like(batch.q)
    cpu_decode_attention.decode_attention(
        batch.q, out, rows, batch.k_cache, batch.v_cache, m.block_tables, m.seq_lens,
        batch.scale, lib=lib,
    )
    tolerance = 1e-5 if dtype == torch.float32 else 2**-8
    torch.testing.assert_close(out.double(), dense_reference(batch), rtol=tolerance, atol=1e-4)


def _kernel_builds() -> list[str]:
    """This CPU's build, and the AVX2 one where this CPU runs it (an AVX512 one)."""
    avx512 = torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX")
    return ["native", "x86-64-v3"] if avx512 else ["native"]


def _decode(batch, lib, q=None, meta=None) -> torch.Tensor:
    q = batch.q if q is None else q
    m = batch.meta if meta is None else meta
    rows = torch.tensor([sum(m.query_lens_cpu[:s]) for s in range(m.num_seqs)])
    out = torch.zeros_like(q)
    cpu_decode_attention.decode_attention(
        q, out, rows, batch.k_cache, batch.v_cache, m.block_tables, m.seq_lens, batch.scale,
        lib=lib,
    )
    return out


@pytest.mark.parametrize("march", _kernel_builds())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_contexts_split_into_work_units_match_float64_and_stay_batch_invariant(march, dtype):
    """A sequence longer than the kernel's work unit (64 keys) is attended a unit at a time,
    on every thread, and the units merged in order: exactly one unit, one key more, several
    units with a short last one, and past 64 units (4,096 keys) 64 longer ones. float64
    agrees; the bits depend neither on the thread count nor on the batch mates (the split
    depends on the sequence's own length only)."""
    lib = load(march)
    assert lib is not None
    batch = make_batch(
        [(1, 64), (1, 65), (1, 1100), (1, 3), (1, 4161)],
        num_kv_heads=2,
        group=4,
        head_dim=128,
        block_size=16,
        dtype=dtype,
        seed=8,
        device="cpu",
    )
    out = _decode(batch, lib)
    tolerance = 1e-5 if dtype == torch.float32 else 2**-8
    torch.testing.assert_close(out.double(), dense_reference(batch), rtol=tolerance, atol=1e-4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(_decode(batch, lib), out)
    finally:
        torch.set_num_threads(threads)
    for s in range(batch.meta.num_seqs):
        q, meta, start = _single(batch, s)
        assert torch.equal(_decode(batch, lib, q, meta), out[start : start + 1]), (march, s)
