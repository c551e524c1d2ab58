"""Per-request KV tier reporting (issue 15 item 4): where a request's cached prefix came from.

Real engines on the tiny float32 checkpoint. Each RequestOutput's `cached_prefix` must split
`num_cached_tokens` by tier exactly as the engine's own counters (engine.stats().kv_tiers) moved
blocks, the disk load time must cover a load made slow on purpose, and /metrics must export the
bytes the tiers moved (parsed back with prometheus-client's own parser).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.serving.metrics import Metrics
from engine import LLM, SamplingParams
from engine.outputs import CachedPrefix
from tests.engine_helpers import random_prompts

BS = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
BLOCK_BYTES = 2 * 2 * BS * 2 * 32 * 4  # k|v, layers, slots, kv heads, head_dim, float32
DOC, Q1, Q2, OTHER1, OTHER2 = random_prompts([300, 20, 21, 200, 200], seed=11)
DOC_BLOCKS = len(DOC) // BS
READ_DELAY_S = 0.02  # per block file, on the disk tier's thread


@pytest.fixture(scope="module")
def written(tiny_checkpoint, tmp_path_factory) -> Path:
    """A disk tier directory left by an engine, now closed, that answered DOC + Q1."""
    directory = tmp_path_factory.mktemp("kv-reporting")
    llm = LLM(str(tiny_checkpoint), kv_disk_dir=directory, num_kv_blocks=64)
    first = llm.generate(DOC + Q1, GREEDY)[0]
    assert first.cached_prefix == CachedPrefix()  # nothing cached on a fresh directory
    llm.engine.close()
    return directory


def test_restart_reports_disk_tokens_and_load_time(tiny_checkpoint, written, monkeypatch):
    llm = LLM(str(tiny_checkpoint), kv_disk_dir=written, num_kv_blocks=64)
    disk = llm.engine.kv_tiers.disk
    real_read = disk._read_block

    def slow_read(path: Path, *args) -> int:
        assert threading.current_thread() is not threading.main_thread()
        time.sleep(READ_DELAY_S)
        return real_read(path, *args)

    monkeypatch.setattr(disk, "_read_block", slow_read)
    out = llm.generate(DOC + Q2, GREEDY)[0]
    prefix = out.cached_prefix
    assert prefix is not None
    assert (prefix.device_tokens, prefix.host_tokens, prefix.disk_tokens) == (
        0,
        0,
        DOC_BLOCKS * BS,
    )
    assert out.num_cached_tokens == prefix.disk_tokens
    # The wait covers every (slowed) block read, and not much more on an idle test.
    assert DOC_BLOCKS * READ_DELAY_S <= prefix.disk_load_seconds < 30
    tiers = llm.stats().kv_tiers
    assert tiers.disk_hit_tokens == prefix.disk_tokens
    assert prefix.disk_load_seconds >= tiers.disk_load_seconds * 0.99  # wall time >= read time

    # The first question again: the document is in the device pool now, the blocks that hold
    # Q1 (written by the first engine) come from disk: a mix, split exactly.
    again = llm.generate(DOC + Q1, GREEDY)[0].cached_prefix
    assert again is not None and again.device_tokens == DOC_BLOCKS * BS
    assert again.disk_tokens >= BS and again.host_tokens == 0 and again.disk_load_seconds > 0
    assert llm.stats().kv_tiers.disk_hit_tokens == prefix.disk_tokens + again.disk_tokens

    samples = scrape(llm)
    hits = samples[("pagechat_kv_tier_hit_tokens_total", (("tier", "disk"),))]
    assert hits == prefix.disk_tokens + again.disk_tokens
    moved = samples[
        ("pagechat_kv_tier_moved_bytes_total", (("direction", "read"), ("tier", "disk")))
    ]
    assert moved == llm.stats().kv_tiers.disk_bytes_read >= DOC_BLOCKS * BLOCK_BYTES
    assert samples[("pagechat_kv_disk_load_seconds_total", ())] >= DOC_BLOCKS * READ_DELAY_S
    assert ("pagechat_kv_tier_moved_bytes_total", (("direction", "write"), ("tier", "disk"))) in (
        samples
    )
    llm.engine.close()


def test_host_and_device_tokens_are_reported_apart(tiny_checkpoint):
    """6 blocks stay in the device pool, the rest of the document comes back from host memory."""
    host_gb = 64 * BLOCK_BYTES / 2**30
    llm = LLM(str(tiny_checkpoint), num_kv_blocks=24, kv_host_gb=host_gb)
    llm.generate(DOC + Q1, GREEDY)
    for other in (OTHER1, OTHER2):  # evict the document's blocks to the host tier
        llm.generate(other, GREEDY)
    tiers = llm.stats().kv_tiers
    out = llm.generate(DOC + Q2, GREEDY)[0]
    prefix = out.cached_prefix
    assert prefix is not None and prefix.disk_tokens == 0 and prefix.disk_load_seconds == 0.0
    assert prefix.host_tokens > 0
    assert prefix.device_tokens + prefix.host_tokens == out.num_cached_tokens == DOC_BLOCKS * BS
    after = llm.stats().kv_tiers
    assert after.host_hit_tokens - tiers.host_hit_tokens == prefix.host_tokens
    assert after.device_hit_tokens - tiers.device_hit_tokens == prefix.device_tokens
    samples = scrape(llm)
    read = samples[
        ("pagechat_kv_tier_moved_bytes_total", (("direction", "read"), ("tier", "host")))
    ]
    written = samples[
        ("pagechat_kv_tier_moved_bytes_total", (("direction", "write"), ("tier", "host")))
    ]
    assert read == after.host_bytes_in == prefix.host_tokens // BS * BLOCK_BYTES
    assert written == after.host_bytes_out > 0


def test_without_lower_tiers_every_cached_token_is_a_device_hit(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint), num_kv_blocks=64, kv_host_gb=0, kv_disk_gb=0)
    llm.generate(DOC + Q1, GREEDY)
    out = llm.generate(DOC + Q2, GREEDY)[0]
    assert out.cached_prefix == CachedPrefix(device_tokens=DOC_BLOCKS * BS)
    samples = scrape(llm)
    assert not any(name == "pagechat_kv_tier_moved_bytes_total" for name, _ in samples)


def scrape(llm: LLM) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The /metrics exposition of this engine, parsed: (sample name, labels) -> value."""
    text = Metrics().render(llm.engine).decode()  # type: ignore[arg-type]
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
