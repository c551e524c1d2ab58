"""SwiGLU activation on a fused gate/up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] along the last dim -> silu(gate) * up (half the width)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul_fused(x: torch.Tensor) -> torch.Tensor:
    """`silu_and_mul` as one Triton launch (CUDA + triton backend; the model decides)."""
    from engine.kernels import silu_and_mul as silu_and_mul_kernel

    return silu_and_mul_kernel(x)
