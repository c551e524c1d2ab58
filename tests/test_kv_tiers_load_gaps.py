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
  decode). After its token LOAD_AT the document's follow-up arrives, waits in the loading state
  while the disk tier's thread reads the 2 GiB, and the stream keeps stepping. Every gap between
  two stream tokens whose steps both ran while the load was in flight counts. The reference is
  the same engine's next stream, another prompt of the same length with no load: its gaps at
  the same tokens. (A decode step reads the stream's whole KV, 4 MiB a token here, so later
  tokens' steps are longer: against the stream's own first gaps, as this check compared
  before, the stream's growth alone read as 1.5x in some runs.) The median and the 90th
  percentile of the gaps during the load must stay within 3x of the reference's median over
  the same tokens. Not asserted, printed: the largest gap of each.
- What the gaps were made of, traced step by step: while a load is in flight a step leaves one
  core to the loader (LLMEngine._cores_beside_loads): the median gap is 1.4-1.8x the
  reference's, and the 2 GiB load takes 3-6 s; with both cores stepping the gaps stayed within
  1.1-1.25x but the load (at idle priority) took 25 s. The outliers that failed this check in
  4 of 6 runs came from the disk writer, not the load: each 64 MiB block the stream completed
  was written through the page cache, ~330 ms of kernel CPU beside the steps, and the reference
  stream itself had 450-980 ms gaps at its writes. With the writer's O_DIRECT writes (2-4 ms of
  CPU a block) the reference's largest gap is 120-200 ms, and 9 of 9 runs passed (p90 1.6-2.6x
  the reference); the largest gap during a load was still 380-550 ms in some of them: the
  loader's RWF_NOWAIT "is it cached?" read started readahead of every cold file into the page
  cache. With mincore asked instead, 7 of 7 runs: p90 1.1-2.0x, largest gap 155-202 ms (one
  run 548 ms).
- Before the loader ran at idle priority one step per 2 GiB load stalled 0.4-0.6 s in every
  run; the loader reads with O_DIRECT straight into the pool's blocks (touched at start), so no
  fresh memory is faulted in beside the steps. The step that lands the load (the follow-up's
  prefill) is not "during the load" and is not counted.
- The follow-up must get its whole document from disk (cached tokens, the disk tier's counters),
  and the load must have lasted long enough for the stream to step several times during it, so
  the check cannot pass by the load being too short to overlap anything.

Marked slow (about 60 s: a 0.6 GB random checkpoint, 2 GiB written and read back, two
streams); peak memory about 4 GB (weights, the 3.5 GiB KV pool the blocks are loaded into).
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from engine import LLM, EngineConfig, SamplingParams
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
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
(REFERENCE_STREAM,) = random_prompts([len(STREAM)], seed=24)
DOC_BYTES = len(DOC) * KV_PER_TOKEN  # 2 GiB: the load
STREAM_TOKENS = 200
ENGINE = dict(dtype="float32", num_kv_blocks=56, max_model_len=768, kv_disk_gb=4.0)
LOAD_AT = 15  # the follow-up arrives after this stream token (a few steps to settle first)


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


@dataclass
class StreamRun:
    """One stream's tokens: when each arrived and whether a load was in flight at that step."""

    times: list[float] = field(default_factory=list)
    loading: list[bool] = field(default_factory=list)
    doc_out: RequestOutput | None = None
    load_seconds: float = 0.0

    def gaps(self, during_load: bool) -> dict[int, float]:
        """Token index -> gap before it; during_load: only gaps whose two steps both ran while
        the load was in flight (else every gap)."""
        return {
            i: self.times[i] - self.times[i - 1]
            for i in range(1, len(self.times))
            if not during_load or (self.loading[i - 1] and self.loading[i])
        }


def run_stream(
    engine: LLMEngine, prompt: list[int], request_id: str, load_at: int | None
) -> StreamRun:
    """Step `engine` until the stream `prompt` has STREAM_TOKENS tokens; with `load_at`, the
    document's follow-up (a load from disk) arrives after the stream's token `load_at`, and the
    stream is stopped once the follow-up has its answer."""
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    stream = SamplingParams(temperature=0.0, max_tokens=STREAM_TOKENS, ignore_eos=True)
    engine.add_request(prompt, stream, request_id=request_id)
    run = StreamRun()
    load_started = 0.0
    deadline = time.monotonic() + 300
    while engine.has_unfinished() and time.monotonic() < deadline:
        outs = engine.step()
        now = time.monotonic()
        loading = engine.scheduler.num_loading == 1
        if loading and not load_started:
            load_started = now
        if load_started and not loading and not run.load_seconds:
            run.load_seconds = now - load_started
        for out in outs:
            if out.request_id == "doc" and out.finished:
                run.doc_out = out
            if out.request_id == request_id and out.delta_token_ids:
                run.times.append(now)
                run.loading.append(loading)
        if load_at is not None and len(run.times) == load_at + 1 and "doc" not in engine.requests:
            if run.doc_out is None:
                engine.add_request(DOC + Q2, one, request_id="doc")
        if run.doc_out is not None and request_id in engine.requests:
            engine.abort(request_id)
    return run


@pytest.mark.timing
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
    loaded = run_stream(engine, STREAM, "stream", load_at=LOAD_AT)
    doc_out = loaded.doc_out
    assert doc_out is not None, "the follow-up did not finish"
    tiers = engine.stats().kv_tiers
    # The same stream's steps without a load: another prompt of the same length, so every token
    # sits at the same position and its step reads as much KV.
    reference = run_stream(engine, REFERENCE_STREAM, "reference", load_at=None)

    during = loaded.gaps(during_load=True)
    without = reference.gaps(during_load=False)
    assert len(during) >= 5, "the load was too short to overlap the stream's steps"
    assert max(during) < len(reference.times), "the reference stream is shorter than the load"
    same_tokens = [without[i] for i in during]
    median = statistics.median(same_tokens)
    during_median = statistics.median(during.values())
    during_p90 = statistics.quantiles(during.values(), n=10)[-1]
    worst, worst_without = max(during.values()), max(same_tokens)
    early = statistics.median(loaded.gaps(during_load=False)[i] for i in range(4, LOAD_AT + 1))
    print(
        f"\n2 GiB load from disk: {loaded.load_seconds:.2f} s in the loading state "
        f"(disk tier {tiers.disk_load_seconds:.2f} s, {tiers.disk_bytes_read / 2**30:.2f} GiB "
        f"read); {len(during)} stream gaps during the load (tokens {min(during)}-{max(during)}): "
        f"median {during_median * 1000:.0f} ms vs {median * 1000:.0f} ms for the same tokens "
        f"without a load ({during_median / median:.2f}x), p90 {during_p90 * 1000:.0f} ms "
        f"({during_p90 / median:.2f}x), largest {worst * 1000:.0f} ms vs {worst_without * 1000:.0f}"
        f" ms ({worst / worst_without:.2f}x); before the load (tokens 4-{LOAD_AT}) "
        f"{early * 1000:.0f} ms"
    )
    prefix = doc_out.cached_prefix
    assert doc_out.num_cached_tokens == len(DOC)
    assert prefix is not None and prefix.disk_tokens == len(DOC) and prefix.device_tokens == 0
    assert tiers.disk_bytes_read >= DOC_BYTES and tiers.disk_hit_tokens >= len(DOC)
    assert during_median <= 3 * median
    assert during_p90 <= 3 * median
    engine.scheduler.check_integrity()
    engine.close()
