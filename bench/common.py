"""What every benchmark shares: checkpoints, workloads and recording results with provenance."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import random
import statistics
import subprocess
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CACHE_DIR = Path(os.environ.get("PAGECHAT_BENCH_CACHE", Path.home() / ".cache" / "pagechat"))


def ensure_checkpoint(shape: str, seed: int = 0) -> Path:
    """A random-weight checkpoint of a real Qwen3 shape, written once and reused."""
    from engine.tiny import write_checkpoint

    path = CACHE_DIR / f"random-{shape}-seed{seed}"
    if not (path / "model.safetensors").is_file():
        write_checkpoint(path, shape=shape, seed=seed)
    return path


def random_token_prompts(num: int, lengths: tuple[int, int], seed: int = 0) -> list[list[int]]:
    """nano-vllm style prompts: random ids below 10,000, lengths uniform in [lo, hi]."""
    rng = random.Random(seed)
    return [[rng.randrange(10_000) for _ in range(rng.randint(*lengths))] for _ in range(num)]


def device_description(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def git_commit() -> str:
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL
        ).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_result(name: str, payload: dict, device: str, out_dir: Path | None = None) -> Path:
    import torch

    record = {
        "benchmark": name,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "device": device_description(device),
        "torch": torch.__version__,
        **payload,
    }
    out_dir = out_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
