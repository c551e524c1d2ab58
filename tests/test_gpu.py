"""CUDA-only checks of the fast path: bf16 parity with transformers and CUDA graphs.

Skipped without a GPU (tests/conftest.py). Greedy bf16 runs are compared the way vLLM's
`check_logprobs_close` does: identical tokens up to the first difference, and there each
side's choice must be among the other's top 5.
"""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.tiny import write_checkpoint
from tests.engine_helpers import random_prompts

pytestmark = pytest.mark.gpu

NEW_TOKENS = 32
TOP = 5


@pytest.fixture(scope="module")
def qwen3_like(tmp_path_factory):
    """Real Qwen3-0.6B head layout (16 q / 8 kv heads, head_dim 128) with 4 layers, stored bf16."""
    return write_checkpoint(
        tmp_path_factory.mktemp("qwen3-like"), shape="qwen3-0.6b", seed=0, num_hidden_layers=4
    )


def hf_greedy_with_top(path, prompt, n):
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).cuda().eval()
    ids = torch.tensor([prompt], device="cuda")
    with torch.inference_mode():
        out = model.generate(
            ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(prompt):].tolist()
    tops = [set(torch.log_softmax(x[0].float(), -1).topk(TOP).indices.tolist()) for x in out.logits]
    return tokens, tops


def assert_logprobs_close(ours, our_tops, theirs, their_tops):
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            assert a in their_tops[i] and b in our_tops[i], f"diverged at {i}: {a} vs {b}"
            return


def test_bf16_greedy_close_to_transformers(qwen3_like):
    llm = LLM(str(qwen3_like), dtype="bfloat16", device="cuda")
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=TOP)
    prompts = random_prompts([17, 64, 200, 333], seed=2)
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        our_tops = [set(sorted(lp, key=lp.get, reverse=True)[:TOP]) for lp in out.logprobs]
        theirs, their_tops = hf_greedy_with_top(qwen3_like, prompt, NEW_TOKENS)
        assert_logprobs_close(out.token_ids, our_tops, theirs, their_tops)


def test_cuda_graphs_give_the_same_tokens(qwen3_like):
    prompts = random_prompts([5, 40, 77, 120, 9, 300, 64, 31, 2], seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    # Two engines in one process: each takes its share of the GPU (as two vLLM instances would).
    eager = LLM(str(qwen3_like), dtype="bfloat16", device="cuda", enforce_eager=True, gpu_memory_utilization=0.4)
    graphs = LLM(str(qwen3_like), dtype="bfloat16", device="cuda", enforce_eager=False, gpu_memory_utilization=0.4)
    assert graphs.engine.runner.graphs is not None and graphs.engine.runner.graphs.graphs
    assert [o.token_ids for o in eager.generate(prompts, params)] == [
        o.token_ids for o in graphs.generate(prompts, params)
    ]


def test_async_output_gives_the_same_outputs(qwen3_like):
    """On CUDA outputs are emitted during the next step's forward pass by default; turned off,
    every request gets the same tokens, text, finish reason and log-probabilities."""
    llm = LLM(str(qwen3_like), dtype="bfloat16", device="cuda", enable_prefix_caching=False,
              gpu_memory_utilization=0.5, max_num_batched_tokens=256)
    assert llm.engine.async_output
    prompts = random_prompts([5, 40, 77, 120, 300, 64], seed=4)
    free = llm.generate([prompts[1]], SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True))[0]
    stop = free.text[len(free.text) // 2:][:2]
    params = [
        SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, stop=[stop]),
        SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=NEW_TOKENS, logprobs=3),
        SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True, prompt_logprobs=2),
        SamplingParams(temperature=0.8, seed=5, max_tokens=24, min_tokens=4, repetition_penalty=1.3),
        SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1),
    ]

    def summary(outs):
        return [(o.token_ids, o.text, o.finish_reason, o.logprobs, o.prompt_logprobs) for o in outs]

    with_async = summary(llm.generate(prompts, params))
    llm.engine.async_output = False
    assert with_async == summary(llm.generate(prompts, params))
    assert with_async[1][2] == "stop"


def test_sampling_stays_on_device_and_kv_sizing_is_logged(qwen3_like, caplog):
    caplog.set_level("INFO")
    llm = LLM(str(qwen3_like), dtype="bfloat16", device="cuda", gpu_memory_utilization=0.5)
    assert llm.engine.runner.kv_cache.is_cuda
    assert any("KV cache:" in r.message for r in caplog.records)
    seeded = SamplingParams(temperature=0.7, top_p=0.8, top_k=20, max_tokens=16, seed=5)
    a = llm.generate([[1, 2, 3]], seeded)[0].token_ids
    b = llm.generate([[1, 2, 3]], seeded)[0].token_ids
    assert a == b
