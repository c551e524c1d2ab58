"""A follow-up question after a restart: KV from the disk tier vs reading the document again.

Per document length: an engine with a disk KV tier answers a first question on the document and
is closed (its writer finishes); a new engine on the same directory, as after a restart, answers
a follow-up sharing the document. Its time to first token (the disk load and the question's own
tokens) is compared with the same follow-up on an engine without the disk tier, which reads the
whole document again. Every engine first answers a short unrelated prompt, so its one-off
set-up costs (the first forward) are left out of both figures. Block files are written with
O_DIRECT, so the restarted engine reads them from the disk, not from the OS page cache.

    python -m bench.kv_restart                        # CPU: 8K and 32K tokens, qwen3-0.6b
    python -m bench.kv_restart --device cuda          # GPU: 32K and 128K, qwen3-4b
    python -m bench.kv_restart --shape tiny --doc-lens 512   # a smoke run
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.common import (
    add_model_args,
    kv_bytes_per_token,
    release_memory,
    resolve_model_args,
    write_result,
)

if TYPE_CHECKING:
    from engine.llm import LLM

DEFAULT_DOC_LENS = {"cpu": [8192, 32768], "cuda": [32768, 131072]}
GOAL_SPEEDUP = 20.0  # the goal on the CPU: 20x faster than reading the document again


class PauseClock:
    """Seconds this process stood still: a thread ticking every 10 ms adds up the ticks that came
    more than 0.25 s late (the process was stopped, e.g. SIGSTOPped by another job on a shared
    machine, or starved of every core). Figures are also given with these seconds taken out."""

    def __init__(self) -> None:
        self.paused = 0.0
        threading.Thread(target=self._run, daemon=True, name="pause-clock").start()

    def _run(self) -> None:
        last = time.monotonic()
        while True:
            time.sleep(0.01)
            now = time.monotonic()
            if now - last > 0.25:
                self.paused += now - last - 0.01
            last = now


PAUSES = PauseClock()


def first_token_s(llm: LLM, prompt: list[int]) -> tuple[float, int, float]:
    """Seconds until the first token of a one-token answer, the cached prompt tokens, and the
    seconds the process stood still meanwhile (PauseClock)."""
    from engine import SamplingParams

    paused = PAUSES.paused
    start = time.perf_counter()
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))[0]
    return time.perf_counter() - start, out.num_cached_tokens, PAUSES.paused - paused


def run_one(model: Path, dtype: str, device: str, doc_len: int, kv_dir: Path) -> dict:
    from engine.llm import LLM

    rng = random.Random(doc_len)
    doc, q1, q2, warm = ([rng.randrange(10_000) for _ in range(n)] for n in (doc_len, 32, 32, 64))
    kv_gb = (doc_len + 256) * kv_bytes_per_token(model, dtype) / 2**30 * 1.1
    common: dict[str, Any] = dict(dtype=dtype, device=device, max_model_len=doc_len + 256)
    if device == "cpu":
        common["kv_cache_memory_gb"] = kv_gb
    shutil.rmtree(kv_dir, ignore_errors=True)

    first = LLM(str(model), kv_disk_dir=kv_dir, kv_disk_gb=kv_gb * 2, **common)
    first_token_s(first, warm)  # each engine's first forward pays one-off set-up costs
    first_s, _, first_paused = first_token_s(first, doc + q1)
    start = time.perf_counter()
    first.engine.close()
    flush_s = time.perf_counter() - start
    written = first.stats().kv_tiers
    del first
    release_memory()

    restarted = LLM(str(model), kv_disk_dir=kv_dir, kv_disk_gb=kv_gb * 2, **common)
    first_token_s(restarted, warm)
    restart_s, cached, restart_paused = first_token_s(restarted, doc + q2)
    tiers = restarted.stats().kv_tiers
    restarted.engine.close()
    del restarted
    release_memory()

    cold = LLM(str(model), **common)
    first_token_s(cold, warm)
    reread_s, _, reread_paused = first_token_s(cold, doc + q2)
    del cold
    release_memory()
    return {
        "doc_tokens": doc_len,
        "first_question_ttft_s": first_s,
        "writer_flush_after_answer_s": flush_s,
        "disk_bytes": written.disk_bytes if written else None,
        "restart_follow_up_ttft_s": restart_s,
        "restart_follow_up_cached_tokens": cached,
        "restart_disk_load_s": tiers.disk_load_seconds if tiers else None,
        "restart_disk_bytes_read": tiers.disk_bytes_read if tiers else None,
        "reread_follow_up_ttft_s": reread_s,
        "speedup_vs_reread": reread_s / restart_s if restart_s else None,
        # Seconds the process stood still during each figure (PauseClock), and the ratio
        # without them.
        "first_question_paused_s": first_paused,
        "restart_follow_up_paused_s": restart_paused,
        "reread_paused_s": reread_paused,
        "speedup_vs_reread_without_pauses": (reread_s - reread_paused)
        / max(1e-9, restart_s - restart_paused),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(parser, "result name (default kv_restart-<device>)")
    parser.add_argument("--doc-lens", type=int, nargs="+", default=None)
    parser.add_argument("--kv-dir", default=None, help="disk tier directory (default: a temp dir)")
    args = parser.parse_args()
    model, shape, dtype = resolve_model_args(args)
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    doc_lens = args.doc_lens or DEFAULT_DOC_LENS[device]
    kv_dir = Path(args.kv_dir) if args.kv_dir else Path(tempfile.mkdtemp(prefix="kv-restart-"))
    runs = []
    try:
        for doc_len in doc_lens:
            run = run_one(model, dtype, args.device, doc_len, kv_dir / str(doc_len))
            runs.append(run)
            print(
                f"{doc_len:>7} tokens: restart follow-up {run['restart_follow_up_ttft_s']:.3f} s "
                f"({run['restart_follow_up_cached_tokens']} cached, disk load "
                f"{run['restart_disk_load_s']:.3f} s) vs re-reading {run['reread_follow_up_ttft_s']:.3f} s: "
                f"{run['speedup_vs_reread']:.1f}x (stood still {run['restart_follow_up_paused_s']:.1f} "
                f"/ {run['reread_paused_s']:.1f} s: "
                f"{run['speedup_vs_reread_without_pauses']:.1f}x without)"
            )
    finally:
        if not args.kv_dir:
            shutil.rmtree(kv_dir, ignore_errors=True)
    name = args.name or f"kv_restart-{device}"
    path = write_result(
        name,
        {"shape": shape, "dtype": dtype, "goal_speedup": GOAL_SPEEDUP, "runs": runs},
        args.device,
        Path(args.out_dir) if args.out_dir else None,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
