"""Fused Triton kernels (RMSNorm, residual add + RMSNorm, q/k norm + rotary, SiLU-and-mul) against
the torch ops they replace (engine.layers), and the Qwen3 forward that dispatches to them.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py), in fp32 and fp16 (the
interpreter's bf16 arithmetic is wrong); every planned launch is checked against the GPU
compiler's rules. `gpu` tests repeat the comparison in bf16 at Qwen3-4B shapes, run the model
forward with and without the fused ops, and capture the kernels in a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch
import triton

import engine.kernels.activation as act_kernels
import engine.kernels.rmsnorm as norm_kernels
import engine.kernels.rotary as rotary_kernels
from engine.kernels import fused_add_rms_norm, qk_norm_rotary, rms_norm, silu_and_mul
from engine.layers.activation import silu_and_mul as silu_and_mul_torch
from engine.layers.attention import (
    AttentionMetadata,
    TorchAttentionBackend,
    TritonAttentionBackend,
)
from engine.layers.norm import Kernels, RMSNorm
from engine.layers.rotary import RotaryEmbedding, apply_rotary
from engine.model_config import ModelConfig
from engine.models.loader import load_model
from engine.models.qwen3 import Qwen3ForCausalLM, default_kernels

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3}
DTYPES = [torch.float32, torch.float16]
NUM_TOKENS = [1, 7, 64]


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_compiler_rules(launch) -> None:
    """What the GPU compiler demands, read from a launch's compile-time constants: power-of-two
    tl.arange lengths that cover the data, and a grid that covers every row / head / column."""
    c = launch.constexprs
    if launch.name == "_rms_norm_kernel":
        assert _is_pow2(c["BLOCK"]) and c["BLOCK"] >= c["N"], c
    elif launch.name == "_qk_rotary_kernel":
        assert _is_pow2(c["BLOCK_H"]) and _is_pow2(c["BLOCK_HALF"]), c
        assert 2 * c["BLOCK_HALF"] >= c["HEAD_DIM"], c
        assert c["Q_BLOCKS"] * c["BLOCK_H"] >= c["NUM_Q_HEADS"], c
        kv_blocks = triton.cdiv(c["NUM_KV_HEADS"], c["BLOCK_H"])
        assert launch.grid[1] == c["Q_BLOCKS"] + kv_blocks, (launch.grid, c)
        tile = 2 * c["BLOCK_H"] * c["BLOCK_HALF"]  # elements of q/k one program holds
        assert tile <= rotary_kernels.TILE_ELEMENTS or c["BLOCK_H"] == 1, c
    elif launch.name == "_silu_and_mul_kernel":
        assert _is_pow2(c["BLOCK"]) and launch.grid[1] * c["BLOCK"] >= c["WIDTH"], c
    else:
        raise AssertionError(f"unexpected kernel {launch.name}")
    assert _is_pow2(launch.options["num_warps"])
    assert all(dim >= 1 for dim in launch.grid)


def _spy(log: list):
    def wrap(plan):
        def planned(*args, **kwargs):
            result = plan(*args, **kwargs)
            log.extend(result)
            return result

        return planned

    return wrap


@pytest.fixture
def launches(monkeypatch):
    """Every fused-kernel launch made during the test, checked against the compiler's rules."""
    log: list = []
    spy = _spy(log)
    monkeypatch.setattr(norm_kernels, "plan_rms_norm", spy(norm_kernels.plan_rms_norm))
    monkeypatch.setattr(rotary_kernels, "plan_qk_rotary", spy(rotary_kernels.plan_qk_rotary))
    monkeypatch.setattr(act_kernels, "plan_silu_and_mul", spy(act_kernels.plan_silu_and_mul))
    yield log
    assert log, "no kernel was launched"
    for launch in log:
        check_compiler_rules(launch)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert not actual.isnan().any(), "kernel output holds NaN"
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= atol, f"max abs error {err:.3g} > {atol:.3g} ({actual.dtype})"


