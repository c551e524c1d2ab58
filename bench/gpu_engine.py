"""GPU engine figures on Qwen3-4B-shaped random weights (speed does not depend on the values).

  decode     tokens/s at batch 1 and 64 (CUDA graphs on), timed once every prompt is prefilled;
             with --async-output-ab, also with async output off and on, alternating; with
             --host-phase-steps, the host's time in each phase of a step; with
             --profile-steps, the torch profiler's GPU kernel time per step against the
             step's wall time, and the heaviest kernels
  prefill    tokens/s for one 8K, 32K and 128K-token prompt (chunked by max_num_batched_tokens);
             a length whose estimated time exceeds what is left of --budget-s is skipped
  nano-vllm  256 sequences, input and output lengths uniform in 100..1024, temperature 0.6,
             ignore EOS: total output tokens / wall time (nano-vllm's published workload); at
             --nano-max-s the run stops and reports the tokens so far (complete: false)
  hf         transformers `generate` on the same device and prompts as `decode`: decode
             tokens/s = batch x (N - 1) new tokens / (time for N tokens - time for 1)

Each part checks its own time: --budget-s bounds the whole invocation, so a slow part is cut
short with what it measured instead of running past the caller's limit.

    python -m bench.gpu_engine                      # all, writes bench/results/gpu-engine.json
    python -m bench.gpu_engine --only decode,prefill --prefill-lens 8192,32768
    python -m bench.gpu_engine --device cpu --dtype float32 --shape tiny --only decode ...  # smoke
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from bench.common import ensure_checkpoint, random_token_prompts, release_memory, write_result
from bench.gpu_check import decode_extra_lines, ratios

if TYPE_CHECKING:
    import torch
    from transformers import Qwen3ForCausalLM

    from engine.llm import LLM

T = TypeVar("T")

PARTS = ("decode", "prefill", "nano-vllm", "hf")


class Deadline:
    """Seconds left of a budget that started when it was made (inf without one)."""

    def __init__(self, seconds: float | None) -> None:
        self.end = time.perf_counter() + seconds if seconds is not None else float("inf")

    def left(self) -> float:
        return self.end - time.perf_counter()


def _engine(path: str | Path, device: str, dtype: str, kv_gb: float, **overrides: Any) -> LLM:
    from engine import LLM

    if not device.startswith("cuda"):
        overrides.setdefault("kv_cache_memory_gb", kv_gb)
    return LLM(str(path), device=device, dtype=dtype, **overrides)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decode_speed(llm: LLM, batch: int, prompt_len: int = 128, new_tokens: int = 256) -> dict:
    """Decode tokens/s with `batch` sequences running, counted after every prompt is prefilled."""
    from engine import SamplingParams

    engine = llm.engine
    llm.generate([[1, 2, 3, 4]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    ids = {engine.add_request(p, params) for p in random_token_prompts(batch, (prompt_len, prompt_len), seed=batch)}
    started: set[str] = set()
    while started != ids and engine.has_unfinished():  # prefill (possibly mixed with decodes)
        started.update(o.request_id for o in engine.step() if o.delta_token_ids)
    # Tokens generated in the timed window: with async output the sequences already hold one
    # more token than the outputs showed so far (the next step ran while they were emitted).
    held = sum(engine.requests[i].seq.num_output_tokens for i in ids if i in engine.requests)
    finished = 0
    start = time.perf_counter()
    while engine.has_unfinished():
        finished += sum(len(o.token_ids) for o in engine.step() if o.finished)
    seconds = time.perf_counter() - start
    decoded = finished - held
    steps = decoded / batch  # device steps: every sequence decodes one token a step
    return {"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "decode_tokens": decoded, "steps": steps, "seconds": seconds,
            "tokens_per_s": decoded / seconds, "ms_per_step": 1000 * seconds / max(steps, 1)}


def output_mode_ab(llm: LLM, batch: int, prompt_len: int, new_tokens: int, rounds: int = 2) -> dict:
    """Decode tokens/s with async output off and on, alternating `rounds` times each: what
    emitting a step's outputs during the next step's forward pass is worth (the engine's own
    setting is restored)."""
    engine = llm.engine
    own = engine.async_output
    runs: dict[str, list[float]] = {"off": [], "on": []}
    try:
        for _ in range(rounds):
            for mode in runs:
                engine.async_output = mode == "on"
                runs[mode].append(decode_speed(llm, batch, prompt_len, new_tokens)["tokens_per_s"])
    finally:
        engine.async_output = own
    on, off = statistics.median(runs["on"]), statistics.median(runs["off"])
    return {"on_tokens_per_s": on, "off_tokens_per_s": off, "on_over_off": on / off, "runs": runs}


def decode_profile(llm: LLM, batch: int, prompt_len: int, steps: int, warm: int = 10) -> dict:
    """Where a decode step's time goes: the torch profiler over `steps` steps of `batch` running
    sequences. On CUDA, the kernels' own time per step against the step's wall time says how much
    of the step the GPU waits for the host; the heaviest kernels say what the GPU does."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from engine import SamplingParams

    engine = llm.engine
    cuda = engine.runner.device.type == "cuda"
    params = SamplingParams(temperature=0.0, max_tokens=warm + steps + 2, ignore_eos=True)
    for p in random_token_prompts(batch, (prompt_len, prompt_len), seed=batch + 1):
        engine.add_request(p, params)
    for _ in range(warm + 1):  # the prompts, then a few decode steps
        engine.step()
    _sync(str(engine.runner.device))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        _sync(str(engine.runner.device))
    wall = time.perf_counter() - start
    while engine.has_unfinished():
        engine.step()
    events = prof.key_averages()
    if cuda:
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        times = {e.key: e.self_device_time_total for e in kernels}
    else:
        times = {e.key: e.self_cpu_time_total for e in events}
    top = sorted(times.items(), key=lambda kv: kv[1], reverse=True)[:8]
    # The profiled wall time includes the profiler's own start (CUPTI's, on CUDA): compare the
    # kernels' time with the unprofiled step of decode_speed instead.
    result = {"batch": batch, "steps": steps, "profiled_ms_per_step": 1000 * wall / steps,
              "top_ms_per_step": {name: round(us / 1000 / steps, 4) for name, us in top}}
    if cuda:
        result["gpu_kernels_ms_per_step"] = sum(times.values()) / 1000 / steps
    return result


