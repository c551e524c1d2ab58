"""CPU precisions end to end on the tiny checkpoint: bf16 math, bf16 weights with float32 math.

No test fakes the CPU: the choice under dtype=auto is checked against what torch reports, and
bf16 runs on whatever kernel this CPU gets for it (oneDNN where native, F.linear elsewhere).
"""

from __future__ import annotations

import logging

import pytest
import torch

from engine import LLM, SamplingParams
from engine.cpu_capability import Precision
from engine.layers.attention import TorchAttentionBackend
from engine.model_config import ModelConfig
from engine.models.loader import load_model
from engine.tiny import write_checkpoint
from tests.engine_helpers import random_prompts, torch_reports_native_bf16
from tests.test_model_parity import PagedCache

TOP_K = 5
NEW_TOKENS = 24


def check_logprobs_close(
    reference: list[list[int]],
    reference_top: list[list[dict[int, float]]],
    other: list[list[int]],
    other_top: list[list[dict[int, float]]],
) -> int:
    """vLLM's check_logprobs_close: greedy tokens agree until the first position where they
    differ, and there each side's token is among the other's top-k (a near-tie); nothing is
    compared after it (the continuations differ from there). Returns the tokens that agreed."""
    agreed = 0
    for i, (ref, out) in enumerate(zip(reference, other, strict=True)):
        for pos, (a, b) in enumerate(zip(ref, out, strict=True)):
            if a == b:
                agreed += 1
                continue
            assert a in other_top[i][pos] and b in reference_top[i][pos], (
                f"prompt {i}, token {pos}: float32 chose {a}, bf16 chose {b}, and they are not "
                f"each in the other's top {TOP_K}: {reference_top[i][pos]} vs {other_top[i][pos]}"
            )
            break
    return agreed


def greedy_with_top(llm: LLM, prompts: list[list[int]]):
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=TOP_K)
    outs = llm.generate(prompts, params)
    return [o.token_ids for o in outs], [o.logprobs for o in outs]


def test_bf16_greedy_matches_float32_until_a_near_tie(tiny_checkpoint):
    prompts = random_prompts([5, 17, 33, 64], seed=3)
    f32 = LLM(str(tiny_checkpoint), dtype="float32", kv_cache_memory_gb=0.05)
    assert f32.engine.runner.precision == Precision(torch.float32, torch.float32)
    ref_ids, ref_top = greedy_with_top(f32, prompts)
    del f32
    bf16 = LLM(str(tiny_checkpoint), dtype="bfloat16", kv_cache_memory_gb=0.05)
    assert bf16.engine.runner.precision == Precision(torch.bfloat16, torch.bfloat16)
    assert bf16.engine.runner.kv_cache.dtype == torch.bfloat16
    ids, top = greedy_with_top(bf16, prompts)
    agreed = check_logprobs_close(ref_ids, ref_top, ids, top)
    assert agreed >= NEW_TOKENS  # not vacuous (63 of 96 here): tokens agree before a near-tie


def test_bf16_weights_with_float32_math_equal_float32_on_the_upcast_weights(tiny_checkpoint):
    """What a CPU without native bf16 runs under auto: the float32 model whose weights were
    rounded to bf16, to float32 rounding (only the order of summation differs)."""
    config = ModelConfig.from_dir(tiny_checkpoint)
    backend = TorchAttentionBackend()
    weight_only = load_model(
        tiny_checkpoint, config, Precision(torch.bfloat16, torch.float32), "cpu", backend
    )
    reference = load_model(tiny_checkpoint, config, "float32", "cpu", backend)
    with torch.no_grad():
        for param in reference.parameters():
            param.copy_(param.bfloat16().float())
    assert {p.dtype for p in weight_only.parameters()} == {torch.bfloat16}
    prompts = random_prompts([1, 9, 40], seed=5, vocab=config.vocab_size)
    results = []
    for model in (weight_only, reference):
        cache = PagedCache(model, num_blocks=32, block_size=16, seed=0)
        seqs = [cache.add_sequence() for _ in prompts]
        prefill = cache.step(list(zip(seqs, prompts, strict=True)))
        decode = cache.step([(s, [7]) for s in seqs])  # one decode step on the cache
        results.append(torch.cat(prefill + decode))
    ours, expected = results
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_auto_on_a_bf16_checkpoint_follows_the_cpu(tmp_path, caplog):
    """dtype=auto on a bf16 checkpoint: bf16 math where torch reports native bf16 (oneDNN, and
    on x86 AVX512-BF16 or AMX), bf16 weights with float32 math elsewhere; the start-up log names
    the capability and the choice."""
    path = write_checkpoint(tmp_path / "bf16", shape="tiny", seed=1, torch_dtype="bfloat16")
    native = torch_reports_native_bf16()
    compute = torch.bfloat16 if native else torch.float32
    with caplog.at_level(logging.INFO, logger="engine.models.loader"):
        llm = LLM(str(path), kv_cache_memory_gb=0.05)
    runner = llm.engine.runner
    assert runner.precision == Precision(torch.bfloat16, compute)
    assert {p.dtype for p in runner.model.parameters()} == {torch.bfloat16}
    assert runner.kv_cache.dtype == compute
    log = caplog.text
    assert torch.backends.cpu.get_cpu_capability() in log
    assert f"bfloat16 weights, {str(compute).removeprefix('torch.')} math" in log
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=4))[0]
    assert len(out.token_ids) == 4


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_explicit_dtype_is_weights_and_math(tiny_checkpoint, dtype):
    llm = LLM(str(tiny_checkpoint), dtype=dtype, kv_cache_memory_gb=0.02)
    target = getattr(torch, dtype)
    assert llm.engine.runner.precision == Precision(target, target)
    out = llm.generate([[4, 5, 6]], SamplingParams(temperature=0.0, max_tokens=3))[0]
    assert len(out.token_ids) == 3
