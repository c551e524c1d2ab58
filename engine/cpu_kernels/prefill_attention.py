"""Prompt attention over the paged KV cache (prefill_attention.c), for the torch backend.

One call per prompt chunk: its queries attend to the sequence's cached keys (a cached prefix
and the chunk itself, causally), read from their blocks; bfloat16 inputs, float32 sums,
probabilities rounded to bfloat16 before P @ V as flash kernels do. The products run on AMX
tiles where the CPU has them, else on AVX512-BF16 vdpbf16ps register tiles (AMD Zen 4/5: sdpa's
bf16 flash kernel took 138 ms a layer for a 2K prompt there, this one ~26), or, where the
process multiplies bf16 with float32 FMAs (`PAGECHAT_CPU_BF16_MATH`, packed_bf16.uses_fma),
on FMA tiles over keys and values widened to float32 as they are packed. Without AVX512-BF16
the backend keeps sdpa's fused kernel.
"""

from __future__ import annotations

import ctypes

import torch

from engine.cpu_kernels.build import load


def available(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """The kernel serves this query/cache pair: bf16 CPU tensors, head_dim a multiple of 32
    up to 256, and a build with AVX512-BF16 (AMX or not)."""
    lib = load() if q.device.type == "cpu" else None
    return (
        lib is not None
        and q.dtype == torch.bfloat16
        and k_cache.dtype == torch.bfloat16
        and k_cache.is_contiguous()
        and q.stride(-1) == 1
        and q.shape[-1] % 32 == 0
        and q.shape[-1] <= 256
        and lib.pc_prefill_attention_level() >= 1
    )


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def prefill_attention(
    q: torch.Tensor,
    out: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
    scale: float,
) -> None:
    """out[t] = attention of q[t] (query at position seq_len - T + t) over the cached keys.

    q, out [T, Hq, D] bf16 (rows may be strided, heads and dims contiguous); caches
    [blocks, block_size, Hkv, D] bf16 holding this chunk's keys already; block_table the
    sequence's int32 row."""
    lib = load()
    assert lib is not None
    query_len, q_heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    assert q.stride(1) == head_dim and out.stride(1) == head_dim and out.stride(2) == 1
    table = block_table.to(torch.int32).contiguous()
    threads = torch.get_num_threads() if query_len * seq_len >= 32 * 1024 else 1
    status = lib.pc_paged_prefill_attention(
        _ptr(q),
        q.stride(0),
        _ptr(out),
        out.stride(0),
        query_len,
        _ptr(k_cache),
        _ptr(v_cache),
        _ptr(table),
        seq_len,
        q_heads,
        kv_heads,
        head_dim,
        block_size,
        scale,
        threads,
    )
    if status != 0:
        raise RuntimeError(
            f"CPU prompt attention refused the shapes (status {status}): {q_heads} query heads, "
            f"{kv_heads} KV heads, head_dim {head_dim}, {query_len} of {seq_len} tokens"
        )
