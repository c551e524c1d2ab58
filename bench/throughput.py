"""Offline throughput: N concurrent requests through pagechat's engine vs Hugging Face transformers.

Same random-weight checkpoint, same prompts, greedy, fixed output length (ignore EOS) for all
peers, each measured after a warm-up run, side by side in one process:
  pagechat       LLM.generate (continuous batching, paged KV)
  hf-generate    transformers `generate` on the left-padded batch
  hf-continuous  transformers' own continuous-batching API (`generate_batch`), when installed

    python -m bench.throughput --shape qwen3-0.6b --num-requests 16 --input-len 64 --output-len 32
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bench.common import MachineMonitor, ensure_checkpoint, random_token_prompts, write_result

if TYPE_CHECKING:
    from transformers import Qwen3ForCausalLM


def run_pagechat(path: str | Path, prompts: list[list[int]], output_len: int, device: str,
                 dtype: str, repeats: int) -> list[float]:
    from engine import LLM, SamplingParams

    llm = LLM(str(path), device=device, dtype=dtype, max_num_seqs=len(prompts),
              max_num_batched_tokens=max(2048, max(len(p) for p in prompts)),
              enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        times.append(time.perf_counter() - start)
    assert all(len(o.token_ids) == output_len for o in outs)
    del llm
    return times


def _hf_model(path: str | Path, device: str, dtype: str) -> Qwen3ForCausalLM:
    from transformers import Qwen3ForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    # transformers wraps .to with functools.wraps(nn.Module.to): typed unbound, `self` expected first
    model = Qwen3ForCausalLM.from_pretrained(str(path), dtype=torch_dtype).to(device).eval()  # type: ignore[arg-type]
    return model


def run_hf_generate(path: str | Path, prompts: list[list[int]], output_len: int, device: str,
                    dtype: str, repeats: int) -> list[float]:
    model = _hf_model(path, device, dtype)
    width = max(len(p) for p in prompts)
    pad = 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    kwargs = dict(
        max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, pad_token_id=pad
    )
    with torch.inference_mode():
        model.generate(input_ids=ids[:2, -8:], attention_mask=mask[:2, -8:], **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
            times.append(time.perf_counter() - start)
    assert out.shape[1] == width + output_len
    del model
    return times


def run_hf_continuous(path: str | Path, prompts: list[list[int]], output_len: int, device: str,
                      dtype: str, repeats: int) -> list[float] | None:
    from transformers import GenerationConfig

    model = _hf_model(path, device, dtype)
    if not hasattr(model, "generate_batch"):
        return None
    config = GenerationConfig(max_new_tokens=output_len, do_sample=False, eos_token_id=-1)
    model.generate_batch(prompts[:2], generation_config=config, max_new_tokens=2)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        results = model.generate_batch(prompts, generation_config=config, max_new_tokens=output_len)
        times.append(time.perf_counter() - start)
    assert len(results) == len(prompts)
    del model
    return times


PEERS = {
    "pagechat": run_pagechat,
    "hf-generate": run_hf_generate,
    "hf-continuous": run_hf_continuous,
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-0.6b", help="tiny | qwen3-0.6b | qwen3-4b")
    parser.add_argument("--model", help="a checkpoint directory instead of --shape")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peers", default=",".join(PEERS))
    parser.add_argument("--name", default=None, help="result file name (default throughput-<device>)")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    path = args.model or ensure_checkpoint(args.shape)
    prompts = random_token_prompts(args.num_requests, (args.input_len, args.input_len), seed=0)
    results = {}
    for peer in args.peers.split(","):
        with MachineMonitor() as machine:  # per peer: was other work running beside it?
            times = PEERS[peer](path, prompts, args.output_len, args.device, dtype, args.repeats)
        gc.collect()
        if times is None:
            print(f"{peer:14s} not available in this transformers version")
            continue
        best = sorted(times)[len(times) // 2]
        tokens = args.num_requests * args.output_len
        results[peer] = {"seconds": times, "median_s": best, "output_tokens_per_s": tokens / best,
                         "machine": machine.report()}
        print(f"{peer:14s} median {best:7.2f} s  {tokens / best:8.1f} output tok/s")
    if "pagechat" in results:
        for peer, r in results.items():
            if peer != "pagechat":
                r["pagechat_speedup"] = results["pagechat"]["output_tokens_per_s"] / r["output_tokens_per_s"]
    payload = {
        "shape": args.shape if not args.model else str(args.model),
        "num_requests": args.num_requests,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "dtype": dtype,
        "results": results,
    }
    name = args.name or f"throughput-{args.device.split(':')[0]}"
    out = write_result(name, payload, args.device, Path(args.out_dir) if args.out_dir else None)
    print(f"wrote {out}")
    return payload


if __name__ == "__main__":
    main()
