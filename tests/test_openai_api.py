"""The OpenAI-compatible API, driven by the official `openai` client against a live server on
127.0.0.1 with the tiny checkpoint and the real AsyncLLM. The engine's own greedy output is the
reference for what the API must return."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest

from app.settings import AppSettings
from engine import SamplingParams
from tests.api_helpers import api_server

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three colours."},
]


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with api_server(tiny_checkpoint) as live:
        yield live


@pytest.fixture
def settings(server):
    """Per-test app settings (restored afterwards)."""
    before = server.app.state.runtime.settings
    yield server.app.state.runtime
    server.app.state.runtime.settings = before


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


@pytest.fixture
def model(server) -> str:
    return str(server.engine.config.model)


def engine_greedy(server, prompt_ids: list[int], max_tokens: int, **kw):
    """The engine's own answer to the same ids, run on the server's loop (the reference)."""

    async def run():
        last = None
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)
        async for out in server.engine.generate(prompt_ids, params):
            last = out
        return last

    return server.call(run())


def chat_ids(server, messages) -> list[int]:
    return server.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def wait_for(condition, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def wait_idle(server) -> None:
    def idle():
        s = server.engine.stats()
        return s.num_running == 0 and s.num_waiting == 0 and s.kv_blocks_used == 0

    wait_for(idle, what=f"an idle engine, have {server.engine.stats()}")


def test_models_lists_the_served_model(client, server, model):
    models = client.models.list().data
    assert [m.id for m in models] == [Path(model).name]  # the directory's name, not its path
    assert models[0].max_model_len == server.engine.max_model_len


def test_chat_greedy_equals_engine_greedy(client, server, model):
    done = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=12, temperature=0
    )
    ids = chat_ids(server, MESSAGES)
    ref = engine_greedy(server, ids, 12)
    assert done.object == "chat.completion" and done.id.startswith("chatcmpl-")
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content == ref.text
    assert done.choices[0].finish_reason == ref.finish_reason
    assert done.usage.prompt_tokens == len(ids)
    assert done.usage.completion_tokens == len(ref.token_ids)
    assert done.usage.total_tokens == len(ids) + len(ref.token_ids)


def test_chat_stream_with_usage_matches_the_whole_answer(client, server, model):
    ids = chat_ids(server, MESSAGES)
    ref = engine_greedy(server, ids, 10, ignore_eos=True)
    stream = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_completion_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == len(ids)
    assert all(c.usage is None for c in chunks[:-1])


def test_text_parts_are_joined_like_a_string_message(client, server, model):
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}],
        }
    ]
    joined = [{"role": "user", "content": "Hello\nthere"}]
    a = client.chat.completions.create(model=model, messages=parts, max_tokens=6, temperature=0)
    b = client.chat.completions.create(model=model, messages=joined, max_tokens=6, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == len(chat_ids(server, joined))


def test_completions_text_ids_and_stream_agree_with_the_engine(client, server, model):
    prompt = "The quick brown fox"
    ids = server.engine.tokenizer.encode(prompt)
    ref = engine_greedy(server, ids, 8, ignore_eos=True)
    extra = {"ignore_eos": True}
    by_text = client.completions.create(
        model=model, prompt=prompt, max_tokens=8, temperature=0, extra_body=extra
    )
    by_ids = client.completions.create(
        model=model, prompt=ids, max_tokens=8, temperature=0, extra_body=extra
    )
    assert by_text.object == "text_completion"
    assert by_text.choices[0].text == by_ids.choices[0].text == ref.text
    assert by_text.usage.prompt_tokens == len(ids) and by_text.usage.completion_tokens == 8
    chunks = list(
        client.completions.create(
            model=model, prompt=prompt, max_tokens=8, temperature=0, stream=True, extra_body=extra
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_batch_of_prompts_gets_one_choice_each(client, server, model):
    prompts = ["One two", "Three four five"]
    done = client.completions.create(model=model, prompt=prompts, max_tokens=4, temperature=0)
    refs = [engine_greedy(server, server.engine.tokenizer.encode(p), 4) for p in prompts]
    assert [c.index for c in done.choices] == [0, 1]
    assert [c.text for c in done.choices] == [r.text for r in refs]
    assert done.usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in refs)


def test_stop_string_cuts_the_answer_before_it(client, server, model):
    prompt = "Once upon a time"
    full = client.completions.create(
        model=model, prompt=prompt, max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
    )
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), f"need a visible stop string, greedy text was {text!r}"
    cut = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=24,
        temperature=0,
        stop=[stop, "\x00never"],
        extra_body={"ignore_eos": True},
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats_and_sampling_fields_are_accepted(client, model):
    kw = dict(model=model, messages=MESSAGES, max_tokens=12, temperature=1.0, top_p=0.9, seed=1234)
    kw["extra_body"] = {"top_k": 50, "min_p": 0.01, "repetition_penalty": 1.1}
    first = client.chat.completions.create(presence_penalty=0.5, frequency_penalty=0.5, **kw)
    again = client.chat.completions.create(presence_penalty=0.5, frequency_penalty=0.5, **kw)
    assert first.choices[0].message.content == again.choices[0].message.content


def test_repeated_prefix_reports_cached_tokens(client, server, model):
    words = " ".join(f"w{uuid.uuid4().hex[:6]}" for _ in range(40))  # unique: nothing cached yet
    block = server.engine.stats().block_size
    first = client.completions.create(model=model, prompt=words, max_tokens=2, temperature=0)
    second = client.completions.create(
        model=model, prompt=words + " and more", max_tokens=2, temperature=0
    )
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens >= 4 * block
    assert cached >= (first.usage.prompt_tokens // block - 1) * block and cached % block == 0
    assert cached < second.usage.prompt_tokens


def test_errors_come_back_in_openai_format(client, server, model):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=MESSAGES, n=0)
    assert info.value.body["param"] == "n"

    with pytest.raises(openai.BadRequestError) as info:  # pydantic validation: 400, not 422
        client.chat.completions.create(model=model, messages=MESSAGES, temperature=3.5)
    assert (
        info.value.body["param"] == "temperature"
        and info.value.body["type"] == "invalid_request_error"
    )

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=model,
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ],
        )
    assert "image_url" in info.value.message

    limit = server.engine.max_model_len
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model, prompt=[100] * (limit + 5), max_tokens=1)
    assert info.value.body["code"] == "context_length_exceeded"
    assert str(limit) in info.value.message and str(limit + 5) in info.value.message

    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model, prompt=[100] * 10, max_tokens=limit)
    assert (
        f"{limit + 10} tokens (10 in the prompt, {limit} in the completion)" in info.value.message
    )

    bad_json = httpx.post(
        server.url + "/v1/completions",
        content=b"{nope",
        headers={"content-type": "application/json"},
    )
    assert (
        bad_json.status_code == 400 and bad_json.json()["error"]["type"] == "invalid_request_error"
    )


def test_api_keys_are_required_when_set(server, settings, model):
    settings.settings = AppSettings(api_keys="key-one, key-two")
    for key in ["", "key-three", "key-one-and-more"]:
        with pytest.raises(openai.AuthenticationError) as info:
            openai.OpenAI(
                base_url=server.url + "/v1", api_key=key or "x", max_retries=0
            ).models.list()
        assert info.value.body["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    ok = openai.OpenAI(base_url=server.url + "/v1", api_key="key-two", max_retries=0)
    assert ok.models.list().data[0].id == Path(model).name
    assert httpx.get(server.url + "/health").status_code == 200  # ops endpoints stay open


def test_loading_model_answers_503_and_health_follows(client, server, settings, model):
    engine = server.app.state.runtime.engine
    server.app.state.runtime.engine = None
    try:
        assert httpx.get(server.url + "/health").status_code == 503
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model=model, messages=MESSAGES)
        assert info.value.status_code == 503 and info.value.body["code"] == "model_not_ready"
    finally:
        server.app.state.runtime.engine = engine
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


async def _open_stream(url: str, body: dict) -> tuple[httpx.AsyncClient, httpx.Response]:
    http = httpx.AsyncClient(timeout=30)
    response = await http.send(
        http.build_request("POST", url + "/v1/completions", json=body), stream=True
    )
    return http, response


async def test_disconnect_mid_stream_aborts_and_frees_blocks(server, model):
    wait_idle(server)
    before = server.engine.stats()
    body = {
        "model": model,
        "prompt": "Count forever:",
        "max_tokens": 3000,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    http, response = await _open_stream(server.url, body)
    lines = response.aiter_lines()
    got = 0
    async for line in lines:
        got += line.startswith("data: {")
        if got == 3:
            break
    running = server.engine.stats()
    assert running.num_running == 1 and running.kv_blocks_used > 0
    await response.aclose()
    await http.aclose()
    await asyncio.to_thread(wait_idle, server)
    after = server.engine.stats()
    assert after.generation_tokens_total - before.generation_tokens_total < 3000
    assert after.requests_finished_total == before.requests_finished_total + 1


async def test_full_queue_answers_503_and_a_queued_client_leaving_is_aborted(
    server, settings, model
):
    """max_num_seqs is 1: A runs, B waits (no response started yet), C is refused."""
    wait_idle(server)
    settings.settings = AppSettings(max_queued_requests=1)
    body = {
        "model": model,
        "prompt": "Go on:",
        "max_tokens": 3000,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    http_a, response_a = await _open_stream(server.url, body)
    assert response_a.status_code == 200
    http_b = httpx.AsyncClient(timeout=30)
    b = asyncio.create_task(http_b.post(server.url + "/v1/completions", json=body))
    await asyncio.to_thread(
        wait_for, lambda: server.engine.stats().num_waiting == 1, 10.0, "B to wait"
    )

    c = httpx.post(server.url + "/v1/chat/completions", json={"model": model, "messages": MESSAGES})
    assert c.status_code == 503
    assert (
        c.json()["error"]["code"] == "queue_full"
        and "1 requests are waiting (limit 1)" in c.json()["error"]["message"]
    )

    b.cancel()  # B's client gives up before its first token: its request must leave the queue
    await asyncio.gather(b, return_exceptions=True)
    await http_b.aclose()
    await asyncio.to_thread(
        wait_for, lambda: server.engine.stats().num_waiting == 0, 10.0, "B to be aborted"
    )
    assert server.engine.stats().num_running == 1  # A is still streaming
    await response_a.aclose()
    await http_a.aclose()
    await asyncio.to_thread(wait_idle, server)


def test_openapi_schema_describes_the_requests(server):
    schema = httpx.get(server.url + "/openapi.json").json()
    post = schema["paths"]["/v1/chat/completions"]["post"]
    ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/ChatCompletionRequest")
    fields = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    for name in [
        "messages",
        "max_completion_tokens",
        "stream_options",
        "stop",
        "seed",
        "top_k",
        "min_p",
    ]:
        assert name in fields
    assert "CompletionRequest" in schema["components"]["schemas"]
    assert set(post["responses"]) >= {"200", "400", "401", "404", "503"}
    assert any("HTTPBearer" in s for s in post.get("security", []))
