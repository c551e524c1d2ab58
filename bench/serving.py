"""Serving under load through the OpenAI API: a concurrency sweep against real servers.

Starts each server in its own process on 127.0.0.1 (pagechat: `python -m app`, the engine, API
and UI in one process; transformers-serve: `transformers serve --continuous-batching`), then
for each concurrency level keeps that many streams open with the official `openai` client
(streaming /v1/completions, greedy, fixed max_tokens; pagechat also gets ignore_eos). The same
prompt texts go to every server. Per level: time to first token and inter-token latency
(gaps between streamed chunks) p50 / p99, time per output token, and total output tokens/s.
Each level is bounded in requests (--requests-per-level, at least the concurrency) and time.

    python -m bench.serving                         # CPU: levels 1 4 16 64, short prompts
    python -m bench.serving --device cuda           # qwen3-4b shape, longer prompts
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench import plots
from bench.common import (
    MachineMonitor,
    add_model_args,
    device_description,
    kv_bytes_per_token,
    resolve_model_args,
    summarize,
    write_result,
)
from bench.server import ServerProcess, pagechat_server, transformers_server

if TYPE_CHECKING:
    from openai import AsyncOpenAI

SERVERS = ("pagechat", "transformers-serve")
DEFAULTS = {
    "cpu": dict(input_len=64, output_len=16, level_timeout=300.0),
    "cuda": dict(input_len=512, output_len=256, level_timeout=300.0),
}


@dataclass
class RequestStats:
    ok: bool
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def prompt_texts(model_dir: Path, num: int, length: int, seed: int) -> list[str]:
    """Random ordinary tokens decoded to text: each server tokenizes the same strings."""
    from engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_checkpoint(model_dir)
    rng = random.Random(seed)
    return [tokenizer.decode([rng.randrange(10_000) for _ in range(length)]) for _ in range(num)]


async def one_request(client: AsyncOpenAI, model: str, prompt: str, max_tokens: int,
                      extra: dict) -> RequestStats:
    start = time.perf_counter()
    first: float | None = None
    last: float | None = None
    gaps: list[float] = []
    usage = None
    chunks = 0
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0, stream=True,
            stream_options={"include_usage": True}, extra_body=extra or None,
        )
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.choices and chunk.choices[0].text:
                chunks += 1
                if first is None:
                    first = now
                else:
                    assert last is not None  # set together with first
                    gaps.append(now - last)
                last = now
    except Exception as exc:
        return RequestStats(ok=False, error=f"{type(exc).__name__}: {exc}")
    end = time.perf_counter()
    return RequestStats(
        ok=first is not None, ttft_s=None if first is None else first - start, itl_s=gaps,
        e2e_s=end - start, output_tokens=usage.completion_tokens if usage else chunks,
        prompt_tokens=usage.prompt_tokens if usage else 0,
    )


async def run_level(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int,
                    extra: dict, timeout: float) -> dict:
    """`len(prompts)` requests with `concurrency` in flight; stops at `timeout` seconds."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=timeout + 60)
    gate = asyncio.Semaphore(concurrency)

    async def gated(prompt: str) -> RequestStats:
        async with gate:
            return await one_request(client, model, prompt, max_tokens, extra)

    start = time.perf_counter()
    tasks = [asyncio.create_task(gated(p)) for p in prompts]
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    wall = time.perf_counter() - start
    await client.close()
    stats = [t.result() for t in done]
    good = [s for s in stats if s.ok]
    output = sum(s.output_tokens for s in good)
    return {
        "concurrency": concurrency,
        "requests": len(prompts),
        "completed": len(good),
        "failed": len(stats) - len(good),
        "cut_by_timeout": len(pending),
        "errors": sorted({s.error for s in stats if s.error})[:5],
        "wall_s": wall,
        "output_tokens": output,
        "output_tokens_per_s": output / wall,
        "prompt_tokens_mean": sum(s.prompt_tokens for s in good) / len(good) if good else None,
        "ttft_s": summarize([s.ttft_s for s in good if s.ttft_s is not None]),  # set when ok
        "itl_s": summarize([g for s in good for g in s.itl_s]),
        "tpot_s": summarize([s.tpot_s for s in good if s.tpot_s is not None]),
        "e2e_s": summarize([s.e2e_s for s in good if s.e2e_s is not None]),  # set when ok
    }


def start_server(name: str, args: argparse.Namespace, path: Path, dtype: str,
                 data_dir: Path) -> ServerProcess:
    top = max(args.levels)
    if name == "pagechat":
        kv_gb = None
        if not args.device.startswith("cuda"):
            tokens = top * (args.input_len * 2 + args.output_len) + 1024  # text may re-tokenize longer
            kv_gb = round(tokens * kv_bytes_per_token(path, dtype) * 1.25 / 1e9 + 0.05, 3)
        return pagechat_server(path, args.device, dtype, max_num_seqs=top,
                               kv_cache_memory_gb=kv_gb, data_dir=data_dir)
    return transformers_server(path, args.device, dtype)


def model_id(url: str) -> str:
    import httpx

    return httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]


