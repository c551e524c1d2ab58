"""Multi-turn chat: N concurrent conversations of several turns, pagechat vs HF transformers.

Each turn's prompt is the previous prompt + the generated ids (closed by <|im_end|>) + the new
user turn, exactly as the app builds a chat's history, so a prefix cache can serve all but the
new turn. Answers are greedy and forced to their length (EOS ignored). Per turn and peer: the
prefix-cache hit rate (cached tokens / the previous turn's prompt + answer, and / the prompt),
time to first token from submission, and decode tokens/s; per peer: wall time and output
tokens/s. Every peer runs the same conversations in one process; the JSON says what each does.

    python -m bench.multi_turn                      # CPU, qwen3-0.6b shape, CPU-sized lengths
    python -m bench.multi_turn --device cuda        # qwen3-4b shape, the issue's lengths
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import TypedDict

from bench import plots
from bench.chat_peers import PEERS, PeerContext, play
from bench.chat_workload import load_codec, max_history_tokens, multi_turn_conversations
from bench.common import (
    MachineMonitor,
    add_model_args,
    device_description,
    median,
    release_memory,
    resolve_model_args,
    write_result,
)


class _Defaults(TypedDict):
    conversations: int
    system_len: int
    user_len: tuple[int, int]
    answer_len: tuple[int, int]
    peers: str


# Per device: (conversations, system prompt, user turn range, answer range, peers).
DEFAULTS: dict[str, _Defaults] = {
    "cpu": dict(conversations=4, system_len=200, user_len=(20, 60), answer_len=(8, 16),
                peers="pagechat,pagechat-no-prefix-cache,hf-generate,hf-generate-cache,hf-continuous"),
    # hf-generate-cache serves one request at a time: hours for 32 chats of 100-400 tokens.
    "cuda": dict(conversations=32, system_len=200, user_len=(20, 200), answer_len=(100, 400),
                 peers="pagechat,pagechat-no-prefix-cache,hf-generate,hf-continuous"),
}


def summarize(records: list[dict], wall_s: float) -> dict:
    """Per-turn medians and hit rates, and the whole run's figures, for one peer."""

    def hit(rows: list[dict], of: str) -> float | None:
        if any(r["cached_tokens"] is None for r in rows):
            return None
        total = sum(r[of] for r in rows)
        return sum(r["cached_tokens"] for r in rows) / total if total else None

    per_turn = []
    for turn in sorted({r["turn"] for r in records}):
        rows = [r for r in records if r["turn"] == turn]
        rates = [r["decode_tokens_per_s"] for r in rows if r["decode_tokens_per_s"]]
        per_turn.append({
            "turn": turn,
            "prompt_tokens_mean": sum(r["prompt_tokens"] for r in rows) / len(rows),
            "ttft_s_p50": median([r["ttft_s"] for r in rows]),
            "decode_tokens_per_s_p50": median(rates) if rates else None,
            "hit_rate_of_previous_history": hit(rows, "previous_history_tokens") if turn > 1 else None,
            "hit_rate_of_prompt": hit(rows, "prompt_tokens"),
        })
    follow = [r for r in records if r["turn"] > 1]
    output = sum(r["output_tokens"] for r in records)
    cached = None if hit(records, "prompt_tokens") is None else sum(r["cached_tokens"] for r in records)
    return {
        "wall_s": wall_s,
        "output_tokens": output,
        "output_tokens_per_s": output / wall_s,
        "prompt_tokens": sum(r["prompt_tokens"] for r in records),
        "cached_prompt_tokens": cached,
        "ttft_s_p50_first_turn": median([r["ttft_s"] for r in records if r["turn"] == 1]),
        "ttft_s_p50_follow_ups": median([r["ttft_s"] for r in follow]),
        "follow_up_hit_rate_of_previous_history": hit(follow, "previous_history_tokens"),
        "follow_up_hit_rate_of_prompt": hit(follow, "prompt_tokens"),
        "per_turn": per_turn,
    }


def compare(results: dict) -> dict:
    """pagechat against each transformers peer and the best of them, on the same workload."""
    ours = results.get("pagechat")
    hf = {k: v for k, v in results.items() if k.startswith("hf-")}
    if not ours or not hf:
        return {}
    best_wall = min(hf, key=lambda k: hf[k]["summary"]["wall_s"])
    best_ttft = min(hf, key=lambda k: hf[k]["summary"]["ttft_s_p50_follow_ups"])
    s = ours["summary"]
    return {
        "best_hf_by_wall_time": best_wall,
        "speedup_vs_best_hf_wall_time": hf[best_wall]["summary"]["wall_s"] / s["wall_s"],
        "best_hf_by_follow_up_ttft": best_ttft,
        "follow_up_ttft_ratio_best_hf_over_pagechat":
            hf[best_ttft]["summary"]["ttft_s_p50_follow_ups"] / s["ttft_s_p50_follow_ups"],
        "pagechat_ahead_of_best_hf": (
            s["wall_s"] < hf[best_wall]["summary"]["wall_s"]
            and s["ttft_s_p50_follow_ups"] < hf[best_ttft]["summary"]["ttft_s_p50_follow_ups"]
        ),
        "speedup_vs_each": {k: v["summary"]["wall_s"] / s["wall_s"] for k, v in hf.items()},
    }