def make_norm(
    hidden: int, dtype: torch.dtype, seed: int, device: str = "cpu", kernels: Kernels = "torch"
) -> RMSNorm:
    norm = RMSNorm(hidden, eps=1e-6, kernels=kernels)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.2 * torch.randn(hidden, generator=gen))
    return norm.to(device=device, dtype=dtype)


def randn(*shape: int, dtype: torch.dtype, seed: int, device: str = "cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def cos_sin(head_dim: int, num_tokens: int, seed: int, device: str = "cpu"):
    """Per-token cos/sin [T, 1, D/2] as the model gets them, at scattered positions up to 32K."""
    rotary = RotaryEmbedding(head_dim, 1_000_000.0, None, 32768).to(device)
    gen = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, 32768, (num_tokens,), generator=gen).to(device)
    return rotary.cos_sin(positions)


# ---------------------------------------------------------------- RMSNorm


NORM_CASES = [(d, h, t) for d in DTYPES for h in (100, 1024, 2560) for t in NUM_TOKENS]


@pytest.mark.parametrize(
    "dtype,hidden,num_tokens",
    NORM_CASES,
    ids=[f"{str(d)[6:]}-h{h}-t{t}" for d, h, t in NORM_CASES],
)
def test_rms_norm_and_residual_variant_match_module(launches, dtype, hidden, num_tokens):
    seed = NORM_CASES.index((dtype, hidden, num_tokens))
    norm = make_norm(hidden, dtype, seed)
    x = randn(num_tokens, hidden, dtype=dtype, seed=seed + 100)
    residual = randn(num_tokens, hidden, dtype=dtype, seed=seed + 200)
    atol = ATOL[dtype]

    assert_close(rms_norm(x, norm.weight, norm.eps), norm(x), atol)

    out, new_residual = fused_add_rms_norm(x, residual, norm.weight, norm.eps)
    expected_residual = x + residual
    assert torch.equal(new_residual, expected_residual)  # the add rounds exactly like torch's
    assert_close(out, norm(expected_residual), atol)


def test_residual_variant_in_place_and_strided_rows(launches):
    """The decoder's call: residual updated in place; rows may be strided views."""
    norm = make_norm(96, torch.float32, 0)
    buffer = randn(5, 200, dtype=torch.float32, seed=1)
    x = buffer[:, 8:104]  # row stride 200
    residual = randn(5, 96, dtype=torch.float32, seed=2)
    expected_residual = x + residual
    fused = make_norm(96, torch.float32, 0, kernels="triton")  # same weight
    out, new_residual = fused(x, residual)
    assert new_residual is residual
    assert torch.equal(residual, expected_residual)
    assert_close(out, norm(expected_residual), ATOL[torch.float32])
    # The Triton-built layer over [..., N]: the layer's own entry point, 3-D input.
    x3 = randn(3, 4, 96, dtype=torch.float32, seed=3)
    assert_close(fused(x3), norm(x3), ATOL[torch.float32])


def test_rms_norm_weight_dtype_promotes_like_torch(launches):
    """A float32 weight on fp16 activations gives float32, as `weight * h.to(x.dtype)` does."""
    norm = make_norm(64, torch.float32, 0)
    x = randn(3, 64, dtype=torch.float16, seed=1)
    assert_close(rms_norm(x, norm.weight, norm.eps), norm(x), ATOL[torch.float32])


# ---------------------------------------------------------------- q/k norm + rotary


ROTARY_CASES = [(d, hd, t) for d in DTYPES for hd in (64, 128) for t in NUM_TOKENS]


@pytest.mark.parametrize(
    "dtype,head_dim,num_tokens",
    ROTARY_CASES,
    ids=[f"{str(d)[6:]}-d{hd}-t{t}" for d, hd, t in ROTARY_CASES],
)
def test_qk_norm_rotary_matches_torch(launches, dtype, head_dim, num_tokens):
    """GQA 4: 8 query heads, 2 KV heads. With norms (Qwen3) and rotary alone."""
    seed = ROTARY_CASES.index((dtype, head_dim, num_tokens))
    q = randn(num_tokens, 8, head_dim, dtype=dtype, seed=seed)
    k = randn(num_tokens, 2, head_dim, dtype=dtype, seed=seed + 50)
    q_norm, k_norm = make_norm(head_dim, dtype, seed + 1), make_norm(head_dim, dtype, seed + 2)
    cos, sin = cos_sin(head_dim, num_tokens, seed)
    atol = ATOL[dtype]

    q_out, k_out = qk_norm_rotary(q, k, cos, sin, q_norm.weight, k_norm.weight, q_norm.eps)
    assert_close(q_out, apply_rotary(q_norm(q), cos, sin), atol)
    assert_close(k_out, apply_rotary(k_norm(k), cos, sin), atol)

    q_out, k_out = qk_norm_rotary(q, k, cos, sin)
    assert_close(q_out, apply_rotary(q, cos, sin), atol)
    assert_close(k_out, apply_rotary(k, cos, sin), atol)


