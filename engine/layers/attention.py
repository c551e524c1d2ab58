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

from engine.cpu_kernels import paged_attention as cpu_decode_attention
from engine.cpu_kernels import prefill_attention as cpu_prefill_attention


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
    # True when no slot is -1 (known on the host when the batch is built): the torch store
    # then skips the mask. Padded CUDA-graph batches and hand-built ones keep the default.
    all_slots_stored: bool = False

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
    all_slots_stored: bool = False,
) -> None:
    """Write k/v [T, Hkv, D] into caches [num_blocks, block_size, Hkv, D] at flat slots.

    Slots of -1 are skipped; `all_slots_stored` says there are none, saving the mask."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    slots = slot_mapping
    if not all_slots_stored:
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
    blocks = torch.index_select(cache, 0, block_table_row[:num_blocks])
    return blocks.view(-1, *cache.shape[2:])[:seq_len]


def paged_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    new_k: torch.Tensor | None = None,
    new_v: torch.Tensor | None = None,
    native_decode: bool = False,
    native_prefill: bool = False,
) -> torch.Tensor:
    """Reference paged attention in plain torch ops, computed in float32.

    `native_decode`: decode rows of a bfloat16/float16 model run sdpa's fused CPU kernel in
    that dtype (float32 accumulation, probabilities rounded to 16 bits before P@V, as GPU
    flash kernels do) instead of up-casting the gathered keys and values to float32: at
    context 512 on Qwen3-0.6B shapes 1.7x (16 sequences) to 3.5x (one) faster attention,
    a few bf16 ulps off. Still one call per sequence: batch mates never change the bits.
    `native_prefill`: prompt chunks of a 16-bit model likewise run in that dtype instead of
    float32: on the engine's flash kernel (engine.cpu_kernels.prefill_attention) where the
    CPU has AVX512-BF16 (AMX tiles, or vdpbf16ps register tiles without AMX), else sdpa's
    fused kernel.

    One sdpa call per sequence, so a sequence's result never depends on its batch mates
    (padding a batch together would change the summation order). A prefill without a cached
    prefix uses this step's `new_k`/`new_v` when given (the values just stored); everything
    else gathers its keys from the cache.
    """
    out = torch.empty_like(q)
    prefill_math = q.dtype if native_prefill and q.device.type == "cpu" else torch.float32
    starts = [0]
    for query_len in meta.query_lens_cpu:
        starts.append(starts[-1] + query_len)
    decodes = [
        s
        for s, (query_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu))
        if query_len == 1 and seq_len > 1
    ]
    # Decodes of equal context length share one gather; each then takes sdpa's fused kernel on
    # its own (one call per sequence keeps its bits independent of its batch mates). On the
    # CPU in float32 math the engine's C kernel serves them all in one call instead, reading
    # keys and values where they lie in the cache (engine.cpu_kernels.paged_attention).
    decodes_by_len: dict[int, list[int]] = {}
    if decodes and not native_decode and cpu_decode_attention.available(q, k_cache):
        index = torch.tensor(decodes)
        cpu_decode_attention.decode_attention(
            q.contiguous(),
            out,
            torch.tensor([starts[s] for s in decodes]),
            k_cache,
            v_cache,
            meta.block_tables[index],
            meta.seq_lens[index],
            scale,
        )
    else:
        for s in decodes:
            decodes_by_len.setdefault(meta.seq_lens_cpu[s], []).append(s)
    for seq_len, seqs in decodes_by_len.items():
        tables = meta.block_tables[torch.tensor(seqs, device=q.device)]
        group_rows = _decode_group(
            q, [starts[s] for s in seqs], k_cache, v_cache, tables, seq_len, scale, native_decode
        )
        for s, row in zip(seqs, group_rows):
            out[starts[s]] = row
    batched = set(decodes)
    for s, (query_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        if query_len == 0 or s in batched:
            continue
        start = starts[s]
        rows = slice(start, start + query_len)
        if prefill_math == q.dtype and cpu_prefill_attention.available(q, k_cache):
            # bf16 on a CPU with AVX512-BF16: the engine's flash kernel reads the prefix and the chunk
            # from the cache in one call (engine.cpu_kernels.prefill_attention).
            cpu_prefill_attention.prefill_attention(
                q[rows], out[rows], k_cache, v_cache, meta.block_tables[s], seq_len, scale
            )
            continue
        queries = q[rows].to(prefill_math).transpose(0, 1)  # [H, T, D]
        if query_len == seq_len and new_k is not None and new_v is not None:
            # A fresh prompt: sdpa's fused causal CPU kernel (it wants 4-D inputs) on this
            # step's own keys, the values just stored.
            keys = new_k[rows].to(prefill_math).transpose(0, 1)[None]
            values = new_v[rows].to(prefill_math).transpose(0, 1)[None]
            attended = F.scaled_dot_product_attention(
                queries[None], keys, values, is_causal=True, scale=scale, enable_gqa=True
            )[0]
        else:
            # A chunk after a cached prefix: every query sees the whole prefix, then its own
            # chunk causally. Two fused-kernel calls merged by log-sum-exp skip the masked half
            # of the chunk-by-chunk scores that one masked call would compute.
            prefix = seq_len - query_len
            keys = (
                gather_sequence_kv(k_cache, meta.block_tables[s], seq_len)
                .to(prefill_math)
                .transpose(0, 1)
            )
            values = (
                gather_sequence_kv(v_cache, meta.block_tables[s], seq_len)
                .to(prefill_math)
                .transpose(0, 1)
            )
            attended = _prefix_then_causal_attention(
                queries,
                keys[:, :prefix],
                values[:, :prefix],
                keys[:, prefix:],
                values[:, prefix:],
                scale,
            )
        out[rows] = attended.transpose(0, 1).to(q.dtype)
    return out


_flash_attention_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _prefix_then_causal_attention(
    q: torch.Tensor,
    prefix_k: torch.Tensor,
    prefix_v: torch.Tensor,
    chunk_k: torch.Tensor,
    chunk_v: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q [H, T, D] over [Hkv, P, D] keys (all visible) then [Hkv, T, D] keys (causal)."""
    if prefix_k.shape[1] == 0:
        return F.scaled_dot_product_attention(
            q[None], chunk_k[None], chunk_v[None], is_causal=True, scale=scale, enable_gqa=True
        )[0]
    if _flash_attention_cpu is None or q.device.type != "cpu":
        keys, values = torch.cat((prefix_k, chunk_k), 1), torch.cat((prefix_v, chunk_v), 1)
        num_queries, num_keys = q.shape[1], keys.shape[1]
        visible = torch.ones(num_queries, num_keys, dtype=torch.bool, device=q.device)
        mask = torch.zeros(num_queries, num_keys, device=q.device)
        mask.masked_fill_(~visible.tril(num_keys - num_queries), float("-inf"))
        return F.scaled_dot_product_attention(
            q[None], keys[None], values[None], attn_mask=mask, scale=scale, enable_gqa=True
        )[0]
    out_prefix, lse_prefix = _flash_attention_cpu(
        q[None], prefix_k[None], prefix_v[None], scale=scale
    )
    out_chunk, lse_chunk = _flash_attention_cpu(
        q[None], chunk_k[None], chunk_v[None], is_causal=True, scale=scale
    )
    top = torch.maximum(lse_prefix, lse_chunk)
    w_prefix = torch.exp(lse_prefix - top)[..., None]
    w_chunk = torch.exp(lse_chunk - top)[..., None]
    return ((out_prefix * w_prefix + out_chunk * w_chunk) / (w_prefix + w_chunk))[0]


