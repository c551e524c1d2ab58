"""Triton paged attention for a whole mixed batch (prefill chunks, cached-prefix extends, decodes).

Semantics match `engine.layers.attention.paged_attention_torch`: every key, cached or new, is read
from the paged cache [num_blocks, block_size, Hkv, D] through the block table, and query i of a
sequence with `query_len` new tokens and `seq_len` keys sees keys 0 .. seq_len - query_len + i.

Design (after vLLM's unified Triton attention):
- One program = one KV head x one "q block" of BLOCK_Q consecutive query tokens of one sequence,
  with all GROUP query heads of that KV head packed into BLOCK_M = BLOCK_Q * GROUP (padded) rows.
  K/V tiles are loaded once and serve the whole group; tl.dot sees M >= 16.
- The grid's first axis is an upper bound on the number of q blocks, num_tokens // BLOCK_Q +
  num_seqs; each program finds its sequence by binary search of query_start_loc and surplus
  programs exit. Nothing is read back to the host, so launches can be captured in CUDA graphs.
- Keys are walked in TILE-sized tiles independent of the cache block size; each key's physical
  block comes from the block table (an index load, not pointer chasing). Only tiles up to the
  causal limit of the q block's last row are visited. Softmax is online, in fp32, base 2.
- Split-KV (flash decoding): with few programs (small decode batches) the key range is cut into
  NUM_SEGMENTS segments run by separate programs, which write unnormalised partial outputs with
  their running max and sum; a second kernel merges them by log-sum-exp.
- Precision: on a GPU with fp16/bf16 inputs, tl.dot takes the operands as loaded (tensor cores)
  and P is rounded to the input dtype before P @ V, as FlashAttention does. In the interpreter
  and for fp32 every load is upcast to fp32 right after tl.load (the interpreter computes bf16
  arithmetic wrongly), with IEEE fp32 dots for fp32 inputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels.launch import KernelLaunch

# Split-KV pays off while the plain grid has fewer programs than a GPU has SMs (~132 on H100).
SPLIT_KV_MAX_PROGRAMS = 128
DEFAULT_NUM_SEGMENTS = 16
# The interpreter runs programs one after another; fewer segments keep the same code path cheap.
INTERPRETER_NUM_SEGMENTS = 4
_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class AttentionLaunchConfig:
    """Compile-time tile shapes of one launch. Every size that reaches tl.arange or tl.dot is a
    power of two and >= 16, as the GPU compiler requires (the interpreter does not check)."""

    block_m: int  # rows per program: block_q query tokens x GROUP heads, padded
    block_q: int  # query tokens per program
    tile: int  # keys per inner-loop iteration
    block_d: int  # head_dim padded to a power of two
    num_segments: int  # 1 = single pass; > 1 = split-KV with a merge kernel
    lowp_dot: bool  # feed fp16/bf16 operands to tl.dot (GPU); else upcast to fp32 after load
    num_warps: int = 4
    num_stages: int = 2


@dataclass
class SplitKVWorkspace:
    """fp32 buffers for split-KV partial results; preallocate once to keep launches capturable.

    Split-KV is only chosen for decode batches with num_seqs * num_kv_heads <= SPLIT_KV_MAX_PROGRAMS,
    so max_num_tokens = SPLIT_KV_MAX_PROGRAMS // num_kv_heads covers every automatic choice.
    """

    out: torch.Tensor  # [max_num_tokens, num_heads, num_segments, block_d]
    max: torch.Tensor  # [max_num_tokens, num_heads, num_segments], base-2 running max
    expsum: torch.Tensor  # [max_num_tokens, num_heads, num_segments]

    @classmethod
    def allocate(
        cls,
        max_num_tokens: int,
        num_heads: int,
        head_dim: int,
        device: torch.device | str,
        num_segments: int | None = None,
    ) -> SplitKVWorkspace:
        num_segments = num_segments or default_num_segments()
        block_d = _padded_head_dim(head_dim)
        shape = (max_num_tokens, num_heads, num_segments)
        return cls(
            out=torch.empty(*shape, block_d, dtype=torch.float32, device=device),
            max=torch.empty(shape, dtype=torch.float32, device=device),
            expsum=torch.empty(shape, dtype=torch.float32, device=device),
        )


def _padded_head_dim(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def default_num_segments() -> int:
    """Split-KV segments of an automatic choice (and of a workspace allocated without a count)."""
    return INTERPRETER_NUM_SEGMENTS if _interpreting() else DEFAULT_NUM_SEGMENTS


def choose_launch_config(
    *,
    num_queries_per_kv: int,
    head_dim: int,
    max_query_len: int,
    num_seqs: int,
    num_kv_heads: int,
    dtype: torch.dtype,
    on_gpu: bool,
    split_kv: bool | None = None,
) -> AttentionLaunchConfig:
    """Tile shapes for a launch. Depends only on shapes and max_query_len (never on sequence
    lengths), so a decode CUDA graph captured once stays on the same path."""
    group = num_queries_per_kv
    block_d = _padded_head_dim(head_dim)
    lowp = on_gpu and not _interpreting() and dtype in (torch.float16, torch.bfloat16)
    elem_bytes = 2 if lowp else 4
    if max_query_len <= 1:
        block_m = max(16, triton.next_power_of_2(group))
        num_warps = 4
    else:
        # Prefill: bigger M tiles amortise each K/V tile over more queries (compute bound).
        cap = 128 if elem_bytes == 2 and block_d <= 128 else 64
        block_m = min(cap, triton.next_power_of_2(max_query_len * group))
        block_m = max(block_m, 16, triton.next_power_of_2(group))
        num_warps = 8 if block_m >= 128 else 4
    block_q = max(1, block_m // group)
    # Keep one K tile + one V tile around 16-32 KiB so two pipeline stages fit in shared memory.
    tile = 64 if block_d * elem_bytes <= 256 else 32
    if split_kv is None:
        split_kv = max_query_len <= 1 and num_seqs * num_kv_heads <= SPLIT_KV_MAX_PROGRAMS
    return AttentionLaunchConfig(
        block_m=block_m,
        block_q=block_q,
        tile=tile,
        block_d=block_d,
        num_segments=default_num_segments() if split_kv else 1,
        lowp_dot=lowp,
        num_warps=num_warps,
    )


@triton.jit
def _find_seq_idx(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q: tl.constexpr):  # type: ignore[no-untyped-def]  # Triton reads annotations
    """Sequence s owning q block `q_block`: the last s with query_start_loc[s] // BLOCK_Q + s <= q_block."""
    left = tl.zeros((), dtype=tl.int32)
    right = num_seqs + left
    while left < right:
        mid = (left + right) // 2
        first_block = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_block <= q_block:
            left = mid + 1
        else:
            right = mid
    return left - 1


