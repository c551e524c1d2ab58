"""/health and /metrics on a live server with the real engine; /metrics is read back with
prometheus-client's own text parser and its figures are checked against the engine and the
API's usage as requests run."""

from __future__ import annotations

import random
import time
import uuid

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.serving.metrics import METRICS, track
from engine import SamplingParams
from tests.api_helpers import api_server


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with api_server(tiny_checkpoint) as live:
        yield live


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def parse(text: str) -> dict[str, float]:
    """Samples as {'name{label="v"}': value}."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def scrape(server) -> dict[str, float]:
    response = httpx.get(server.url + "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def wait_idle(server) -> None:
    deadline = time.monotonic() + 10
    while True:
        s = server.engine.stats()
        if s.num_running == 0 and s.num_waiting == 0 and s.kv_blocks_used == 0:
            return
        assert time.monotonic() < deadline, f"engine not idle: {s}"
        time.sleep(0.01)


def delta(after: dict, before: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def test_health_and_engine_gauges(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    m = scrape(server)
    stats = server.engine.stats()
    assert m["pagechat_model_loaded"] == 1
    assert m["pagechat_kv_cache_blocks_capacity"] == stats.kv_blocks_total == 512
    for name in [
        "time_to_first_token_seconds",
        "inter_token_latency_seconds",
        "e2e_request_latency_seconds",
    ]:
        assert f'pagechat_{name}_bucket{{le="+Inf"}}' in m


def test_figures_move_as_requests_run(server, client):
    wait_idle(server)
    before = scrape(server)
    assert (
        before["pagechat_num_requests_running"] == 0
        and before["pagechat_kv_cache_blocks_used"] == 0
    )

    body = {
        "model": str(server.engine.config.model),
        "prompt": "Tell a long story:",
        "max_tokens": 3000,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()  # keep the iterator: dropping it closes the connection
        chunks = 0
        while chunks < 5:
            chunks += next(lines).startswith("data: {")
        during = scrape(server)
    assert during["pagechat_num_requests_running"] == 1
    assert during["pagechat_kv_cache_blocks_used"] > 0
    assert 0 < during["pagechat_kv_cache_usage_ratio"] < 1
    assert delta(during, before, "pagechat_generation_tokens_total") >= 5
    assert delta(during, before, "pagechat_time_to_first_token_seconds_count") == 1

    wait_idle(server)  # the client left: its request was aborted
    after_abort = scrape(server)
    assert (
        after_abort["pagechat_num_requests_running"] == 0
        and after_abort["pagechat_kv_cache_blocks_used"] == 0
    )
    assert (
        delta(after_abort, before, 'pagechat_requests_finished_total{finish_reason="abort"}') == 1
    )
    assert delta(after_abort, before, "pagechat_e2e_request_latency_seconds_count") == 1

    done = client.chat.completions.create(
        model=str(server.engine.config.model),
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=8,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    after = scrape(server)
    assert delta(after, after_abort, "pagechat_prompt_tokens_total") == done.usage.prompt_tokens
    assert delta(after, after_abort, "pagechat_generation_tokens_total") == 8
    assert delta(after, after_abort, "pagechat_time_to_first_token_seconds_count") == 1
    assert delta(after, after_abort, "pagechat_inter_token_latency_seconds_count") == 7
    assert delta(after, after_abort, "pagechat_e2e_request_latency_seconds_count") == 1
    assert delta(after, after_abort, "pagechat_e2e_request_latency_seconds_sum") > 0
    assert (
        delta(after, after_abort, 'pagechat_requests_finished_total{finish_reason="length"}') == 1
    )


def test_prefix_cache_counters_match_usage(server, client):
    model = str(server.engine.config.model)
    prompt = " ".join(f"p{uuid.uuid4().hex[:5]}" for _ in range(50))
    client.completions.create(model=model, prompt=prompt, max_tokens=1)
    before = scrape(server)
    again = client.completions.create(model=model, prompt=prompt, max_tokens=1)
    after = scrape(server)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached > 0
    hits = delta(after, before, "pagechat_prefix_cache_hits_total")
    assert 0 < hits <= delta(after, before, "pagechat_prefix_cache_queries_total")
    rate = after["pagechat_prefix_cache_hits_total"] / after["pagechat_prefix_cache_queries_total"]
    assert after["pagechat_prefix_cache_hit_ratio"] == pytest.approx(rate)
    assert after["pagechat_prefix_cache_hit_ratio"] > before["pagechat_prefix_cache_hit_ratio"]


def test_refused_requests_record_no_latency(server, client):
    before = scrape(server)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(
            model=str(server.engine.config.model),
            prompt=[5] * 10,
            max_tokens=server.engine.max_model_len,
        )
    after = scrape(server)
    assert delta(after, before, "pagechat_e2e_request_latency_seconds_count") == 0


def test_track_records_the_chat_ui_path(server):
    """The chat UI wraps its engine stream with track(); the histograms see it like an API call."""

    def samples():
        return parse(METRICS.render(server.engine).decode())

    async def run():
        outs = []
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        async for out in track(server.engine.generate("Hello", params)):
            outs.append(out)
        return outs

    before = samples()
    outs = server.call(run())
    after = samples()
    assert outs[-1].finished and len(outs[-1].token_ids) == 6
    assert delta(after, before, "pagechat_time_to_first_token_seconds_count") == 1
    assert delta(after, before, "pagechat_inter_token_latency_seconds_count") == 5
    assert delta(after, before, 'pagechat_requests_finished_total{finish_reason="length"}') == 1


def test_requests_are_counted_by_kind(server, client):
    """API requests count as kind "api"; a stream wrapped by the chat UI as kind "chat"."""

    async def chat_request():
        params = SamplingParams(temperature=0.0, max_tokens=2)
        async for _ in track(server.engine.generate("Hi", params), kind="chat"):
            pass

    before = scrape(server)
    client.completions.create(model=str(server.engine.config.model), prompt="Hi", max_tokens=2)
    server.call(chat_request())
    after = scrape(server)
    assert delta(after, before, 'pagechat_requests_served_total{kind="api"}') == 1
    assert delta(after, before, 'pagechat_requests_served_total{kind="chat"}') == 1


def test_generation_rate_over_the_window_matches_summing_it(monkeypatch):
    """The engine's tokens/s (read after every step) keeps its window's count as events come
    and go; it equals summing the window's events after the first over their span."""
    from engine import llm_engine

    clock = [0.0]
    monkeypatch.setattr(llm_engine.time, "monotonic", lambda: clock[0])
    throughput = llm_engine._Throughput(window_s=1.0)
    rng = random.Random(3)
    assert throughput.rate() == 0.0
    for _ in range(500):
        clock[0] += rng.choice([0.004, 0.01, 0.3])
        throughput.add(rng.randint(1, 64))
        events = list(throughput.events)
        assert all(clock[0] - t <= 1.0 for t, _ in events)
        span = events[-1][0] - events[0][0]
        naive = sum(n for _, n in events[1:]) / span if len(events) > 1 and span > 0 else 0.0
        assert throughput.rate() == pytest.approx(naive)
