"""AsyncLLM: concurrent streams, aborts and cancellation against the engine thread.

Every test runs twice: with the CPU's default (outputs emitted in the step that made them) and
with async output, CUDA's default (emitted during the next step's forward pass)."""

from __future__ import annotations

import asyncio

import pytest

from engine import AsyncLLM, EngineConfig, SamplingParams
from tests.engine_helpers import random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module", params=[False, True], ids=["sync-output", "async-output"])
def engine(tiny_checkpoint, request):
    llm = AsyncLLM(EngineConfig(model=str(tiny_checkpoint), async_output=request.param))
    assert llm.engine.async_output is request.param
    yield llm
    llm.shutdown()


async def collect(engine, prompt, params, request_id=None):
    ids, text, last = [], "", None
    async for out in engine.generate(prompt, params, request_id=request_id):
        ids.extend(out.delta_token_ids)
        text += out.delta_text
        last = out
    assert ids == last.token_ids and text == last.text
    return last


async def wait_until_idle(engine, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        stats = engine.stats()
        if stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_blocks_used == 0:
            return stats
        await asyncio.sleep(0.02)
    raise AssertionError(f"engine not idle: {engine.stats()}")


async def test_sixteen_concurrent_streams_equal_solo(engine):
    prompts = random_prompts([5 + 9 * i for i in range(16)], seed=11)
    solo = [(await collect(engine, p, GREEDY)).token_ids for p in prompts]
    together = await asyncio.gather(*(collect(engine, p, GREEDY) for p in prompts))
    assert [o.token_ids for o in together] == solo
    await wait_until_idle(engine)


async def test_stop_strings_end_streams_with_the_solo_text(engine, tiny_checkpoint):
    """A stop string found while the request's next step already runs (async output) ends the
    stream with the same text as the blocking engine gives, the stop string cut."""
    from engine import LLM

    prompts = random_prompts([9, 33, 70], seed=13)
    free = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    reference = LLM(str(tiny_checkpoint))
    texts = [o.text for o in reference.generate(prompts, free)]
    stops = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[t[8:10]]) for t in texts]
    expected = reference.generate(prompts, stops)
    streamed = await asyncio.gather(*(collect(engine, p, s) for p, s in zip(prompts, stops)))
    assert [(o.text, o.token_ids, o.finish_reason) for o in streamed] == [
        (o.text, o.token_ids, o.finish_reason) for o in expected
    ]
    assert all(o.finish_reason == "stop" for o in streamed)
    await wait_until_idle(engine)


async def test_abort_mid_stream_frees_blocks(engine):
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    seen = []
    async for out in engine.generate(random_prompts([120], seed=5)[0], params, request_id="victim"):
        seen.append(out)
        if len(seen) == 3:
            await engine.abort("victim")
    assert seen[-1].finished and seen[-1].finish_reason == "abort"
    stats = engine.stats()
    assert stats.kv_blocks_used == 0 or (await wait_until_idle(engine)).kv_blocks_used == 0


async def test_cancelling_the_consumer_aborts(engine):
    params = SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)
    started = asyncio.Event()

    async def consume():
        async for _ in engine.generate(random_prompts([50], seed=6)[0], params):
            started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until_idle(engine)


async def test_too_long_prompt_is_refused_with_numbers(engine):
    too_long = [1] * (engine.max_model_len + 1)
    with pytest.raises(ValueError, match=str(engine.max_model_len)):
        await collect(engine, too_long, GREEDY)
    # The engine still serves others afterwards.
    out = await collect(engine, [1, 2, 3], GREEDY)
    assert len(out.token_ids) == 16


async def test_seeded_streams_reproduce(engine):
    params = SamplingParams(temperature=0.8, top_k=50, max_tokens=12, seed=99, ignore_eos=True)
    prompt = random_prompts([30], seed=12)[0]
    first = await collect(engine, prompt, params)
    noise = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    again, _ = await asyncio.gather(collect(engine, prompt, params), collect(engine, prompt, noise))
    assert first.token_ids == again.token_ids


async def test_chat_is_generate_on_the_chat_template_and_closing_it_aborts(engine):
    """The EngineClient members beyond generate: chat() renders the chat template (as the API
    does before generate), closing its stream aborts the request; health() and aclose()."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    ids = engine.tokenizer.apply_chat_template(messages)
    by_generate = await collect(engine, ids, GREEDY)
    chunks = [out async for out in engine.chat(messages, GREEDY)]
    assert chunks[-1].finished and chunks[-1].token_ids == by_generate.token_ids
    assert chunks[-1].num_generated_tokens == len(by_generate.token_ids)
    assert engine.model_id == str(engine.config.model) and await engine.health()

    long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    stream = engine.chat(messages, long, request_id="left")
    await anext(stream)
    await stream.aclose()  # the consumer leaves: the request is aborted, its blocks freed
    assert (await wait_until_idle(engine)).kv_blocks_used == 0


async def test_aclose_stops_the_engine(tiny_checkpoint):
    llm = await asyncio.to_thread(AsyncLLM, EngineConfig(model=str(tiny_checkpoint)))
    assert await llm.health()
    await llm.aclose()
    assert not await llm.health()
    await llm.aclose()  # twice is fine
