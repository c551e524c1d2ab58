"""Monitoring (compose.yaml's `monitoring` profile, deploy/monitoring/).

Statically: the Grafana dashboard JSON loads, points at the provisioned Prometheus data source,
and every metric its queries name is one the server exports (the exporter run against a fake
engine with KV tiers and a fake CUDA device, so the GPU and tier series are checked too); the
metric names follow Prometheus conventions. Live: a real Prometheus (Debian's `prometheus`
package, installed by .ci/run) scrapes a running server whose /metrics is closed by
PAGECHAT_METRICS_TOKEN, with the shipped prometheus.yml and that token, and every PromQL
expression of the dashboard returns data.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import httpx
import pytest
import yaml

from app.serving.metrics import Metrics
from app.serving.rate_limit import RateLimits
from engine.kv_tiers import KVTierStats
from engine.outputs import EngineStats
from tests.app_client import Server, free_port
from tests.test_compose import compose, needs_compose

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "pagechat.json"
METRIC_NAME = re.compile(r"\b((?:pagechat|process)_[a-z0-9_]+)\b")
GPU_ONLY = re.compile(r"pagechat_gpu_")  # series only a CUDA engine exports


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def expressions() -> list[str]:
    return [t["expr"] for panel in dashboard()["panels"] for t in panel["targets"]]


class FakeTorchCuda:
    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def is_initialized() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def memory_reserved(index: int) -> int:
        return 3 * 2**30

    @staticmethod
    def get_device_properties(index: int):
        return types.SimpleNamespace(total_memory=80 * 2**30)


class FakeEngine:
    def stats(self) -> EngineStats:
        tiers = KVTierStats(  # a host and a disk tier on
            device_hit_tokens=32,
            host_hit_tokens=16,
            disk_hit_tokens=8,
            host_blocks_used=5,
            host_blocks_total=500,
            disk_blocks=7,
            disk_bytes=7 * 4096,
            disk_capacity_bytes=2**30,
            disk_bad_files=1,
            disk_load_seconds=0.5,
        )
        return EngineStats(
            num_running=2,
            num_waiting=1,
            kv_blocks_used=10,
            kv_blocks_total=100,
            block_size=16,
            prefix_cache_queries=64,
            prefix_cache_hits=32,
            prompt_tokens_total=100,
            generation_tokens_total=50,
            requests_finished_total=3,
            generation_tokens_per_s=9.0,
            kv_tiers=tiers,
        )


def exported(monkeypatch) -> dict[str, set[tuple[tuple[str, str], ...]]]:
    """Every sample name the exporter writes, with its label sets, on a GPU with KV tiers."""
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=FakeTorchCuda))
    metrics = Metrics()
    text = metrics.render(FakeEngine(), RateLimits()).decode()  # type: ignore[arg-type]
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, set[tuple[tuple[str, str], ...]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, set()).add(tuple(sorted(sample.labels.items())))
    return out


def test_the_dashboard_loads_and_uses_the_provisioned_data_source():
    board = dashboard()
    assert board["uid"] == "pagechat-serving" and board["panels"]
    source = yaml.safe_load(
        (MONITORING / "grafana/provisioning/datasources/prometheus.yaml").read_text()
    )
    uid = source["datasources"][0]["uid"]
    provider = yaml.safe_load(
        (MONITORING / "grafana/provisioning/dashboards/pagechat.yaml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    titles = {p["title"] for p in board["panels"]}
    for wanted in (
        "Time to first token",
        "Inter-token latency",
        "Throughput",
        "Requests running and waiting",
        "KV cache blocks used by tier",
        "Prefix-cache hit rate",
        "Errors and aborts",
        "Rate-limited requests",
        "GPU memory",
    ):
        assert wanted in titles
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs) and all(
            t["datasource"]["uid"] == uid for t in panel["targets"]
        )


def test_every_dashboard_query_names_metrics_the_server_exports(monkeypatch):
    samples = exported(monkeypatch)
    for expr in expressions():
        names = METRIC_NAME.findall(expr)
        assert names, expr
        for name in names:
            assert name in samples, f"{name} (in {expr}) is not exported"
    # Labels the queries group by exist on those series.
    assert {dict(s)["tier"] for s in samples["pagechat_kv_tier_blocks_used"]} == {
        "device",
        "host",
        "disk",
    }
    assert {dict(s)["device"] for s in samples["pagechat_gpu_memory_used_bytes"]} == {"cuda:0"}
    reasons = {dict(s)["finish_reason"] for s in samples["pagechat_requests_finished_total"]}
    assert {"error", "abort"} <= reasons  # there from the start, at 0
    problems = {dict(s)["problem"] for s in samples["pagechat_kv_disk_problems_total"]}
    assert problems == {"bad_file", "write_error", "dropped"}
    assert {dict(s)["limit"] for s in samples["pagechat_rate_limited_requests_total"]} == {
        "requests",
        "tokens",
    }


def test_metric_names_follow_prometheus_conventions(monkeypatch):
    samples = exported(monkeypatch)
    for name in samples:
        assert re.fullmatch(r"[a-z_][a-z0-9_]*", name), name
        if name.startswith("pagechat_") and "seconds" in name:
            suffix = name.split("_seconds")[1]
            assert suffix in ("", "_total", "_bucket", "_count", "_sum", "_created"), name
    counters = [n for n in samples if n.endswith("_total")]
    assert (
        "pagechat_generation_tokens_total" in counters
        and "pagechat_prompt_tokens_total" in counters
    )
    assert all("_total_" not in n for n in samples)  # only counters end in _total
    text = Metrics().render(FakeEngine(), RateLimits()).decode()  # type: ignore[arg-type]
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        if kind == "gauge":  # a gauge named *_total would read as a counter
            assert not name.endswith("_total"), name
    gauges = [n for n, k in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M) if k == "gauge"]
    assert (
        "pagechat_kv_cache_blocks_capacity" in gauges and "pagechat_gpu_memory_used_bytes" in gauges
    )
    histograms = [n for n, k in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M) if k == "histogram"]
    assert histograms and all(n.endswith("_seconds") for n in histograms)  # the unit in the name


@needs_compose
def test_the_monitoring_profile_runs_prometheus_and_grafana_with_the_shipped_files():
    for profiles in ([], ["monitoring"], ["postgres", "vllm", "monitoring"]):
        compose(*[arg for p in profiles for arg in ("--profile", p)], "config", "--quiet")
    services = yaml.safe_load(compose("--profile", "monitoring", "config"))["services"]
    assert services["prometheus"]["profiles"] == ["monitoring"]
    assert services["grafana"]["profiles"] == ["monitoring"]
    for name, count in (("prometheus", 1), ("grafana", 2)):
        files = []
        for volume in services[name]["volumes"]:
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith("/"):  # a file of this repository, not a named volume
                assert Path(source).exists() and Path(source).is_relative_to(MONITORING), source
                files.append(source)
        assert len(files) == count, services[name]["volumes"]
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    assert config["scrape_configs"][0]["static_configs"][0]["targets"] == ["pagechat:8000"]
    source = yaml.safe_load(
        (MONITORING / "grafana/provisioning/datasources/prometheus.yaml").read_text()
    )
    assert source["datasources"][0]["url"] == "http://prometheus:9090"


def shipped_config(tmp_path: Path, token: str) -> dict:
    """deploy/monitoring/prometheus.yml with its token file written where the test can."""
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    assert job["authorization"]["credentials_file"] == "/prometheus/metrics_token"  # compose's
    (tmp_path / "metrics_token").write_text(token)
    job["authorization"]["credentials_file"] = str(tmp_path / "metrics_token")
    return config


def test_promtool_accepts_the_prometheus_config(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed: `apt-get install prometheus`")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(shipped_config(tmp_path, "")))
    done = subprocess.run(
        [promtool, "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# ---- a real Prometheus against a live server ------------------------------------------------


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.3)
    raise TimeoutError(f"{what}: {last}")


@pytest.mark.timeout(300)
def test_prometheus_scrapes_a_live_server_and_every_dashboard_query_returns_data(
    tiny_checkpoint, tmp_path
):
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip(
            "Prometheus is not installed: `apt-get install prometheus` (.ci/run does it in CI)"
        )
    token = "metrics-token-5d1e"  # /metrics is closed to anyone without it
    server = Server(
        tiny_checkpoint,
        tmp_path / "data",
        PAGECHAT_RATE_LIMIT_RPM="3",
        PAGECHAT_METRICS_TOKEN=token,
    )
    prom = None
    try:
        server.wait_ready(timeout=180)  # a loaded CI machine can take over a minute
        assert httpx.get(server.url + "/metrics").status_code == 401
        config = shipped_config(tmp_path, token)
        config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = "1s"
        job = config["scrape_configs"][0]
        job["static_configs"] = [{"targets": [server.url.removeprefix("http://")]}]
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        prom_url = f"http://127.0.0.1:{port}"
        prom_log = open(tmp_path / "prometheus.log", "w")
        prom = subprocess.Popen(
            [
                prometheus,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=prom_log,
            stderr=subprocess.STDOUT,
        )

        def query(expr: str) -> list:
            response = httpx.get(prom_url + "/api/v1/query", params={"query": expr}, timeout=10)
            body = response.json()
            assert body["status"] == "success", (expr, body)
            return body["data"]["result"]

        def ready() -> bool:  # Prometheus answers 503 in plain text until its TSDB is up
            return httpx.get(prom_url + "/-/ready", timeout=5).status_code == 200

        wait_for(ready, 60, "Prometheus never became ready")
        wait_for(
            lambda: query('up{job="pagechat"} == 1'), 60, "Prometheus never scraped the server"
        )
        api = httpx.Client(base_url=server.url + "/v1", timeout=60)
        model = api.get("/models").json()["data"][0]["id"]
        statuses, generated = [], 0
        for content in ("Hello there", "Hello there, again", "Something else", "Hello there"):
            response = api.post(
                "/chat/completions",
                json={
                    "model": model,
                    "messages": [{"role": "user", "content": content}],
                    "max_tokens": 8,
                    "temperature": 0.0,
                },
            )
            statuses.append(response.status_code)
            if response.status_code == 200:
                generated += response.json()["usage"]["completion_tokens"]
        assert statuses == [200, 200, 200, 429]  # RPM 3: the fourth is refused
        # Three more scrapes after the requests, so every rate() has two points with them.
        wait_for(
            lambda: query("sum(pagechat_generation_tokens_total) > 0"), 30, "no tokens scraped"
        )
        time.sleep(3)

        gpu = bool(query("count(pagechat_gpu_memory_used_bytes)"))
        for expr in expressions():
            if GPU_ONLY.search(expr) and not gpu:
                continue  # a CPU engine exports no GPU series (checked statically above)
            result = query(expr.replace("$__rate_interval", "1m"))
            assert result, f"no data for {expr}"
            if "histogram_quantile" in expr or "generation_tokens" in expr:
                assert all(math.isfinite(float(r["value"][1])) for r in result), (expr, result)
        refused = query('sum(pagechat_rate_limited_requests_total{limit="requests"})')
        assert float(refused[0]["value"][1]) == 1.0
        tokens = query("sum(pagechat_generation_tokens_total)")
        assert float(tokens[0]["value"][1]) == generated > 0  # what the API reported as usage
    finally:
        if prom is not None:
            prom.terminate()
            prom.wait(15)
        server.stop()