def _decode_group(
    q: torch.Tensor,
    rows: list[int],
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_len: int,
    scale: float,
    native: bool = False,
) -> list[torch.Tensor]:
    """Attention of the query rows `rows` (one per sequence), all holding seq_len keys.

    `native`: in q's own dtype (see paged_attention_torch); float32 otherwise.

    One gather for the group, viewed as [S, Hkv, L, D] without a copy: sdpa's fused kernel
    reads strided keys, and its GQA mode serves each KV head's query heads in place.
    """
    num_seqs = len(rows)
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    num_blocks = (seq_len + block_size - 1) // block_size
    index = block_tables[:, :num_blocks].flatten()
    shape = (num_seqs, num_blocks * block_size, num_kv_heads, head_dim)
    keys = torch.index_select(k_cache, 0, index).view(shape)[:, :seq_len].transpose(1, 2)
    values = torch.index_select(v_cache, 0, index).view(shape)[:, :seq_len].transpose(1, 2)
    math = q.dtype if native and q.device.type == "cpu" else torch.float32
    results = []
    for i, row in enumerate(rows):
        attended = F.scaled_dot_product_attention(
            q[row : row + 1, :, None].to(math),
            keys[i : i + 1].to(math),
            values[i : i + 1].to(math),
            scale=scale,
            enable_gqa=True,
        )  # [1, H, 1, D]
        results.append(attended[0, :, 0].to(q.dtype))
    return results


class TorchAttentionBackend:
    """Plain torch ops: the CPU path and the reference the Triton kernels are tested against.

    `native_decode` (EngineConfig.cpu_attention == "native"): decode attention of 16-bit
    models in their own dtype, faster and a few ulps off the float32 reference; see
    paged_attention_torch.
    """

    name = "torch"

    def __init__(self, native_decode: bool = False, native_prefill: bool = False) -> None:
        self.native_decode = native_decode
        self.native_prefill = native_prefill

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        store_kv_cache_torch(k, v, k_cache, v_cache, meta.slot_mapping, meta.all_slots_stored)
        return paged_attention_torch(
            q,
            k_cache,
            v_cache,
            meta,
            scale,
            new_k=k,
            new_v=v,
            native_decode=self.native_decode,
            native_prefill=self.native_prefill,
        )


class TritonAttentionBackend:
    """Triton kernels: one store launch and one paged-attention launch for the whole batch."""

    name = "triton"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
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


def get_attention_backend(name: str, cpu_attention: str = "auto") -> AttentionBackend:
    """'torch' or 'triton' (resolve 'auto' with EngineConfig.resolved_attention_backend first).

    `cpu_attention` is the torch backend's precision for 16-bit models (float32 models compute
    in float32 whatever it says):
      auto     decodes in float32 math (the C kernel reads the bf16 cache in place, as fast as
               16-bit math), prompt chunks in the model's dtype (the engine's flash kernel on
               AVX512-BF16, AMX or not, else sdpa's fused bf16 kernel: 2.5-3x faster than float32 on a 2K-token
               prompt, as GPU engines compute them);
      float32  everything in float32: the reference;
      native   everything in the model's dtype."""
    if name == "torch":
        if cpu_attention not in ("auto", "float32", "native"):
            raise ValueError(
                f"cpu_attention must be auto, float32 or native, got {cpu_attention!r}"
            )
        return TorchAttentionBackend(
            native_decode=cpu_attention == "native", native_prefill=cpu_attention != "float32"
        )
    if name == "triton":
        return TritonAttentionBackend()
    raise ValueError(f"attention_backend must be 'torch' or 'triton', got {name!r}")
