"""Triton kernel: Qwen3's per-head q/k RMSNorm followed by neox rotary, for q and k in one launch.

As torch ops, q_norm, k_norm and two rotary calls are ~20 small kernels over q and k with a
temporary tensor each (engine/models/qwen3.py). Here each program takes BLOCK_H heads of one
token, normalizes them (optional), rotates them with that token's cos/sin and writes them out,
reading q/k straight from the strided views of the fused QKV output. The numerics follow
engine/layers/norm.py then engine/layers/rotary.py `apply_rotary` step by step: float32
statistics, cast to the input dtype, weight multiply rounded to the model dtype, rotation in
float32, cast back. Floating-point contraction is off so the rotation rounds like torch's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.launch import KernelLaunch

# Elements of one program's tile of heads (BLOCK_H x head_dim): 8 heads of 128.
TILE_ELEMENTS = 1024


@triton.jit
def _norm_rotate_heads(  # type: ignore[no-untyped-def]  # Triton reads annotations
    x_ptr,
    out_ptr,
    weight_ptr,
    cos,
    sin,
    token,
    first_head,
    stride_x_t,
    stride_x_h,
    stride_o_t,
    stride_o_h,
    eps,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    HAS_NORM: tl.constexpr,
):
    """Norm (optional) and rotate heads [first_head, first_head + BLOCK_H) of one token."""
    HALF = HEAD_DIM // 2
    offs_h = first_head + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < HALF
    mask = (offs_h[:, None] < NUM_HEADS) & mask_d[None, :]
    src = x_ptr + token * stride_x_t + offs_h[:, None] * stride_x_h + offs_d[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        # RMSNorm over the whole head (both halves), as engine/layers/norm.py orders it.
        variance = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / HEAD_DIM
        rstd = tl.rsqrt(variance + eps)[:, None]
        x1 = (x1 * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        x2 = (x2 * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        w1 = tl.load(weight_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        w2 = tl.load(weight_ptr + HALF + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        x1 = (w1[None, :] * x1).to(out_ptr.dtype.element_ty).to(tl.float32)
        x2 = (w2[None, :] * x2).to(out_ptr.dtype.element_ty).to(tl.float32)
    o1 = x1 * cos[None, :] - x2 * sin[None, :]
    o2 = x2 * cos[None, :] + x1 * sin[None, :]
    dst = out_ptr + token * stride_o_t + offs_h[:, None] * stride_o_h + offs_d[None, :]
    tl.store(dst, o1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, o2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _qk_rotary_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    cos_ptr,
    sin_ptr,
    q_weight_ptr,
    k_weight_ptr,
    stride_q_t,
    stride_q_h,
    stride_k_t,
    stride_k_h,
    stride_qo_t,
    stride_qo_h,
    stride_ko_t,
    stride_ko_h,
    stride_cos,
    stride_sin,
    eps,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    Q_BLOCKS: tl.constexpr,
    HAS_NORM: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head_block = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < HEAD_DIM // 2
    cos = tl.load(cos_ptr + token * stride_cos + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + token * stride_sin + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if head_block < Q_BLOCKS:
        _norm_rotate_heads(
            q_ptr,
            q_out_ptr,
            q_weight_ptr,
            cos,
            sin,
            token,
            head_block * BLOCK_H,
            stride_q_t,
            stride_q_h,
            stride_qo_t,
            stride_qo_h,
            eps,
            NUM_Q_HEADS,
            HEAD_DIM,
            BLOCK_H,
            BLOCK_HALF,
            HAS_NORM,
        )
    else:
        _norm_rotate_heads(
            k_ptr,
            k_out_ptr,
            k_weight_ptr,
            cos,
            sin,
            token,
            (head_block - Q_BLOCKS) * BLOCK_H,
            stride_k_t,
            stride_k_h,
            stride_ko_t,
            stride_ko_h,
            eps,
            NUM_KV_HEADS,
            HEAD_DIM,
            BLOCK_H,
            BLOCK_HALF,
            HAS_NORM,
        )


def _check_heads(name: str, t: torch.Tensor, num_tokens: int, head_dim: int) -> None:
    if t.dim() != 3 or t.shape[0] != num_tokens or t.shape[2] != head_dim:
        raise ValueError(f"{name} must be [{num_tokens}, heads, {head_dim}], got {list(t.shape)}")
    if t.stride(2) != 1:
        raise ValueError(f"{name} must be contiguous in its last (head_dim) dimension")


def _check_cos_sin(name: str, t: torch.Tensor, num_tokens: int, half: int) -> torch.Tensor:
    """cos/sin as [T, D/2] rows (RotaryEmbedding.cos_sin gives [T, 1, D/2] views)."""
    if t.shape[0] != num_tokens or t.numel() != num_tokens * half:
        raise ValueError(f"{name} must be [{num_tokens}, 1, {half}], got {list(t.shape)}")
    rows = t.reshape(num_tokens, half)
    if rows.stride(1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension")
    return rows


def plan_qk_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    q_weight: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> list[KernelLaunch]:
    """Validate q [T, Hq, D], k [T, Hkv, D], cos/sin [T, 1, D/2] and build the launch."""
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q and k must be [T, heads, D], got {list(q.shape)}, {list(k.shape)}")
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if head_dim % 2:
        raise ValueError(f"rotary needs an even head_dim, got {head_dim}")
    _check_heads("q", q, num_tokens, head_dim)
    _check_heads("k", k, num_tokens, head_dim)
    for name, out, src in (("q_out", q_out, q), ("k_out", k_out, k)):
        _check_heads(name, out, num_tokens, head_dim)
        if out.shape != src.shape:
            raise ValueError(f"{name} must be {list(src.shape)}, got {list(out.shape)}")
    cos = _check_cos_sin("cos", cos, num_tokens, head_dim // 2)
    sin = _check_cos_sin("sin", sin, num_tokens, head_dim // 2)
    if (q_weight is None) != (k_weight is None):
        raise ValueError("q_weight and k_weight go together (both norms or neither)")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w is not None and (w.shape != (head_dim,) or w.stride(0) != 1):
            raise ValueError(f"{name} must be a contiguous [{head_dim}], got {list(w.shape)}")
    if num_tokens == 0:
        return []
    block_half = triton.next_power_of_2(head_dim // 2)
    block_h = min(
        triton.next_power_of_2(max(num_q_heads, num_kv_heads)),
        max(1, TILE_ELEMENTS // (2 * block_half)),
    )
    q_blocks = triton.cdiv(num_q_heads, block_h)
    kv_blocks = triton.cdiv(num_kv_heads, block_h)
    has_norm = q_weight is not None
    return [
        KernelLaunch(
            kernel=_qk_rotary_kernel,
            grid=(num_tokens, q_blocks + kv_blocks),
            args=dict(
                q_ptr=q,
                k_ptr=k,
                q_out_ptr=q_out,
                k_out_ptr=k_out,
                cos_ptr=cos,
                sin_ptr=sin,
                q_weight_ptr=q_weight if q_weight is not None else cos,
                k_weight_ptr=k_weight if k_weight is not None else cos,
                stride_q_t=q.stride(0),
                stride_q_h=q.stride(1),
                stride_k_t=k.stride(0),
                stride_k_h=k.stride(1),
                stride_qo_t=q_out.stride(0),
                stride_qo_h=q_out.stride(1),
                stride_ko_t=k_out.stride(0),
                stride_ko_h=k_out.stride(1),
                stride_cos=cos.stride(0),
                stride_sin=sin.stride(0),
                eps=float(eps),
            ),
            constexprs=dict(
                NUM_Q_HEADS=num_q_heads,
                NUM_KV_HEADS=num_kv_heads,
                HEAD_DIM=head_dim,
                BLOCK_H=block_h,
                BLOCK_HALF=block_half,
                Q_BLOCKS=q_blocks,
                HAS_NORM=has_norm,
            ),
            options=dict(num_warps=4, enable_fp_fusion=False),
        )
    ]


def _out_dtype(x: torch.Tensor, weight: torch.Tensor | None) -> torch.dtype:
    return x.dtype if weight is None else torch.promote_types(x.dtype, weight.dtype)


def qk_norm_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_weight: torch.Tensor | None = None,
    k_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    q_out: torch.Tensor | None = None,
    k_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """rotary(rms_norm(q, q_weight)), rotary(rms_norm(k, k_weight)) in one launch.

    Without weights only the rotation runs. q/k may be strided views (the fused QKV output);
    outputs are new contiguous tensors unless given, and may be q and k themselves (in place).
    No host synchronisation (CUDA-graph safe).
    """
    if q_out is None:
        q_out = torch.empty(q.shape, dtype=_out_dtype(q, q_weight), device=q.device)
    if k_out is None:
        k_out = torch.empty(k.shape, dtype=_out_dtype(k, k_weight), device=k.device)
    for launch in plan_qk_rotary(q, k, cos, sin, q_out, k_out, q_weight, k_weight, eps):
        launch()
    return q_out, k_out
