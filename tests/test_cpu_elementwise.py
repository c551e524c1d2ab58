"""The C elementwise kernels (engine.cpu_kernels.elementwise) against the torch references of
engine.layers: RMSNorm (with and without the residual add), q/k norm + rotary on strided views
of a QKV output, and SiLU-and-mul, in bfloat16, and in float32 on bfloat16 weights (checked
against float64)."""

from __future__ import annotations

import pytest
import torch

from engine.cpu_kernels import elementwise
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


def float64_close(got: torch.Tensor, want64: torch.Tensor, ulps: float = 8) -> None:
    """float32 `got` within a few float32 ulps (of the row's scale) of a float64 reference."""
    assert got.dtype == torch.float32 and got.shape == want64.shape
    scale = want64.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
    assert ((got.double() - want64).abs() <= ulps * 2**-23 * scale).all()


@pytest.mark.parametrize("rows,hidden", [(1, 64), (37, 1024), (5, 2560), (3, 100)])
def test_float32_rms_norm_on_bf16_weights(rows, hidden):
    """float32 activations, bf16 norm weight (bf16 checkpoints on CPUs without bf16 math)."""
    torch.manual_seed(rows)
    x, residual = torch.randn(2, rows, hidden) * 3
    norm = RMSNorm(hidden, 1e-6, "cpu")
    norm.weight.data = (torch.rand(hidden) + 0.5).bfloat16()
    assert elementwise.serves_float32((x, residual), (norm.weight,))
    w64 = norm.weight.double()

    def want(r: torch.Tensor) -> torch.Tensor:
        r = r.double()
        return w64 * (r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + 1e-6))

    got = norm(x)
    assert got.dtype == torch.float32
    float64_close(got, want(x))
    got, got_residual = norm(x, residual)
    assert torch.equal(got_residual, x + residual)
    float64_close(got, want(x + residual))


def test_float32_qk_norm_rotary_on_strided_views():
    torch.manual_seed(4)
    tokens, q_heads, kv_heads, d = 11, 16, 8, 128
    qkv = torch.randn(tokens, (q_heads + 2 * kv_heads) * d)
    q = qkv[:, : q_heads * d].reshape(tokens, q_heads, d)
    k = qkv[:, q_heads * d : (q_heads + kv_heads) * d].reshape(tokens, kv_heads, d)
    cos, sin = torch.randn(tokens, 1, d).chunk(2, dim=-1)
    qw, kw = (torch.rand(2, d) + 0.5).bfloat16()
    got_q, got_k = QKNormRotary("cpu")(q, k, cos, sin, qw, kw, 1e-6)
    want_q, want_k = qk_norm_rotary(
        q.double(), k.double(), cos.double(), sin.double(), qw.double(), kw.double(), 1e-6
    )
    float64_close(got_q, want_q)
    float64_close(got_k, want_k)


def test_float32_silu_and_mul_against_float64():
    """The C exp (plain arithmetic, vectorised) within 2 ulps of float64 over the range
    where silu(g) is a normal float, and torch's results at the edges (0, infinities, NaN)."""
    gates = torch.cat([torch.linspace(-87, 88, 60001), torch.randn(2000) * 5])
    x = torch.cat([gates, torch.ones_like(gates)]).reshape(1, -1)
    got = elementwise.silu_and_mul(x)[0]
    g64 = gates.double()
    want = g64 / (1 + torch.exp(-g64))
    normal = want.abs() > 1.2e-38
    rel = (got.double() - want).abs() / want.abs()
    assert (rel[normal] <= 2 * 2**-23).all()
    edges = torch.tensor(
        [-200.0, -104.0, -90.0, 0.0, -0.0, 89.0, 200.0, float("inf"), float("-inf"), float("nan")]
    )
    edge_x = torch.cat([edges, torch.full_like(edges, -3.0)]).reshape(1, -1)
    assert torch.equal(elementwise.silu_and_mul(edge_x).isnan(), silu_and_mul(edge_x).isnan())
    torch.testing.assert_close(
        elementwise.silu_and_mul(edge_x), silu_and_mul(edge_x), equal_nan=True, rtol=1e-6, atol=0
    )


def test_float32_on_bf16_weights_takes_the_c_kernels_in_a_model(tiny_checkpoint, monkeypatch):
    """bf16 weights with float32 math: the model's norms and SiLU are the C float32 kernels
    (the ones the one-call decode step chains); float32 models keep torch's ops."""
    from engine.cpu_capability import Precision
    from engine.layers.attention import TorchAttentionBackend
    from engine.model_config import ModelConfig
    from engine.models.loader import load_model

    config = ModelConfig.from_dir(tiny_checkpoint)
    precision = Precision(torch.bfloat16, torch.float32)
    model = load_model(tiny_checkpoint, config, precision, "cpu", TorchAttentionBackend())
    layer = model.model.layers[0]
    hidden, residual = torch.randn(2, 7, config.hidden_size)
    weight, eps = layer.input_layernorm.weight, config.rms_norm_eps
    assert weight.dtype == torch.bfloat16
    got = layer.input_layernorm(hidden, residual)
    assert torch.equal(got[0], elementwise.add_rms_norm(hidden, residual, weight, eps)[0])
    torch.testing.assert_close(got[0], add_rms_norm(hidden, residual, weight, eps)[0])
    calls: list[tuple[int, ...]] = []
    real = elementwise.silu_and_mul
    monkeypatch.setattr(elementwise, "silu_and_mul", lambda x: calls.append(x.shape) or real(x))
    layer.mlp(torch.randn(7, config.hidden_size))
    assert calls == [(7, 2 * config.intermediate_size)]
