"""Triton SiLU-and-mul: [T, 2I] = [gate | up] -> silu(gate) * up, [T, I], in one pass.

As torch ops (engine/layers/activation.py) this is two kernels and a temporary [T, I] tensor
between the gate/up matmul and the down projection. The rounding follows torch's: silu in
float32 rounded to the input dtype, then the product in float32 rounded again.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.launch import KernelLaunch

# Columns per program; the MLP widths (3072, 9728) split into a few programs per row.
MAX_BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations
    x_ptr,
    out_ptr,
    stride_x,
    stride_o,
    WIDTH: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < WIDTH
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + WIDTH + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


def plan_silu_and_mul(x: torch.Tensor, out: torch.Tensor) -> list[KernelLaunch]:
    """Validate x [T, 2I] and out [T, I] and build the launch (none for an empty batch)."""
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"x must be [tokens, 2 * width], got {list(x.shape)}")
    num_rows, width = x.shape[0], x.shape[1] // 2
    if tuple(out.shape) != (num_rows, width):
        raise ValueError(f"out must be [{num_rows}, {width}], got {list(out.shape)}")
    if x.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError("x and out must be contiguous in their last dimension")
    if num_rows == 0 or width == 0:
        return []
    block = min(triton.next_power_of_2(width), MAX_BLOCK)
    return [
        KernelLaunch(
            kernel=_silu_and_mul_kernel,
            grid=(num_rows, triton.cdiv(width, block)),
            args=dict(x_ptr=x, out_ptr=out, stride_x=x.stride(0), stride_o=out.stride(0)),
            constexprs=dict(WIDTH=width, BLOCK=block),
            options=dict(num_warps=4, enable_fp_fusion=False),
        )
    ]


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., 2I] -> silu(x[..., :I]) * x[..., I:] as [..., I]. No host synchronisation."""
    width = x.shape[-1] // 2
    if out is None:
        out = torch.empty((*x.shape[:-1], width), dtype=x.dtype, device=x.device)
    for launch in plan_silu_and_mul(x.reshape(-1, x.shape[-1]), out.view(-1, width)):
        launch()
    return out
