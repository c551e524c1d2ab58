"""Rate limits per API key and per chat user (PAGECHAT_RATE_LIMIT_RPM / _TPM).

The buckets are checked on a fake clock (refill, reset times, debt, fairness, forgetting idle
callers); then a live server (`python -m app`, tiny checkpoint) with two API keys and a chat
user is driven with the official `openai` client and Chainlit's socket protocol: the key over
its limit gets 429 in OpenAI's error JSON with Retry-After and x-ratelimit-* headers while the
other key's requests keep their latency, prompts x n count as requests, tokens are metered, the
limit resets, and the chat says why it refused a message.
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time

import httpx
import openai
import pytest

from app.serving.rate_limit import (
    MAX_IDLE_BUCKETS,
    RateLimited,
    RateLimits,
    _duration,
    api_caller,
    chat_caller,
)
from app.settings import AppSettings
from engine.outputs import RequestOutput
from tests.app_client import ChatClient, Server

KEY_A, KEY_B = "sk-rate-alpha-0001", "sk-rate-bravo-0002"
RPM, TPM = 12, 300


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def settings(rpm: int = 0, tpm: int = 0) -> AppSettings:
    return AppSettings(rate_limit_rpm=rpm, rate_limit_tpm=tpm, api_keys=f"{KEY_A},{KEY_B}")


# ---- the buckets, on a fake clock ------------------------------------------------------------


def test_off_by_default_admits_everything_without_headers():
    limits, off = RateLimits(), AppSettings()
    assert off.rate_limit_rpm == 0 and off.rate_limit_tpm == 0
    for _ in range(10_000):
        assert limits.admit(off, "api", 16).headers == {}
    assert limits.refused == {"requests": 0, "tokens": 0}


def test_requests_bucket_refills_continuously_and_resets():
    clock = FakeClock()
    limits, s = RateLimits(clock), settings(rpm=6)  # one request back every 10 s
    first = limits.admit(s, "a")
    assert first.headers == {
        "x-ratelimit-limit-requests": "6",
        "x-ratelimit-remaining-requests": "5",
        "x-ratelimit-reset-requests": "10s",
    }
    for _ in range(5):
        limits.admit(s, "a")
    with pytest.raises(RateLimited) as refused:
        limits.admit(s, "a")
    exc = refused.value
    assert exc.kind == "requests" and exc.retry_after == pytest.approx(10.0)
    assert "limit 6, used 6, requested 1" in exc.message and "try again in 10s" in exc.message
    headers = exc.response_headers()
    assert headers["Retry-After"] == "10" and headers["retry-after-ms"] == "10000"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == "1m0s"
    clock.now += 9.9
    with pytest.raises(RateLimited) as refused:
        limits.admit(s, "a")
    assert refused.value.retry_after == pytest.approx(0.1)
    assert refused.value.response_headers()["Retry-After"] == "1"  # whole seconds, rounded up
    clock.now += 0.1
    limits.admit(s, "a")  # one came back
    clock.now += 3600
    assert limits.admit(s, "a").headers["x-ratelimit-remaining-requests"] == "5"  # full again
    assert limits.refused == {"requests": 2, "tokens": 0}


def test_prompts_times_n_count_as_that_many_requests():
    clock = FakeClock()
    limits, s = RateLimits(clock), settings(rpm=10)
    assert limits.admit(s, "a", 4).headers["x-ratelimit-remaining-requests"] == "6"
    assert limits.admit(s, "a", 6).headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(RateLimited) as refused:
        limits.admit(s, "a", 2)
    assert refused.value.retry_after == pytest.approx(12.0)  # two requests at 6 s each
    with pytest.raises(RateLimited) as refused:
        limits.admit(s, "b", 11)  # more than a whole minute's worth: never
    assert (
        refused.value.retry_after is None and "Retry-After" not in refused.value.response_headers()
    )
    assert "11 requests" in refused.value.message and "smaller n" in refused.value.message


def test_check_refuses_an_exhausted_caller_without_taking_anything():
    clock = FakeClock()
    limits, s = RateLimits(clock), settings(rpm=2)
    limits.check(s, "a")
    limits.check(s, "a")  # checks take nothing
    limits.admit(s, "a", 2)
    with pytest.raises(RateLimited):
        limits.check(s, "a")
    clock.now += 30
    limits.check(s, "a")
    assert limits.admit(s, "a").headers["x-ratelimit-remaining-requests"] == "0"


def _outputs(prompt: int, generated: int):
    async def stream():
        for i in range(1, generated + 1):
            yield RequestOutput(
                request_id="r",
                prompt_token_ids=[7] * prompt,
                delta_token_ids=[1],
                num_generated_tokens=i,
                finished=i == generated,
            )

    return stream()


async def test_tokens_are_metered_as_processed_and_may_go_into_debt():
    clock = FakeClock()
    limits, s = RateLimits(clock), settings(tpm=120)  # 2 tokens per second come back
    ticket = limits.admit(s, "a")
    assert ticket.headers["x-ratelimit-remaining-tokens"] == "120"
    seen = [out async for out in ticket.meter(_outputs(prompt=50, generated=100))]
    assert len(seen) == 100  # passed through unchanged
    with pytest.raises(RateLimited) as refused:
        limits.admit(s, "a")
    exc = refused.value
    assert exc.kind == "tokens" and "limit 120, used 150" in exc.message
    assert exc.retry_after == pytest.approx(15.5)  # 30 tokens of debt + 1, at 2 per second
    assert exc.response_headers()["x-ratelimit-remaining-tokens"] == "0"
    assert limits.admit(s, "b").headers["x-ratelimit-remaining-tokens"] == "120"  # b is untouched
    clock.now += 15.5
    assert limits.admit(s, "a").headers["x-ratelimit-remaining-tokens"] == "1"


async def test_metering_stops_with_the_consumer_and_closes_the_stream():
    limits, s = RateLimits(FakeClock()), settings(tpm=1000)
    closed = []

    async def stream():
        try:
            for i in range(1, 100):
                yield RequestOutput(
                    request_id="r", prompt_token_ids=[1] * 10, num_generated_tokens=i
                )
        finally:
            closed.append(True)

    metered = limits.admit(s, "a").meter(stream())
    async for out in metered:
        if out.num_generated_tokens == 5:
            break
    await metered.aclose()
    assert closed == [True]
    assert limits.admit(s, "a").headers["x-ratelimit-remaining-tokens"] == str(1000 - 15)


def test_idle_callers_are_forgotten_but_busy_ones_kept():
    clock = FakeClock()
    limits, s = RateLimits(clock), settings(rpm=60)
    for i in range(MAX_IDLE_BUCKETS + 1):
        limits.admit(s, f"caller-{i}")
    limits.admit(s, "busy", 30)
    clock.now += 2  # every one-request caller is full again; busy is still 28 short
    limits.admit(s, "late")
    assert set(limits._requests) == {"busy", "late"}


def test_callers_never_carry_the_key_and_differ_per_key_and_user():
    s = settings(rpm=1)
    a, b = api_caller(s, KEY_A), api_caller(s, KEY_B)
    assert a != b and KEY_A not in a and a.startswith("api-key:")
    assert api_caller(AppSettings(), None) == api_caller(AppSettings(), "anything") == "api"
    assert chat_caller("alice") != chat_caller("bob") != chat_caller(None)


def test_durations_are_written_like_openais_headers():
    assert [_duration(x) for x in (0.0201, 0.5, 1.0, 17.5, 59.0, 60.0, 372.25)] == [
        "21ms",
        "500ms",
        "1s",
        "17.5s",
        "59s",
        "1m0s",
        "6m12.25s",
    ]


# ---- a live server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("rate-limit")
    live = Server(
        tiny_checkpoint,
        root / "data",
        PAGECHAT_API_KEYS=f"{KEY_A},{KEY_B}",
        PAGECHAT_RATE_LIMIT_RPM=str(RPM),
        PAGECHAT_RATE_LIMIT_TPM=str(TPM),
    )
    try:
        wait_healthy(live)
        yield live
    finally:
        live.stop()


def wait_healthy(server: Server, timeout: float = 180.0) -> None:
    """Wait for /health (open to all, unlike /pagechat/status once keys are set)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.proc.poll() is None, server.output()[-3000:]
        try:
            if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(server.output()[-3000:])


