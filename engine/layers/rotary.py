"""Rotary position embedding (neox rotate-half style) with the rope_scaling types Qwen3 uses.

cos/sin are precomputed once per position in float32 (as Hugging Face computes them: float32
position x float32 inverse frequency), and the rotation itself runs in float32 before casting
back, so positions deep in a 256K context keep their precision in bf16 models.

Supported rope types: default, linear, yarn, llama3. The types whose frequencies change with
the current sequence length (dynamic, longrope) are rejected: keys already in the paged cache
were rotated with the old frequencies and would silently disagree with new queries.

`QKNormRotary` is Qwen3's step before attention (per-head q/k RMSNorm, then rotary) on the
kernels chosen when it is built: these torch ops, or one Triton launch (engine/kernels/rotary.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from engine.layers.norm import Kernels, check_kernels, rms_norm

SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn", "llama3")


def rope_type_of(rope_scaling: dict[str, Any] | None) -> str:
    if not rope_scaling:
        return "default"
    return str(rope_scaling.get("rope_type", rope_scaling.get("type", "default")))


def validate_rope_scaling(rope_scaling: dict[str, Any] | None) -> None:
    """Raise ValueError for rope_scaling settings this engine cannot reproduce exactly."""
    rope_type = rope_type_of(rope_scaling)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope_scaling type {rope_type!r} is not supported; supported types: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)} (or no rope_scaling)"
        )
    params = rope_scaling or {}
    if rope_type in ("linear", "llama3") and not params.get("factor"):
        raise ValueError(f"rope_scaling of type {rope_type!r} needs a 'factor'")
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if key not in params:
                raise ValueError(f"rope_scaling of type 'llama3' needs {key!r}")
    factor = params.get("factor")
    if factor is not None and (not isinstance(factor, int | float) or factor <= 0):
        raise ValueError(f"rope_scaling factor must be a positive number, got {factor!r}")
    partial = params.get("partial_rotary_factor", 1.0)
    if partial != 1.0:
        raise ValueError(
            f"partial_rotary_factor {partial} is not supported (Qwen3 rotates all dims)"
        )


def compute_inv_freq(
    head_dim: int,
    rope_theta: float,
    rope_scaling: dict[str, Any] | None,
    max_position_embeddings: int,
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] (float32, CPU) and the cos/sin scale (attention factor)."""
    validate_rope_scaling(rope_scaling)
    rope_type = rope_type_of(rope_scaling)
    params = rope_scaling or {}
    dim = head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (rope_theta**exponents)
    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / params["factor"], 1.0
    original = params.get("original_max_position_embeddings") or max_position_embeddings
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, params, original), 1.0
    return _yarn_inv_freq(dim, rope_theta, params, original, max_position_embeddings)


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict, original: int) -> torch.Tensor:
    factor = params["factor"]
    low_freq_factor = params["low_freq_factor"]
    high_freq_factor = params["high_freq_factor"]
    low_freq_wavelen = original / low_freq_factor
    high_freq_wavelen = original / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(
    dim: int, base: float, params: dict, original: int, max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071): interpolate low frequencies, keep high ones, scale attention."""
    factor = params.get("factor") or max_position_embeddings / original

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero in the ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_weight = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq, float(attention_factor)


def rope_max_positions(rope_scaling: dict[str, Any] | None, max_position_embeddings: int) -> int:
    """Positions the cos/sin cache must cover: scaled contexts may extend past the config value."""
    params = rope_scaling or {}
    factor = params.get("factor")
    original = params.get("original_max_position_embeddings")
    if factor and original:
        return max(max_position_embeddings, int(original * factor))
    return max_position_embeddings


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, D] by per-token cos/sin [T, 1, D/2] (neox layout), computed in float32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def qk_norm_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3's per-head RMSNorm of q [T, Hq, D] and k [T, Hkv, D], then `apply_rotary`, in
    torch ops."""
    q = apply_rotary(rms_norm(q, q_norm_weight, eps), cos, sin)
    k = apply_rotary(rms_norm(k, k_norm_weight, eps), cos, sin)
    return q, k


def _cpu_qk_norm_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The C kernel (one pass per head) for bfloat16 on the CPU, and for float32 q/k with
    bfloat16 norm weights; torch ops otherwise."""
    from engine.cpu_kernels import elementwise

    if (
        (
            elementwise.serves(q, k, q_norm_weight, k_norm_weight)
            or elementwise.serves_float32((q, k), (q_norm_weight, k_norm_weight))
        )
        and cos.dtype == sin.dtype == torch.float32
        and q.shape[-1] <= elementwise.MAX_HEAD_DIM
    ):
        return elementwise.qk_norm_rotary(q, k, cos, sin, q_norm_weight, k_norm_weight, eps)
    return qk_norm_rotary(q, k, cos, sin, q_norm_weight, k_norm_weight, eps)


QKNormRotaryFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float],
    tuple[torch.Tensor, torch.Tensor],
]


class QKNormRotary(nn.Module):
    """The attention's step between the QKV projection and attention: q/k RMSNorm per head,
    then rotary, on the kernels chosen when built (torch ops, or one Triton launch for q and k,
    which reads q and k as strided views of the fused QKV output).

    It holds no weights: the norms' weights stay `q_norm` / `k_norm` of the attention layer,
    where the checkpoint's names put them, and are passed in. q and k norms share one eps
    (Qwen3's rms_norm_eps)."""

    def __init__(self, kernels: Kernels = "torch") -> None:
        super().__init__()
        self.kernels = check_kernels(kernels)
        self._fn: QKNormRotaryFn = qk_norm_rotary
        if kernels == "triton":
            from engine.kernels import qk_norm_rotary as qk_norm_rotary_kernel

            self._fn = qk_norm_rotary_kernel
        elif kernels == "cpu":
            self._fn = _cpu_qk_norm_rotary

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        q_norm_weight: torch.Tensor,
        k_norm_weight: torch.Tensor,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._fn(q, k, cos, sin, q_norm_weight, k_norm_weight, eps)

    def extra_repr(self) -> str:
        return f"kernels={self.kernels}"


class RotaryEmbedding(nn.Module):
    """cos/sin cache [max_positions, head_dim] in float32; one lookup per forward pass."""

    cos_sin_cache: torch.Tensor

    def __init__(
        self,
        head_dim: int,
        rope_theta: float,
        rope_scaling: dict[str, Any] | None,
        max_position_embeddings: int,
    ) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        inv_freq, scale = compute_inv_freq(
            head_dim, rope_theta, rope_scaling, max_position_embeddings
        )
        self.max_positions = rope_max_positions(rope_scaling, max_position_embeddings)
        device = torch.empty(0).device  # honours an enclosing `with torch.device(...)`
        positions = torch.arange(self.max_positions, dtype=torch.float32, device=device)
        freqs = positions[:, None] * inv_freq.to(device)[None, :]
        cache = torch.cat((freqs.cos() * scale, freqs.sin() * scale), dim=-1)
        self.register_buffer("cos_sin_cache", cache.float(), persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, D/2] float32 for the given positions; shared by every layer."""
        cos_sin = self.cos_sin_cache.index_select(0, positions).unsqueeze(1)
        cos, sin = cos_sin.chunk(2, dim=-1)
        return cos, sin

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.cos_sin(positions)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_positions={self.max_positions}"
