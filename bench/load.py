"""Load test: many streaming API clients and Chainlit chat clients against the demo server.

Starts `python -m app` with the tiny random checkpoint (PAGECHAT_DEMO=1) on 127.0.0.1, asks
every prompt once on its own (the solo reference), then for --duration seconds keeps
--api-clients streaming /v1/chat/completions requests and --chat-clients socket.io chats open
(as the browser drives Chainlit: login, connect, settings, two turns, new chat). It stops by
itself: every client ends its current request at the deadline, each bounded by max_tokens.

Checked: no errors; every stream (greedy, or sampled with a seed) equals its solo answer; the
first answer of every chat equals the API's solo answer to the same message; every KV block is
free at the end; the server's RSS is flat (least-squares slope over the run after warm-up).
A greedy stream that leaves its solo answer exactly where the solo answer's two best tokens
are within 1e-4 in log-probability is reported as a near-tie (fp32 sums of a batch and of a
single sequence differ in their last bits), not as a mismatch.
Reported: inter-token latency p50/p99 seen by the clients and by the server's /metrics, time to
first token, requests and tokens served, the RSS samples and slope.

    python -m bench.load                                # 64 API + 8 chat clients, 120 s
    python -m bench.load --duration 10 --api-clients 16 --chat-clients 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import httpx

from bench.common import MachineMonitor, ensure_checkpoint, summarize, write_result
from bench.server import ServerProcess, free_port

if TYPE_CHECKING:
    from tests.app_client import ChatClient

# The stats line closing every chat answer: "*N prompt tokens · M cached · first token ...*".
STATS = re.compile(r"\n\n\*([\d,]+) prompt tokens · ([\d,]+) cached · first token")
QUESTIONS = [
    "What is the capital of France?", "Name three colours.", "Write a haiku about rain.",
    "How do magnets work?", "List five prime numbers.", "Translate 'good morning' to Chinese.",
    "Why is the sky blue?", "Give me a recipe for pancakes.", "What is 17 times 23?",
    "Describe a cat in one sentence.", "Who wrote Hamlet?", "Explain recursion briefly.",
]
SYSTEM = "You are a helpful assistant. Answer briefly and precisely. " * 4  # a shared prefix


@dataclass(frozen=True)
class Prompt:
    """One API request shape: messages and sampling, asked solo first, then under load."""

    key: str
    messages: tuple[tuple[str, str], ...]
    max_tokens: int
    seed: int | None  # None: greedy; else temperature 0.8 with this seed

    def body(self, model: str, stream: bool) -> dict:
        body = {
            "model": model,
            "messages": [{"role": r, "content": c} for r, c in self.messages],
            "max_tokens": self.max_tokens,
            "stream": stream,
            "temperature": 0.0 if self.seed is None else 0.8,
        }
        if self.seed is not None:
            body["seed"] = self.seed
        return body


def api_prompts(count: int, max_tokens: tuple[int, int]) -> list[Prompt]:
    """Half greedy, half seeded; half of them share a long system prompt (prefix cache hits)."""
    lo, hi = max_tokens
    prompts = []
    for i in range(count):
        question = f"{QUESTIONS[i % len(QUESTIONS)]} (variant {i})"
        messages = (("system", SYSTEM),) if i % 2 else ()
        prompts.append(Prompt(
            key=f"api-{i}", messages=messages + (("user", question),),
            max_tokens=lo + (i * 7) % (hi - lo + 1), seed=None if i % 4 < 2 else 1000 + i,
        ))
    return prompts


def chat_question(i: int) -> str:
    return f"Chat {i}: {QUESTIONS[i % len(QUESTIONS)]}"


@dataclass
class Tally:
    """What the clients saw, merged at the end."""

    api_requests: int = 0
    api_tokens: int = 0
    chat_answers: int = 0
    chats: int = 0
    mismatches: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    chat_answer_s: list[float] = field(default_factory=list)
    follow_up_cached: list[int] = field(default_factory=list)

    def error(self, what: str) -> None:
        if len(self.errors) < 50:
            self.errors.append(what)
        else:
            self.errors[-1] = f"... and more (last: {what})"


# ---- the API clients ---------------------------------------------------------------------------


async def stream_chat(http: httpx.AsyncClient, body: dict) -> tuple[str, list[float]]:
    """One streaming chat completion: (text, arrival time of each content chunk)."""
    text, times = [], []
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        done = False
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"error event: {chunk['error']}")
            delta = chunk["choices"][0]["delta"].get("content") or ""
            if delta:
                text.append(delta)
                times.append(time.monotonic())
        if not done:
            raise RuntimeError("stream ended without [DONE]")
    return "".join(text), times


async def solo_answers(url: str, model: str, prompts: list[Prompt]) -> dict[str, str]:
    """Each prompt alone on an idle server: the reference every loaded stream must equal."""
    answers = {}
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        for prompt in prompts:
            response = await http.post("/v1/chat/completions", json=prompt.body(model, stream=False))
            response.raise_for_status()
            answers[prompt.key] = response.json()["choices"][0]["message"]["content"]
    return answers


async def api_client(index: int, url: str, model: str, prompts: list[Prompt],
                     reference: dict[str, str], deadline: float, tally: Tally) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300, connect=30)) as http:
        turn = 0
        while time.monotonic() < deadline:
            prompt = prompts[(index * 5 + turn) % len(prompts)]
            turn += 1
            sent = time.monotonic()
            try:
                text, times = await stream_chat(http, prompt.body(model, stream=True))
            except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
                tally.error(f"api client {index}, {prompt.key}: {type(exc).__name__}: {exc}")
                continue
            tally.api_requests += 1
            tally.api_tokens += len(times)
            if times:
                tally.ttft_s.append(times[0] - sent)
                tally.itl_s.extend(b - a for a, b in zip(times, times[1:]))
            if text != reference[prompt.key]:
                tally.mismatches.append({"client": f"api-{index}", "prompt": prompt.key,
                                         "solo": reference[prompt.key], "loaded": text})


# ---- the Chainlit clients ----------------------------------------------------------------------


def _answer_of(client: ChatClient, start: int) -> dict | None:
    """The finished assistant answer (with its stats line) among events since `start`."""
    for message in client.assistant_messages(start):
        if STATS.search(message.get("output") or ""):
            return message
    return None


def _streamed_text(client: ChatClient, start: int, message_id: str) -> str:
    text = ""
    for event, payload in client.events[start:]:
        if event not in ("stream_start", "stream_token"):
            continue
        data = cast(dict, payload)  # Chainlit's stream events carry a dict
        if event == "stream_start" and data.get("id") == message_id:
            text = data.get("output") or ""
        elif event == "stream_token" and data.get("id") == message_id:
            text += data["token"]
    return text


async def _ask(client: ChatClient, text: str, timeout: float) -> tuple[dict, int]:
    start = await client.send(text, wait=False)
    stop = time.monotonic() + timeout
    while (answer := _answer_of(client, start)) is None:
        if time.monotonic() > stop:
            raise TimeoutError(f"no answer to {text!r} in {timeout:.0f} s")
        await asyncio.sleep(0.05)
    return answer, start


async def chat_client(index: int, url: str, max_tokens: int, reference: dict[str, str],
                      deadline: float, tally: Tally) -> None:
    """Chats of two turns each: the first answer must equal the API's solo answer."""
    from tests.app_client import ChatClient

    turn = 0
    while time.monotonic() < deadline:
        number = index * 1000 + turn
        turn += 1
        question = chat_question(number % len(reference))
        client = ChatClient(url)
        try:
            await client.login()
            await client.connect()
            await client.wait_event("chat_settings", timeout=120)
            await client.settings({"max_tokens": max_tokens, "temperature": 0.0})
            sent = time.monotonic()
            answer, start = await _ask(client, question, timeout=300)
            tally.chat_answer_s.append(time.monotonic() - sent)
            streamed = _streamed_text(client, start, answer["id"])
            if streamed != reference[question]:
                tally.mismatches.append({"client": f"chat-{index}", "prompt": question,
                                         "solo": reference[question], "loaded": streamed})
            follow_up, _ = await _ask(client, "Tell me more.", timeout=300)
            stats = STATS.search(follow_up["output"])
            if stats is None:
                raise RuntimeError(f"the follow-up answer has no stats line: {follow_up['output']!r}")
            cached = int(stats.group(2).replace(",", ""))
            tally.follow_up_cached.append(cached)
            if cached == 0:
                tally.error(f"chat client {index}: the follow-up reused no cached tokens")
            tally.chat_answers += 2
            tally.chats += 1
        except Exception as exc:  # noqa: BLE001
            tally.error(f"chat client {index}, turn {turn}: {type(exc).__name__}: {exc}")
        finally:
            try:
                await client.close()
            except Exception:  # noqa: BLE001 - a socket already gone
                pass


