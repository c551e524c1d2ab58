"""Triton kernel that writes a step's new K/V vectors into the paged cache.

Runs before paged attention, so attention reads every key (cached prefix and new tokens alike)
from one place. One program per token copies all of its KV heads; slot -1 marks a token whose
K/V must not be stored (padding), and that program exits at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.launch import KernelLaunch


@triton.jit
def _store_kv_kernel(  # type: ignore[no-untyped-def]  # Triton reads annotations
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_k_t,
    stride_k_h,
    stride_v_t,
    stride_v_h,
    stride_kc_b,
    stride_kc_s,
    stride_kc_h,
    stride_vc_b,
    stride_vc_s,
    stride_vc_h,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)

    src_k = k_ptr + token * stride_k_t + offs_h[:, None] * stride_k_h + offs_d[None, :]
    src_v = v_ptr + token * stride_v_t + offs_h[:, None] * stride_v_h + offs_d[None, :]
    dst_k = (
        k_cache_ptr
        + block * stride_kc_b
        + offset * stride_kc_s
        + offs_h[:, None] * stride_kc_h
        + offs_d[None, :]
    )
    dst_v = (
        v_cache_ptr
        + block * stride_vc_b
        + offset * stride_vc_s
        + offs_h[:, None] * stride_vc_h
        + offs_d[None, :]
    )
    # Pure copy (plus a dtype cast when the cache dtype differs): no arithmetic on the values.
    k = tl.load(src_k, mask=mask)
    v = tl.load(src_v, mask=mask)
    tl.store(dst_k, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst_v, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def plan_store_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> list[KernelLaunch]:
    """Validate the inputs and build the launch of `store_kv_cache` (none for an empty batch)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if v.shape != k.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if k_cache.shape != v_cache.shape or tuple(k_cache.shape[2:]) != (num_kv_heads, head_dim):
        raise ValueError(
            f"caches {tuple(k_cache.shape)}/{tuple(v_cache.shape)} do not hold "
            f"[num_blocks, block_size, {num_kv_heads}, {head_dim}]"
        )
    if slot_mapping.shape != (num_tokens,):
        raise ValueError(f"slot_mapping must be [{num_tokens}], got {tuple(slot_mapping.shape)}")
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head_dim) dimension")
    if num_tokens == 0:
        return []
    return [
        KernelLaunch(
            kernel=_store_kv_kernel,
            grid=(num_tokens,),
            args=dict(
                k_ptr=k,
                v_ptr=v,
                k_cache_ptr=k_cache,
                v_cache_ptr=v_cache,
                slot_mapping_ptr=slot_mapping,
                stride_k_t=k.stride(0),
                stride_k_h=k.stride(1),
                stride_v_t=v.stride(0),
                stride_v_h=v.stride(1),
                stride_kc_b=k_cache.stride(0),
                stride_kc_s=k_cache.stride(1),
                stride_kc_h=k_cache.stride(2),
                stride_vc_b=v_cache.stride(0),
                stride_vc_s=v_cache.stride(1),
                stride_vc_h=v_cache.stride(2),
            ),
            constexprs=dict(
                NUM_KV_HEADS=num_kv_heads,
                HEAD_DIM=head_dim,
                BLOCK_SIZE=k_cache.shape[1],
                BLOCK_H=triton.next_power_of_2(num_kv_heads),
                BLOCK_D=triton.next_power_of_2(head_dim),
            ),
            options=dict(num_warps=4),
        )
    ]


def store_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write k/v [T, Hkv, D] into caches [num_blocks, block_size, Hkv, D] at flat slots.

    slot_mapping [T] (int32 or int64) holds block * block_size + offset per token; -1 skips the
    token. One launch for the whole batch and no host synchronisation (CUDA-graph safe).
    """
    for launch in plan_store_kv_cache(k, v, k_cache, v_cache, slot_mapping):
        launch()
