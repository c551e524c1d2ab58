"""The one-call C decode step (engine.cpu_kernels.decoder_step) against the Python forward it
replaces: the same kernels in the same order, so the same bits, for bf16 weights on the CPU in
bf16 math and in float32 math (what a CPU without bf16 instructions runs)."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine import model_runner as model_runner_module
from engine.cpu_capability import Precision
from engine.cpu_kernels import decoder_step, packed_bf16
from engine.cpu_kernels.build import compiler

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C compiler on this machine")

PROMPTS = [list(range(300, 340)), list(range(1000, 1007)), [5, 6]]
BF16 = Precision(torch.bfloat16, torch.bfloat16)
BF16_WEIGHTS = Precision(torch.bfloat16, torch.float32)  # auto without bf16 instructions
PRECISIONS = pytest.mark.parametrize("precision", [BF16, BF16_WEIGHTS], ids=["bf16", "bf16w-f32"])


def run(checkpoint, monkeypatch, use_step: bool, calls: list[int], prompts=PROMPTS, precision=BF16,
        **engine):
    real = decoder_step.DecoderStep.run

    def counted(self, *args):
        calls.append(args[0].shape[0])
        return real(self, *args)

    monkeypatch.setattr(decoder_step.DecoderStep, "run", counted)
    monkeypatch.setattr(model_runner_module, "resolve_precision", lambda *a: precision)
    if not use_step:
        monkeypatch.setattr(decoder_step.DecoderStep, "serves_step", staticmethod(lambda *a: False))
    llm = LLM(str(checkpoint), kv_cache_memory_gb=0.05, block_size=16, **engine)
    assert llm.engine.runner.kv_cache.dtype == precision.compute_dtype
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3)
    outs = llm.generate(prompts, params)
    llm.engine.close()
    monkeypatch.undo()
    return [(o.token_ids, o.logprobs) for o in outs]


@PRECISIONS
def test_the_c_step_gives_the_python_forwards_bits(tiny_checkpoint, monkeypatch, precision):
    with_step: list[int] = []
    without: list[int] = []
    fast = run(tiny_checkpoint, monkeypatch, True, with_step, precision=precision)
    slow = run(tiny_checkpoint, monkeypatch, False, without, precision=precision)
    assert with_step and max(with_step) == len(PROMPTS)  # decode steps went through C...
    assert not without  # ...and the reference run never did
    assert fast == slow  # tokens and logprobs, bit for bit


@PRECISIONS
def test_a_batch_of_20_decodes_gives_the_python_forwards_bits(
    tiny_checkpoint, monkeypatch, precision
):
    """More rows than the few-rows kernel serves: the C step's matmuls run their many-row
    paths (AMX tiles, or without AMX the register tiles and the fused SwiGLU from 8 rows).
    The portable kernels (without AVX512-BF16), and float32 math everywhere, take up to
    WIDEN_MAX_ROWS rows (64); the answers are the same either way."""
    prompts = [list(range(100 + 37 * i, 110 + 41 * i)) for i in range(20)]
    with_step: list[int] = []
    fast = run(tiny_checkpoint, monkeypatch, True, with_step, prompts, precision)
    slow = run(tiny_checkpoint, monkeypatch, False, [], prompts, precision)
    assert 20 <= packed_bf16.WIDEN_MAX_ROWS
    assert with_step and max(with_step) == 20  # every kernel takes 20 rows itself
    assert fast == slow


def test_prompt_steps_and_float32_keep_the_python_forward(tiny_checkpoint, monkeypatch):
    calls: list[int] = []
    real = decoder_step.DecoderStep.run
    monkeypatch.setattr(
        decoder_step.DecoderStep, "run", lambda self, *a: calls.append(1) or real(self, *a)
    )
    llm = LLM(str(tiny_checkpoint), dtype="float32", kv_cache_memory_gb=0.05)
    llm.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=4))
    llm.engine.close()
    assert not calls
    hidden = torch.zeros(2, 8, dtype=torch.bfloat16)
    assert not decoder_step.DecoderStep.serves_step(hidden, [1, 3], [5, 9])  # a prompt chunk
    assert not decoder_step.DecoderStep.serves_step(hidden, [1, 1], [1, 9])  # a 1-token prompt
    assert decoder_step.DecoderStep.serves_step(hidden, [1, 1], [2, 9])
    assert decoder_step.DecoderStep.serves_step(hidden.float(), [1, 1], [2, 9])
    rows = packed_bf16.WIDEN_MAX_ROWS + 1  # float32 rows beyond the widening kernel's, but
    # AVX-512 and AVX2 builds widen at any row count (packed_bf16.widens_any_rows)
    served = decoder_step.DecoderStep.serves_step(torch.zeros(rows, 8), [1] * rows, [2] * rows)
    assert served == packed_bf16.widens_any_rows()


ANY_ROWS = pytest.mark.skipif(
    not packed_bf16.widens_any_rows(),
    reason="the float32-activation kernel serves any row count only in AVX-512 and AVX2 builds",
)


@ANY_ROWS
def test_float32_math_decodes_of_70_rows_give_the_python_forwards_bits(tiny_checkpoint, monkeypatch):
    """Beyond WIDEN_MAX_ROWS an AVX-512 or AVX2 build still takes the decode step in C."""
    prompts = [list(range(100 + 37 * i, 108 + 41 * i)) for i in range(70)]
    with_step: list[int] = []
    fast = run(tiny_checkpoint, monkeypatch, True, with_step, prompts, BF16_WEIGHTS, max_num_seqs=70)
    slow = run(tiny_checkpoint, monkeypatch, False, [], prompts, BF16_WEIGHTS, max_num_seqs=70)
    assert with_step and max(with_step) == 70 > packed_bf16.WIDEN_MAX_ROWS
    assert fast == slow


@pytest.fixture(scope="module")
def wide_mlp_checkpoint(tmp_path_factory):
    """The tiny shape with a 1,536-wide MLP: torch's float32 matmul sums a k of 384 or less in
    the widening kernel's order (the same bits), a longer one not."""
    from engine.tiny import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("wide-mlp"), shape="tiny", seed=0,
                            intermediate_size=1536)


