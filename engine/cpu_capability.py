"""What this CPU computes natively, read once from torch, and the choices that follow from it.

Torch's reports decide everything, never a crash caught at run time:
  torch.backends.cpu.get_cpu_capability()       the vector ISA ATen dispatches to: "AVX512",
                                                "AVX2", "DEFAULT", "SVE256", ...
  torch.ops.mkldnn._is_mkldnn_bf16_supported()  oneDNN has bfloat16 kernels here: on x86 from
                                                AVX512 on (AVX512-BF16 and AMX natively; on
                                                AVX512 without them, Skylake to Ice Lake
                                                servers, by emulating bf16 with float32
                                                math), on ARM with its bf16 dot instructions
  torch.cpu._is_avx512_bf16_supported(),        an x86 CPU multiplies bfloat16 itself
  torch.cpu._is_amx_tile_supported()

From them:
  - the matmul kernel per (weight dtype, activation dtype), see `CpuCapability.linear_kernel`:
    oneDNN for float32 always; oneDNN for bfloat16 where it has bf16 kernels at all (elsewhere
    oneDNN has no bf16 inner product and refuses to build one); 16-bit weights with float32
    activations on the up-cast kernel of engine.layers.linear; everything else on F.linear;
  - what dtype=auto means on the CPU, see `CpuCapability.auto_precision`: a bfloat16 checkpoint
    computes in bfloat16 where the CPU has bf16 instructions, and elsewhere keeps its weights
    in bfloat16 and computes in float32 (the same numbers as float32 weights up-cast from the
    checkpoint, half the memory and half the bytes per decoded token); a float32 checkpoint
    stays float32. oneDNN's emulated bf16 is not reason enough: its bf16 GEMM there runs at a
    quarter of its float32 GEMM (a 2K prompt of the 0.6B shape took 3.4x longer in bf16 math).

| CPU (capability report)           | f32 x f32 | bf16 x bf16   | bf16 weights, f32 x | auto (bf16 ckpt)    |
|-----------------------------------|-----------|---------------|---------------------|---------------------|
| AVX512-BF16 or AMX; ARM with bf16 | oneDNN    | oneDNN        | up-cast kernel      | bf16 weights,       |
|                                   |           |               |                     | bf16 math           |
| AVX512 without bf16 (oneDNN       | oneDNN    | oneDNN        | up-cast kernel      | bf16 weights,       |
| emulates bf16)                    |           | (emulated)    |                     | float32 math        |
| AVX2; ARM without bf16            | oneDNN    | F.linear      | up-cast kernel      | bf16 weights,       |
|                                   |           | (works, slow) |                     | float32 math        |
| torch built without oneDNN        | F.linear  | F.linear      | up-cast kernel      | as the row above    |
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from enum import StrEnum

import torch


class LinearKernel(StrEnum):
    """Which CPU kernel computes y = x W^T for one (weight dtype, activation dtype) pair."""

    ONEDNN = "onednn"  # torch.ops.mkldnn._linear_pointwise, same dtype for x and W
    UPCAST = "upcast"  # 16-bit W up-cast to float32 in cache-sized row blocks, float32 math
    TORCH = "torch"  # F.linear


@dataclass(frozen=True)
class Precision:
    """Dtypes a model is held and run in: weights as stored, activations and KV cache as computed."""

    weight_dtype: torch.dtype
    compute_dtype: torch.dtype

    @property
    def weight_only(self) -> bool:
        """Weights narrower than the math: up-cast on the fly by the linear kernel."""
        return self.weight_dtype != self.compute_dtype

    def describe(self) -> str:
        weights = str(self.weight_dtype).removeprefix("torch.")
        math = str(self.compute_dtype).removeprefix("torch.")
        return f"{weights} weights, {math} math"


@dataclass(frozen=True)
class CpuCapability:
    """This CPU as torch reports it. Build it with `cpu_capability()` (read once per process)."""

    isa: str  # torch.backends.cpu.get_cpu_capability()
    onednn_linear: bool  # oneDNN is built in and has the inner-product op the linear layer uses
    onednn_bf16: bool  # torch.ops.mkldnn._is_mkldnn_bf16_supported(): natively or emulated
    bf16_instructions: bool  # the CPU multiplies bf16 itself (AVX512-BF16, AMX; ARM's bf16)

    @property
    def native_bf16(self) -> bool:
        """oneDNN computes bfloat16 with the CPU's own bf16 instructions (not emulated)."""
        return self.onednn_linear and self.onednn_bf16 and self.bf16_instructions

    def linear_kernel(self, weight_dtype: torch.dtype, input_dtype: torch.dtype) -> LinearKernel:
        """The kernel for a CPU matmul of `input_dtype` activations by `weight_dtype` weights."""
        if weight_dtype == input_dtype:
            if self.onednn_linear and (
                weight_dtype == torch.float32
                or (weight_dtype == torch.bfloat16 and self.onednn_bf16)
            ):
                return LinearKernel.ONEDNN
            return LinearKernel.TORCH
        if input_dtype == torch.float32 and weight_dtype in (torch.bfloat16, torch.float16):
            return LinearKernel.UPCAST
        return LinearKernel.TORCH

    def auto_precision(self, checkpoint_dtype: torch.dtype) -> Precision:
        """dtype=auto on this CPU for a checkpoint stored in `checkpoint_dtype`."""
        if checkpoint_dtype == torch.bfloat16:
            if self.native_bf16:
                return Precision(torch.bfloat16, torch.bfloat16)
            return Precision(torch.bfloat16, torch.float32)
        if checkpoint_dtype == torch.float16:
            # No fast float16 path is relied on: keep the 16-bit weights, compute in float32.
            return Precision(torch.float16, torch.float32)
        return Precision(torch.float32, torch.float32)

    def describe(self) -> str:
        if self.native_bf16:
            bf16 = "native"
        elif self.onednn_bf16 and self.onednn_linear:
            bf16 = "emulated (no bf16 instructions: not native)"
        else:
            bf16 = "not native"
        kernels = ", ".join(
            f"{name} {self.linear_kernel(w, x).value}"
            for name, w, x in (
                ("f32", torch.float32, torch.float32),
                ("bf16", torch.bfloat16, torch.bfloat16),
                ("bf16-weight/f32", torch.bfloat16, torch.float32),
            )
        )
        onednn = "" if self.onednn_linear else ", torch built without oneDNN"
        return f"CPU capability {self.isa}, oneDNN bf16 {bf16}{onednn}; linear kernels: {kernels}"


def _onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def cpu_capability() -> CpuCapability:
    """This process's CPU as torch reports it (computed once)."""
    onednn = _onednn_linear_available()
    onednn_bf16 = onednn and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return CpuCapability(
        isa=torch.backends.cpu.get_cpu_capability(),
        onednn_linear=onednn,
        onednn_bf16=onednn_bf16,
        bf16_instructions=_bf16_instructions(onednn_bf16),
    )


def _bf16_instructions(onednn_bf16: bool) -> bool:
    """x86: AVX512-BF16 or AMX, as torch reads them (oneDNN also says yes on plain AVX512, where
    it emulates bf16). Elsewhere (ARM) torch's oneDNN report already reads the bf16 extension."""
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return onednn_bf16
