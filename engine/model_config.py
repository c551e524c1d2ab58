"""The checkpoint's facts, read once from config.json and generation_config.json.

Everything the engine needs to know about the checkpoint is decided here and nowhere else:
the architecture, the positions its rotary embedding covers (`max_positions`, after rope
scaling), the ids that end a generation (`eos_token_ids`) and its recommended sampling
(`sampling_defaults`).

Validated up front: a checkpoint this engine cannot run (another architecture, quantized
weights, sliding-window layers, an unsupported rope_scaling) is refused with a ValueError that
says why, before a single weight is read or any memory is allocated.

Both config.json dialects are read: the published Qwen3 one (`rope_theta`, `rope_scaling`) and
the one transformers >= 5 writes (`rope_parameters` holding `rope_theta` and `rope_type`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.layers.rotary import rope_max_positions, rope_type_of, validate_rope_scaling

SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM",)
SUPPORTED_DTYPES = ("bfloat16", "float16", "float32")
DEFAULT_ROPE_THETA = 10000.0  # what transformers assumes when config.json names none
# The generation_config.json keys that are sampling defaults (SamplingParams field names).
SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass(frozen=True)
class ModelConfig:
    architectures: tuple[str, ...]
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None = field(hash=False)
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    torch_dtype: str  # dtype the checkpoint was saved in
    # generation_config.json's eos_token_id, else config.json's (empty when neither names one).
    eos_token_ids: tuple[int, ...]
    # generation_config.json's recommended sampling, SAMPLING_DEFAULT_KEYS that it sets.
    sampling_defaults: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def max_positions(self) -> int:
        """Positions the checkpoint supports: rope scaling (yarn, ...) may extend the config value."""
        return rope_max_positions(self.rope_scaling, self.max_position_embeddings)

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        """Parse and validate `path/config.json` (and `generation_config.json` if present)."""
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"{config_file} not found: {path} is not a Hugging Face checkpoint directory "
                "(expected config.json and *.safetensors)"
            )
        raw = _read_json(config_file)
        generation_file = path / "generation_config.json"
        generation = _read_json(generation_file) if generation_file.is_file() else {}
        return cls.from_dict(raw, generation, source=str(config_file))

    @classmethod
    def from_dict(
        cls,
        raw: dict[str, Any],
        generation: dict[str, Any] | None = None,
        source: str = "config.json",
    ) -> ModelConfig:
        """Build from parsed config.json / generation_config.json dicts; ValueError if unsupported."""
        _check_architecture(raw, source)
        _check_features(raw, source)
        generation = generation or {}
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ):
            if not isinstance(raw.get(key), int) or raw[key] <= 0:
                raise ValueError(
                    f"{source}: {key} must be a positive integer, got {raw.get(key)!r}"
                )
        heads = raw["num_attention_heads"]
        kv_heads = raw.get("num_key_value_heads") or heads
        head_dim = raw.get("head_dim") or raw["hidden_size"] // heads
        if heads % kv_heads:
            raise ValueError(
                f"{source}: num_attention_heads ({heads}) must be a multiple of "
                f"num_key_value_heads ({kv_heads})"
            )
        if head_dim % 2:
            raise ValueError(
                f"{source}: head_dim must be even for rotary embeddings, got {head_dim}"
            )

        rope_theta, rope_scaling = _rope_settings(raw)
        try:
            validate_rope_scaling(rope_scaling)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

        dtype = str(raw.get("torch_dtype") or raw.get("dtype") or "float32")
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"{source}: checkpoint dtype {dtype!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_DTYPES)})"
            )
        return cls(
            architectures=tuple(raw.get("architectures") or SUPPORTED_ARCHITECTURES),
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", False)),
            torch_dtype=dtype,
            eos_token_ids=_eos_ids(generation.get("eos_token_id"))
            or _eos_ids(raw.get("eos_token_id")),
            sampling_defaults={k: generation[k] for k in SAMPLING_DEFAULT_KEYS if k in generation},
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _check_architecture(raw: dict[str, Any], source: str) -> None:
    architectures = raw.get("architectures") or []
    model_type = raw.get("model_type")
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    if architectures and not any(a in SUPPORTED_ARCHITECTURES for a in architectures):
        raise ValueError(
            f"{source}: unsupported architecture {', '.join(map(str, architectures))} "
            f"(model_type {model_type!r}); this engine runs dense Qwen3 checkpoints only "
            f"({supported}), e.g. Qwen/Qwen3-4B-Instruct-2507"
        )
    if model_type not in (None, "qwen3"):
        raise ValueError(
            f"{source}: unsupported model_type {model_type!r}; this engine runs dense Qwen3 "
            f"checkpoints only (model_type 'qwen3', {supported})"
        )
    if not architectures and model_type is None:
        raise ValueError(
            f"{source} names neither 'architectures' nor 'model_type'; expected {supported}"
        )


def _check_features(raw: dict[str, Any], source: str) -> None:
    if raw.get("quantization_config"):
        method = raw["quantization_config"].get("quant_method", "unknown")
        raise ValueError(
            f"{source}: quantized checkpoints ({method}) are not supported; use the bf16 checkpoint"
        )
    if raw.get("use_sliding_window"):
        raise ValueError(
            f"{source}: use_sliding_window=true is not supported (full attention only)"
        )
    layer_types = raw.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(
            f"{source}: layer_types {sorted(set(layer_types))} are not supported "
            "(full_attention only)"
        )
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{source}: hidden_act {act!r} is not supported (Qwen3 uses 'silu')")


def _rope_settings(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling or None) from either config.json dialect."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None)
    if theta is None:
        theta = raw.get("rope_theta", DEFAULT_ROPE_THETA)
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    if "partial_rotary_factor" in raw and "partial_rotary_factor" not in params:
        params["partial_rotary_factor"] = raw["partial_rotary_factor"]
    rope_type = rope_type_of(params)
    if rope_type in ("yarn", "llama3") and "original_max_position_embeddings" not in params:
        original = raw.get("original_max_position_embeddings") or raw.get("max_position_embeddings")
        if original is not None:
            params["original_max_position_embeddings"] = original
    if rope_type == "default" and set(params) <= {"rope_type"}:
        return float(theta), None
    params["rope_type"] = rope_type
    return float(theta), params


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