@ANY_ROWS
def test_float32_math_answers_do_not_depend_on_their_batch_mates(wide_mlp_checkpoint, monkeypatch):
    """bf16 weights, float32 math (a CPU without bf16 instructions): a request alone and the
    same request decoding in steps shared with 300-token prompt chunks get the same tokens and
    logprobs, bit for bit (every matmul is the widening kernel, whatever the step's rows; with
    the dense float32 copy above 64 rows, as before, the logprobs differ)."""
    monkeypatch.setattr(model_runner_module, "resolve_precision", lambda *a: BF16_WEIGHTS)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=3)
    target = list(range(500, 530))
    others = [list(range(2000 + 300 * i, 2300 + 300 * i)) for i in range(3)]
    llm = LLM(str(wide_mlp_checkpoint), kv_cache_memory_gb=0.05, block_size=16,
              enable_prefix_caching=False, max_num_batched_tokens=256)
    alone = llm.generate([target], params)[0]
    llm.engine.add_request(target, params)
    steps_with_prompts = 0
    for prompt in others:  # arriving while the target decodes
        llm.engine.step()
        llm.engine.add_request(prompt, params)
    outs = {}
    while llm.engine.has_unfinished():
        rows = llm.engine.step()
        steps_with_prompts += 1
        for out in rows or []:
            if out.finished:
                outs[tuple(out.prompt_token_ids)] = out
    llm.engine.close()
    together = outs[tuple(target)]
    assert steps_with_prompts > 1
    assert (together.token_ids, together.logprobs) == (alone.token_ids, alone.logprobs)
