"""Decode attention over the paged KV cache in C (paged_attention.c), for the torch backend.

One call per step serves every decoding sequence: keys and values are read in place from
their blocks (no gather), in float32 math for float32 or bfloat16 caches.
"""

from __future__ import annotations

import ctypes

import torch

from engine.cpu_kernels.build import load

DTYPES = (torch.float32, torch.bfloat16)


def available(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """The kernel serves this query/cache pair: CPU tensors of one supported dtype, built."""
    return (
        q.device.type == "cpu"
        and q.dtype in DTYPES
        and k_cache.dtype == q.dtype
        and q.is_contiguous()
        and k_cache.is_contiguous()
        and load() is not None
    )


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def decode_attention(
    q: torch.Tensor,
    out: torch.Tensor,
    rows: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    lib: ctypes.CDLL | None = None,
) -> None:
    """Write out[rows[s]] = attention of q[rows[s]] over sequence s's cached keys.

    q, out [T, Hq, D]; rows int64 [S]; caches [blocks, block_size, Hkv, D]; block_tables
    int32 [S, max_blocks]; seq_lens int32 [S] (keys per sequence, this step's included).
    `lib`: another build of the kernels (tests); this CPU's own by default."""
    lib = lib or load()
    assert lib is not None
    _, q_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    rows = rows.to(torch.int64).contiguous()
    tables = block_tables.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    status = lib.pc_paged_decode_attention(
        _ptr(q),
        _ptr(out),
        _ptr(rows),
        _ptr(k_cache),
        _ptr(v_cache),
        _ptr(tables),
        tables.shape[1],
        _ptr(lens),
        rows.shape[0],
        q_heads,
        kv_heads,
        head_dim,
        block_size,
        scale,
        int(q.dtype == torch.bfloat16),
        torch.get_num_threads(),
    )
    if status != 0:
        raise RuntimeError(
            f"CPU decode attention refused the shapes (status {status}): {q_heads} query heads, "
            f"{kv_heads} KV heads, head_dim {head_dim}"
        )
