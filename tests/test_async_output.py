"""Async output: a step's outputs are emitted by the next step, while its forward pass runs.

On CUDA that hides detokenizing, stop strings and output building behind the GPU. The CPU
runs its steps synchronously, so it keeps async output off by default; here it is switched on
to check that the only difference is when outputs appear: every request gets the same tokens,
text, finish reason and log-probabilities as with it off, and the same greedy tokens as HF
transformers; a request that a stop string ends while its next step is already queued loses
that step's token, and all its blocks come back.
"""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.structured_output import StructuredOutputParams
from tests.engine_helpers import hf_greedy, random_prompts
from tests.test_engine import assert_all_blocks_free

NEW_TOKENS = 16


@pytest.fixture(scope="module")
def prompts():
    return random_prompts([5, 17, 40, 64, 90, 130], seed=7)


@pytest.fixture(scope="module")
def engines(tiny_checkpoint):
    # Small steps so prompts are chunked and sequences join and leave mid-flight.
    kwargs = {"max_num_batched_tokens": 48, "max_num_seqs": 4}
    return (
        LLM(str(tiny_checkpoint), async_output=True, **kwargs),
        LLM(str(tiny_checkpoint), async_output=False, **kwargs),
    )


def mixed_params(stop_text: str) -> list[SamplingParams]:
    """One request per feature whose outputs come from the output path."""
    return [
        SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, stop=[stop_text]),
        SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=NEW_TOKENS, logprobs=3),
        SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True, prompt_logprobs=2),
        SamplingParams(
            temperature=0.8, seed=5, max_tokens=24, min_tokens=4, repetition_penalty=1.3
        ),
        SamplingParams(
            temperature=0.0,
            max_tokens=40,
            structured_output=StructuredOutputParams(choice=["yes", "no", "maybe so"]),
        ),
    ]


def summary(out):
    return (
        out.token_ids,
        out.text,
        out.finish_reason,
        out.stop_reason,
        out.logprobs,
        out.prompt_logprobs,
        out.num_cached_tokens,
    )


def test_engine_defaults_follow_the_device(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint))
    assert llm.engine.async_output is False  # the CPU: steps are synchronous


def test_async_output_gives_every_request_what_sync_output_does(engines, prompts, tiny_checkpoint):
    on, off = engines
    # Both engines run the same requests in the same order, so their prefix caches agree too.
    free, free_on = (llm.generate([prompts[1]], mixed_params("x")[0])[0] for llm in (off, on))
    assert free.token_ids == free_on.token_ids
    stop_text = free.text[len(free.text) // 2 :][:2]  # ends request 1 mid-answer
    params = mixed_params(stop_text)
    with_async = on.generate(prompts, params)
    without = off.generate(prompts, params)
    assert [summary(o) for o in with_async] == [summary(o) for o in without]
    assert with_async[0].token_ids == hf_greedy(tiny_checkpoint, prompts[0], NEW_TOKENS)
    stopped = with_async[1]
    assert stopped.finish_reason == "stop" and stop_text not in stopped.text
    assert len(stopped.token_ids) < NEW_TOKENS
    assert with_async[5].text in ("yes", "no", "maybe so")
    assert_all_blocks_free(on)
    on.engine.scheduler.check_integrity()


def test_outputs_come_one_step_later_and_streams_add_up(engines, prompts):
    on, off = engines
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    streams = {}
    for llm in (on, off):
        engine = llm.engine
        ids = [engine.add_request(p, params) for p in prompts[:3]]
        per_step, deltas, final = [], {i: [] for i in ids}, {}
        while engine.has_unfinished():
            outs = engine.step()
            per_step.append(sorted(o.request_id for o in outs if o.delta_token_ids))
            for o in outs:
                deltas[o.request_id] += o.delta_token_ids
                if o.finished:
                    final[o.request_id] = o.token_ids
            # A request counts as running or waiting until its final output is out.
            stats = engine.stats()
            assert stats.num_running + stats.num_waiting == len(ids) - len(final)
        assert all(deltas[i] == final[i] for i in ids)  # every token streamed exactly once
        streams[llm is on] = (per_step, [final[i] for i in ids])
    (async_steps, async_tokens), (sync_steps, sync_tokens) = streams[True], streams[False]
    assert async_tokens == sync_tokens
    assert async_steps == [[], *sync_steps]  # the same outputs, each a step later


def test_a_stop_string_while_the_next_step_is_queued_drops_that_steps_token(engines, prompts):
    on, off = engines
    free = off.generate([prompts[2]], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))[0]
    stop_text = off.tokenizer.decode(free.token_ids[5:6])
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop=[stop_text])
    expected = off.generate([prompts[2]], params)[0]
    engine = on.engine
    rid = engine.add_request(prompts[2], params)
    final = None
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                final = o
        engine.scheduler.check_integrity()  # the pool stays consistent at every step
    assert final is not None and final.request_id == rid
    assert summary(final) == summary(expected)
    assert final.finish_reason == "stop"
    assert_all_blocks_free(on)


def test_abort_while_outputs_are_pending(engines, prompts):
    on, _ = engines
    engine = on.engine
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    keep = engine.add_request(prompts[0], params)
    gone = engine.add_request(prompts[1], params)
    for _ in range(8):
        engine.step()
    aborted = engine.abort(gone)
    assert aborted is not None and aborted.finished and aborted.finish_reason == "abort"
    final = {}
    while engine.has_unfinished():
        for o in engine.step():
            assert o.request_id != gone  # nothing more for the aborted request
            if o.finished:
                final[o.request_id] = o
    assert list(final) == [keep] and len(final[keep].token_ids) == 30
    assert_all_blocks_free(on)
