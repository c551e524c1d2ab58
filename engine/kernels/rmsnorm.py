"""Triton RMSNorm over the last dimension, alone or fused with the residual add before it.

The decoder's pre-norm blocks compute `residual = x + residual` and then `norm(residual)`; as
torch ops that is about eight kernels (add, upcast, square, mean, eps, rsqrt, scale, cast,
weight), each with a temporary tensor. Here one program per token row reads the row once, writes
the new residual and the normed row, and keeps Hugging Face's order of operations
(engine/layers/norm.py): the add rounded to the input dtype, float32 statistics, cast to the
input dtype, then the weight multiply rounded to the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.launch import KernelLaunch

# One program holds a whole row in registers; beyond this a row would spill.
MAX_HIDDEN = 65536


@triton.jit
def _rms_norm_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations
    x_ptr,
    residual_ptr,
    out_ptr,
    residual_out_ptr,
    weight_ptr,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    eps,
    N: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0)
        # torch adds in the input dtype: float32 sum rounded back, like `x + residual`.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_ro + offs, x, mask=mask)
    h = x.to(tl.float32)
    variance = tl.sum(h * h, axis=0) / N
    h = h * tl.rsqrt(variance + eps)
    h = h.to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (w * h).to(out_ptr.dtype.element_ty), mask=mask)


def _num_warps(block: int) -> int:
    """Enough threads that each holds at most a few dozen elements of the row."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def _check_rows(name: str, t: torch.Tensor, shape: tuple[int, int]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must be {list(shape)}, got {list(t.shape)}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension")


def plan_rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor,
    residual: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> list[KernelLaunch]:
    """Validate 2-D [T, N] inputs and build the launch (none for an empty batch)."""
    if x.dim() != 2:
        raise ValueError(f"x must be [tokens, hidden], got {list(x.shape)}")
    num_rows, hidden = x.shape
    if weight.shape != (hidden,) or weight.stride(0) != 1:
        raise ValueError(f"weight must be a contiguous [{hidden}], got {list(weight.shape)}")
    if hidden > MAX_HIDDEN:
        raise ValueError(f"hidden size {hidden} exceeds {MAX_HIDDEN} (one row per program)")
    _check_rows("x", x, (num_rows, hidden))
    _check_rows("out", out, (num_rows, hidden))
    if (residual is None) != (residual_out is None):
        raise ValueError("residual and residual_out go together")
    if residual is not None and residual_out is not None:
        _check_rows("residual", residual, (num_rows, hidden))
        if residual.dtype != x.dtype:
            raise ValueError(f"residual must be {x.dtype}, got {residual.dtype}")
        _check_rows("residual_out", residual_out, (num_rows, hidden))
        if residual_out.dtype != x.dtype:
            raise ValueError(f"residual_out must be {x.dtype}, got {residual_out.dtype}")
    if num_rows == 0:
        return []
    block = triton.next_power_of_2(hidden)
    has_residual = residual is not None
    return [
        KernelLaunch(
            kernel=_rms_norm_kernel,
            grid=(num_rows,),
            args=dict(
                x_ptr=x,
                residual_ptr=residual if has_residual else x,
                out_ptr=out,
                residual_out_ptr=residual_out if has_residual else x,
                weight_ptr=weight,
                stride_x=x.stride(0),
                stride_r=residual.stride(0) if residual is not None else 0,
                stride_o=out.stride(0),
                stride_ro=residual_out.stride(0) if residual_out is not None else 0,
                eps=float(eps),
            ),
            constexprs=dict(N=hidden, BLOCK=block, HAS_RESIDUAL=has_residual),
            options=dict(num_warps=_num_warps(block), enable_fp_fusion=False),
        )
    ]


def _output(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The result tensor torch's `weight * h.to(x.dtype)` would give: promoted dtype."""
    return torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """RMSNorm of x [..., N] by weight [N]; `out` may be x itself. No host synchronisation."""
    out = _output(x, weight) if out is None else out
    hidden = x.shape[-1]
    for launch in plan_rms_norm(x.reshape(-1, hidden), weight, eps, out.view(-1, hidden)):
        launch()
    return out


def fused_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual) in one pass over x, residual [..., N].

    Either output may alias an input (`residual_out=residual` updates the residual in place):
    each element is read before it is written, by the same program.
    """
    out = _output(x, weight) if out is None else out
    residual_out = torch.empty_like(x) if residual_out is None else residual_out
    hidden = x.shape[-1]
    for launch in plan_rms_norm(
        x.reshape(-1, hidden),
        weight,
        eps,
        out.view(-1, hidden),
        residual.reshape(-1, hidden),
        residual_out.view(-1, hidden),
    ):
        launch()
    return out, residual_out
