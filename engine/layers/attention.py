"""Paged attention: one interface, two backends (torch for CPU and as the reference, Triton for GPU).

Every backend first writes the step's new K/V into the paged cache by slot, then attends each
query token to all keys of its sequence (cached prefix + new tokens) through the block table.
A prefill chunk, a prefill with a cached prefix and a single-token decode are one case:
query i of a sequence with `query_len` new tokens and `seq_len` keys sees keys
`0 .. seq_len - query_len + i` (bottom-right aligned causal mask).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Batch layout for one forward pass over a mixed batch of prefill chunks and decodes.

    Tokens of all sequences are packed: sequence s owns rows query_start_loc[s]:query_start_loc[s+1].
    """

    slot_mapping: torch.Tensor  # int64 [num_tokens]; cache slot per new token, -1 = do not store
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]
    seq_lens: torch.Tensor  # int32 [num_seqs]; keys per sequence after this step's tokens
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq]; padding rows/cols are 0
    max_query_len: int
    max_seq_len: int
    # Host copies, so the torch backend and the runner never sync the device to read them.
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(Protocol):
    """Stores k/v for the new tokens, then returns attention output [num_tokens, Hq, D]."""

    name: str

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor: ...


def store_kv_cache_torch(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write k/v [T, Hkv, D] into caches [num_blocks, block_size, Hkv, D] at flat slots."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    slots = slot_mapping
    # Slot -1 (nothing to store) only comes from padded CUDA-graph batches; on the CPU path the
    # check is a 1-element host read, and skipping the mask saves three nonzero() per layer.
    if slot_mapping.device.type != "cpu" or int(slot_mapping.min()) < 0:
        keep = slot_mapping >= 0
        slots, k, v = slot_mapping[keep], k[keep], v[keep]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v.to(v_cache.dtype))


def gather_sequence_kv(
    cache: torch.Tensor, block_table_row: torch.Tensor, seq_len: int
) -> torch.Tensor:
    """The first seq_len cached vectors of one sequence, [seq_len, Hkv, D]."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = cache[block_table_row[:num_blocks].long()]
    return blocks.reshape(-1, *cache.shape[2:])[:seq_len]


def paged_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    new_k: torch.Tensor | None = None,
    new_v: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference paged attention in plain torch ops, computed in float32.

    One sdpa call per sequence, so a sequence's result never depends on its batch mates
    (padding a batch together would change the summation order). A prefill without a cached
    prefix uses this step's `new_k`/`new_v` when given (the values just stored); everything
    else gathers its keys from the cache.
    """
    out = torch.empty_like(q)
    starts = [0]
    for query_len in meta.query_lens_cpu:
        starts.append(starts[-1] + query_len)
    # Decodes of equal context length share one gather and one sdpa call. sdpa's fused CPU
    # kernel computes every (sequence, head) on its own, so a decode gives the same bits alone
    # or in a group of any size; a lone decode takes the same path.
    decodes_by_len: dict[int, list[int]] = {}
    for s, (query_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        if query_len == 1 and seq_len > 1:
            decodes_by_len.setdefault(seq_len, []).append(s)
    for seq_len, seqs in decodes_by_len.items():
        if len(seqs) == 1:
            rows = slice(starts[seqs[0]], starts[seqs[0]] + 1)
            tables = meta.block_tables[seqs[0] : seqs[0] + 1]
        else:
            rows = torch.tensor([starts[s] for s in seqs], device=q.device)
            tables = meta.block_tables[torch.tensor(seqs, device=q.device)]
        out[rows] = _decode_group(q[rows], k_cache, v_cache, tables, seq_len, scale)
    batched = {s for seqs in decodes_by_len.values() for s in seqs}
    for s, (query_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        if query_len == 0 or s in batched:
            continue
        start = starts[s]
        rows = slice(start, start + query_len)
        queries = q[rows].float().transpose(0, 1)  # [H, T, D]
        if query_len == seq_len and new_k is not None and new_v is not None:
            # A fresh prompt: sdpa's fused causal CPU kernel (it wants 4-D inputs) on this
            # step's own keys, the values just stored.
            keys = new_k[rows].float().transpose(0, 1)[None]
            values = new_v[rows].float().transpose(0, 1)[None]
            attended = F.scaled_dot_product_attention(
                queries[None], keys, values, is_causal=True, scale=scale, enable_gqa=True
            )[0]
        else:
            # Keys from the cache (the cached prefix is visible to every query).
            keys = (
                gather_sequence_kv(k_cache, meta.block_tables[s], seq_len).float().transpose(0, 1)
            )
            values = (
                gather_sequence_kv(v_cache, meta.block_tables[s], seq_len).float().transpose(0, 1)
            )
            # A chunk after a cached prefix: bottom-right aligned causal mask, as an additive
            # float mask on 4-D inputs so sdpa takes its fused CPU kernel (the math path
            # would materialise [H, chunk, seq_len] scores).
            visible = torch.ones(query_len, seq_len, dtype=torch.bool, device=q.device)
            visible = visible.tril(seq_len - query_len)
            mask = torch.zeros(query_len, seq_len, device=q.device)
            mask.masked_fill_(~visible, float("-inf"))
            attended = F.scaled_dot_product_attention(
                queries[None],
                keys[None],
                values[None],
                attn_mask=mask,
                scale=scale,
                enable_gqa=True,
            )[0]
        out[rows] = attended.transpose(0, 1).to(q.dtype)
    return out


def _decode_group(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_len: int,
    scale: float,
) -> torch.Tensor:
    """Attention of one query token per sequence for sequences that all hold seq_len keys.

    The gathered blocks are viewed as [S, Hkv, L, D] without a copy: sdpa's fused kernel reads
    strided keys, and its GQA mode lets each KV head serve its query heads as they are.
    """
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_blocks = (seq_len + block_size - 1) // block_size
    tables = block_tables[:, :num_blocks].long()
    shape = (num_seqs, num_blocks * block_size, num_kv_heads, head_dim)
    keys = k_cache[tables].view(shape)[:, :seq_len].float().transpose(1, 2)
    values = v_cache[tables].view(shape)[:, :seq_len].float().transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q.float()[:, :, None], keys, values, scale=scale, enable_gqa=True
    )  # [S, H, 1, D]
    return out[:, :, 0].to(q.dtype)


class TorchAttentionBackend:
    """Plain torch ops: the CPU path and the reference the Triton kernels are tested against."""

    name = "torch"

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        store_kv_cache_torch(k, v, k_cache, v_cache, meta.slot_mapping)
        return paged_attention_torch(q, k_cache, v_cache, meta, scale, new_k=k, new_v=v)


class TritonAttentionBackend:
    """Triton kernels: one store launch and one paged-attention launch for the whole batch."""

    name = "triton"

    def forward(self, q, k, v, k_cache, v_cache, meta, scale):
        from engine.kernels import paged_attention, store_kv_cache

        store_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        return paged_attention(
            q,
            k_cache,
            v_cache,
            out,
            meta.query_start_loc,
            meta.seq_lens,
            meta.block_tables,
            max_query_len=meta.max_query_len,
            max_seq_len=meta.max_seq_len,
            scale=scale,
        )


def get_attention_backend(name: str) -> AttentionBackend:
    """'torch' or 'triton' (resolve 'auto' with EngineConfig.resolved_attention_backend first)."""
    if name == "torch":
        return TorchAttentionBackend()
    if name == "triton":
        return TritonAttentionBackend()
    raise ValueError(f"attention_backend must be 'torch' or 'triton', got {name!r}")
