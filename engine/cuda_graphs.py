"""CUDA graphs for decode-only steps: one captured forward per padded batch size.

A decode step launches hundreds of small kernels; replaying a graph removes their launch cost,
which dominates at small batch sizes. Inputs are copied into static buffers, padding rows get
slot -1 (nothing stored) and a 1-token context, and the graph's outputs are sliced back.
Graphs need the Triton backend: the torch backend loops over host-side lengths.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from engine.layers.attention import AttentionMetadata

if TYPE_CHECKING:
    from engine.model_runner import BatchInputs, ModelRunner

logger = logging.getLogger(__name__)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then steps of 16 up to max_num_seqs (capped at 512)."""
    top = min(max_num_seqs, 512)
    sizes = [b for b in (1, 2, 4, 8) if b <= top]
    sizes += list(range(16, top + 1, 16))
    if sizes[-1] != top:
        sizes.append(top)
    return sizes


class DecodeGraphs:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.enabled = runner.attention_backend.name == "triton"
        self.sizes = graph_batch_sizes(runner.config.max_num_seqs)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        max_bs = self.sizes[-1]
        device = runner.device
        max_len = runner.config.max_model_len or runner.model_config.max_position_embeddings
        self.max_seq_len = max_len
        self.max_blocks = (max_len + runner.block_size - 1) // runner.block_size
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.int64, device=device)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_bs, self.max_blocks, dtype=torch.int32, device=device)
        self.hidden = torch.zeros(
            max_bs, runner.model_config.hidden_size, dtype=runner.dtype, device=device
        )

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
        model = self.runner.model
        pool = None
        for bs in reversed(self.sizes):
            meta = self._meta(bs)
            self.hidden[:bs] = model(self.input_ids[:bs], self.positions[:bs], meta)  # warm up
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                self.hidden[:bs] = model(self.input_ids[:bs], self.positions[:bs], meta)
            pool = graph.pool() if pool is None else pool
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.runner.device)
        logger.info(
            "captured CUDA graphs for decode batch sizes %s in %.1f s",
            self.sizes,
            time.monotonic() - start,
        )

    def can_run(self, inputs: BatchInputs) -> bool:
        meta = inputs.meta
        return (
            bool(self.graphs)
            and meta.is_decode_only
            and meta.num_seqs <= self.sizes[-1]
            and meta.block_tables.shape[1] <= self.max_blocks
        )

    def run(self, inputs: BatchInputs) -> torch.Tensor:
        n = inputs.meta.num_seqs
        bs = next(b for b in self.sizes if b >= n)
        meta = inputs.meta
        self.input_ids[:n] = inputs.input_ids
        self.positions[:n] = inputs.positions
        self.slot_mapping.fill_(-1)
        self.slot_mapping[:n] = meta.slot_mapping
        self.seq_lens.fill_(1)
        self.seq_lens[:n] = meta.seq_lens
        self.block_tables[:n, : meta.block_tables.shape[1]] = meta.block_tables
        self.graphs[bs].replay()
        return self.hidden[:n]
