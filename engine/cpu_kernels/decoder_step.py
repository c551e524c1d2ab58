"""A decode step of the whole decoder stack in one C call (decoder_step.c), on the CPU.

The Python forward of a decode step calls ~15 kernels per layer through modules, views and
small allocations; at batch 1 that glue is a fifth of the step. For steps where every row is a
decoding sequence, `DecoderStep.run` hands the embeddings, the layers' packed weights and KV
caches and the step's metadata to one C function that calls the same kernels in the same order:
the same bits as the Python forward (tests/test_cpu_decoder_step.py). Two precisions, both on
packed bfloat16 weights: bfloat16 math (pc_decoder_decode_bf16), and float32 math with a
float32 KV cache (pc_decoder_decode_f32: a bf16 checkpoint on a CPU without bf16
instructions). Everything else (prompt chunks, float32 models, other backends) keeps the
Python forward.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.cpu_kernels import elementwise, packed_bf16
from engine.cpu_kernels.build import load


class _LayerParams(ctypes.Structure):
    _fields_ = [
        (name, ctypes.POINTER(ctypes.c_void_p))
        for name in (
            "input_norm",
            "qkv",
            "q_norm",
            "k_norm",
            "o",
            "post_norm",
            "gate_up",
            "down",
            "k_cache",
            "v_cache",
        )
    ]


@dataclass(frozen=True)
class DecoderShape:
    hidden_size: int
    q_heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int
    eps: float
    scale: float


@dataclass(frozen=True)
class LayerTensors:
    """One layer's tensors the step reads: packed weights, norm weights, its KV cache."""

    input_norm: torch.Tensor
    qkv: torch.Tensor
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor


MATH_DTYPES = (torch.bfloat16, torch.float32)


def eligible(layers: Sequence[LayerTensors], final_norm: torch.Tensor) -> bool:
    """The C step serves these tensors: packed bf16 weights, bf16 norm weights, KV caches of
    one math dtype (bf16 or float32), all on the CPU and contiguous, the library built."""
    if load() is None or not layers:
        return False
    math = layers[0].k_cache.dtype
    if math not in MATH_DTYPES:
        return False
    for layer in layers:
        weights = (layer.qkv, layer.o, layer.gate_up, layer.down)
        if not all(packed_bf16.is_packed(w) and w.dtype == torch.bfloat16 for w in weights):
            return False
        norms = (layer.input_norm, layer.q_norm, layer.k_norm, layer.post_norm)
        caches = (layer.k_cache, layer.v_cache)
        if not elementwise.serves(*norms) or any(
            c.dtype != math or c.device.type != "cpu" for c in caches
        ):
            return False
        if not all(t.is_contiguous() for t in norms + caches):
            return False
    return elementwise.serves(final_norm) and final_norm.is_contiguous()


def _pointers(tensors: Sequence[torch.Tensor]) -> ctypes.Array[ctypes.c_void_p]:
    return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))


class DecoderStep:
    """The C decode step over fixed layers; build it again when weights or caches change."""

    def __init__(
        self, shape: DecoderShape, layers: Sequence[LayerTensors], final_norm: torch.Tensor
    ) -> None:
        self.shape = shape
        self.layers = list(layers)  # keeps every tensor the pointers below point into alive
        self.final_norm = final_norm
        self.block_size = layers[0].k_cache.shape[1] if layers else 1
        self.dtype = layers[0].k_cache.dtype if layers else torch.bfloat16  # the math's
        self._arrays = {
            name: _pointers([getattr(layer, name) for layer in self.layers])
            for name in LayerTensors.__dataclass_fields__
        }
        self._params = _LayerParams(
            **{
                name: ctypes.cast(array, ctypes.POINTER(ctypes.c_void_p))
                for name, array in self._arrays.items()
            }
        )

    @staticmethod
    def serves_step(hidden: torch.Tensor, query_lens: list[int], seq_lens: list[int]) -> bool:
        """Every row a decode (one new token after at least one cached one), bf16 or float32
        rows, and a row count the packed matmul takes without a dense fallback."""
        rows = hidden.shape[0]
        fits = (
            packed_bf16.c_kernel_serves_bf16(rows)
            if hidden.dtype == torch.bfloat16
            else packed_bf16.c_kernel_serves_float32(rows)
        )
        return (
            hidden.dtype in MATH_DTYPES
            and hidden.device.type == "cpu"
            and len(query_lens) == rows
            and all(n == 1 for n in query_lens)
            and min(seq_lens, default=0) > 1
            and fits
        )

    def run(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
    ) -> torch.Tensor:
        """hidden [M, H] embeddings in the step's math dtype -> the final normed hidden states
        [M, H] (a new tensor)."""
        lib = load()
        assert lib is not None
        if hidden.dtype != self.dtype:
            raise TypeError(f"this step computes in {self.dtype}, got {hidden.dtype} rows")
        s = self.shape
        out = hidden.contiguous().clone()
        if cos.stride(-1) != 1 or sin.stride(-1) != 1 or cos.stride(0) != sin.stride(0):
            cos, sin = cos.contiguous(), sin.contiguous()
        slots = slot_mapping.to(torch.int64).contiguous()
        tables = block_tables.to(torch.int32).contiguous()
        lens = seq_lens.to(torch.int32).contiguous()
        bf16 = self.dtype == torch.bfloat16
        step = lib.pc_decoder_decode_bf16 if bf16 else lib.pc_decoder_decode_f32
        last = (packed_bf16.AMX_MIN_ROWS,) if bf16 else ()
        status = step(
            ctypes.c_void_p(out.data_ptr()),
            out.shape[0],
            len(self.layers),
            s.hidden_size,
            s.q_heads,
            s.kv_heads,
            s.head_dim,
            s.intermediate_size,
            ctypes.byref(self._params),
            ctypes.c_void_p(self.final_norm.data_ptr()),
            self.block_size,
            ctypes.c_void_p(cos.data_ptr()),
            ctypes.c_void_p(sin.data_ptr()),
            cos.stride(0),
            ctypes.c_void_p(slots.data_ptr()),
            ctypes.c_void_p(tables.data_ptr()),
            tables.shape[1],
            ctypes.c_void_p(lens.data_ptr()),
            s.eps,
            s.scale,
            *last,
            torch.get_num_threads(),
        )
        if status != 0:
            raise RuntimeError(f"the C decode step failed (status {status})")
        return out