@triton.jit(do_not_specialize=["num_seqs"])
def _paged_attention_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    segm_out_ptr,
    segm_max_ptr,
    segm_expsum_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    num_seqs,
    scale_log2,
    stride_q_t,
    stride_q_h,
    stride_o_t,
    stride_o_h,
    stride_kc_b,
    stride_kc_s,
    stride_kc_h,
    stride_vc_b,
    stride_vc_s,
    stride_vc_h,
    stride_bt,
    stride_so_t,
    stride_so_h,
    stride_so_s,
    stride_sm_t,
    stride_sm_h,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr,
    LOWP_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # What the GPU compiler demands and the interpreter would let slip.
    tl.static_assert(BLOCK_M >= 16, "tl.dot needs M >= 16")
    tl.static_assert(TILE >= 16, "tl.dot needs N and K >= 16")
    tl.static_assert(BLOCK_D >= 16, "tl.dot needs K >= 16")
    tl.static_assert((BLOCK_M & (BLOCK_M - 1)) == 0, "BLOCK_M must be a power of two")
    tl.static_assert((TILE & (TILE - 1)) == 0, "TILE must be a power of two")
    tl.static_assert((BLOCK_D & (BLOCK_D - 1)) == 0, "BLOCK_D must be a power of two")
    tl.static_assert((NUM_SEGMENTS & (NUM_SEGMENTS - 1)) == 0, "NUM_SEGMENTS: power of two")
    tl.static_assert(BLOCK_Q * GROUP <= BLOCK_M, "a q block's rows must fit in BLOCK_M")
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)

    seq = _find_seq_idx(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_block_local = q_block - (q_start // BLOCK_Q + seq)
    if q_block_local * BLOCK_Q >= query_len:
        return  # surplus program of the upper-bound grid
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - query_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, TILE)
    q_pos = q_block_local * BLOCK_Q + offs_m // GROUP  # index among the sequence's new tokens
    head = kv_head * GROUP + offs_m % GROUP
    row_valid = (offs_m // GROUP < BLOCK_Q) & (q_pos < query_len)
    dim_valid = offs_d < HEAD_DIM
    token = (q_start + q_pos).to(tl.int64)

    q_offs = token[:, None] * stride_q_t + head[:, None] * stride_q_h + offs_d[None, :]
    q = tl.load(q_ptr + q_offs, mask=row_valid[:, None] & dim_valid[None, :], other=0.0)
    if not LOWP_DOT:
        q = q.to(tl.float32)

    # Keys this q block may see: up to the causal limit of its last row.
    kv_end = tl.minimum(context_len + (q_block_local + 1) * BLOCK_Q, seq_len)
    num_tiles = tl.cdiv(kv_end, TILE)
    if NUM_SEGMENTS == 1:
        tile_lo = 0
        tile_hi = num_tiles
    else:
        tiles_per_segment = tl.cdiv(num_tiles, NUM_SEGMENTS)
        tile_lo = segment * tiles_per_segment
        tile_hi = tl.minimum(tile_lo + tiles_per_segment, num_tiles)

    causal_limit = context_len + q_pos  # row sees key j iff j <= causal_limit
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for t in range(tile_lo, tile_hi):
        key_pos = t * TILE + offs_t
        key_valid = key_pos < kv_end
        block = tl.load(bt_row + key_pos // BLOCK_SIZE, mask=key_valid, other=0).to(tl.int64)
        in_block = key_pos % BLOCK_SIZE
        k_offs = (
            block[None, :] * stride_kc_b
            + in_block[None, :] * stride_kc_s
            + kv_head * stride_kc_h
            + offs_d[:, None]
        )
        k = tl.load(
            k_cache_ptr + k_offs, mask=key_valid[None, :] & dim_valid[:, None], other=0.0
        )  # [BLOCK_D, TILE]
        v_offs = (
            block[:, None] * stride_vc_b
            + in_block[:, None] * stride_vc_s
            + kv_head * stride_vc_h
            + offs_d[None, :]
        )
        v = tl.load(
            v_cache_ptr + v_offs, mask=key_valid[:, None] & dim_valid[None, :], other=0.0
        )  # [TILE, BLOCK_D]
        if not LOWP_DOT:
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2
        visible = (key_pos[None, :] <= causal_limit[:, None]) & key_valid[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row with no visible key yet keeps m = -inf; exponentiate against 0 to avoid NaN.
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if NUM_SEGMENTS == 1:
        o_offs = token[:, None] * stride_o_t + head[:, None] * stride_o_h + offs_d[None, :]
        result = acc / l_i[:, None]
        tl.store(
            out_ptr + o_offs,
            result.to(out_ptr.dtype.element_ty),
            mask=row_valid[:, None] & dim_valid[None, :],
        )
    else:
        # Unnormalised partials; empty segments write m = -inf, sum 0, acc 0 for the merge.
        sm_offs = token * stride_sm_t + head * stride_sm_h + segment
        tl.store(segm_max_ptr + sm_offs, m_i, mask=row_valid)
        tl.store(segm_expsum_ptr + sm_offs, l_i, mask=row_valid)
        so_offs = (
            token[:, None] * stride_so_t
            + head[:, None] * stride_so_h
            + segment * stride_so_s
            + offs_d[None, :]
        )
        tl.store(segm_out_ptr + so_offs, acc, mask=row_valid[:, None])


@triton.jit
def _merge_segments_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations
    out_ptr,
    segm_out_ptr,
    segm_max_ptr,
    segm_expsum_ptr,
    stride_o_t,
    stride_o_h,
    stride_so_t,
    stride_so_h,
    stride_so_s,
    stride_sm_t,
    stride_sm_h,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr,
):
    """Log-sum-exp merge of the segments of one (token, head)."""
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, NUM_SEGMENTS)
    offs_d = tl.arange(0, BLOCK_D)
    sm_offs = token * stride_sm_t + head * stride_sm_h + offs_s
    seg_max = tl.load(segm_max_ptr + sm_offs)
    seg_sum = tl.load(segm_expsum_ptr + sm_offs)
    overall = tl.max(seg_max, axis=0)
    overall = tl.where(overall > float("-inf"), overall, 0.0)
    weight = tl.exp2(seg_max - overall)  # 0 for empty segments
    denom = tl.sum(seg_sum * weight, axis=0)
    so_offs = (
        token * stride_so_t + head * stride_so_h + offs_s[:, None] * stride_so_s + offs_d[None, :]
    )
    seg_out = tl.load(segm_out_ptr + so_offs)
    result = tl.sum(seg_out * weight[:, None], axis=0) / denom
    o_offs = token * stride_o_t + head * stride_o_h + offs_d
    tl.store(out_ptr + o_offs, result.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


def plan_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    *,
    max_query_len: int,
    scale: float,
    split_kv: bool | None = None,
    workspace: SplitKVWorkspace | None = None,
    config: AttentionLaunchConfig | None = None,
) -> list[KernelLaunch]:
    """Validate the inputs and build the launches of `paged_attention` (one, or two when split)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    num_seqs = query_start_loc.shape[0] - 1
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    if k_cache.shape != v_cache.shape or k_cache.shape[3] != head_dim:
        raise ValueError(
            f"caches {tuple(k_cache.shape)}/{tuple(v_cache.shape)} do not match head_dim {head_dim}"
        )
    if out.shape != q.shape:
        raise ValueError(f"out {tuple(out.shape)} must have q's shape {tuple(q.shape)}")
    if seq_lens.shape != (num_seqs,) or block_tables.shape[0] != num_seqs:
        raise ValueError("query_start_loc, seq_lens and block_tables disagree on num_seqs")
    for name, t in (("q", q), ("out", out), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head_dim) dimension")
    for name, t in (
        ("query_start_loc", query_start_loc),
        ("seq_lens", seq_lens),
        ("block_tables", block_tables),
    ):
        if t.dtype != torch.int32 or t.stride(-1) != 1:
            raise ValueError(f"{name} must be int32 and contiguous in its last dimension")
    if num_tokens == 0 or num_seqs == 0:
        return []

    group = num_heads // num_kv_heads
    if config is None:
        config = choose_launch_config(
            num_queries_per_kv=group,
            head_dim=head_dim,
            max_query_len=max_query_len,
            num_seqs=num_seqs,
            num_kv_heads=num_kv_heads,
            dtype=q.dtype,
            on_gpu=q.is_cuda,
            split_kv=split_kv,
        )
    elif split_kv is not None and split_kv != (config.num_segments > 1):
        raise ValueError("split_kv contradicts config.num_segments")
    if config.block_q * group > config.block_m or config.block_d < head_dim:
        raise ValueError(f"launch config {config} cannot hold {group} heads x head_dim {head_dim}")

    num_segments = config.num_segments
    if num_segments > 1:
        if workspace is None:
            workspace = SplitKVWorkspace.allocate(
                num_tokens, num_heads, head_dim, q.device, num_segments
            )
        expected = (num_heads, num_segments, config.block_d)
        if workspace.out.shape[0] < num_tokens or tuple(workspace.out.shape[1:]) != expected:
            raise ValueError(
                f"split-KV workspace {tuple(workspace.out.shape)} cannot hold "
                f"[{num_tokens}, {num_heads}, {num_segments}, {config.block_d}]"
            )
        segm_out, segm_max, segm_expsum = workspace.out, workspace.max, workspace.expsum
    else:
        # Never touched when NUM_SEGMENTS == 1; any tensor gives the kernel valid pointers.
        segm_out = segm_max = segm_expsum = out

    attention = KernelLaunch(
        kernel=_paged_attention_kernel,
        grid=(num_tokens // config.block_q + num_seqs, num_kv_heads, num_segments),
        args=dict(
            q_ptr=q,
            k_cache_ptr=k_cache,
            v_cache_ptr=v_cache,
            out_ptr=out,
            segm_out_ptr=segm_out,
            segm_max_ptr=segm_max,
            segm_expsum_ptr=segm_expsum,
            query_start_loc_ptr=query_start_loc,
            seq_lens_ptr=seq_lens,
            block_tables_ptr=block_tables,
            num_seqs=num_seqs,
            scale_log2=scale * _LOG2E,
            stride_q_t=q.stride(0),
            stride_q_h=q.stride(1),
            stride_o_t=out.stride(0),
            stride_o_h=out.stride(1),
            stride_kc_b=k_cache.stride(0),
            stride_kc_s=k_cache.stride(1),
            stride_kc_h=k_cache.stride(2),
            stride_vc_b=v_cache.stride(0),
            stride_vc_s=v_cache.stride(1),
            stride_vc_h=v_cache.stride(2),
            stride_bt=block_tables.stride(0),
            stride_so_t=segm_out.stride(0),
            stride_so_h=segm_out.stride(1),
            stride_so_s=segm_out.stride(2) if num_segments > 1 else 0,
            stride_sm_t=segm_max.stride(0),
            stride_sm_h=segm_max.stride(1),
        ),
        constexprs=dict(
            GROUP=group,
            HEAD_DIM=head_dim,
            BLOCK_SIZE=k_cache.shape[1],
            BLOCK_M=config.block_m,
            BLOCK_Q=config.block_q,
            TILE=config.tile,
            BLOCK_D=config.block_d,
            NUM_SEGMENTS=num_segments,
            LOWP_DOT=config.lowp_dot,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        ),
        options=dict(num_warps=config.num_warps, num_stages=config.num_stages),
    )
    if num_segments == 1:
        return [attention]
    merge = KernelLaunch(
        kernel=_merge_segments_kernel,
        grid=(num_tokens, num_heads),
        args=dict(
            out_ptr=out,
            segm_out_ptr=segm_out,
            segm_max_ptr=segm_max,
            segm_expsum_ptr=segm_expsum,
            stride_o_t=out.stride(0),
            stride_o_h=out.stride(1),
            stride_so_t=segm_out.stride(0),
            stride_so_h=segm_out.stride(1),
            stride_so_s=segm_out.stride(2),
            stride_sm_t=segm_max.stride(0),
            stride_sm_h=segm_max.stride(1),
        ),
        constexprs=dict(HEAD_DIM=head_dim, BLOCK_D=config.block_d, NUM_SEGMENTS=num_segments),
        options=dict(num_warps=4),
    )
    return [attention, merge]


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    *,
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    split_kv: bool | None = None,
    workspace: SplitKVWorkspace | None = None,
    config: AttentionLaunchConfig | None = None,
) -> torch.Tensor:
    """Attention of q [T, Hq, D] over the paged caches [num_blocks, block_size, Hkv, D]; writes out
    [T, Hq, D] and returns it.

    query_start_loc int32 [num_seqs + 1], seq_lens int32 [num_seqs], block_tables int32
    [num_seqs, max_blocks]. max_query_len selects tile shapes; max_seq_len is not needed (lengths
    are read on the device), so a captured decode graph stays valid as sequences grow. split_kv
    forces (True) or forbids (False) the split-KV path; None picks it for small decode batches.
    workspace holds the split-KV buffers (allocated per call when None). config overrides the
    tile shapes (tests use it to exercise small tiles).
    """
    del max_seq_len
    for launch in plan_paged_attention(
        q,
        k_cache,
        v_cache,
        out,
        query_start_loc,
        seq_lens,
        block_tables,
        max_query_len=max_query_len,
        scale=scale,
        split_kv=split_kv,
        workspace=workspace,
        config=config,
    ):
        launch()
    return out


__all__ = [
    "AttentionLaunchConfig",
    "SplitKVWorkspace",
    "choose_launch_config",
    "paged_attention",
    "plan_paged_attention",
    "SPLIT_KV_MAX_PROGRAMS",
    "DEFAULT_NUM_SEGMENTS",
    "default_num_segments",
]