# ---- mismatches: a bug, or an fp32 near-tie? --------------------------------------------------

TIE_GAP = 1e-4  # top-2 log-prob gap below which batched and solo fp32 sums may pick either


def classify_mismatches(mismatches: list[dict], prompts: dict[str, Prompt], model: str) -> None:
    """Mark each greedy mismatch whose divergence point is an exact near-tie of the solo answer.

    Batched and solo fp32 sums differ in their last bits (~1e-6); random-weight models have
    occasional steps whose two best tokens are that close, where a loaded stream may take the
    other one without anything being wrong. The checkpoint is loaded here to find the top-2
    log-prob gap at the first differing token; anything else stays a mismatch.
    """
    greedy = [m for m in mismatches if prompts[m["prompt"]].seed is None]
    for m in mismatches:
        m["near_tie"] = False
    if not greedy or not Path(model).is_dir():
        return
    from engine import LLM, SamplingParams

    llm = LLM(model, device="cpu", num_kv_blocks=1024, max_model_len=4096)
    tokenizer = llm.tokenizer
    for m in greedy:
        prompt = prompts[m["prompt"]]
        ids = tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in prompt.messages])
        params = SamplingParams(temperature=0.0, max_tokens=prompt.max_tokens, logprobs=2)
        out = llm.generate([ids], params)[0]
        if out.text != m["solo"]:
            continue  # cannot tell: the local reference differs from the server's
        common = next((i for i, (a, b) in enumerate(zip(m["solo"], m["loaded"])) if a != b),
                      min(len(m["solo"]), len(m["loaded"])))
        k = next((k for k in range(len(out.token_ids))
                  if len(tokenizer.decode(out.token_ids[: k + 1], skip_special_tokens=True)) > common),
                 len(out.token_ids) - 1)
        top_two = sorted(out.logprobs[k].values())[-2:]
        m["divergence_token"] = k
        m["top2_logprob_gap"] = abs(top_two[1] - top_two[0])
        m["near_tie"] = m["top2_logprob_gap"] < TIE_GAP


