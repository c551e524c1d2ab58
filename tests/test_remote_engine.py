"""RemoteEngine against a fake OpenAI-compatible upstream served on 127.0.0.1, and the API on top of it."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest
from fastapi import FastAPI

from app.api.routes import router
from app.serving.remote_engine import RemoteEngine, UpstreamError, api_root
from app.serving.runtime import Runtime
from app.settings import AppSettings
from engine.sampling_params import SamplingParams
from tests.api_helpers import (
    UPSTREAM_CACHED_TOKENS,
    UPSTREAM_MODEL,
    LiveServer,
    UpstreamLog,
    fake_upstream,
)


@pytest.fixture(scope="module")
def upstream():
    log = UpstreamLog()
    with LiveServer(fake_upstream(log)) as server:
        server.log = log
        yield server


@pytest.fixture
def log(upstream) -> UpstreamLog:
    upstream.log.bodies.clear()
    upstream.log.disconnected.clear()
    upstream.log.healthy = True
    return upstream.log


async def collect(stream) -> list:
    return [out async for out in stream]


def test_api_root_accepts_server_or_v1_urls():
    assert api_root("http://h:8000") == "http://h:8000/v1"
    assert api_root("http://h:8000/v1/") == "http://h:8000/v1"


async def test_chat_streams_deltas_and_forwards_messages_and_sampling(upstream, log):
    engine = RemoteEngine(upstream.url + "/v1", api_key="secret")
    assert await engine.start()
    assert engine.model == UPSTREAM_MODEL and engine.max_model_len == 4096
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello there world"},
    ]
    params = SamplingParams(
        temperature=0.3, top_p=0.9, top_k=20, max_tokens=50, stop=["\n\n"], seed=5
    )
    outs = await collect(engine.chat(messages, params, request_id="r1"))

    assert [o.delta_text for o in outs[:-1]] == ["hello ", "there ", "world "]
    final = outs[-1]
    assert final.finished and final.finish_reason == "stop" and final.delta_text == ""
    assert final.text == "hello there world " and final.request_id == "r1"
    assert final.num_prompt_tokens == 13 and final.num_generated_tokens == 3
    assert final.num_cached_tokens == UPSTREAM_CACHED_TOKENS
    assert not any(o.finished for o in outs[:-1])

    body = log.bodies[-1]
    assert body["messages"] == messages and body["model"] == UPSTREAM_MODEL
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert (body["temperature"], body["top_p"], body["top_k"]) == (0.3, 0.9, 20)
    assert (body["max_tokens"], body["stop"], body["seed"]) == (50, ["\n\n"], 5)
    # Neutral extras are not sent to the upstream.
    assert not {"min_p", "repetition_penalty", "presence_penalty", "ignore_eos"} & set(body)

    stats = engine.stats()
    assert stats.num_running == 0 and stats.requests_finished_total == 1
    assert stats.prompt_tokens_total == 13 and stats.generation_tokens_total == 3
    await engine.aclose()


async def test_generate_is_a_text_completion(upstream, log):
    engine = RemoteEngine(upstream.url)
    outs = await collect(engine.generate("one two", SamplingParams(max_tokens=2, temperature=0)))
    assert "".join(o.delta_text for o in outs) == "one two "
    assert outs[-1].finish_reason == "length"
    assert log.bodies[-1]["prompt"] == "one two" and log.bodies[-1]["model"] == UPSTREAM_MODEL
    await engine.aclose()


async def test_upstream_refusals_raise_before_any_output(upstream, log):
    engine = RemoteEngine(upstream.url)
    with pytest.raises(ValueError, match="prompt is bad"):
        await collect(engine.chat([{"role": "user", "content": "bad"}]))
    with pytest.raises(UpstreamError) as info:
        await collect(engine.chat([{"role": "user", "content": "busy"}]))
    assert info.value.status == 503
    assert engine.stats().num_running == 0
    await engine.aclose()


async def test_error_event_mid_stream_ends_the_request_with_an_error(upstream, log):
    engine = RemoteEngine(upstream.url)
    outs = await collect(engine.chat([{"role": "user", "content": "explode"}]))
    assert outs[-1].finish_reason == "error" and "upstream blew up" in outs[-1].error
    await engine.aclose()


async def test_abort_closes_the_upstream_stream(upstream, log):
    engine = RemoteEngine(upstream.url)
    stream = engine.chat([{"role": "user", "content": "slow please"}], request_id="long")
    outs = []
    async for out in stream:
        outs.append(out)
        if len(outs) == 3:
            assert engine.stats().num_running == 1
            await engine.abort("long")
    assert outs[-1].finished and outs[-1].finish_reason == "abort"
    assert len(outs) < 20
    assert engine.stats().num_running == 0
    await _until(lambda: log.disconnected == ["slow please"])
    await engine.aclose()


async def test_consumer_that_stops_reading_closes_the_upstream_stream(upstream, log):
    engine = RemoteEngine(upstream.url)
    stream = engine.chat([{"role": "user", "content": "slow again"}])
    async for out in stream:
        if out.delta_text:
            break
    await stream.aclose()
    await _until(lambda: log.disconnected == ["slow again"])
    assert engine.stats().num_running == 0
    await engine.aclose()


async def test_health_and_start_follow_the_upstream(upstream, log):
    engine = RemoteEngine(upstream.url)
    assert await engine.health()
    log.healthy = False
    assert not await engine.health()
    await engine.aclose()
    down = RemoteEngine("http://127.0.0.1:9")  # discard port: nothing listens
    assert not await down.start()
    assert not await down.health()
    with pytest.raises(UpstreamError):
        await collect(down.chat([{"role": "user", "content": "hi"}]))
    await down.aclose()


async def _until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


@pytest.fixture(scope="module")
def remote_app(upstream):
    """The app's API with the remote engine behind it, as PAGECHAT_ENGINE_URL sets it up."""
    app = FastAPI()
    app.include_router(router)
    app.state.runtime = Runtime(settings=AppSettings(engine_url=upstream.url + "/v1", api_keys=""))
    with LiveServer(app) as server:
        server.app = app
        yield server