def plot(payload: dict, name: str, out_dir: Path | None) -> Path:
    results = payload["results"]
    turns = [t["turn"] for t in next(iter(results.values()))["summary"]["per_turn"]]

    def per_turn(key: str) -> dict[str, list]:
        return {p: [t[key] for t in r["summary"]["per_turn"]] for p, r in results.items()}

    w = payload["workload"]
    fig, axes = plots.figure(2, 2, (
        f"Multi-turn chat, {w['conversations']} concurrent conversations x {w['turns']} turns "
        f"({payload['shape']}, {payload['dtype']}, {payload['device']})"
    ))
    plots.lines(axes[0][0], turns, per_turn("ttft_s_p50"), "Time to first token (median)",
                "seconds", "turn", log=True)
    hits = {p: v for p, v in per_turn("hit_rate_of_previous_history").items() if any(v)}
    plots.lines(axes[0][1], turns, hits, "Prefix-cache hits / previous turn's prompt + answer",
                "hit rate", "turn")
    plots.lines(axes[1][0], turns, per_turn("decode_tokens_per_s_p50"),
                "Decode speed per conversation (median)", "tokens/s", "turn")
    peers = list(results)
    plots.bars(axes[1][1], ["wall time (s)", "output tokens/s"],
               {p: [results[p]["summary"]["wall_s"], results[p]["summary"]["output_tokens_per_s"]]
                for p in peers}, "Whole run", "", log=True)
    return plots.save(fig, name, out_dir)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, "result file name (default multi_turn-<device>)")
    parser.add_argument("--conversations", type=int, default=None,
                        help="concurrent conversations (default 4 on cpu, 32 on cuda)")
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--system-len", type=int, default=None, help="system prompt tokens (200)")
    parser.add_argument("--user-len", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                        help="user turn tokens (cpu 20 60, cuda 20 200)")
    parser.add_argument("--answer-len", type=int, nargs=2, default=None, metavar=("LO", "HI"),
                        help="answer tokens (cpu 8 16, cuda 100 400)")
    parser.add_argument("--peers", default=None, help=f"comma-separated, from {', '.join(PEERS)}")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="per-step token budget for pagechat and hf-continuous")
    parser.add_argument("--hf-page-size", type=int, default=16, help="hf-continuous page size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    defaults = DEFAULTS["cuda" if args.device.startswith("cuda") else "cpu"]
    n = args.conversations or defaults["conversations"]
    system_len = defaults["system_len"] if args.system_len is None else args.system_len
    user_len = tuple(args.user_len or defaults["user_len"])
    answer_len = tuple(args.answer_len or defaults["answer_len"])
    peers = (args.peers or defaults["peers"]).split(",")
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        parser.error(f"unknown peers {unknown}; choose from {list(PEERS)}")
    path, shape, dtype = resolve_model_args(args)
    codec = load_codec(path)
    conversations = multi_turn_conversations(codec, n, args.turns, system_len, user_len,
                                             answer_len, seed=args.seed)
    ctx = PeerContext(
        model_dir=path, device=args.device, dtype=dtype, max_concurrency=n,
        kv_tokens=sum(max_history_tokens(c) for c in conversations) + 256,
        max_num_batched_tokens=args.max_num_batched_tokens, hf_page_size=args.hf_page_size,
    )

    results: dict = {}
    errors: dict[str, str] = {}
    with MachineMonitor() as machine:
        for peer_name in peers:
            peer = PEERS[peer_name](ctx)
            what = peer.description
            try:
                with MachineMonitor() as own:  # per peer: the load varies on a shared machine
                    run = asyncio.run(play(peer, codec, conversations))
            except Exception as exc:  # e.g. out of memory: record it, run the other peers
                errors[peer_name] = f"{type(exc).__name__}: {exc}"
                print(f"{peer_name:26s} failed: {exc}", flush=True)
                continue
            finally:
                peer.close()
                del peer
                release_memory()
            summary = summarize(run.records, run.wall_s)
            results[peer_name] = {
                "what": what,
                "answers_digest": run.answers_digest,
                "machine": own.report(),
                "summary": summary,
                "turns": run.records,
            }
            print(f"{peer_name:26s} wall {run.wall_s:7.1f} s  {summary['output_tokens_per_s']:7.1f} "
                  f"out tok/s  TTFT p50 first {summary['ttft_s_p50_first_turn']:.3f} s, "
                  f"follow-ups {summary['ttft_s_p50_follow_ups']:.3f} s  hit rate "
                  f"{summary['follow_up_hit_rate_of_previous_history']}", flush=True)

    pagechat = results.get("pagechat", {}).get("summary", {})
    rate = pagechat.get("follow_up_hit_rate_of_previous_history")
    payload = {
        "shape": shape,
        "dtype": dtype,
        "device_kind": args.device,
        "workload": {
            "conversations": n, "turns": args.turns, "system_len": system_len,
            "user_len": list(user_len), "answer_len": list(answer_len), "seed": args.seed,
            "prompt_building": "previous prompt + generated ids + <|im_end|> + new user turn "
                               "(app.chat.token_history.ChatCodec)",
            "sampling": "greedy, exactly answer_len tokens (EOS ignored)",
            "ttft": "from submission to the first token, on the client's clock",
        },
        "machine": machine.report(),
        "results": results,
        "errors": errors,
        "same_answers_across_peers": len({r["answers_digest"] for r in results.values()}) == 1,
        "comparison": compare(results),
        "goals": {
            "follow_up_hit_rate_of_previous_history": rate,
            "hit_rate_ge_0.95": rate is not None and rate >= 0.95,
        },
    }
    name = args.name or f"multi_turn-{args.device.split(':')[0]}"
    out_dir = Path(args.out_dir) if args.out_dir else None
    out = write_result(name, payload, args.device, out_dir)
    payload["device"] = device_description(args.device)
    png = plot(payload, name, out_dir)
    print(f"wrote {out} and {png}")
    return payload


if __name__ == "__main__":
    main()