def client(server: Server, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


LONG_PROMPT = "Tell me a long story about " + "the old lighthouse keeper " * 100


async def _chat(api: openai.AsyncOpenAI, max_tokens: int = 1, content: str = "Say hi", **extra):
    started = time.monotonic()
    raw = await api.chat.completions.with_raw_response.create(
        model=extra.pop("model"),
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        temperature=0.0,
        **extra,
    )
    return raw, time.monotonic() - started


async def _refused(api: openai.AsyncOpenAI, model: str) -> httpx.Response:
    """Send until refused (at most a minute's worth of requests); the 429 response."""
    for _ in range(RPM + 1):
        try:
            await _chat(api, model=model)
        except openai.RateLimitError as exc:
            return exc.response
    raise AssertionError("never refused")


@pytest.mark.timing
async def test_a_key_over_its_limit_gets_429_while_the_other_keeps_its_latency(server):
    a, b = client(server, KEY_A), client(server, KEY_B)
    model = (await b.models.list()).data[0].id
    base = [(await _chat(b, model=model))[1] for _ in range(3)]

    before_first = time.monotonic()
    raw, _ = await _chat(a, model=model, n=3)  # n counts: three requests
    assert raw.headers["x-ratelimit-limit-requests"] == str(RPM)
    assert raw.headers["x-ratelimit-remaining-requests"] == str(RPM - 3)
    assert raw.headers["x-ratelimit-limit-tokens"] == str(TPM)
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) == TPM
    completion = await a.completions.with_raw_response.create(
        model=model, prompt=["one", "two"], n=2, max_tokens=1
    )  # two prompts x n=2: four requests
    refilled = math.ceil((time.monotonic() - before_first) / (60 / RPM))  # one every 5 s
    remaining = int(completion.headers["x-ratelimit-remaining-requests"])
    assert RPM - 7 <= remaining <= RPM - 7 + refilled

    response = await _refused(a, model)
    assert response.status_code == 429
    error = response.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "requests"
    assert "requests per minute (RPM): limit 12" in error["message"]
    assert 1 <= int(response.headers["Retry-After"]) <= 60 / RPM + 1
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    assert response.headers["x-ratelimit-limit-requests"] == str(RPM)
    assert response.headers["x-ratelimit-reset-requests"].endswith("s")
    # Refused where the key is checked, before the request is parsed: even /v1/models.
    with pytest.raises(openai.RateLimitError):
        await a.models.list()
    assert (await b.models.list()).data[0].id == model

    async def flood_one() -> tuple[int, float]:
        started = time.monotonic()
        try:
            raw, _ = await _chat(a, model=model)
            return raw.http_response.status_code, time.monotonic() - started
        except openai.RateLimitError as exc:
            return exc.response.status_code, time.monotonic() - started

    flood = [asyncio.create_task(flood_one()) for _ in range(40)]
    during = [(await _chat(b, model=model))[1] for _ in range(3)]
    results = await asyncio.gather(*flood)
    statuses = [status for status, _ in results]
    assert statuses.count(429) >= 38 and set(statuses) <= {200, 429}  # a refill may admit one
    assert max(t for status, t in results if status == 429) < 5.0  # refused at once, never queued
    assert statistics.median(during) <= max(
        3 * statistics.median(base), statistics.median(base) + 1.0
    )

    # The limit resets: after Retry-After, key A is served again.
    response = await _refused(a, model)
    await asyncio.sleep(int(response.headers["retry-after-ms"]) / 1000)
    raw, _ = await _chat(a, model=model)
    assert raw.http_response.status_code == 200


