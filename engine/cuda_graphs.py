"""CUDA graphs for decode-only steps: one captured forward per padded batch size.

A decode step launches hundreds of small kernels; replaying a graph removes their launch cost,
which dominates at small batch sizes. Inputs are copied into static buffers, padding rows get
slot -1 (nothing stored) and a 1-token context, and the graph's outputs are sliced back.
Graphs need the Triton backend: the torch backend loops over host-side lengths.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from engine.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)

# The model's forward: (input_ids [T], positions [T], metadata) -> hidden states [T, hidden].
Forward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then steps of 16 up to max_num_seqs (capped at 512)."""
    top = min(max_num_seqs, 512)
    sizes = [b for b in (1, 2, 4, 8) if b <= top]
    sizes += list(range(16, top + 1, 16))
    if sizes[-1] != top:
        sizes.append(top)
    return sizes


class DecodeGraphs:
    """Static buffers sized for `max_num_seqs` decodes of up to `max_model_len` tokens each.

    Built from plain values, after the KV cache is bound to the model: the engine has fixed
    max_model_len by then, so the block-table width here is the one the scheduler enforces.
    """

    def __init__(
        self,
        model: Forward,
        *,
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        hidden_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        enabled: bool = True,
    ) -> None:
        self.model = model
        self.enabled = enabled  # graphs need the triton backend (the torch one loops on the host)
        self.device = torch.device(device)
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        max_bs = self.sizes[-1]
        self.max_seq_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        device = self.device
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.int64, device=device)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_bs, self.max_blocks, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(max_bs, hidden_size, dtype=dtype, device=device)

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            max_query_len=1,
            max_seq_len=self.max_seq_len,
            query_lens_cpu=[1] * bs,
            seq_lens_cpu=[self.max_seq_len] * bs,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        if not self.enabled:
            logger.info("CUDA graphs off: they need the triton attention backend")
            return
        start = time.monotonic()
        model = self.model
        pool = None
        for bs in reversed(self.sizes):
            meta = self._meta(bs)
            self.hidden[:bs] = model(self.input_ids[:bs], self.positions[:bs], meta)  # warm up
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                self.hidden[:bs] = model(self.input_ids[:bs], self.positions[:bs], meta)
            pool = graph.pool() if pool is None else pool
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.device)
        logger.info(
            "captured CUDA graphs for decode batch sizes %s in %.1f s",
            self.sizes,
            time.monotonic() - start,
        )

    def can_run(self, meta: AttentionMetadata) -> bool:
        return (
            bool(self.graphs)
            and meta.is_decode_only
            and meta.num_seqs <= self.sizes[-1]
            and meta.block_tables.shape[1] <= self.max_blocks
        )

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Hidden states [n, hidden] of a decode-only batch that `can_run`."""
        n = meta.num_seqs
        bs = next(b for b in self.sizes if b >= n)
        self.input_ids[:n] = input_ids
        self.positions[:n] = positions
        self.slot_mapping.fill_(-1)
        self.slot_mapping[:n] = meta.slot_mapping
        self.seq_lens.fill_(1)
        self.seq_lens[:n] = meta.seq_lens
        self.block_tables[:n, : meta.block_tables.shape[1]] = meta.block_tables
        self.graphs[bs].replay()
        return self.hidden[:n]
