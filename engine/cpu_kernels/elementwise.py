"""The decoder's elementwise steps in C on the CPU (elementwise.c).

Each function takes the same arguments as its torch reference in engine.layers and returns the
same result up to the order of float32 sums. Two precisions:
  bfloat16 activations and weights: `serves(...)`;
  float32 activations with bfloat16 (norm) weights, what a bf16 checkpoint runs in on a CPU
  without bf16 instructions: `serves_float32(activations, weights)`.
The layers built with kernels="cpu" call these where one holds and their torch reference
otherwise: float32 models (float32 weights, the parity tests) keep the torch ops bit for bit.
"""

from __future__ import annotations

import ctypes

import torch

from engine.cpu_kernels.build import load

MAX_HIDDEN = 16384  # row buffer of pc_add_rms_norm_bf16
MAX_HEAD_DIM = 1024  # row buffer of pc_qk_norm_rotary_bf16


def serves(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in tensors) and (
        load() is not None
    )


def serves_float32(
    activations: tuple[torch.Tensor, ...], weights: tuple[torch.Tensor, ...]
) -> bool:
    """float32 CPU activations with bfloat16 weights (bf16 weights, float32 math), built."""
    return (
        all(t.dtype == torch.float32 and t.device.type == "cpu" for t in activations)
        and all(w.dtype == torch.bfloat16 and w.device.type == "cpu" for w in weights)
        and load() is not None
    )


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _lib() -> ctypes.CDLL:
    lib = load()
    assert lib is not None
    return lib


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); with residual None, (rms_norm(x), x).
    x bfloat16 (weight bfloat16) or float32 (weight bfloat16: float32 out)."""
    n = x.shape[-1]
    flat = x.reshape(-1, n).contiguous()
    out = torch.empty_like(flat)
    kernel = _lib().pc_add_rms_norm_f32 if x.dtype == torch.float32 else _lib().pc_add_rms_norm_bf16
    if residual is None:
        kernel(
            _ptr(flat),
            None,
            _ptr(weight),
            _ptr(out),
            None,
            flat.shape[0],
            n,
            eps,
            torch.get_num_threads(),
        )
        return out.view(x.shape), x
    res = residual.reshape(-1, n).contiguous()
    res_out = torch.empty_like(flat)
    kernel(
        _ptr(flat),
        _ptr(res),
        _ptr(weight),
        _ptr(out),
        _ptr(res_out),
        flat.shape[0],
        n,
        eps,
        torch.get_num_threads(),
    )
    return out.view(x.shape), res_out.view(x.shape)


def qk_norm_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_norm_weight: torch.Tensor,
    k_norm_weight: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hkv, D] (rows may be strided views of the QKV output; each head's
    D values contiguous), cos/sin [T, 1, D/2] float32 -> contiguous normed, rotated q and k.
    q and k bfloat16, or float32 (norm weights bfloat16 either way)."""
    tokens, q_heads, d = q.shape
    kv_heads = k.shape[1]
    if q.stride(1) != d or q.stride(2) != 1 or k.stride(1) != d or k.stride(2) != 1:
        q, k = q.contiguous(), k.contiguous()
    if cos.stride(-1) != 1 or sin.stride(-1) != 1 or cos.stride(0) != sin.stride(0):
        cos, sin = cos.contiguous(), sin.contiguous()
    q_out = torch.empty(tokens, q_heads, d, dtype=q.dtype)
    k_out = torch.empty(tokens, kv_heads, d, dtype=k.dtype)
    kernel = (
        _lib().pc_qk_norm_rotary_f32 if q.dtype == torch.float32 else _lib().pc_qk_norm_rotary_bf16
    )
    kernel(
        _ptr(q),
        q.stride(0),
        _ptr(k),
        k.stride(0),
        _ptr(cos),
        _ptr(sin),
        cos.stride(0),
        _ptr(q_norm_weight),
        _ptr(k_norm_weight),
        _ptr(q_out),
        _ptr(k_out),
        tokens,
        q_heads,
        kv_heads,
        d,
        eps,
        torch.get_num_threads(),
    )
    return q_out, k_out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] along the last dim (bfloat16 or float32) -> silu(gate) * up."""
    n = x.shape[-1] // 2
    flat = x.reshape(-1, 2 * n).contiguous()
    out = torch.empty(flat.shape[0], n, dtype=x.dtype)
    kernel = _lib().pc_silu_and_mul_f32 if x.dtype == torch.float32 else _lib().pc_silu_and_mul_bf16
    kernel(_ptr(flat), _ptr(out), flat.shape[0], n, torch.get_num_threads())
    return out.view(*x.shape[:-1], n)
