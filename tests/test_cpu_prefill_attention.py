"""The engine's prompt attention (engine.cpu_kernels.prefill_attention: AMX tiles, or AVX512-BF16
register tiles where there is no AMX, vdpbf16ps or float32 FMAs) against float64 attention and
against sdpa's bf16 flash kernel it replaces: fresh prompts and chunks after cached prefixes,
block sizes, GQA groups, lengths off every block edge; batch- and thread-count invariance."""

from __future__ import annotations

import random

import pytest
import torch

from engine.cpu_kernels import prefill_attention as cpu_prefill_attention
from engine.cpu_kernels.build import load
from engine.layers.attention import paged_attention_torch
from tests.test_attention_torch import _single, dense_reference
from tests.test_kernels import make_batch


def _native() -> bool:
    lib = load()
    return lib is not None and lib.pc_prefill_attention_level() >= 1


pytestmark = pytest.mark.skipif(not _native(), reason="this CPU (or build) has no AVX512-BF16")


def test_the_kernel_level_matches_what_torch_reports_about_this_cpu():
    lib = load()
    assert lib is not None
    amx = torch.cpu._is_amx_tile_supported()
    assert lib.pc_prefill_attention_level() == (2 if amx else 1)


def prompt_batch(pairs, group=2, block_size=16, head_dim=128, seed=0, dtype=torch.bfloat16):
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


def attend(batch) -> torch.Tensor:
    return paged_attention_torch(
        batch.q, batch.k_cache, batch.v_cache, batch.meta, batch.scale, native_prefill=True
    )


def test_the_kernel_serves_bf16_prompts_and_nothing_else():
    batch = prompt_batch([(40, 40)])
    assert cpu_prefill_attention.available(batch.q, batch.k_cache)
    f32 = prompt_batch([(40, 40)], dtype=torch.float32)
    assert not cpu_prefill_attention.available(f32.q, f32.k_cache)
    odd = prompt_batch([(40, 40)], head_dim=48)
    assert not cpu_prefill_attention.available(odd.q, odd.k_cache)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("group,block_size,head_dim", [(1, 16, 128), (4, 16, 64), (2, 32, 256)])
def test_prompts_and_chunks_match_float64(seed, group, block_size, head_dim, bf16_math):
    """Within what bf16 probabilities and one rounding of the output allow."""
    rng = random.Random(seed)
    # (query_len, seq_len): fresh prompts, chunks after prefixes, one token after a prefix,
    # lengths on and off the 32-query and 128-key block edges
    pairs = [(1, 1), (rng.randrange(2, 70), 0), (128, 128), (33, 161), (1, 300), (200, 531)]
    pairs = [(t, s if s else t) for t, s in pairs]
    batch = prompt_batch(pairs, group, block_size, head_dim, seed)
    out = attend(batch)
    reference = dense_reference(batch)
    torch.testing.assert_close(out.double(), reference, rtol=2**-7, atol=4e-3)


def test_as_close_to_float64_as_sdpa_bf16(monkeypatch, bf16_math):
    """The kernel's error stays within sdpa's own bf16 flash kernel's, on a long prompt."""
    batch = prompt_batch([(700, 700), (300, 1100)], group=2, seed=7)
    reference = dense_reference(batch)
    ours = (attend(batch).double() - reference).abs()
    monkeypatch.setattr(cpu_prefill_attention, "available", lambda q, k: False)
    theirs = (attend(batch).double() - reference).abs()
    assert ours.mean() <= theirs.mean() * 1.25
    assert ours.max() <= theirs.max() * 2


def test_bits_do_not_depend_on_batch_mates_or_thread_count(bf16_math):
    batch = prompt_batch([(90, 90), (40, 250), (1, 77), (300, 300)], seed=3)
    batched = attend(batch)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = attend(batch)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(batched, one_thread)
    for s in range(batch.meta.num_seqs):
        q, meta, start = _single(batch, s)
        alone = paged_attention_torch(
            q, batch.k_cache, batch.v_cache, meta, batch.scale, native_prefill=True
        )
        assert torch.equal(alone, batched[start : start + q.shape[0]]), f"sequence {s} differs"
