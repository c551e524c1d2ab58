"""The C elementwise kernels (engine.cpu_kernels.elementwise) against the torch references of
engine.layers: RMSNorm (with and without the residual add), q/k norm + rotary on strided views
of a QKV output, and SiLU-and-mul, all in bfloat16."""

from __future__ import annotations

import pytest
import torch

from engine.cpu_kernels.build import compiler
from engine.layers.activation import SiluAndMul, silu_and_mul
from engine.layers.norm import RMSNorm, add_rms_norm, rms_norm
from engine.layers.rotary import QKNormRotary, qk_norm_rotary

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C compiler on this machine")


def assert_same_up_to_sum_order(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal, but for a rare 1-ulp bf16 difference where a float32 sum in another order lands on
    the other side of a rounding boundary."""
    assert got.dtype == want.dtype and got.shape == want.shape
    differ = got != want
    assert differ.float().mean().item() <= 1e-3
    ulp = want.float().abs() * 2**-7 + 1e-30
    assert ((got.float() - want.float()).abs() <= ulp).all()


@pytest.mark.parametrize("rows,hidden", [(1, 64), (37, 1024), (5, 2560)])
def test_rms_norm_and_the_residual_add(rows, hidden):
    torch.manual_seed(rows)
    x, residual = torch.randn(2, rows, hidden).bfloat16()
    norm = RMSNorm(hidden, 1e-6, "cpu")
    norm.weight.data = (torch.rand(hidden) + 0.5).bfloat16()
    assert_same_up_to_sum_order(norm(x), rms_norm(x, norm.weight, 1e-6))
    got, got_residual = norm(x, residual)
    want, want_residual = add_rms_norm(x, residual, norm.weight, 1e-6)
    assert torch.equal(got_residual, want_residual)
    assert_same_up_to_sum_order(got, want)
    assert torch.equal(x, x.clone()) and residual.dtype == torch.bfloat16  # inputs untouched


def test_qk_norm_rotary_on_strided_views_of_the_qkv_output():
    torch.manual_seed(1)
    tokens, q_heads, kv_heads, d = 23, 16, 8, 128
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * d).bfloat16()
    q = qkv[:, : q_heads * d].reshape(tokens, q_heads, d)
    k = qkv[:, q_heads * d : (q_heads + kv_heads) * d].reshape(tokens, kv_heads, d)
    cos_sin = torch.randn(tokens, 1, d)
    cos, sin = cos_sin.chunk(2, dim=-1)
    qw, kw = (torch.rand(2, d) + 0.5).bfloat16()
    got_q, got_k = QKNormRotary("cpu")(q, k, cos, sin, qw, kw, 1e-6)
    want_q, want_k = qk_norm_rotary(q, k, cos, sin, qw, kw, 1e-6)
    assert_same_up_to_sum_order(got_q, want_q)
    assert_same_up_to_sum_order(got_k, want_k)


def test_silu_and_mul():
    torch.manual_seed(2)
    x = (torch.randn(9, 2 * 3072) * 4).bfloat16()
    assert torch.equal(SiluAndMul("cpu")(x), silu_and_mul(x))


def test_silu_and_mul_on_every_finite_bf16_gate():
    """The vector path's exp is torch's (SLEEF u10): the same bits for all 65,280 finite
    bf16 gates (rows of 255: 15 vectors of 16 and a scalar tail of 15), up = 1 and -3."""
    gates = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    gates = gates[torch.isfinite(gates)].reshape(-1, 255)
    for up in (1.0, -3.0):
        x = torch.cat([gates, torch.full_like(gates, up)], dim=-1)
        assert torch.equal(SiluAndMul("cpu")(x), silu_and_mul(x))


def test_float32_keeps_the_torch_ops_bit_for_bit():
    torch.manual_seed(3)
    x = torch.randn(4, 64)
    norm = RMSNorm(64, 1e-6, "cpu")
    assert torch.equal(norm(x), rms_norm(x, norm.weight, 1e-6))
    y = torch.randn(4, 128)
    assert torch.equal(SiluAndMul("cpu")(y), silu_and_mul(y))


def test_a_bf16_model_on_cpu_kernels_matches_torch_kernels(tiny_checkpoint):
    from engine.layers.attention import TorchAttentionBackend
    from engine.model_config import ModelConfig
    from engine.models.loader import load_model

    config = ModelConfig.from_dir(tiny_checkpoint)
    model = load_model(tiny_checkpoint, config, "bfloat16", "cpu", TorchAttentionBackend())
    assert model.kernels == "cpu"
    layer = model.model.layers[0]
    hidden = torch.randn(7, config.hidden_size).bfloat16()
    residual = torch.randn(7, config.hidden_size).bfloat16()
    got = layer.input_layernorm(hidden, residual)
    want = add_rms_norm(hidden, residual, layer.input_layernorm.weight, config.rms_norm_eps)
    assert torch.equal(got[1], want[1])
    assert_same_up_to_sum_order(got[0], want[0])