def test_qk_norm_rotary_in_place_on_fused_qkv_views(launches):
    """Qwen3-4B head layout (32 / 8 heads of 128) read from the fused QKV output's strided
    views, written back in place: q and k rotated, v untouched."""
    num_tokens, hq, hkv, d = 5, 32, 8, 128
    qkv = randn(num_tokens, (hq + 2 * hkv) * d, dtype=torch.float32, seed=0)
    before = qkv.clone()
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k = q.reshape(num_tokens, hq, d), k.reshape(num_tokens, hkv, d)
    q_norm, k_norm = make_norm(d, torch.float32, 1), make_norm(d, torch.float32, 2)
    cos, sin = cos_sin(d, num_tokens, 3)
    expected_q = apply_rotary(q_norm(q), cos, sin)
    expected_k = apply_rotary(k_norm(k), cos, sin)
    q_out, k_out = qk_norm_rotary(
        q, k, cos, sin, q_norm.weight, k_norm.weight, 1e-6, q_out=q, k_out=k
    )
    assert q_out is q and k_out is k
    assert_close(q, expected_q, ATOL[torch.float32])
    assert_close(k, expected_k, ATOL[torch.float32])
    assert torch.equal(v, before[:, (hq + hkv) * d :])


def test_qk_rotary_odd_head_counts_and_head_dim(launches):
    """Head counts and a head_dim (80) that are not powers of two: masked lanes stay out."""
    q = randn(3, 6, 80, dtype=torch.float32, seed=0)
    k = randn(3, 3, 80, dtype=torch.float32, seed=1)
    q_norm, k_norm = make_norm(80, torch.float32, 2), make_norm(80, torch.float32, 3)
    cos, sin = cos_sin(80, 3, 4)
    q_out, k_out = qk_norm_rotary(q, k, cos, sin, q_norm.weight, k_norm.weight, 1e-6)
    assert_close(q_out, apply_rotary(q_norm(q), cos, sin), ATOL[torch.float32])
    assert_close(k_out, apply_rotary(k_norm(k), cos, sin), ATOL[torch.float32])


# ---------------------------------------------------------------- SiLU-and-mul


SILU_CASES = [(d, w, t) for d in DTYPES for w in (100, 1500, 3072) for t in NUM_TOKENS]


@pytest.mark.parametrize(
    "dtype,width,num_tokens",
    SILU_CASES,
    ids=[f"{str(d)[6:]}-i{w}-t{t}" for d, w, t in SILU_CASES],
)
def test_silu_and_mul_matches_torch(launches, dtype, width, num_tokens):
    seed = SILU_CASES.index((dtype, width, num_tokens))
    x = randn(num_tokens, 2 * width, dtype=dtype, seed=seed)
    assert_close(silu_and_mul(x), silu_and_mul_torch(x), ATOL[dtype])


# ---------------------------------------------------------------- edges


def test_empty_batch_launches_nothing():
    norm = make_norm(64, torch.float32, 0)
    empty = torch.empty(0, 64)
    assert norm_kernels.plan_rms_norm(empty, norm.weight, 1e-6, empty) == []
    assert rms_norm(empty, norm.weight, 1e-6).shape == (0, 64)
    assert silu_and_mul(torch.empty(0, 128)).shape == (0, 64)
    cos = torch.empty(0, 1, 32)
    q_out, k_out = qk_norm_rotary(torch.empty(0, 4, 64), torch.empty(0, 2, 64), cos, cos)
    assert q_out.shape == (0, 4, 64) and k_out.shape == (0, 2, 64)


