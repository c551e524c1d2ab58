"""Token embedding table; also serves as the output projection when embeddings are tied."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.cpu_kernels import packed_bf16


class VocabEmbedding(nn.Module):
    """[vocab, hidden] lookup table, allocated uninitialised: weights always come from a checkpoint.

    `output_dtype` is the dtype of the activations it starts: the table's own dtype by default;
    the loader sets float32 when 16-bit weights are kept with float32 math (a CPU without native
    bf16), and from there every layer computes in float32.

    With tied embeddings on a CPU the table may be stored packed for the output projection's
    kernel (engine.cpu_kernels.packed_bf16): the lookup then gathers its rows from that layout,
    so the model holds one copy of the table, not two.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim), requires_grad=False)
        self.output_dtype: torch.dtype | None = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if packed_bf16.is_packed(self.weight):
            hidden = packed_bf16.rows(self.weight, input_ids)
        else:
            hidden = F.embedding(input_ids, self.weight)
        if self.output_dtype is not None and hidden.dtype != self.output_dtype:
            hidden = hidden.to(self.output_dtype)
        return hidden

    def dense_weight(self) -> torch.Tensor:
        """The table as a plain [vocab, hidden] tensor (a copy when it is packed)."""
        if packed_bf16.is_packed(self.weight):
            return packed_bf16.unpack(self.weight)
        return self.weight

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"