# ---- the server side ---------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def sample_rss(pid: int, interval: float, stop: asyncio.Event, samples: list) -> None:
    t0 = time.monotonic()
    while not stop.is_set():
        samples.append((round(time.monotonic() - t0, 2), rss_bytes(pid)))
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except TimeoutError:
            pass


def slope_mb_per_min(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of RSS over time."""
    if len(samples) < 3:
        return float("nan")
    xs = [t / 60 for t, _ in samples]
    ys = [b / 2**20 for _, b in samples]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else float("nan")


def metric_histogram(text: str, name: str) -> dict[float, float]:
    """Cumulative bucket counts {le: count} of a Prometheus histogram."""
    buckets = {}
    for match in re.finditer(rf'^{name}_bucket{{le="([^"]+)"}} ([\d.e+]+)$', text, re.M):
        buckets[float(match.group(1))] = float(match.group(2))
    return buckets


def histogram_quantile(buckets: dict[float, float], q: float) -> float | None:
    """Upper bound of the bucket holding quantile q (what Prometheus' buckets can tell)."""
    if not buckets or not buckets.get(float("inf")):
        return None
    total = buckets[float("inf")]
    for le in sorted(buckets):
        if buckets[le] >= q * total:
            return le
    return None


async def wait_idle(url: str, timeout: float = 30.0) -> dict:
    """The server's status once nothing runs or waits (or the last one seen at the timeout)."""
    stop = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        while True:
            status = (await http.get("/pagechat/status")).json()
            idle = status["running"] == 0 and status["waiting"] == 0
            if (idle and status["kv_blocks_used"] == 0) or time.monotonic() > stop:
                return status
            await asyncio.sleep(0.2)


# ---- the run -----------------------------------------------------------------------------------


@dataclass
class LoadConfig:
    duration_s: float = 120.0
    api_clients: int = 64
    chat_clients: int = 8
    num_prompts: int = 32
    max_tokens: tuple[int, int] = (12, 40)
    chat_max_tokens: int = 24
    rss_interval_s: float = 1.0
    warmup_fraction: float = 0.25  # RSS samples before this share of the run are not in the slope
    max_rss_slope_mb_per_min: float = 5.0


async def run_load(url: str, pid: int | None, config: LoadConfig) -> dict:
    """Run the load against a ready server; returns the figures and whether every check passed."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
    prompts = api_prompts(config.num_prompts, config.max_tokens)
    chat_prompts = [
        Prompt(key=chat_question(i), messages=(("user", chat_question(i)),),
               max_tokens=config.chat_max_tokens, seed=None)
        for i in range(max(1, min(config.num_prompts, 4 * config.chat_clients)))
    ]
    solo_started = time.monotonic()
    reference = await solo_answers(url, model, prompts + chat_prompts)
    solo_s = time.monotonic() - solo_started

    tally = Tally()
    rss: list[tuple[float, int]] = []
    stop = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(pid, config.rss_interval_s, stop, rss)) if pid else None
    started = time.monotonic()
    deadline = started + config.duration_s
    chat_reference = {p.key: reference[p.key] for p in chat_prompts}
    clients = [api_client(i, url, model, prompts, reference, deadline, tally)
               for i in range(config.api_clients)]
    clients += [chat_client(i, url, config.chat_max_tokens, chat_reference, deadline, tally)
                for i in range(config.chat_clients)]
    await asyncio.gather(*clients)
    elapsed = time.monotonic() - started
    status = await wait_idle(url)
    stop.set()
    if sampler:
        await sampler
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        metrics_text = (await http.get("/metrics")).text

    classify_mismatches(tally.mismatches, {p.key: p for p in prompts + chat_prompts}, model)
    near_ties = [m for m in tally.mismatches if m["near_tie"]]
    mismatches = [m for m in tally.mismatches if not m["near_tie"]]
    server_itl = metric_histogram(metrics_text, "pagechat_inter_token_latency_seconds")
    steady = [s for s in rss if s[0] >= config.warmup_fraction * elapsed]
    slope = slope_mb_per_min(steady)
    leaked = status["kv_blocks_used"] != 0 or status["running"] != 0 or status["waiting"] != 0
    checks = {
        "no_errors": not tally.errors,
        "streams_equal_solo": not mismatches,
        "kv_blocks_free_at_end": not leaked,
        "rss_flat": bool(pid is None or (slope == slope and slope <= config.max_rss_slope_mb_per_min)),
        "every_client_served": tally.api_requests >= config.api_clients and tally.chats >= config.chat_clients,
    }
    return {
        "config": {**config.__dict__, "max_tokens": list(config.max_tokens)},
        "passed": all(checks.values()),
        "checks": checks,
        "duration_s": round(elapsed, 1),
        "solo_reference_s": round(solo_s, 1),
        "api_requests": tally.api_requests,
        "api_tokens": tally.api_tokens,
        "api_tokens_per_s": round(tally.api_tokens / elapsed, 1),
        "chats": tally.chats,
        "chat_answers": tally.chat_answers,
        "errors": tally.errors,
        "mismatches": mismatches[:10],
        "num_mismatches": len(mismatches),
        "near_ties": near_ties[:10],
        "num_near_ties": len(near_ties),
        "client_itl_s": summarize(tally.itl_s),
        "client_itl_max_s": round(max(tally.itl_s), 4) if tally.itl_s else None,
        "client_ttft_s": summarize(tally.ttft_s),
        "chat_answer_s": summarize(tally.chat_answer_s),
        "follow_up_cached_tokens": summarize([float(c) for c in tally.follow_up_cached]),
        "server_itl_p50_bucket_s": histogram_quantile(server_itl, 0.50),
        "server_itl_p99_bucket_s": histogram_quantile(server_itl, 0.99),
        "status_at_end": status,
        "rss_mb_start": round(rss[0][1] / 2**20, 1) if rss else None,
        "rss_mb_end": round(rss[-1][1] / 2**20, 1) if rss else None,
        "rss_mb_max": round(max(b for _, b in rss) / 2**20, 1) if rss else None,
        "rss_slope_mb_per_min": round(slope, 3) if slope == slope else None,
        "rss_samples": [(t, round(b / 2**20, 1)) for t, b in rss],
    }


def demo_server(data_dir: Path, kv_cache_memory_gb: float, max_model_len: int,
                extra_env: dict | None = None) -> ServerProcess:
    """`python -m app` as `make demo` runs it: the tiny checkpoint, PAGECHAT_DEMO=1."""
    port = free_port()
    env = {
        "PAGECHAT_MODEL": str(ensure_checkpoint("tiny")),
        "PAGECHAT_DEMO": "1",
        "PAGECHAT_DEVICE": "cpu",
        "PAGECHAT_DATA_DIR": str(data_dir),
        "PAGECHAT_KV_CACHE_MEMORY_GB": str(kv_cache_memory_gb),
        "PAGECHAT_MAX_MODEL_LEN": str(max_model_len),
        "PAGECHAT_API_KEYS": "",
        "PAGECHAT_AUTH_USERS": "",
        **(extra_env or {}),
    }
    env_out = {k: v for k, v in os.environ.items() if k != "CHAINLIT_AUTH_SECRET"}

    def ready(client: httpx.Client) -> bool:
        status = client.get("/pagechat/status").json()
        if status.get("engine") == "error":
            raise RuntimeError(f"the model could not be loaded: {status.get('error')}")
        return status.get("engine") == "ready"

    argv = [sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning"]
    server = ServerProcess("pagechat-demo", argv, port, ready, env, startup_timeout=180)
    server.env = {**env_out, **env}
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load (default 120)")
    parser.add_argument("--api-clients", type=int, default=64, help="streaming API clients (default 64)")
    parser.add_argument("--chat-clients", type=int, default=8, help="Chainlit socket clients (default 8)")
    parser.add_argument("--prompts", type=int, default=32, help="distinct API prompts (default 32)")
    parser.add_argument("--max-tokens", type=int, nargs=2, default=(12, 40), metavar=("LO", "HI"),
                        help="answer lengths of the API prompts (default 12 40)")
    parser.add_argument("--chat-max-tokens", type=int, default=24, help="chat answer length (default 24)")
    parser.add_argument("--max-rss-slope", type=float, default=5.0,
                        help="largest RSS growth counted as flat, MB/min (default 5)")
    parser.add_argument("--kv-cache-memory-gb", type=float, default=0.5)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--url", help="load an already running server instead of starting one")
    parser.add_argument("--pid", type=int, help="with --url: the server's pid, for its RSS")
    parser.add_argument("--name", default="load", help="result name (default load)")
    parser.add_argument("--out-dir", default=None, help="default bench/results")
    args = parser.parse_args(argv)
    config = LoadConfig(
        duration_s=args.duration, api_clients=args.api_clients, chat_clients=args.chat_clients,
        num_prompts=args.prompts, max_tokens=tuple(args.max_tokens),
        chat_max_tokens=args.chat_max_tokens, max_rss_slope_mb_per_min=args.max_rss_slope,
    )
    with MachineMonitor() as machine:
        if args.url:
            result = asyncio.run(run_load(args.url.rstrip("/"), args.pid, config))
        else:
            with tempfile.TemporaryDirectory(prefix="pagechat-load-") as tmp:
                server = demo_server(Path(tmp) / "data", args.kv_cache_memory_gb, args.max_model_len)
                with server:
                    assert server.process is not None  # __enter__ started it
                    result = asyncio.run(run_load(server.url, server.process.pid, config))
    result["machine"] = machine.report()
    path = write_result(args.name, result, device="cpu",
                        out_dir=Path(args.out_dir) if args.out_dir else None)
    shown = {k: v for k, v in result.items() if k not in ("rss_samples", "mismatches")}
    print(json.dumps(shown, indent=2))
    print(f"{'PASSED' if result['passed'] else 'FAILED'}; result in {path}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
