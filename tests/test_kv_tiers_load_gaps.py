"""A stream keeps its inter-token gaps while another request loads 2 GiB of KV from disk.

Issue 15's check: "a stream running while another request loads 2 GB from disk keeps its
inter-token gaps (within 3x of its gaps without the load)". What this measures, on the CPU:

- A model shaped for a large KV and a cheap prefill (32 layers x 64 KV heads x head_dim 256,
  hidden size 64, float32: 4 MiB of KV per token), so a 512-token document fills 32 blocks,
  2 GiB on disk, in seconds of prefill. An engine answers the document once and is closed (its
  writer fsyncs every block); the files' pages are then dropped from the OS page cache
  (posix_fadvise DONTNEED on each file, after the fsync), so the restarted engine's load reads
  2 GiB from the disk itself, not a memory copy out of the page cache.
- A fresh engine on the same directory (a restart) runs a stream (a short prompt, greedy
  decode). Its gaps between tokens before anything else is submitted are the baseline (median);
  then the document's follow-up arrives, waits in the loading state while the disk tier's thread
  reads the 2 GiB, and the stream keeps stepping. Every gap between two stream tokens whose steps
  both ran while the load was in flight counts: their median and their 90th percentile must
  stay within 3x of the baseline's median. Not asserted, printed: the largest gap. Before the
  loader ran at idle priority one step per 2 GiB load stalled 0.4-0.6 s (6-8x) in every run;
  then most runs stayed within 2.5x, and about one in three still stalled once (reproduced
  outside the engine: a decode step's OpenMP barriers wait while another thread reads into
  freshly allocated memory; not the GIL, the loader's reads and checksums release it). Since the
  loader reads straight into the pool's blocks (touched at start), there is no fresh memory:
  the load takes 1.6-1.9 s instead of 3.6-4.2 s and the largest gap was 140-145 ms in 4 of 5
  runs (one run, with another job on the machine, 518 ms). The baseline itself had a 361 ms
  stall once. The step that lands the load (the follow-up's prefill) is not "during the load"
  and is not counted.
- The follow-up must get its whole document from disk (cached tokens, the disk tier's counters),
  and the load must have lasted long enough for the stream to step several times during it, so
  the check cannot pass by the load being too short to overlap anything.

Marked slow (about 30 s: a 0.6 GB random checkpoint, 2 GiB written and read back); peak
memory about 4 GB (weights, the 3.5 GiB KV pool the blocks are loaded into).
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from pathlib import Path

import pytest

from engine import LLM, EngineConfig, SamplingParams
from engine.llm_engine import LLMEngine
from engine.tiny import write_checkpoint
from tests.engine_helpers import random_prompts

pytestmark = pytest.mark.slow

BS = 16
SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=32,
    num_attention_heads=64,
    num_key_value_heads=64,
    head_dim=256,
    max_position_embeddings=1024,
)
KV_PER_TOKEN = 2 * 32 * 64 * 256 * 4  # k|v, layers, KV heads, head_dim, float32: 4 MiB
DOC, Q1, Q2, WARM, STREAM = random_prompts([512, 16, 16, 8, 32], seed=23)
DOC_BYTES = len(DOC) * KV_PER_TOKEN  # 2 GiB: the load
STREAM_TOKENS = 200
ENGINE = dict(dtype="float32", num_kv_blocks=56, max_model_len=768, kv_disk_gb=4.0)
BASELINE_SKIP = 3  # the stream's first gaps include one-off costs of its first steps
BASELINE_GAPS = 12


@pytest.fixture(scope="module")
def big_kv_checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("big-kv") / "model", "tiny", **SHAPE)


def drop_from_page_cache(directory: Path) -> int:
    """Evict the (fsynced, clean) block files' pages from the page cache; their total bytes."""
    total = 0
    for path in directory.rglob("*.kv"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


def test_a_stream_keeps_its_gaps_while_2_gib_load_from_disk(big_kv_checkpoint, tmp_path):
    kv_dir = tmp_path / "kv"
    first = LLM(str(big_kv_checkpoint), kv_disk_dir=kv_dir, **ENGINE)
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    first.generate(DOC + Q1, one)
    first.engine.close()  # every block written and fsynced
    del first
    gc.collect()
    on_disk = drop_from_page_cache(kv_dir)
    assert on_disk >= DOC_BYTES >= 2 << 30

    engine = LLMEngine(EngineConfig(model=str(big_kv_checkpoint), kv_disk_dir=kv_dir, **ENGINE))
    engine.add_request(WARM, SamplingParams(temperature=0.0, max_tokens=2), request_id="warm")
    while engine.has_unfinished():  # the engine's first forward pays one-off set-up costs
        engine.step()
    stream = SamplingParams(temperature=0.0, max_tokens=STREAM_TOKENS, ignore_eos=True)
    engine.add_request(STREAM, stream, request_id="stream")
    baseline: list[float] = []
    during_load: list[float] = []
    last = None  # (time of the stream's last token, whether a load was in flight then)
    doc_out = None
    load_started = load_ended = 0.0
    deadline = time.monotonic() + 300
    while engine.has_unfinished() and time.monotonic() < deadline:
        outs = engine.step()
        now = time.monotonic()
        loading = engine.scheduler.num_loading == 1
        if loading and not load_started:
            load_started = now
        if load_started and not loading and not load_ended:
            load_ended = now
        for out in outs:
            if out.request_id == "doc" and out.finished:
                doc_out = out
            if out.request_id != "stream" or not out.delta_token_ids:
                continue
            if last is not None:
                gap = now - last[0]
                if not load_started and len(baseline) < BASELINE_SKIP + BASELINE_GAPS:
                    baseline.append(gap)
                elif last[1] and loading:
                    during_load.append(gap)
            last = (now, loading)
        if len(baseline) == BASELINE_SKIP + BASELINE_GAPS and "doc" not in engine.requests:
            if doc_out is None:
                engine.add_request(DOC + Q2, one, request_id="doc")
        if doc_out is not None and "stream" in engine.requests:
            engine.abort("stream")
    assert doc_out is not None, "the follow-up did not finish"

    median = statistics.median(baseline[BASELINE_SKIP:])
    baseline_worst = max(baseline[BASELINE_SKIP:])
    during_median = statistics.median(during_load or [float("nan")])
    during_p90 = (
        statistics.quantiles(during_load, n=10)[-1] if len(during_load) > 1 else float("nan")
    )
    worst = max(during_load, default=float("nan"))
    tiers = engine.stats().kv_tiers
    print(
        f"\n2 GiB load from disk: {load_ended - load_started:.2f} s in the loading state "
        f"(disk tier {tiers.disk_load_seconds:.2f} s, {tiers.disk_bytes_read / 2**30:.2f} GiB "
        f"read); stream gaps: median {median * 1000:.0f} ms without a load, during the load "
        f"{len(during_load)} gaps, median {during_median * 1000:.0f} ms "
        f"({during_median / median:.2f}x), p90 {during_p90 * 1000:.0f} ms "
        f"({during_p90 / median:.2f}x), largest {worst * 1000:.0f} ms vs "
        f"{baseline_worst * 1000:.0f} ms without ({worst / baseline_worst:.2f}x)"
    )
    prefix = doc_out.cached_prefix
    assert doc_out.num_cached_tokens == len(DOC)
    assert prefix is not None and prefix.disk_tokens == len(DOC) and prefix.device_tokens == 0
    assert tiers.disk_bytes_read >= DOC_BYTES and tiers.disk_hit_tokens >= len(DOC)
    assert len(during_load) >= 5, "the load was too short to overlap the stream's steps"
    assert during_median <= 3 * median
    assert during_p90 <= 3 * median
    engine.scheduler.check_integrity()
    engine.close()