async def test_openai_client_through_the_app_to_the_upstream(remote_app, log):
    app = remote_app.app
    runtime = app.state.runtime
    runtime.engine = RemoteEngine.from_settings(runtime.settings)
    client = openai.AsyncOpenAI(base_url=remote_app.url + "/v1", api_key="unused", max_retries=0)
    try:
        models = await client.models.list()
        assert [m.id for m in models.data] == [UPSTREAM_MODEL]

        messages = [{"role": "user", "content": [{"type": "text", "text": "alpha beta"}]}]
        done = await client.chat.completions.create(
            model=UPSTREAM_MODEL, messages=messages, max_tokens=9
        )
        assert done.choices[0].message.content == "alpha beta "
        assert done.choices[0].finish_reason == "stop"
        assert done.usage.completion_tokens == 2
        assert done.usage.prompt_tokens_details.cached_tokens == UPSTREAM_CACHED_TOKENS
        # Text parts were joined into one message; the upstream got the messages, not token ids.
        assert log.bodies[-1]["messages"] == [{"role": "user", "content": "alpha beta"}]
        assert log.bodies[-1]["max_tokens"] == 9

        chunks = [
            c
            async for c in await client.chat.completions.create(
                model=UPSTREAM_MODEL,
                messages=[{"role": "user", "content": "x y z"}],
                stream=True,
                stream_options={"include_usage": True},
            )
        ]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "x y z "
        assert chunks[-1].usage.completion_tokens == 3

        with pytest.raises(openai.BadRequestError, match="prompt is bad"):
            await client.chat.completions.create(
                model=UPSTREAM_MODEL, messages=[{"role": "user", "content": "bad"}]
            )
        with pytest.raises(openai.APIStatusError) as info:
            await client.completions.create(model=UPSTREAM_MODEL, prompt="busy")
        assert info.value.status_code == 503
    finally:
        await client.close()
        remote_app.call(runtime.engine.aclose())  # its connections belong to the server's loop
        runtime.engine = None


async def test_fields_only_the_local_engine_serves_are_refused_remotely(remote_app, log):
    """logprobs, echo, min_tokens, logit_bias, template fields: 400 naming them (a remote engine
    is sent OpenAI's basic fields only); n > 1 is served as n upstream requests."""
    runtime = remote_app.app.state.runtime
    runtime.engine = RemoteEngine.from_settings(runtime.settings)
    client = openai.AsyncOpenAI(base_url=remote_app.url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "a b"}]
    try:
        for extra, param in [
            ({"logprobs": True}, "logprobs"),
            ({"min_tokens": 2}, "min_tokens"),
            ({"logit_bias": {"5": 1}}, "logit_bias"),
            ({"chat_template_kwargs": {"x": 1}}, "chat_template_kwargs"),
            ({"skip_special_tokens": False}, "skip_special_tokens"),
        ]:
            with pytest.raises(openai.BadRequestError) as info:
                await client.chat.completions.create(
                    model=UPSTREAM_MODEL, messages=messages, extra_body=extra
                )
            assert info.value.body["param"] == param
        with pytest.raises(openai.BadRequestError) as info:
            await client.completions.create(model=UPSTREAM_MODEL, prompt="a", echo=True)
        assert info.value.body["param"] == "echo"
        done = await client.chat.completions.create(model=UPSTREAM_MODEL, messages=messages, n=2)
        assert [(c.index, c.message.content) for c in done.choices] == [(0, "a b "), (1, "a b ")]
    finally:
        await client.close()
        remote_app.call(runtime.engine.aclose())