def plot(payload: dict, name: str, out_dir: Path | None) -> Path:
    results = payload["results"]
    levels = payload["workload"]["levels"]

    def series(metric: str) -> dict[str, list]:
        out = {}
        for server, r in results.items():
            by_level = {lv["concurrency"]: lv for lv in r.get("levels", [])}
            for q in ("p50", "p99"):
                out[f"{server} {q}"] = [by_level.get(c, {}).get(metric, {}).get(q) for c in levels]
        return out

    w = payload["workload"]
    fig, axes = plots.figure(1, 3, (
        f"Serving through the OpenAI API: prompt {w['input_len']} tokens, {w['output_len']} out "
        f"({payload['shape']}, {payload['dtype']}, {payload['device']})"
    ), size=(19, 4.8))
    plots.lines(axes[0][0], levels, series("ttft_s"), "Time to first token", "seconds",
                "concurrent streams", log=True)
    plots.lines(axes[0][1], levels, series("itl_s"), "Inter-token latency", "seconds",
                "concurrent streams", log=True)
    plots.lines(axes[0][2], levels, {
        server: [{lv["concurrency"]: lv for lv in r.get("levels", [])}.get(c, {})
                 .get("output_tokens_per_s") for c in levels]
        for server, r in results.items()
    }, "Total output throughput", "tokens/s", "concurrent streams")
    for ax in axes[0]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
    return plots.save(fig, name, out_dir)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, "result file name (default serving-<device>)")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 64],
                        help="concurrent streams per level (default %(default)s)")
    parser.add_argument("--requests-per-level", type=int, default=0,
                        help="requests per level; at least the concurrency and 4 (default: that)")
    parser.add_argument("--input-len", type=int, default=None, help="prompt tokens (cpu 64, cuda 512)")
    parser.add_argument("--output-len", type=int, default=None, help="max_tokens (cpu 16, cuda 256)")
    parser.add_argument("--level-timeout", type=float, default=None,
                        help="seconds per level before outstanding requests are cancelled (300)")
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated: pagechat, "
                        "transformers-serve")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    defaults = DEFAULTS["cuda" if args.device.startswith("cuda") else "cpu"]
    args.input_len = args.input_len or defaults["input_len"]
    args.output_len = args.output_len or defaults["output_len"]
    timeout = args.level_timeout or defaults["level_timeout"]
    servers = args.servers.split(",")
    unknown = [s for s in servers if s not in SERVERS]
    if unknown:
        parser.error(f"unknown servers {unknown}; choose from {list(SERVERS)}")
    path, shape, dtype = resolve_model_args(args)
    counts = {c: max(c, 4, args.requests_per_level) for c in args.levels}
    prompts = prompt_texts(path, max(counts.values()) + 1, args.input_len, args.seed)

    results: dict = {}
    with MachineMonitor() as machine, tempfile.TemporaryDirectory() as tmp:
        for name in servers:
            extra = {"ignore_eos": True} if name == "pagechat" else {}
            try:
                with MachineMonitor() as own, \
                        start_server(name, args, path, dtype, Path(tmp) / name) as server:
                    model = model_id(server.url)
                    # Warm-up (first-call setup, caches, graphs) with a prompt no level uses.
                    asyncio.run(run_level(server.url, model, prompts[-1:], 1, 4, extra, timeout))
                    levels = []
                    for c in args.levels:
                        level = asyncio.run(run_level(server.url, model, prompts[: counts[c]], c,
                                                      args.output_len, extra, timeout))
                        levels.append(level)
                        print(f"{name:18s} {c:3d} streams: TTFT p50 {level['ttft_s']['p50']} s "
                              f"p99 {level['ttft_s']['p99']} s, ITL p50 {level['itl_s']['p50']} s "
                              f"p99 {level['itl_s']['p99']} s, {level['output_tokens_per_s']:.1f} "
                              f"out tok/s ({level['completed']}/{level['requests']} done)", flush=True)
            except RuntimeError as exc:  # the server did not start: record why, go on
                results[name] = {"error": str(exc)[-2000:]}
                print(f"{name}: {exc}", flush=True)
                continue
            results[name] = {"what": _WHAT[name], "model_id": model, "levels": levels,
                             "machine": own.report()}

    payload = {
        "shape": shape,
        "dtype": dtype,
        "device_kind": args.device,
        "workload": {
            "levels": args.levels, "requests_per_level": counts, "input_len": args.input_len,
            "output_len": args.output_len, "level_timeout_s": timeout, "seed": args.seed,
            "request": "POST /v1/completions, stream, temperature 0, max_tokens=output_len, "
                       "the same prompt texts for every server (random tokens < 10,000 decoded)",
            "itl": "gaps between streamed chunks that carry text, client side",
        },
        "machine": machine.report(),
        "results": results,
    }
    name = args.name or f"serving-{args.device.split(':')[0]}"
    out_dir = Path(args.out_dir) if args.out_dir else None
    out = write_result(name, payload, args.device, out_dir)
    payload["device"] = device_description(args.device)
    png = plot(payload, name, out_dir)
    print(f"wrote {out} and {png}")
    return payload


_WHAT = {
    "pagechat": "python -m app (engine + OpenAI API + Chainlit UI in one process), "
                "max_num_seqs = the top level, ignore_eos",
    "transformers-serve": "transformers serve MODEL --continuous-batching (paged KV, OpenAI API); "
                          "it takes no ignore_eos, so a stream may end early on EOS "
                          "(usage counts the real tokens)",
}


if __name__ == "__main__":
    main()