def host_phases(llm: LLM, batch: int, prompt_len: int, steps: int, warm: int = 10) -> dict:
    """Median milliseconds a decode step spends in each phase on the host, over `steps` steps
    of `batch` sequences: what the GPU waits for between its steps. `read` is the wait for the
    sampled ids (on CUDA: for the GPU); with async output, `emit` (the previous step's outputs)
    runs while the GPU works, the other phases while it idles."""
    from engine import SamplingParams

    engine = llm.engine
    runner = engine.runner
    times: dict[str, list[float]] = {}

    def timed(obj: object, name: str, phase: str) -> None:
        inner = getattr(obj, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                times.setdefault(phase, []).append(time.perf_counter() - start)

        setattr(obj, name, wrapper)

    start = runner.start  # the class's method; the timed one below wraps it

    def start_then_timed_read(batch_: list) -> Callable[[], None]:
        read = start(batch_)

        def timed_read() -> None:
            t = time.perf_counter()
            read()
            times.setdefault("read", []).append(time.perf_counter() - t)

        return timed_read

    params = SamplingParams(temperature=0.0, max_tokens=warm + steps + 2, ignore_eos=True)
    for p in random_token_prompts(batch, (prompt_len, prompt_len), seed=batch + 2):
        engine.add_request(p, params)
    for _ in range(warm + 1):
        engine.step()
    phases = (
        (engine.scheduler, "schedule", "schedule"),
        (runner, "_build_inputs", "build_inputs"),
        (runner, "_forward", "forward_launch"),
        (runner.model, "compute_logits", "logits_launch"),
        (runner.sampler, "sample_on_device", "sample_launch"),
        (engine, "_collect_outputs", "emit"),
        (engine.scheduler, "postprocess", "postprocess"),
        (engine, "step", "step"),
    )
    try:
        for obj, name, phase in phases:
            timed(obj, name, phase)
        runner.start = start_then_timed_read  # type: ignore[method-assign,assignment]
        for _ in range(steps):
            engine.step()
    finally:
        for obj, name, _ in phases:
            delattr(obj, name)  # the class's method again
        del runner.start
    while engine.has_unfinished():
        engine.step()
    ms = {phase: round(1000 * statistics.median(v), 4) for phase, v in times.items()}
    ms["other"] = round(ms["step"] - sum(v for k, v in ms.items() if k != "step"), 4)
    return {"batch": batch, "steps": steps, "async_output": engine.async_output, "median_ms": ms}


def prefill_speed(llm: LLM, length: int) -> dict:
    from engine import SamplingParams

    prompt = random_token_prompts(1, (length, length), seed=length)[0]
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    start = time.perf_counter()
    out = llm.generate([prompt], params)[0]
    seconds = time.perf_counter() - start
    return {"prompt_tokens": length, "cached_tokens": out.num_cached_tokens, "seconds": seconds,
            "tokens_per_s": length / seconds}


def prefill_all(llm: LLM, lengths: list[int], deadline: Deadline) -> list[dict]:
    """Lengths in increasing order; skip one whose estimate (time grows like length^1.5 between
    linear MLP and quadratic attention) does not fit what is left of the budget."""
    from engine import SamplingParams

    warm = list(range(100, 100 + min(512, min(lengths))))
    llm.generate([warm], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
    results: list[dict] = []
    for length in sorted(lengths):
        if results:
            last = results[-1]
            if "seconds" in last:
                estimate = last["seconds"] * (length / last["prompt_tokens"]) ** 1.5
                if estimate > deadline.left():
                    results.append({"prompt_tokens": length, "skipped": "over budget",
                                    "estimated_s": round(estimate, 1), "left_s": round(deadline.left(), 1)})
                    continue
            elif "skipped" in last:
                results.append({"prompt_tokens": length, "skipped": "a shorter prompt was skipped"})
                continue
        results.append(prefill_speed(llm, length))
    return results


def nano_vllm_workload(llm: LLM, num_seqs: int = 256, input_lens: tuple[int, int] = (100, 1024),
                       output_lens: tuple[int, int] = (100, 1024),
                       deadline: Deadline | None = None) -> dict:
    """nano-vllm's bench.py: random ids below 10,000, uniform lengths, ignore EOS; stops at the
    deadline (aborting what is left) and reports the output tokens produced until then."""
    from engine import SamplingParams

    rng = random.Random(0)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(*input_lens))] for _ in range(num_seqs)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=rng.randint(*output_lens))
              for _ in range(num_seqs)]
    wanted = sum(p.max_tokens for p in params if p.max_tokens is not None)  # all set just above
    llm.generate(["Benchmark: "], SamplingParams(max_tokens=8))
    engine = llm.engine
    deadline = deadline or Deadline(None)
    start = time.perf_counter()
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    tokens = finished = 0
    complete = True
    while engine.has_unfinished():
        if deadline.left() <= 0:
            complete = False
            for rid in ids:
                engine.abort(rid)
            break
        for out in engine.step():
            tokens += len(out.delta_token_ids)
            finished += out.finished
    seconds = time.perf_counter() - start
    return {"num_seqs": num_seqs, "input_lens": list(input_lens), "output_lens": list(output_lens),
            "wanted_output_tokens": wanted, "output_tokens": tokens, "finished_seqs": finished,
            "complete": complete, "seconds": seconds, "output_tokens_per_s": tokens / seconds}


