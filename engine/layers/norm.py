"""RMSNorm as Qwen3 computes it: normalize in float32, cast back, then scale by the weight."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension.

    The order of operations (float32 statistics, cast to the input dtype, then multiply by the
    weight in the model dtype) follows Hugging Face's Qwen3RMSNorm so bf16 rounding matches too.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """The same norm as one Triton launch (CUDA + triton backend; the model decides)."""
        from engine.kernels import rms_norm

        return rms_norm(x, self.weight, self.eps)

    def add_forward_fused(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual) as one Triton launch, the residual updated in
        place: what a pre-norm decoder layer does between its blocks, in one pass."""
        from engine.kernels import fused_add_rms_norm

        return fused_add_rms_norm(x, residual, self.weight, self.eps, residual_out=residual)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
