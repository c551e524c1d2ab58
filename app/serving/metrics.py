"""Prometheus metrics: engine gauges read at scrape time, latency histograms fed by request streams.

One process serves one engine, so there is one `METRICS` instance with its own registry (not
prometheus-client's global one). Every stream of engine outputs is wrapped with
`track(outputs, kind=...)`: the OpenAI API's (kind "api", in app/api/routes.py) and the chat
UI's (kind "chat", in the chat session), so time-to-first-token, inter-token and end-to-end
latency cover every request, and `pagechat_requests_served_total{kind}` says where they came from.
"""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncGenerator, Iterable
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from app.serving.rate_limit import RateLimits
from app.serving.runtime import runtime_of
from engine.client import EngineClient
from engine.outputs import EngineStats, RequestOutput

StreamKind = Literal["chat", "api"]

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)


class _EngineCollector:
    """Reads the engine's stats snapshot when /metrics is scraped (no polling thread)."""

    def __init__(self) -> None:
        self.engine: EngineClient | None = None
        self.rate_limits: RateLimits | None = None

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        engine = self.engine
        yield GaugeMetricFamily(
            "pagechat_model_loaded",
            "1 once the model is loaded and serving",
            value=int(engine is not None),
        )
        refused = CounterMetricFamily(
            "pagechat_rate_limited_requests",
            "Requests refused by PAGECHAT_RATE_LIMIT_RPM / _TPM (API 429s and chat messages), "
            "by the limit that refused them",
            labels=["limit"],
        )
        counts = self.rate_limits.refused if self.rate_limits is not None else {}
        for limit in ("requests", "tokens"):
            refused.add_metric([limit], counts.get(limit, 0))
        yield refused
        if engine is None:
            return
        s = engine.stats()
        gauges = [
            (
                "num_requests_running",
                "Requests being generated (in the running batch)",
                s.num_running,
            ),
            (
                "num_requests_waiting",
                "Requests queued for their first prefill or preempted",
                s.num_waiting,
            ),
            ("kv_cache_blocks_used", "KV cache blocks held by requests", s.kv_blocks_used),
            ("kv_cache_blocks_capacity", "KV cache blocks in the pool", s.kv_blocks_total),
            (
                "kv_cache_usage_ratio",
                "Fraction of KV cache blocks in use",
                _ratio(s.kv_blocks_used, s.kv_blocks_total),
            ),
            (
                "prefix_cache_hit_ratio",
                "Prefix-cache hits / lookups since start",
                s.prefix_cache_hit_rate,
            ),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"pagechat_{name}", doc, value=value)
        counters = [
            ("prompt_tokens", "Prompt tokens received", s.prompt_tokens_total),
            (
                "prompt_tokens_computed",
                "Prompt tokens the model computed, not served from a KV cache tier nor copied "
                "from a running request's block (a preempted request's recompute counts again)",
                s.prompt_tokens_computed,
            ),
            ("generation_tokens", "Tokens generated", s.generation_tokens_total),
            (
                "prefix_cache_queries",
                "Prefix-cache lookups of new prompts",
                s.prefix_cache_queries,
            ),
            (
                "prefix_cache_hits",
                "Prefix-cache lookups that found the KV cached",
                s.prefix_cache_hits,
            ),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(f"pagechat_{name}", doc, value=value)
        yield from _tier_metrics(s)
        yield from _gpu_memory()


def _tier_metrics(s: EngineStats) -> Iterable[Metric]:
    """KV blocks by tier: the device pool always; the host and disk tiers (engine.kv_tiers)
    when they are on, with the disk tier's size and its failures."""
    tiers = s.kv_tiers
    used = GaugeMetricFamily(
        "pagechat_kv_tier_blocks_used", "KV blocks held in each tier", labels=["tier"]
    )
    total = GaugeMetricFamily(
        "pagechat_kv_tier_blocks_capacity", "KV blocks each tier can hold", labels=["tier"]
    )
    hits = CounterMetricFamily(
        "pagechat_kv_tier_hit_tokens",
        "Prompt tokens whose KV was found in each tier at admission",
        labels=["tier"],
    )
    used.add_metric(["device"], s.kv_blocks_used)
    total.add_metric(["device"], s.kv_blocks_total)
    hits.add_metric(["device"], tiers.device_hit_tokens if tiers else s.prefix_cache_hits)
    if tiers is not None and tiers.host_blocks_total:
        used.add_metric(["host"], tiers.host_blocks_used)
        total.add_metric(["host"], tiers.host_blocks_total)
        hits.add_metric(["host"], tiers.host_hit_tokens)
    disk = tiers is not None and tiers.disk_capacity_bytes > 0
    if tiers is not None and disk:
        used.add_metric(["disk"], tiers.disk_blocks)
        hits.add_metric(["disk"], tiers.disk_hit_tokens)
    yield from (used, total, hits)
    if tiers is None:
        return
    moved = CounterMetricFamily(
        "pagechat_kv_tier_moved_bytes",
        "KV bytes moved through each lower tier: host write = device to host (evictions), host "
        "read = host to device (hits); disk write = block files written, disk read = read back",
        labels=["tier", "direction"],
    )
    if tiers.host_blocks_total:
        moved.add_metric(["host", "write"], tiers.host_bytes_out)
        moved.add_metric(["host", "read"], tiers.host_bytes_in)
    if disk:
        moved.add_metric(["disk", "write"], tiers.disk_bytes_written)
        moved.add_metric(["disk", "read"], tiers.disk_bytes_read)
    yield moved
    if not disk:
        return
    yield GaugeMetricFamily(
        "pagechat_kv_disk_bytes", "Bytes of KV block files in the disk tier", value=tiers.disk_bytes
    )
    yield GaugeMetricFamily(
        "pagechat_kv_disk_capacity_bytes",
        "Cap of the disk tier (PAGECHAT_KV_DISK_GB)",
        value=tiers.disk_capacity_bytes,
    )
    yield GaugeMetricFamily(
        "pagechat_kv_disk_loading_requests",
        "Requests waiting for their KV to load from disk",
        value=tiers.num_loading,
    )
    yield CounterMetricFamily(
        "pagechat_kv_disk_load_seconds",
        "Time spent loading KV blocks from disk",
        value=tiers.disk_load_seconds,
    )
    problems = CounterMetricFamily(
        "pagechat_kv_disk_problems",
        "Disk tier blocks not used: damaged or foreign files deleted, failed writes, blocks "
        "dropped because the writer was too far behind",
        labels=["problem"],
    )
    problems.add_metric(["bad_file"], tiers.disk_bad_files)
    problems.add_metric(["write_error"], tiers.disk_write_errors)
    problems.add_metric(["dropped"], tiers.disk_blocks_dropped)
    yield problems


def _gpu_memory() -> Iterable[Metric]:
    """This process's CUDA memory per device (weights, activations, KV cache), when on a GPU.

    Read only if torch is already loaded with CUDA initialised (an in-process engine on a GPU);
    a CPU or remote engine exports nothing here (the process_* metrics cover host memory).
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    used = GaugeMetricFamily(
        "pagechat_gpu_memory_used_bytes",
        "GPU memory this process holds (reserved by torch's allocator)",
        labels=["device"],
    )
    total = GaugeMetricFamily(
        "pagechat_gpu_memory_capacity_bytes", "GPU memory of the device", labels=["device"]
    )
    for index in range(torch.cuda.device_count()):
        device = f"cuda:{index}"
        used.add_metric([device], float(torch.cuda.memory_reserved(index)))
        total.add_metric([device], float(torch.cuda.get_device_properties(index).total_memory))
    yield from (used, total)


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


class Metrics:
    """A registry with the engine collector and the per-request latency metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._engine = _EngineCollector()
        self.registry.register(self._engine)
        ProcessCollector(registry=self.registry)  # process_* (CPU seconds, resident memory, fds)
        self.time_to_first_token = Histogram(
            "pagechat_time_to_first_token_seconds",
            "From the request reaching the server to its first generated token",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "pagechat_inter_token_latency_seconds",
            "Time between consecutive generated tokens of one request",
            buckets=ITL_BUCKETS,
            registry=self.registry,
        )
        self.e2e_latency = Histogram(
            "pagechat_e2e_request_latency_seconds",
            "From the request reaching the server to its last token",
            buckets=E2E_BUCKETS,
            registry=self.registry,
        )
        self.requests_finished = Counter(
            "pagechat_requests_finished",
            "Requests finished, by reason (stop, length, abort, error)",
            ["finish_reason"],
            registry=self.registry,
        )
        self.requests_served = Counter(
            "pagechat_requests_served",
            "Requests that produced output, by where they came from (chat UI or API)",
            ["kind"],
            registry=self.registry,
        )
        # Every known label value exists from the start (at 0), so rates and dashboards have a
        # series before the first error or the first chat.
        for reason in ("stop", "length", "abort", "error"):
            self.requests_finished.labels(reason)
        for kind in ("chat", "api"):
            self.requests_served.labels(kind)

    def recorder(self, kind: StreamKind = "chat") -> RequestRecorder:
        return RequestRecorder(self, kind)

    async def track(
        self, outputs: AsyncGenerator[RequestOutput, None], kind: StreamKind = "chat"
    ) -> AsyncGenerator[RequestOutput, None]:
        """Pass a request's outputs through unchanged, recording its latencies on the way.

        Closing this generator closes `outputs` too, so an engine stream ends (and aborts) at once.
        """
        recorder = self.recorder(kind)
        try:
            async for out in outputs:
                recorder.observe(out)
                yield out
        finally:
            recorder.close()
            await outputs.aclose()

    def render(self, engine: EngineClient | None, rate_limits: RateLimits | None = None) -> bytes:
        """The exposition text, with engine gauges read from `engine.stats()` now."""
        self._engine.engine, self._engine.rate_limits = engine, rate_limits
        try:
            return generate_latest(self.registry)
        finally:
            self._engine.engine, self._engine.rate_limits = None, None


class RequestRecorder:
    """Feeds one request's stream of outputs into the latency histograms.

    Times are taken as the consumer sees the outputs, which is what a user waits for.
    """

    def __init__(
        self, metrics: Metrics, kind: StreamKind = "chat", start: float | None = None
    ) -> None:
        self.metrics = metrics
        self.kind = kind
        self.start = time.monotonic() if start is None else start
        self.last_token_time: float | None = None
        self.seen = False
        self.done = False

    def observe(self, out: RequestOutput) -> None:
        if self.done:
            return
        if not self.seen:
            self.metrics.requests_served.labels(self.kind).inc()
        self.seen = True
        now = time.monotonic()
        # Remote outputs carry text but no token ids; count a text delta as one token.
        n = len(out.delta_token_ids) or (1 if out.delta_text else 0)
        if n:
            if self.last_token_time is None:
                self.metrics.time_to_first_token.observe(now - self.start)
            else:
                gap = (now - self.last_token_time) / n
                for _ in range(n):
                    self.metrics.inter_token_latency.observe(gap)
            self.last_token_time = now
        if out.finished:
            self.metrics.e2e_latency.observe(now - self.start)
            self.metrics.requests_finished.labels(out.finish_reason or "stop").inc()
            self.done = True

    def close(self) -> None:
        """Call when the consumer stops; a started stream that did not finish counts as aborted.

        A request refused before its first output (prompt too long...) is not counted.
        """
        if self.seen and not self.done:
            self.metrics.e2e_latency.observe(time.monotonic() - self.start)
            self.metrics.requests_finished.labels("abort").inc()
            self.done = True


METRICS = Metrics()


def track(
    outputs: AsyncGenerator[RequestOutput, None], kind: StreamKind = "chat"
) -> AsyncGenerator[RequestOutput, None]:
    """Record one request's stream in /metrics: `async for out in track(engine.chat(...))`.

    `outputs` is any stream of RequestOutput from an `EngineClient` (`generate` or `chat`);
    `kind` says who asked ("chat": the browser chat, "api": /v1). The outputs pass through
    unchanged; closing the returned generator closes `outputs` (which aborts the request).
    """
    return METRICS.track(outputs, kind)


router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    runtime = runtime_of(request)
    return Response(
        METRICS.render(runtime.engine, runtime.rate_limits), media_type=CONTENT_TYPE_LATEST
    )


@router.get("/health", tags=["ops"])
async def health(request: Request) -> JSONResponse:
    """200 once the model is loaded (and a remote engine answers), 503 before."""
    runtime = runtime_of(request)
    engine = runtime.engine
    if engine is None:
        error = runtime.engine_error
        body = {"status": "error", "error": error} if error else {"status": "loading"}
        return JSONResponse(body, status_code=503)
    if not await engine.health():
        return JSONResponse({"status": "engine unreachable"}, status_code=503)
    return JSONResponse({"status": "ok"})
