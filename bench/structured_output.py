"""Throughput with structured output: 16 requests, none constrained vs 8 of them constrained.

Same checkpoint, prompts, greedy decoding and output length in both runs: constrained requests
follow a JSON schema (an array of at least `output_len` small integers, so their grammar cannot
end before max_tokens and every request generates exactly `output_len` tokens). Reports tokens
per second of each run side by side, and the time the sampler spent on grammar bitmasks (filling
them on the host, copying and applying them), so the cost of a grammar is visible and requests
without one can be seen to pay nothing for it.

    python -m bench.structured_output --shape tiny --num-requests 16 --output-len 32
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import engine.sampler as sampler_module
from bench.common import ensure_checkpoint, random_token_prompts, write_result

if TYPE_CHECKING:
    import torch

    from engine.structured_output import GrammarState


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--num-constrained", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    from engine import LLM, SamplingParams
    from engine.structured_output import StructuredOutputParams

    path = ensure_checkpoint(args.shape)
    n, out_len = args.num_requests, args.output_len
    prompts = random_token_prompts(n, (args.input_len, args.input_len))
    llm = LLM(
        str(path),
        device=args.device,
        dtype=args.dtype,
        max_num_seqs=n,
        max_num_batched_tokens=max(2048, n * args.input_len),
        enable_prefix_caching=False,
    )
    schema = {
        "type": "array",
        "items": {"type": "integer", "minimum": 0, "maximum": 99},
        "minItems": out_len,
    }
    plain = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    constrained = SamplingParams(
        temperature=0.0,
        max_tokens=out_len,
        ignore_eos=True,
        structured_output=StructuredOutputParams(json=schema),
    )
    # Warm up, and compile the grammar once (the cache serves the timed runs, as in serving).
    llm.generate(prompts[:2], [plain, constrained])

    mask_s = [0.0]
    apply = sampler_module.apply_grammar_bitmasks

    def timed_apply(logits: torch.Tensor, grammars: Sequence[GrammarState | None]) -> torch.Tensor:
        start = time.perf_counter()
        try:
            return apply(logits, grammars)
        finally:
            mask_s[0] += time.perf_counter() - start

    sampler_module.apply_grammar_bitmasks = timed_apply
    runs = {}
    counts = (0, args.num_constrained)
    times: dict[int, list[float]] = {k: [] for k in counts}
    masks: dict[int, list[float]] = {k: [] for k in counts}
    try:
        for _ in range(args.repeats):  # the two runs alternate, so machine noise hits both
            for k in counts:
                params = [constrained] * k + [plain] * (n - k)
                mask_s[0] = 0.0
                start = time.perf_counter()
                outs = llm.generate(prompts, params)
                times[k].append(time.perf_counter() - start)
                masks[k].append(mask_s[0])
                assert all(len(o.token_ids) == out_len for o in outs), [
                    len(o.token_ids) for o in outs
                ]
    finally:
        sampler_module.apply_grammar_bitmasks = apply
    for k in counts:
        best = min(range(args.repeats), key=times[k].__getitem__)
        runs[f"{k}_of_{n}_constrained"] = {
            "seconds": round(times[k][best], 4),
            "tokens_per_s": round(n * out_len / times[k][best], 1),
            "mask_seconds": round(masks[k][best], 4),
        }

    print(f"{args.shape} {args.device} {args.dtype}: {n} requests x {out_len} tokens, best of "
          f"{args.repeats}")
    print(f"{'run':<22}{'s':>9}{'tok/s':>10}{'mask s':>9}")
    for name, r in runs.items():
        print(f"{name:<22}{r['seconds']:>9.3f}{r['tokens_per_s']:>10.1f}{r['mask_seconds']:>9.3f}")
    write_result(
        "structured_output",
        {"shape": args.shape, "dtype": args.dtype, "num_requests": n, "output_len": out_len,
         "input_len": args.input_len, "runs": runs},
        args.device,
    )


if __name__ == "__main__":
    main()