async def test_tokens_per_minute_are_metered_and_enforced_through_the_api(server):
    """Key B spends its tokens on one long prompt; the next request is refused on tokens."""
    b = client(server, KEY_B)
    model = (await b.models.list()).data[0].id
    streamed = await b.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, stream=True
    )
    assert streamed.headers["x-ratelimit-limit-tokens"] == str(TPM)  # streams carry them too
    assert int(streamed.headers["x-ratelimit-remaining-requests"]) < RPM
    assert [chunk async for chunk in streamed.parse()]
    raw, _ = await _chat(
        b, model=model, max_tokens=20, content=LONG_PROMPT, extra_body={"ignore_eos": True}
    )
    usage = raw.parse().usage
    assert usage.completion_tokens == 20 and usage.prompt_tokens > TPM
    with pytest.raises(openai.RateLimitError) as caught:
        await _chat(b, model=model)
    error = caught.value.response.json()["error"]
    assert error["type"] == "tokens" and error["code"] == "rate_limit_exceeded"
    assert f"tokens per minute (TPM): limit {TPM}, used" in error["message"]
    assert int(error["message"].split("used ")[1].split(".")[0]) > TPM  # in debt
    assert caught.value.response.headers["x-ratelimit-remaining-tokens"] == "0"
    assert int(caught.value.response.headers["Retry-After"]) >= 1

    auth = {"Authorization": f"Bearer {KEY_B}"}  # /metrics is for key holders once keys are set
    metrics = httpx.get(server.url + "/metrics", headers=auth).text
    assert 'pagechat_rate_limited_requests_total{limit="tokens"} 1.0' in metrics
    assert 'pagechat_rate_limited_requests_total{limit="requests"}' in metrics


async def test_the_chat_says_when_a_user_is_over_the_limit(server):
    chat = ChatClient(server.url)
    await chat.login()
    await chat.connect()
    await chat.wait_event("chat_settings")
    await chat.settings({"max_tokens": 8, "temperature": 0.0})
    first = await chat.send(LONG_PROMPT)  # spends the user's tokens (the prompt alone)
    assert any("prompt tokens" in (m.get("output") or "") for m in chat.messages(first).values())
    start = await chat.send("And another one?")
    said = [m.get("output") or "" for m in chat.messages(start).values()]
    await chat.close()
    refusal = [s for s in said if "token allowance" in s]
    assert refusal and "Send your message again in" in refusal[0], said
    assert not any("prompt tokens" in s for s in said)  # no answer was generated
