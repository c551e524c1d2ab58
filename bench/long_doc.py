"""Long-document Q&A: a document and a first question, then follow-ups in the same chat.

The document sits in the first user turn before the question (as the app puts an upload);
each follow-up extends the chat the app's way, so every question shares the document's
prefix. Per document size and peer: time to first token of the first question, the median of
the follow-ups', and their ratio (a prefix cache makes a follow-up cost only its new tokens).
Peers that recompute everything each turn run only up to --recompute-max-doc tokens.

    python -m bench.long_doc                       # CPU: 1K and 8K-token documents
    python -m bench.long_doc --device cuda         # GPU: 8K, 32K and 128K
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import TypedDict

from bench import plots
from bench.chat_peers import PEERS, PeerContext, play
from bench.chat_workload import document_conversation, load_codec, max_history_tokens
from bench.common import (
    MachineMonitor,
    add_model_args,
    device_description,
    median,
    release_memory,
    resolve_model_args,
    write_result,
)

RECOMPUTING = {"pagechat-no-prefix-cache", "hf-generate"}


class _Defaults(TypedDict):
    doc_lens: list[int]
    answer_len: int
    recompute_max_doc: int
    peers: str


DEFAULTS: dict[str, _Defaults] = {
    "cpu": dict(doc_lens=[1024, 8192], answer_len=16, recompute_max_doc=1024,
                peers="pagechat,pagechat-no-prefix-cache,hf-generate,hf-generate-cache,hf-continuous"),
    "cuda": dict(doc_lens=[8192, 32768, 131072], answer_len=64, recompute_max_doc=32768,
                 peers="pagechat,pagechat-no-prefix-cache,hf-generate,hf-generate-cache,hf-continuous"),
}
GOAL_DOC = 8192  # the goal: follow-up TTFT <= 1/10 of the first question's on 8K tokens


def summarize(records: list[dict]) -> dict:
    first = records[0]
    follow = records[1:]
    follow_ttft = [r["ttft_s"] for r in follow]
    p50 = median(follow_ttft)
    rates = [r["decode_tokens_per_s"] for r in records if r["decode_tokens_per_s"]]
    cached = [r["cached_tokens"] for r in follow]
    return {
        "first_question_prompt_tokens": first["prompt_tokens"],
        "first_question_ttft_s": first["ttft_s"],
        "follow_up_ttft_s": follow_ttft,
        "follow_up_ttft_s_p50": p50,
        "follow_up_over_first_ttft": p50 / first["ttft_s"] if first["ttft_s"] else None,
        "follow_up_cached_tokens": cached,
        "follow_up_hit_rate_of_prompt": (
            sum(cached) / sum(r["prompt_tokens"] for r in follow)
            if follow and None not in cached else None
        ),
        "decode_tokens_per_s_p50": median(rates) if rates else None,
    }


def compare(results: dict, doc_lens: list[int]) -> dict:
    out = {}
    for doc in doc_lens:
        key = str(doc)
        ours = results.get("pagechat", {}).get(key, {}).get("summary")
        hf = {p: r[key]["summary"] for p, r in results.items()
              if p.startswith("hf-") and key in r and "summary" in r[key]}
        if not ours or not hf:
            continue
        best_first = min(hf, key=lambda p: hf[p]["first_question_ttft_s"])
        best_follow = min(hf, key=lambda p: hf[p]["follow_up_ttft_s_p50"])
        out[key] = {
            "best_hf_first_question": best_first,
            "first_ttft_best_hf_over_pagechat":
                hf[best_first]["first_question_ttft_s"] / ours["first_question_ttft_s"],
            "best_hf_follow_up": best_follow,
            "follow_up_ttft_best_hf_over_pagechat":
                hf[best_follow]["follow_up_ttft_s_p50"] / ours["follow_up_ttft_s_p50"],
            "pagechat_ahead_of_best_hf": (
                ours["first_question_ttft_s"] < hf[best_first]["first_question_ttft_s"]
                and ours["follow_up_ttft_s_p50"] < hf[best_follow]["follow_up_ttft_s_p50"]
            ),
        }
    return out


def plot(payload: dict, name: str, out_dir: Path | None) -> Path:
    results, docs = payload["results"], payload["workload"]["doc_lens"]
    groups = [f"{d // 1024}K tokens" if d >= 1024 else f"{d} tokens" for d in docs]

    def series(key: str) -> dict[str, list]:
        return {
            peer: [r.get(str(d), {}).get("summary", {}).get(key) for d in docs]
            for peer, r in results.items()
        }

    fig, axes = plots.figure(1, 3, (
        f"Long-document Q&A: first question vs {payload['workload']['follow_ups']} follow-ups "
        f"({payload['shape']}, {payload['dtype']}, {payload['device']})"
    ), size=(19, 4.8))
    plots.bars(axes[0][0], groups, series("first_question_ttft_s"),
               "First question: time to first token", "seconds", log=True)
    plots.bars(axes[0][1], groups, series("follow_up_ttft_s_p50"),
               "Follow-ups: time to first token (median)", "seconds", log=True)
    plots.bars(axes[0][2], groups, series("follow_up_over_first_ttft"),
               "Follow-up / first TTFT (lower is better)", "ratio", log=True)
    axes[0][2].axhline(0.1, color="grey", linestyle="--", linewidth=1)
    return plots.save(fig, name, out_dir)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, "result file name (default long_doc-<device>)")
    parser.add_argument("--doc-lens", type=int, nargs="+", default=None,
                        help="document sizes in tokens (cpu 1024 8192, cuda 8192 32768 131072)")
    parser.add_argument("--follow-ups", type=int, default=5)
    parser.add_argument("--question-len", type=int, nargs=2, default=(20, 40), metavar=("LO", "HI"))
    parser.add_argument("--answer-len", type=int, default=None, help="answer tokens (cpu 16, cuda 64)")
    parser.add_argument("--system-len", type=int, default=32)
    parser.add_argument("--recompute-max-doc", type=int, default=None,
                        help="largest document for peers that recompute every turn "
                             "(cpu 1024, cuda 32768)")
    parser.add_argument("--peers", default=None, help=f"comma-separated, from {', '.join(PEERS)}")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="per-step token budget (chunked prefill) for pagechat and hf-continuous")
    parser.add_argument("--hf-page-size", type=int, default=16, help="hf-continuous page size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    defaults = DEFAULTS["cuda" if args.device.startswith("cuda") else "cpu"]
    doc_lens = args.doc_lens or defaults["doc_lens"]
    answer_len = args.answer_len or defaults["answer_len"]
    recompute_max = args.recompute_max_doc or defaults["recompute_max_doc"]
    peers = (args.peers or defaults["peers"]).split(",")
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        parser.error(f"unknown peers {unknown}; choose from {list(PEERS)}")
    path, shape, dtype = resolve_model_args(args)
    codec = load_codec(path)
    chats = {
        doc: document_conversation(codec, doc, args.follow_ups, tuple(args.question_len),
                                   answer_len, args.system_len, seed=args.seed + doc)
        for doc in doc_lens
    }

    results: dict = {}
    with MachineMonitor() as machine:
        for peer_name in peers:
            docs = [d for d in doc_lens if peer_name not in RECOMPUTING or d <= recompute_max]
            if not docs:
                continue
            ctx = PeerContext(
                model_dir=path, device=args.device, dtype=dtype, max_concurrency=1,
                kv_tokens=max(max_history_tokens(chats[d]) for d in docs) + 256,
                max_num_batched_tokens=args.max_num_batched_tokens, hf_page_size=args.hf_page_size,
            )
            peer = PEERS[peer_name](ctx)
            results[peer_name] = {"what": peer.description}
            try:
                for doc in docs:
                    try:
                        with MachineMonitor() as own:  # the load varies on a shared machine
                            run = asyncio.run(play(peer, codec, [chats[doc]]))
                    except Exception as exc:  # e.g. out of memory at 128K: record it, go on
                        results[peer_name][str(doc)] = {"error": f"{type(exc).__name__}: {exc}"}
                        print(f"{peer_name:26s} {doc:7d} tokens: failed: {exc}", flush=True)
                        continue
                    summary = summarize(run.records)
                    results[peer_name][str(doc)] = {
                        "answers_digest": run.answers_digest, "machine": own.report(),
                        "summary": summary, "turns": run.records,
                    }
                    print(f"{peer_name:26s} {doc:7d} tokens: first TTFT "
                          f"{summary['first_question_ttft_s']:8.3f} s, follow-ups p50 "
                          f"{summary['follow_up_ttft_s_p50']:7.3f} s, ratio "
                          f"{summary['follow_up_over_first_ttft']:.4f}", flush=True)
            finally:
                peer.close()
                del peer
                release_memory()

    goal_doc = GOAL_DOC if GOAL_DOC in doc_lens else None
    ours = results.get("pagechat", {}).get(str(goal_doc), {}).get("summary") if goal_doc else None
    ratio = ours["follow_up_over_first_ttft"] if ours else None
    payload = {
        "shape": shape,
        "dtype": dtype,
        "device_kind": args.device,
        "workload": {
            "doc_lens": doc_lens, "follow_ups": args.follow_ups,
            "question_len": list(args.question_len), "answer_len": answer_len,
            "system_len": args.system_len, "seed": args.seed,
            "recompute_max_doc": recompute_max,
            "prompt_building": "system + user(document + question) + assistant; each follow-up "
                               "appends the answer + <|im_end|> + a new user turn (app.chat.token_history)",
            "sampling": "greedy, exactly answer_len tokens (EOS ignored)",
            "ttft": "from submission to the first token, one request at a time",
        },
        "machine": machine.report(),
        "results": results,
        "comparison": compare(results, doc_lens),
        "goals": {
            "doc_tokens": goal_doc,
            "follow_up_over_first_ttft": ratio,
            "follow_up_ttft_le_tenth_of_first": ratio is not None and ratio <= 0.1,
        },
    }
    name = args.name or f"long_doc-{args.device.split(':')[0]}"
    out_dir = Path(args.out_dir) if args.out_dir else None
    out = write_result(name, payload, args.device, out_dir)
    payload["device"] = device_description(args.device)
    png = plot(payload, name, out_dir)
    print(f"wrote {out} and {png}")
    return payload


if __name__ == "__main__":
    main()
