"""RMSNorm as Qwen3 computes it (normalize in float32, cast back, scale by the weight), alone or
carrying the residual stream of a pre-norm decoder: `norm(x, residual)` adds first, then norms.

Each layer runs on the kernels it is built with (`Kernels`): plain torch ops (the reference),
the fused Triton kernels of engine/kernels (the model picks them with the triton attention
backend on CUDA), or "cpu": the engine's C kernels (engine.cpu_kernels.elementwise) for
bfloat16 activations, and for float32 activations on bfloat16 weights, on the CPU; the torch
ops for everything else (float32 models keep their bits).
The choice is made once, in the constructor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, cast, get_args, overload

import torch
from torch import nn

Kernels = Literal["torch", "triton", "cpu"]
KERNELS: tuple[str, ...] = get_args(Kernels)

NormFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
AddNormFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]
]


def check_kernels(kernels: str) -> Kernels:
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    return cast(Kernels, kernels)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in torch ops, in Hugging Face Qwen3RMSNorm's order (float32
    statistics, cast to the input dtype, then the weight multiply) so bf16 rounding matches too."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in torch ops; the inputs are left as they are.
    The add is the decoder's `hidden + block(hidden)`: same dtype, and a + b == b + a exactly."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def _triton_fns() -> tuple[NormFn, AddNormFn]:
    from engine.kernels import fused_add_rms_norm
    from engine.kernels import rms_norm as rms_norm_kernel

    def add_rms_norm_kernel(
        x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # One pass: reads x and the residual, writes the normed rows and the new residual in
        # place (the first layer's residual is the embedding output, never a weight).
        return fused_add_rms_norm(x, residual, weight, eps, residual_out=residual)

    return rms_norm_kernel, add_rms_norm_kernel


def _cpu_fns() -> tuple[NormFn, AddNormFn]:
    from engine.cpu_kernels import elementwise

    def norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if (
            elementwise.serves(x, weight) and x.shape[-1] <= elementwise.MAX_HIDDEN
        ) or elementwise.serves_float32((x,), (weight,)):
            return elementwise.add_rms_norm(x, None, weight, eps)[0]
        return rms_norm(x, weight, eps)

    def add_norm(
        x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if (
            elementwise.serves(x, residual, weight) and x.shape[-1] <= elementwise.MAX_HIDDEN
        ) or elementwise.serves_float32((x, residual), (weight,)):
            return elementwise.add_rms_norm(x, residual, weight, eps)
        return add_rms_norm(x, residual, weight, eps)

    return norm, add_norm


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension, optionally carrying the residual.

    `norm(x)` returns the normed x. `norm(x, residual)` returns `(norm(x + residual), x +
    residual)`: the residual add of a pre-norm block happens inside the next norm (vLLM and
    nano-vllm do the same), one Triton launch with `kernels="triton"`, where the residual is
    updated in place.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, kernels: Kernels = "torch") -> None:
        super().__init__()
        self.eps = eps
        self.kernels = check_kernels(kernels)
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self._norm: NormFn
        self._add_norm: AddNormFn
        if kernels == "triton":
            self._norm, self._add_norm = _triton_fns()
        elif kernels == "cpu":
            self._norm, self._add_norm = _cpu_fns()
        else:
            self._norm, self._add_norm = rms_norm, add_rms_norm

    @overload
    def forward(self, x: torch.Tensor, residual: None = None) -> torch.Tensor: ...

    @overload
    def forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self._norm(x, self.weight, self.eps)
        return self._add_norm(x, residual, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, kernels={self.kernels}"
