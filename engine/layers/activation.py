"""SwiGLU activation on a fused gate/up projection: silu(gate) * up."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.norm import Kernels, check_kernels


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] along the last dim -> silu(gate) * up (half the width), in torch ops."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def _cpu_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    from engine.cpu_kernels import elementwise

    if elementwise.serves(x):
        return elementwise.silu_and_mul(x)
    return silu_and_mul(x)


class SiluAndMul(nn.Module):
    """`silu_and_mul` on the kernels chosen when built: torch ops, one Triton launch, or the C
    kernel for bfloat16 on the CPU (torch ops for other dtypes)."""

    def __init__(self, kernels: Kernels = "torch") -> None:
        super().__init__()
        self.kernels = check_kernels(kernels)
        self._fn: Callable[[torch.Tensor], torch.Tensor] = silu_and_mul
        if kernels == "triton":
            from engine.kernels import silu_and_mul as silu_and_mul_kernel

            self._fn = silu_and_mul_kernel
        elif kernels == "cpu":
            self._fn = _cpu_silu_and_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x)

    def extra_repr(self) -> str:
        return f"kernels={self.kernels}"