def hf_decode_speed(path: str | Path, device: str, dtype: str, batches: list[int], prompt_len: int,
                    new_tokens: int, deadline: Deadline) -> list[dict]:
    """transformers `generate` (greedy, EOS ignored) on the decode part's prompts."""
    import torch
    from transformers import Qwen3ForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    # transformers wraps .to with functools.wraps(nn.Module.to): typed unbound, `self` expected first
    model = Qwen3ForCausalLM.from_pretrained(str(path), dtype=torch_dtype).to(device).eval()  # type: ignore[arg-type]

    def timed(model: Qwen3ForCausalLM, ids: torch.Tensor, n: int) -> float:
        _sync(device)
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=0)
        _sync(device)
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - start

    results: list[dict] = []
    with torch.inference_mode():
        timed(model, torch.tensor([[5, 6, 7, 8]], device=device), 4)  # warm-up
        for batch in batches:
            if deadline.left() <= 0:
                results.append({"batch": batch, "skipped": "over budget"})
                continue
            prompts = random_token_prompts(batch, (prompt_len, prompt_len), seed=batch)
            ids = torch.tensor(prompts, device=device)
            first = timed(model, ids, 1)
            total = timed(model, ids, new_tokens)
            decode_s = max(total - first, 1e-9)
            results.append({"batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
                             "prefill_s": first, "seconds": total,
                             "tokens_per_s": batch * (new_tokens - 1) / decode_s,
                             "ms_per_step": 1000 * decode_s / (new_tokens - 1)})
    del model
    release_memory()
    return results


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _pair(text: str) -> tuple[int, int]:
    lo, hi = _ints(text)
    return lo, hi


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-4b")
    parser.add_argument("--model", help="checkpoint directory instead of --shape")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, help="default bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--kv-gb", type=float, default=0.25, help="KV pool on cpu (GB)")
    parser.add_argument("--only", default="decode,prefill,nano-vllm", help=f"comma list of {', '.join(PARTS)}")
    parser.add_argument("--budget-s", type=float, default=None, help="time for the whole invocation")
    parser.add_argument("--prefill-lens", default="8192,32768,131072")
    parser.add_argument("--prefill-chunk", type=int, default=8192, help="max_num_batched_tokens for prefill")
    parser.add_argument("--decode-batches", default="1,64")
    parser.add_argument("--decode-prompt-len", type=int, default=128)
    parser.add_argument("--decode-new-tokens", type=int, default=256)
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="after each decode batch, profile this many steps (torch profiler)")
    parser.add_argument("--host-phase-steps", type=int, default=0,
                        help="after each decode batch, time the host's phases of this many steps")
    parser.add_argument("--async-output-ab", action="store_true",
                        help="after each decode batch, decode with async output off and on, alternating")
    parser.add_argument("--hf-batches", default="1,64")
    parser.add_argument("--hf-new-tokens", type=int, default=64)
    parser.add_argument("--nano-seqs", type=int, default=256)
    parser.add_argument("--nano-input-lens", default="100,1024")
    parser.add_argument("--nano-output-lens", default="100,1024")
    parser.add_argument("--nano-max-s", type=float, default=None, help="stop the nano-vllm run here")
    parser.add_argument("--nano-max-model-len", type=int, default=4096)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--name", default="gpu-engine")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    deadline = Deadline(args.budget_s)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    path = args.model or ensure_checkpoint(args.shape)
    wanted = set(args.only.split(","))
    unknown = wanted - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}")
    result: dict = {"shape": args.shape if not args.model else str(args.model), "dtype": dtype,
                    "enforce_eager": args.enforce_eager, "budget_s": args.budget_s, "seconds": {}}
    batches = _ints(args.decode_batches)

    def timed_part(name: str, fn: Callable[[], T]) -> T:
        start = time.perf_counter()
        value = fn()
        result["seconds"][name] = round(time.perf_counter() - start, 2)
        return value

    if "decode" in wanted:
        def run_decode() -> list[dict]:
            llm = _engine(path, args.device, dtype, args.kv_gb, max_num_seqs=max(batches),
                          max_model_len=args.decode_prompt_len + args.decode_new_tokens + 64,
                          enforce_eager=args.enforce_eager)
            out: list[dict] = []
            for b in batches:
                if deadline.left() <= 0:
                    out.append({"batch": b, "skipped": "over budget"})
                    continue
                out.append(decode_speed(llm, b, args.decode_prompt_len, args.decode_new_tokens))
                if args.async_output_ab:
                    out[-1]["async_output_ab"] = output_mode_ab(
                        llm, b, args.decode_prompt_len, args.decode_new_tokens)
                if args.host_phase_steps:
                    out[-1]["host_phases"] = host_phases(
                        llm, b, args.decode_prompt_len, args.host_phase_steps)
                if args.profile_steps:
                    out[-1]["profile"] = decode_profile(llm, b, args.decode_prompt_len, args.profile_steps)
            del llm
            release_memory()
            return out

        result["decode"] = timed_part("decode", run_decode)
        for r in result["decode"]:
            if "tokens_per_s" in r:
                print(f"decode batch {r['batch']:3d}: {r['tokens_per_s']:9.1f} tok/s ({r['ms_per_step']:.2f} ms/step)")
            for line in decode_extra_lines(r):
                print(line)
            if "profile" in r:
                prof = r["profile"]
                gpu = prof.get("gpu_kernels_ms_per_step")
                # Against the unprofiled step: the profiled one also pays the profiler's start.
                print(f"  profiled {prof['profiled_ms_per_step']:.2f} ms/step"
                      + (f"; GPU kernels {gpu:.2f} of the {r['ms_per_step']:.2f} ms unprofiled step"
                         if gpu is not None else "") + "; heaviest:")
                for name, ms in prof["top_ms_per_step"].items():
                    print(f"    {ms:8.3f} ms  {name[:90]}")
    if "prefill" in wanted:
        def run_prefill() -> list[dict]:
            lens = _ints(args.prefill_lens)
            llm = _engine(path, args.device, dtype, args.kv_gb, max_num_seqs=4, max_model_len=max(lens) + 16,
                          max_num_batched_tokens=args.prefill_chunk, enforce_eager=True,
                          enable_prefix_caching=False)
            out = prefill_all(llm, lens, deadline)
            del llm
            release_memory()
            return out

        result["prefill"] = timed_part("prefill", run_prefill)
        for r in result["prefill"]:
            if "tokens_per_s" in r:
                print(f"prefill {r['prompt_tokens']:7d}: {r['seconds']:7.2f} s, {r['tokens_per_s']:9.0f} tok/s")
            else:
                print(f"prefill {r['prompt_tokens']:7d}: skipped ({r['skipped']})")
    if "nano-vllm" in wanted:
        def run_nano() -> dict:
            llm = _engine(path, args.device, dtype, args.kv_gb, max_num_seqs=args.nano_seqs,
                          max_model_len=args.nano_max_model_len, max_num_batched_tokens=16384,
                          enforce_eager=args.enforce_eager)
            cap = Deadline(min(deadline.left(), args.nano_max_s or float("inf")))
            out = nano_vllm_workload(llm, args.nano_seqs, _pair(args.nano_input_lens),
                                     _pair(args.nano_output_lens), cap)
            del llm
            release_memory()
            return out

        result["nano_vllm"] = r = timed_part("nano-vllm", run_nano)
        print(f"nano-vllm workload: {r['output_tokens_per_s']:.0f} output tok/s "
              f"({r['output_tokens']}/{r['wanted_output_tokens']} tokens, complete={r['complete']})")
    if "hf" in wanted:
        result["hf"] = timed_part("hf", lambda: hf_decode_speed(
            path, args.device, dtype, _ints(args.hf_batches), args.decode_prompt_len,
            args.hf_new_tokens, deadline))
        for r in result["hf"]:
            if "tokens_per_s" in r:
                print(f"hf generate batch {r['batch']:3d}: {r['tokens_per_s']:9.1f} tok/s "
                      f"({r['ms_per_step']:.2f} ms/step)")
    if "decode" in result and "hf" in result:
        result["pagechat_over_hf"] = ratios(result)
    out = write_result(args.name, result, args.device, Path(args.out_dir) if args.out_dir else None)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
