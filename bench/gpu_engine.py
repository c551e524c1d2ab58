"""GPU engine figures on Qwen3-4B-shaped random weights (speed does not depend on the values).

  decode     tokens/s at batch 1 and 64 (CUDA graphs on), after the prompts are prefilled
  prefill    tokens/s for one 8K, 32K and 128K-token prompt (chunked by max_num_batched_tokens)
  nano-vllm  256 sequences, input and output lengths uniform in 100..1024, temperature 0.6,
             ignore EOS: total output tokens / wall time (nano-vllm's published workload)

    python -m bench.gpu_engine                      # all, writes bench/results/gpu-engine.json
    python -m bench.gpu_engine --only decode,prefill --prefill-lens 8192,32768
"""

from __future__ import annotations

import argparse
import random
import time

from bench.common import ensure_checkpoint, random_token_prompts, write_result


def _engine(path, **overrides):
    from engine import LLM

    return LLM(str(path), device="cuda", dtype="bfloat16", **overrides)


def decode_speed(llm, batch: int, prompt_len: int = 128, new_tokens: int = 256) -> dict:
    from engine import SamplingParams

    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    for prompt in random_token_prompts(batch, (prompt_len, prompt_len), seed=batch):
        engine.add_request(prompt, params)
    generated = 0
    while engine.scheduler.num_waiting or any(
        state.seq.num_computed_tokens < state.seq.num_prompt_tokens
        for state in engine.requests.values()
    ):
        generated += sum(len(o.delta_token_ids) for o in engine.step())
    start = time.perf_counter()
    decoded = 0
    while engine.has_unfinished():
        decoded += sum(len(o.delta_token_ids) for o in engine.step())
    seconds = time.perf_counter() - start
    return {"batch": batch, "decode_tokens": decoded, "seconds": seconds,
            "tokens_per_s": decoded / seconds, "ms_per_step": 1000 * seconds / (decoded / batch)}


def prefill_speed(llm, length: int) -> dict:
    from engine import SamplingParams

    prompt = random_token_prompts(1, (length, length), seed=length)[0]
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    llm.generate([prompt[:512]], params)
    start = time.perf_counter()
    llm.generate([prompt], params)
    seconds = time.perf_counter() - start
    return {"prompt_tokens": length, "seconds": seconds, "tokens_per_s": length / seconds}


def nano_vllm_workload(llm, num_seqs: int = 256) -> dict:
    from engine import SamplingParams

    rng = random.Random(0)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))] for _ in range(num_seqs)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=rng.randint(100, 1024))
              for _ in range(num_seqs)]
    llm.generate(["Benchmark: "], SamplingParams(max_tokens=8))
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    return {"num_seqs": num_seqs, "output_tokens": tokens, "seconds": seconds,
            "output_tokens_per_s": tokens / seconds}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen3-4b")
    parser.add_argument("--model", help="checkpoint directory instead of --shape")
    parser.add_argument("--only", default="decode,prefill,nano-vllm")
    parser.add_argument("--prefill-lens", default="8192,32768,131072")
    parser.add_argument("--decode-batches", default="1,64")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--name", default="gpu-engine")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    path = args.model or ensure_checkpoint(args.shape)
    wanted = set(args.only.split(","))
    result: dict = {"shape": args.shape, "enforce_eager": args.enforce_eager}
    if "decode" in wanted:
        llm = _engine(path, max_num_seqs=64, max_model_len=4096, enforce_eager=args.enforce_eager)
        result["decode"] = [decode_speed(llm, int(b)) for b in args.decode_batches.split(",")]
        for r in result["decode"]:
            print(f"decode batch {r['batch']:3d}: {r['tokens_per_s']:9.1f} tok/s ({r['ms_per_step']:.2f} ms/step)")
        del llm
    if "prefill" in wanted:
        lens = [int(x) for x in args.prefill_lens.split(",")]
        llm = _engine(path, max_num_seqs=4, max_model_len=max(lens) + 16,
                      max_num_batched_tokens=8192, enforce_eager=True)
        result["prefill"] = [prefill_speed(llm, n) for n in lens]
        for r in result["prefill"]:
            print(f"prefill {r['prompt_tokens']:7d}: {r['seconds']:7.2f} s, {r['tokens_per_s']:9.0f} tok/s")
        del llm
    if "nano-vllm" in wanted:
        llm = _engine(path, max_num_seqs=256, max_model_len=4096, max_num_batched_tokens=16384,
                      enforce_eager=args.enforce_eager)
        result["nano_vllm"] = nano_vllm_workload(llm)
        print(f"nano-vllm workload: {result['nano_vllm']['output_tokens_per_s']:.0f} output tok/s")
    from pathlib import Path

    out = write_result(args.name, result, "cuda", Path(args.out_dir) if args.out_dir else None)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
