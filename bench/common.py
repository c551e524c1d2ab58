"""What every benchmark shares: checkpoints, workloads and recording results with provenance."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import statistics
import subprocess
import time
from pathlib import Path

from engine.cpu_malloc import keep_freed_memory

# The engine tunes glibc's allocator on CPU (engine/cpu_malloc.py); applying it before any peer
# runs gives every peer in a benchmark process the same allocator, recorded in each result.
ALLOCATOR = "glibc, freed memory kept (mmap off, trim above 2 GiB)" if keep_freed_memory() else "default"

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
    if os.environ.get("PAGECHAT_COMMIT"):  # a copy of the tree without .git (the GPU machine)
        return os.environ["PAGECHAT_COMMIT"]
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
        "allocator": ALLOCATOR,
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


# ---- shared by the chat benchmarks (multi_turn, long_doc, serving) ----------------------------


def default_shape(device: str) -> str:
    """qwen3-0.6b on CPU (minutes), qwen3-4b (the product's model) on a GPU."""
    return "qwen3-4b" if device.startswith("cuda") else "qwen3-0.6b"


def default_dtype(device: str) -> str:
    return "bfloat16" if device.startswith("cuda") else "float32"


def add_model_args(parser: argparse.ArgumentParser, name_help: str) -> None:
    """The checkpoint, device and output options every benchmark takes."""
    parser.add_argument("--shape", default=None,
                        help="tiny | qwen3-0.6b | qwen3-4b random weights (default: qwen3-0.6b on "
                             "cpu, qwen3-4b on cuda)")
    parser.add_argument("--model", help="a checkpoint directory instead of --shape")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (default %(default)s)")
    parser.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--name", default=None, help=name_help)
    parser.add_argument("--out-dir", default=None, help="default bench/results")


def resolve_model_args(args: argparse.Namespace) -> tuple[Path, str, str]:
    """(checkpoint directory, shape label, dtype) from the parsed options."""
    shape = args.shape or default_shape(args.device)
    path = Path(args.model) if args.model else ensure_checkpoint(shape)
    return path, (str(args.model) if args.model else shape), args.dtype or default_dtype(args.device)


def kv_bytes_per_token(model_dir: Path, dtype: str) -> int:
    """K and V of every layer for one token, in bytes."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    heads = config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    size = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    return 2 * config["num_hidden_layers"] * heads * head_dim * size


class MachineMonitor:
    """How much of the machine other processes used while a benchmark ran.

    Compares the CPU time of the whole machine (/proc/stat) with this process's own (and its
    waited-for children's), so a result taken on a shared machine says so.
    """

    def __enter__(self) -> MachineMonitor:
        self.start = (time.monotonic(), _machine_busy_s(), _own_cpu_s(), os.getloadavg())
        return self

    def __exit__(self, *exc: object) -> None:
        self.end = (time.monotonic(), _machine_busy_s(), _own_cpu_s(), os.getloadavg())

    def report(self) -> dict:
        (t0, busy0, own0, load0), (t1, busy1, own1, load1) = self.start, self.end
        cores = os.cpu_count() or 1
        elapsed = max(t1 - t0, 1e-9)
        other = (max(0.0, (busy1 - busy0) - (own1 - own0))
                 if busy0 is not None and busy1 is not None else None)
        share = None if other is None else round(other / (elapsed * cores), 3)
        return {
            "cpu_count": cores,
            "elapsed_s": round(elapsed, 1),
            "own_cpu_s": round(own1 - own0, 1),
            "other_processes_cpu_s": None if other is None else round(other, 1),
            "other_processes_cpu_share": share,
            "load_average_start": [round(x, 2) for x in load0],
            "load_average_end": [round(x, 2) for x in load1],
            "shared": bool(share is not None and share > 0.05),
        }


def _machine_busy_s() -> float | None:
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(x) for x in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    import resource

    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def release_memory() -> None:
    """Give back what a finished peer held before the next one loads (GPU memory above all)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def summarize(values: list[float]) -> dict:
    """p50 / p99 / mean of a sample (NaN when empty), rounded for the JSON."""
    if not values:
        return {"n": 0, "p50": None, "p99": None, "mean": None}
    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 6),
        "p99": round(percentile(values, 99), 6),
        "mean": round(sum(values) / len(values), 6),
    }