def test_rejects_inconsistent_inputs():
    w = torch.ones(64)
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(32), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        fused_add_rms_norm(x, torch.randn(4, 64, dtype=torch.float16), w, 1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        rms_norm(torch.randn(64, 4).t(), w, 1e-6, out=torch.empty(4, 64))
    cos = torch.randn(4, 1, 32)
    with pytest.raises(ValueError, match="q_weight and k_weight"):
        qk_norm_rotary(torch.randn(4, 2, 64), torch.randn(4, 1, 64), cos, cos, q_weight=w)
    with pytest.raises(ValueError, match="cos"):
        qk_norm_rotary(torch.randn(4, 2, 64), torch.randn(4, 1, 64), cos[:3], cos)
    with pytest.raises(ValueError, match="even head_dim"):
        qk_norm_rotary(torch.randn(4, 2, 63), torch.randn(4, 1, 63), cos, cos)
    with pytest.raises(ValueError, match="2 \\* width"):
        silu_and_mul(torch.randn(4, 63))


# ---------------------------------------------------------------- the model's dispatch


def _single_step_meta(query_lens: list[int], block_size: int, device: str) -> AttentionMetadata:
    """Prefill of fresh sequences, each in its own run of blocks (block tables 0.., n..)."""
    tables, slots, starts, next_block = [], [], [0], 0
    for n in query_lens:
        blocks = -(-n // block_size)
        tables.append(list(range(next_block, next_block + blocks)))
        slots += [next_block * block_size + i for i in range(n)]
        next_block += blocks
        starts.append(starts[-1] + n)
    width = max(len(t) for t in tables)
    tables = [t + [0] * (width - len(t)) for t in tables]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(query_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        max_query_len=max(query_lens),
        max_seq_len=max(query_lens),
        query_lens_cpu=list(query_lens),
        seq_lens_cpu=list(query_lens),
    )


def build_model(
    path, dtype: torch.dtype, device: str, backend, kernels: Kernels
) -> Qwen3ForCausalLM:
    """`load_model`, with the layers' kernels chosen explicitly ("torch" or "triton")."""
    from engine.models.loader import find_weight_files, iter_weights

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(ModelConfig.from_dir(path), backend, kernels=kernels)
    finally:
        torch.set_default_dtype(previous)
    model.load_weights(iter_weights(find_weight_files(path)))
    return model.eval()


@torch.inference_mode()
def run_forward(model: Qwen3ForCausalLM, query_lens: list[int]) -> torch.Tensor:
    """One packed prefill step on fresh (zeroed) caches, on the kernels the model was built
    with."""
    config, device = model.config, model.model.embed_tokens.weight.device
    dtype = model.model.embed_tokens.weight.dtype
    block_size, num_blocks = 16, sum(-(-n // 16) for n in query_lens)
    shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
    caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(2)]
    layers = range(config.num_hidden_layers)
    model.bind_kv_cache([caches[0].clone() for _ in layers], [caches[1].clone() for _ in layers])
    gen = torch.Generator().manual_seed(0)
    total = sum(query_lens)
    input_ids = torch.randint(0, config.vocab_size, (total,), generator=gen).to(device)
    positions = torch.cat([torch.arange(n) for n in query_lens]).to(device)
    return model(input_ids, positions, _single_step_meta(query_lens, block_size, device))


def test_model_fused_forward_equals_torch_ops(tiny_checkpoint, launches):
    """The Qwen3 forward through the fused kernels (interpreted on the CPU here) equals the
    same model on torch ops: the wiring (residual chaining, q/k views, norms) is right."""
    config = ModelConfig.from_dir(tiny_checkpoint)
    model = load_model(tiny_checkpoint, config, "float32", "cpu", TritonAttentionBackend())
    fused = build_model(tiny_checkpoint, torch.float32, "cpu", TritonAttentionBackend(), "triton")
    query_lens = [9, 3, 1]
    expected = run_forward(model, query_lens)
    assert not launches
    actual = run_forward(fused, query_lens)
    kernels = {launch.name for launch in launches}
    assert kernels == {"_rms_norm_kernel", "_qk_rotary_kernel", "_silu_and_mul_kernel"}
    # Per layer: input norm, q/k rotary, post-attention norm, SiLU; then the final norm.
    assert len(launches) == 4 * config.num_hidden_layers + 1
    assert_close(actual, expected, 1e-4)


def test_fused_ops_only_with_triton_backend_on_cuda(tiny_checkpoint, monkeypatch):
    """The CPU path never runs the Triton layer kernels: the triton backend alone does not
    switch them on (on the CPU the layers take the engine's C kernels for bf16, torch ops
    for float32)."""
    log: list = []
    spy = _spy(log)
    monkeypatch.setattr(norm_kernels, "plan_rms_norm", spy(norm_kernels.plan_rms_norm))
    monkeypatch.setattr(rotary_kernels, "plan_qk_rotary", spy(rotary_kernels.plan_qk_rotary))
    monkeypatch.setattr(act_kernels, "plan_silu_and_mul", spy(act_kernels.plan_silu_and_mul))
    config = ModelConfig.from_dir(tiny_checkpoint)
    triton_model = load_model(tiny_checkpoint, config, "float32", "cpu", TritonAttentionBackend())
    torch_model = load_model(tiny_checkpoint, config, "float32", "cpu", TorchAttentionBackend())
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert default_kernels(TritonAttentionBackend(), cuda) == "triton"
    assert default_kernels(TritonAttentionBackend(), cpu) == "cpu"
    assert default_kernels(TorchAttentionBackend(), cuda) == "torch"
    assert triton_model.kernels == "cpu" and torch_model.kernels == "cpu"
    hidden = run_forward(triton_model, [4, 2])  # the triton backend, but on the CPU
    assert not log
    assert_close(hidden, run_forward(torch_model, [4, 2]), 1e-4)


# ---------------------------------------------------------------- on a real GPU

BF16_ATOL = 1.6e-2  # one bf16 ulp at [2, 4): a float32-level difference may flip a rounding


def assert_close_bf16(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Within a bf16 ulp of the value (relative), and exactly equal almost everywhere."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    diff = (actual.float() - expected.float()).abs()
    bound = BF16_ATOL * expected.float().abs().clamp(min=1.0)
    assert (diff <= bound).all(), f"max abs error {diff.max().item():.3g}"
    assert (diff == 0).float().mean().item() > 0.99


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 64, 2048])
def test_gpu_bf16_kernels_qwen3_4b(launches, num_tokens):
    dtype, dev = torch.bfloat16, "cuda"
    norm = make_norm(2560, dtype, 0, dev)
    x = randn(num_tokens, 2560, dtype=dtype, seed=1, device=dev)
    residual = randn(num_tokens, 2560, dtype=dtype, seed=2, device=dev)
    assert_close_bf16(rms_norm(x, norm.weight, norm.eps), norm(x))
    out, new_residual = fused_add_rms_norm(x, residual, norm.weight, norm.eps)
    assert torch.equal(new_residual, x + residual)
    assert_close_bf16(out, norm(x + residual))

    qkv = randn(num_tokens, 48 * 128, dtype=dtype, seed=3, device=dev)
    q, k, _ = qkv.split([32 * 128, 8 * 128, 8 * 128], dim=-1)
    q, k = q.reshape(num_tokens, 32, 128), k.reshape(num_tokens, 8, 128)
    q_norm, k_norm = make_norm(128, dtype, 4, dev), make_norm(128, dtype, 5, dev)
    cos, sin = cos_sin(128, num_tokens, 6, dev)
    q_out, k_out = qk_norm_rotary(q, k, cos, sin, q_norm.weight, k_norm.weight, 1e-6)
    assert_close_bf16(q_out, apply_rotary(q_norm(q), cos, sin))
    assert_close_bf16(k_out, apply_rotary(k_norm(k), cos, sin))

    gate_up = randn(num_tokens, 2 * 9728, dtype=dtype, seed=7, device=dev)
    assert_close_bf16(silu_and_mul(gate_up), silu_and_mul_torch(gate_up))


@pytest.mark.gpu
def test_gpu_fused_kernels_are_cuda_graph_capturable():
    """Capture norm + rotary + SiLU once, replay on new inputs: no host syncs, fixed buffers."""
    dev, dtype = "cuda", torch.bfloat16
    norm = make_norm(1024, dtype, 0, dev)
    q_norm, k_norm = make_norm(128, dtype, 6, dev), make_norm(128, dtype, 7, dev)
    x = randn(8, 1024, dtype=dtype, seed=1, device=dev)
    residual = randn(8, 1024, dtype=dtype, seed=2, device=dev)
    q = randn(8, 16, 128, dtype=dtype, seed=3, device=dev)
    k = randn(8, 8, 128, dtype=dtype, seed=4, device=dev)
    gate_up = randn(8, 6144, dtype=dtype, seed=5, device=dev)
    positions = torch.arange(8, device=dev)
    rotary = RotaryEmbedding(128, 1_000_000.0, None, 4096).to(dev)
    outs: dict[str, torch.Tensor] = {}

    def step() -> None:
        cos, sin = rotary.cos_sin(positions)
        outs["norm"], outs["residual"] = fused_add_rms_norm(x, residual, norm.weight, norm.eps)
        outs["q"], outs["k"] = qk_norm_rotary(q, k, cos, sin, q_norm.weight, k_norm.weight)
        outs["act"] = silu_and_mul(gate_up)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in (10, 20):
        for i, t in enumerate((x, residual, q, k, gate_up)):
            t.copy_(randn(*t.shape, dtype=dtype, seed=seed + i, device=dev))
        positions.copy_(torch.randint(0, 4096, (8,), device=dev))
        graph.replay()
        torch.cuda.synchronize()
        cos, sin = rotary.cos_sin(positions)
        assert torch.equal(outs["residual"], x + residual)
        assert_close_bf16(outs["norm"], norm(x + residual))
        assert_close_bf16(outs["act"], silu_and_mul_torch(gate_up))
        assert_close_bf16(outs["q"], apply_rotary(q_norm(q), cos, sin))
        assert_close_bf16(outs["k"], apply_rotary(k_norm(k), cos, sin))


@pytest.fixture(scope="module")
def qwen3_like_bf16(tmp_path_factory):
    """Qwen3-0.6B's layout (16 / 8 heads of 128, hidden 1024) with 2 layers, bf16 on CUDA: the
    model as loaded (fused kernels) and a twin built on torch ops."""
    from engine.tiny import write_checkpoint

    path = write_checkpoint(
        tmp_path_factory.mktemp("qwen3-fused"), shape="qwen3-0.6b", seed=0, num_hidden_layers=2
    )
    config = ModelConfig.from_dir(path)
    fused = load_model(path, config, "bfloat16", "cuda", TritonAttentionBackend())
    plain = build_model(path, torch.bfloat16, "cuda", TritonAttentionBackend(), "torch")
    return fused, plain


@pytest.mark.gpu
def test_gpu_model_fused_forward_equals_torch_ops(qwen3_like_bf16, launches):
    """CUDA + triton backend: the forward with the fused ops against the same model on torch ops
    (triton attention both times), bf16, a packed batch of prefills."""
    model, plain = qwen3_like_bf16
    assert model.kernels == "triton" and plain.kernels == "torch"
    query_lens = [300, 17, 1, 64]
    expected = run_forward(plain, query_lens)
    assert not launches
    actual = run_forward(model, query_lens)
    assert len(launches) == 4 * model.config.num_hidden_layers + 1
    diff = (actual.float() - expected.float()).abs()
    scale = expected.float().abs().max().item()
    assert diff.max().item() <= 2e-2 * scale, (diff.max().item(), scale)
    # Same ops in the same order: only float32-level differences flipping a bf16 rounding here
    # and there, carried through two layers.
    assert diff.mean().item() <= 1e-2 * expected.float().abs().mean().item()
    cosine = torch.nn.functional.cosine_similarity(actual.float(), expected.float(), dim=-1)
    assert cosine.min().item() > 0.999
