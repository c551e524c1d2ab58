"""The CPU linear kernels against torch's F.linear, the reference for every shape they serve.

Nothing here fakes the CPU: the kernel choice is checked against what torch reports about this
machine, and each dtype runs on the kernel that choice names (oneDNN bf16 only where oneDNN has it).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.cpu_capability import CpuCapability, LinearKernel, Precision, cpu_capability
from engine.layers import linear as linear_module
from engine.layers.linear import CPU_KERNELS, linear, linear_bf16_weight_f32_math
from tests.engine_helpers import torch_reports_native_bf16


@pytest.mark.parametrize("rows", [1, 3, 16, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_f_linear_float32(rows, bias):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=gen)
    w = torch.randn(200, 96, generator=gen) / 10
    b = torch.randn(200, generator=gen) if bias else None
    torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_linear_matches_f_linear_bfloat16():
    # Runs on the kernel this CPU gets for bf16 (oneDNN where native, F.linear elsewhere).
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 128, generator=gen).bfloat16()
    w = (torch.randn(64, 128, generator=gen) / 10).bfloat16()
    y = linear(x, w)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), F.linear(x, w).float(), rtol=2e-2, atol=2e-2)


def test_kernel_choice_matches_what_torch_reports():
    onednn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    native = torch_reports_native_bf16() and onednn
    cap = cpu_capability()
    assert cap.isa == torch.backends.cpu.get_cpu_capability()
    assert cap.native_bf16 == native
    assert cap.onednn_linear == onednn
    f32, bf16 = torch.float32, torch.bfloat16
    assert CPU_KERNELS[(f32, f32)] == (LinearKernel.ONEDNN if onednn else LinearKernel.TORCH)
    assert CPU_KERNELS[(bf16, bf16)] == (
        LinearKernel.ONEDNN if onednn_bf16 and onednn else LinearKernel.TORCH
    )
    assert CPU_KERNELS[(bf16, f32)] == LinearKernel.UPCAST
    assert CPU_KERNELS[(torch.float16, f32)] == LinearKernel.UPCAST
    assert cap.auto_precision(bf16) == (Precision(bf16, bf16) if native else Precision(bf16, f32))
    assert cap.auto_precision(f32) == Precision(f32, f32)
    assert cap.isa in cap.describe() and ("not native" in cap.describe()) != cap.native_bf16


# The CPU kinds this project meets, as torch reports them: (isa, oneDNN bf16, bf16 instructions).
KINDS = {
    "avx512-bf16 or amx": ("AVX512", True, True),
    "avx512 without bf16 (cascade lake)": ("AVX512", True, False),
    "avx2": ("AVX2", False, False),
    "arm with bf16": ("SVE256", True, True),
    "arm without bf16": ("DEFAULT", False, False),
}


@pytest.mark.parametrize("kind", KINDS)
def test_auto_computes_in_bf16_only_with_bf16_instructions(kind):
    """Where oneDNN only emulates bf16 (plain AVX512) its bf16 GEMM runs at a quarter of its
    float32 one: auto keeps the bf16 weights and computes in float32 there, as on AVX2; an
    explicit bfloat16 still runs on oneDNN's bf16 kernels."""
    isa, onednn_bf16, instructions = KINDS[kind]
    cap = CpuCapability(
        isa=isa, onednn_linear=True, onednn_bf16=onednn_bf16, bf16_instructions=instructions
    )
    bf16, f32 = torch.bfloat16, torch.float32
    native = onednn_bf16 and instructions
    assert cap.native_bf16 == native
    assert cap.auto_precision(bf16) == Precision(bf16, bf16 if native else f32)
    assert cap.linear_kernel(bf16, bf16) == (
        LinearKernel.ONEDNN if onednn_bf16 else LinearKernel.TORCH
    )
    assert cap.linear_kernel(bf16, f32) == LinearKernel.UPCAST
    described = cap.describe()
    assert ("oneDNN bf16 native" in described) == native
    assert ("emulated" in described) == (onednn_bf16 and not instructions)


@pytest.mark.parametrize("rows", [0, 1, 3, 16, 17, 300])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16])
def test_16bit_weights_compute_in_float32(rows, bias, weight_dtype, monkeypatch):
    """bf16 weights, f32 math: the float32 product with the up-cast weights, block by block."""
    monkeypatch.setattr(linear_module, "UPCAST_BLOCK_BYTES", 16 * 96 * 4)  # many 16-row blocks
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 96, generator=gen)
    w = (torch.randn(200, 96, generator=gen) / 10).to(weight_dtype)
    b = torch.randn(200, generator=gen).to(weight_dtype) if bias else None
    y = linear(x, w, b)
    assert y.dtype == torch.float32 and y.shape == (rows, 200)
    expected = F.linear(x, w.float(), None if b is None else b.float())
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear_bf16_weight_f32_math(x, w, b), y, rtol=0, atol=0)


def test_16bit_weights_take_batched_inputs():
    x = torch.randn(2, 5, 64)
    w = torch.randn(24, 64).bfloat16()
    torch.testing.assert_close(linear(x, w), F.linear(x, w.float()), rtol=1e-5, atol=1e-5)


def test_linear_takes_non_contiguous_input():
    x = torch.randn(64, 16).t()  # [16, 64], transposed view
    w = torch.randn(32, 64)
    torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_linear_falls_back_for_other_dtypes_and_shapes():
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    w = torch.randn(4, 8, dtype=torch.float64)
    assert torch.equal(linear(x, w), F.linear(x, w))
    x3 = torch.randn(2, 5, 8)
    torch.testing.assert_close(linear(x3, w.float()), F.linear(x3, w.float()))


def test_onednn_path_is_taken_on_this_build():
    # The speed of the CPU engine rests on it: a torch build without oneDNN would silently
    # fall back to F.linear, twice as slow at decode batch sizes.
    assert cpu_capability().onednn_linear
    assert CPU_KERNELS[(torch.float32, torch.float32)] is LinearKernel.ONEDNN


def test_upcast_scratch_made_under_inference_mode_serves_callers_outside_it():
    """The engine thread runs under inference_mode, LLM callers and tests may not: the reused
    up-cast buffer must stay writable from both."""
    torch.manual_seed(0)
    weight = torch.randn(8192, 1024).to(torch.bfloat16)  # larger than one up-cast block
    x = torch.randn(1, 1024)
    linear_module._scratch.__dict__.clear()
    with torch.inference_mode():
        inside = linear_module.linear_bf16_weight_f32_math(x, weight)
    outside = linear_module.linear_bf16_weight_f32_math(x, weight)
    assert torch.equal(inside, outside)
    torch.testing.assert_close(outside, F.linear(x, weight.float()), rtol=1e-5, atol=1e-4)
