"""One model decode step on the CPU, two loads of the same checkpoint side by side, and a profile.

    python -m bench.cpu_decode CHECKPOINT [--batch 1 16] [--context 512] [--steps 20] [--profile]
    python -m bench.cpu_decode CHECKPOINT --prefill 2048 [--steps 3]   # one prompt's forward

`--dtype` is PAGECHAT_DTYPE's choice (default bfloat16; `auto` gives what the engine picks for
this CPU, e.g. bf16 weights with float32 math on AVX2). Loads the checkpoint twice in it
("packed": what load_model does by default, the engine's own packed C kernels where they build, else oneDNN-prepacked weights; "dense": prepack=False) and times a decode step (forward + logits, batch B, each
sequence with `context` cached tokens) alternating A B A B; the median and 10th percentile of
each are printed with the ratio dense/packed (the machine may be shared: only the ratio of
interleaved runs means anything). --profile prints the torch profiler's op breakdown of a few
steps of each, grouped into linear, attention, norms/rotary/activation and the rest.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import cast

import torch

from engine.layers.attention import (
    AttentionMetadata,
    TorchAttentionBackend,
    get_attention_backend,
)
from engine.model_config import ModelConfig
from engine.models.loader import load_model
from engine.models.qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM

BLOCK = 16


def kv_dtype(model: Qwen3ForCausalLM) -> torch.dtype:
    """The dtype the model computes (and so caches K/V) in: the embedding starts it."""
    embed = model.model.embed_tokens
    return embed.output_dtype or embed.weight.dtype


class DecodeBatch:
    """KV caches of B sequences of `context` tokens each (random K/V), and one decode step."""

    def __init__(self, model: Qwen3ForCausalLM, batch: int, context: int) -> None:
        cfg = model.config
        blocks_per_seq = (context + 1 + BLOCK - 1) // BLOCK
        shape = (batch * blocks_per_seq, BLOCK, cfg.num_key_value_heads, cfg.head_dim)
        dtype = kv_dtype(model)
        self.k = [torch.randn(shape).to(dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.randn(shape).to(dtype) for _ in range(cfg.num_hidden_layers)]
        self.model = model
        tables = [list(range(s * blocks_per_seq, (s + 1) * blocks_per_seq)) for s in range(batch)]
        slots = [tables[s][context // BLOCK] * BLOCK + context % BLOCK for s in range(batch)]
        self.meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            query_start_loc=torch.arange(batch + 1, dtype=torch.int32),
            seq_lens=torch.full((batch,), context + 1, dtype=torch.int32),
            block_tables=torch.tensor(tables, dtype=torch.int32),
            max_query_len=1,
            max_seq_len=context + 1,
            query_lens_cpu=[1] * batch,
            seq_lens_cpu=[context + 1] * batch,
            all_slots_stored=True,
        )
        self.ids = torch.randint(0, cfg.vocab_size, (batch,))
        self.positions = torch.full((batch,), context, dtype=torch.int64)

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        self.model.bind_kv_cache(self.k, self.v)
        hidden = self.model(self.ids, self.positions, self.meta)
        return self.model.compute_logits(hidden)


class PrefillBatch:
    """One fresh prompt of `tokens` tokens (random ids) through the model, as the engine's
    first prefill chunk of a request: KV stored, causal attention, logits of the last token."""

    def __init__(self, model: Qwen3ForCausalLM, tokens: int) -> None:
        cfg = model.config
        blocks = (tokens + BLOCK - 1) // BLOCK
        shape = (blocks, BLOCK, cfg.num_key_value_heads, cfg.head_dim)
        dtype = kv_dtype(model)
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.model = model
        self.meta = AttentionMetadata(
            slot_mapping=torch.arange(tokens, dtype=torch.int64),
            query_start_loc=torch.tensor([0, tokens], dtype=torch.int32),
            seq_lens=torch.tensor([tokens], dtype=torch.int32),
            block_tables=torch.arange(blocks, dtype=torch.int32)[None],
            max_query_len=tokens,
            max_seq_len=tokens,
            query_lens_cpu=[tokens],
            seq_lens_cpu=[tokens],
            all_slots_stored=True,
        )
        self.ids = torch.randint(0, min(cfg.vocab_size, 10_000), (tokens,))
        self.positions = torch.arange(tokens, dtype=torch.int64)

    @torch.inference_mode()
    def step(self) -> torch.Tensor:
        self.model.bind_kv_cache(self.k, self.v)
        hidden = self.model(self.ids, self.positions, self.meta)
        return self.model.compute_logits(hidden[-1:])


def time_prefill(
    checkpoint: str, tokens: int, repeats: int, cpu_attention: list[str], dtype: str
) -> None:
    """Prompt tokens/s of one `tokens`-token prefill per attention setting, alternating."""
    config = ModelConfig.from_dir(checkpoint)
    backends = {name: get_attention_backend("torch", name) for name in cpu_attention}
    model = load_model(checkpoint, config, dtype, "cpu", backends[cpu_attention[0]])
    # The ModuleList holds Qwen3DecoderLayers (Qwen3Model builds it so; engine/models/qwen3.py casts too)
    attention_layers = [cast(Qwen3DecoderLayer, layer).self_attn for layer in model.model.layers]
    batch = PrefillBatch(model, tokens)
    samples: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(repeats):
        for name, backend in backends.items():
            for layer in attention_layers:
                layer.backend = backend
            start = time.perf_counter()
            batch.step()
            samples[name].append(time.perf_counter() - start)
    for name, s in samples.items():
        median = statistics.median(s)
        print(
            f"prefill {tokens} tokens, PAGECHAT_CPU_ATTENTION={name}: median {median:.2f} s "
            f"({tokens / median:.0f} tok/s), runs {', '.join(f'{x:.2f}' for x in s)}"
        )


GROUPS = {
    "linear": ("mkldnn::_linear_pointwise", "aten::linear", "aten::addmm", "aten::mm"),
    "attention": (
        "scaled_dot_product",
        "aten::index_put",
        "aten::index_select",
        "_flash_attention",
        "aten::index",
    ),
    "norm/rotary/act": (
        "rms_norm",
        "aten::silu",
        "aten::mul",
        "aten::add",
        "aten::pow",
        "aten::mean",
        "aten::rsqrt",
        "aten::cat",
        "aten::neg",
        "aten::sub",
    ),
    "embedding": ("aten::embedding",),
}


def profile(batch: DecodeBatch, steps: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            batch.step()
        wall = (time.perf_counter() - start) / steps
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    grouped: dict[str, float] = {}
    for e in events:
        group = next((g for g, keys in GROUPS.items() if any(k in e.key for k in keys)), "other")
        grouped[group] = grouped.get(group, 0.0) + e.self_cpu_time_total
    print(f"  profile: {wall * 1e3:.1f} ms/step wall (profiled); self time by group:")
    for group, t in sorted(grouped.items(), key=lambda kv: -kv[1]):
        print(f"    {group:18s} {100 * t / total:5.1f}%")
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
    for e in top:
        print(f"      {e.key:50s} {100 * e.self_cpu_time_total / total:5.1f}%  calls {e.count}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--prefill",
        type=int,
        metavar="TOKENS",
        help="time one prompt of TOKENS tokens instead of decode steps (--steps repeats; "
        "--cpu-attention settings compared)",
    )
    parser.add_argument(
        "--cpu-attention", nargs="+", default=["auto", "float32"], help="for --prefill"
    )
    parser.add_argument("--no-compare", action="store_true")
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        help="PAGECHAT_DTYPE's choice: bfloat16 (default), float32 or auto (this CPU's pick)",
    )
    parser.add_argument(
        "--compare",
        choices=["prepack", "attention"],
        default="prepack",
        help="prepack: packed vs dense weights; attention: float32 vs native bf16 decode "
        "attention (PAGECHAT_CPU_ATTENTION), both packed",
    )
    args = parser.parse_args()
    if args.prefill:
        time_prefill(
            args.checkpoint,
            args.prefill,
            max(1, min(args.steps, 5)),
            args.cpu_attention,
            args.dtype,
        )
        return
    config = ModelConfig.from_dir(args.checkpoint)
    backend = TorchAttentionBackend(native_decode=False)
    models = {"packed": load_model(args.checkpoint, config, args.dtype, "cpu", backend)}
    if args.compare == "attention":  # "dense" = the baseline: float32 attention
        native = TorchAttentionBackend(native_decode=True)
        models = {
            "packed": load_model(args.checkpoint, config, args.dtype, "cpu", native),
            "dense": models["packed"],
        }
    elif not args.no_compare:
        models["dense"] = load_model(
            args.checkpoint, config, args.dtype, "cpu", backend, prepack=False
        )
    if args.compare == "attention":
        print("packed = native bf16 decode attention, dense = float32 attention (both prepacked)")
    for b in args.batch:
        batches = {}
        for name, m in models.items():
            torch.manual_seed(0)  # the same K/V and tokens for every load
            batches[name] = DecodeBatch(m, b, args.context)
        outs = {name: batch.step() for name, batch in batches.items()}
        if "dense" in outs:
            same = torch.equal(outs["packed"], outs["dense"])
            print(f"batch {b}: packed logits bit-identical to dense: {same}")
        samples: dict[str, list[float]] = {name: [] for name in batches}
        for _ in range(args.steps):
            for name, batch in batches.items():
                start = time.perf_counter()
                batch.step()
                samples[name].append(time.perf_counter() - start)
        for name, s in samples.items():
            s.sort()
            print(
                f"  {name:7s} median {statistics.median(s) * 1e3:7.1f} ms  "
                f"p10 {s[len(s) // 10] * 1e3:7.1f} ms  ({b / statistics.median(s):.1f} tok/s)"
            )
        if "dense" in samples:
            ratio = statistics.median(samples["dense"]) / statistics.median(samples["packed"])
            p10 = (
                samples["dense"][len(samples["dense"]) // 10]
                / samples["packed"][len(samples["packed"]) // 10]
            )
            print(f"  dense/packed time ratio: median {ratio:.2f}, p10 {p10:.2f}")
        if args.profile:
            for name, batch in batches.items():
                print(f"  [{name}]")
                profile(batch, max(3, args.steps // 4))


if __name__ == "__main__":
    main()
