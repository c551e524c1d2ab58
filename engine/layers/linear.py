"""Linear layers with checkpoint-aware weight loading.

Weights are stored [out_features, in_features] like Hugging Face checkpoints. A MergedLinear
runs several projections of the same input as one matmul (QKV, gate/up): fewer, larger kernels,
and each checkpoint tensor is copied straight into its row slice, never concatenated in memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def copy_checked(target: torch.Tensor, loaded: torch.Tensor, name: str) -> None:
    """Copy a checkpoint tensor into a parameter (slice), converting dtype and device."""
    if tuple(target.shape) != tuple(loaded.shape):
        raise ValueError(
            f"checkpoint tensor {name} has shape {tuple(loaded.shape)}, the model expects "
            f"{tuple(target.shape)}: config.json does not describe this checkpoint"
        )
    target.copy_(loaded)


class Linear(nn.Module):
    """y = x W^T (+ b); parameters allocated uninitialised, filled by the loader."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    @property
    def num_shards(self) -> int:
        return 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    @torch.no_grad()
    def load_weight(self, param_name: str, loaded: torch.Tensor, shard: int, name: str) -> None:
        copy_checked(getattr(self, param_name), loaded, name)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class MergedLinear(Linear):
    """Several projections of one input stacked along the output dim, loaded shard by shard."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False) -> None:
        super().__init__(in_features, sum(output_sizes), bias)
        self.output_sizes = list(output_sizes)

    @property
    def num_shards(self) -> int:
        return len(self.output_sizes)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Split an output [.., sum(output_sizes)] back into the per-projection views."""
        return y.split(self.output_sizes, dim=-1)

    @torch.no_grad()
    def load_weight(self, param_name: str, loaded: torch.Tensor, shard: int, name: str) -> None:
        offset = sum(self.output_sizes[:shard])
        target = getattr(self, param_name).narrow(0, offset, self.output_sizes[shard])
        copy_checked(target, loaded, name)
