"""The engine's C kernels on packed bfloat16 weights (engine.cpu_kernels), against torch.

Every kernel is checked against a float64 matmul of the same bf16 inputs: the few-rows kernel
(decode), AMX tiles (more rows, where the CPU has them), and the portable float32 loops that
CPUs without AVX512-BF16 run, built here for AVX2 (x86-64-v3) so this machine runs them too.
"""

from __future__ import annotations

import pytest
import torch

from engine.cpu_kernels import packed_bf16
from engine.cpu_kernels.build import MARCH_ENV, compiler, kernel_march, load, target_macros

pytestmark = pytest.mark.skipif(compiler() is None, reason="no C compiler on this machine")

# (N, K): blocks that fill the few-rows kernel's groups of 4 and that leave a remainder, an odd
# number of 16-column blocks (AMX pairs plus one), K a multiple of 32 but not of 64.
SHAPES = [(64, 64), (48, 96), (80, 1056), (1040, 256)]
ROWS = [1, 2, 3, 4, 5, 7, 16, 17, 40]


def builds() -> list[str]:
    marches = [kernel_march()]  # the engine's build: native unless PAGECHAT_KERNEL_MARCH
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX512", "AVX512_BF16", "AMX"):
        marches.append("x86-64-v3")  # the portable kernels, as an AVX2 CPU compiles them
    if kernel_march() == "native" and packed_bf16.kernel_level() >= 1:
        marches.append("skylake-avx512")  # AVX-512 without BF16 (Skylake to Ice Lake servers)
    return marches


def _reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.double() @ w.double().t()


def test_the_build_matches_what_torch_reports_about_this_cpu():
    lib = load()
    assert lib is not None
    level = lib.pc_kernel_level()
    if kernel_march() == "native":
        avx512_bf16 = torch.cpu._is_avx512_bf16_supported()
        amx = torch.cpu._is_amx_tile_supported()
    else:  # PAGECHAT_KERNEL_MARCH (make test-avx2): what that target has, within this CPU
        cc = compiler()
        assert cc is not None
        macros = target_macros(cc, kernel_march())
        avx512_bf16 = "__AVX512BF16__" in macros
        amx = "__AMX_TILE__" in macros
        assert torch.cpu._is_avx512_bf16_supported() or not avx512_bf16
    assert level == (2 if avx512_bf16 and amx else 1 if avx512_bf16 else 0)
    # The float32-activation kernel serves every row count where the build has AVX-512, or
    # AVX2 with FMA (its register and panel kernels); NEON and generic builds only few rows.
    cc = compiler()
    assert cc is not None
    macros = target_macros(cc, kernel_march())
    registers = "__AVX512F__" in macros or ("__AVX2__" in macros and "__FMA__" in macros)
    assert packed_bf16.widens_any_rows() == registers


def test_a_kernel_march_the_compiler_rejects_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(MARCH_ENV, "no-such-cpu")
    with pytest.raises(ValueError, match="PAGECHAT_KERNEL_MARCH='no-such-cpu'"):
        load()


def test_pack_round_trip_and_row_lookup():
    w = torch.randn(48, 96).bfloat16()
    packed = packed_bf16.pack(w)
    assert packed.shape == (3, 48, 16, 2) and packed_bf16.is_packed(packed)
    assert torch.equal(packed_bf16.unpack(packed), w)
    ids = torch.tensor([0, 15, 16, 47, 3])
    assert torch.equal(packed_bf16.rows(packed, ids), w[ids])


def test_can_pack_only_shapes_the_kernels_take():
    assert packed_bf16.can_pack(torch.zeros(32, 64, dtype=torch.bfloat16))
    assert not packed_bf16.can_pack(torch.zeros(40, 64, dtype=torch.bfloat16))  # N % 16
    assert not packed_bf16.can_pack(torch.zeros(32, 48, dtype=torch.bfloat16))  # K % 32
    assert not packed_bf16.can_pack(torch.zeros(32, 64))  # float32 stays dense


@pytest.mark.parametrize("march", builds())
@pytest.mark.parametrize("n,k", SHAPES)
def test_bf16_activations_match_float64_up_to_output_rounding(march, n, k, bf16_math):
    lib = load(march)
    assert lib is not None
    torch.manual_seed(n + k)
    w = torch.randn(n, k).bfloat16()
    packed = packed_bf16.pack(w)
    for m in ROWS:
        x = torch.randn(m, k).bfloat16()
        out = packed_bf16.linear(x, packed, lib=lib)
        assert out.dtype == torch.bfloat16 and out.shape == (m, n)
        ref = _reference(x, w)
        # float32 sums of exact bf16 products, then one rounding to bf16 (2^-8 relative).
        bound = ref.abs() * 2**-8 + 1e-5 * (x.double().abs() @ w.double().abs().t())
        assert ((out.double() - ref).abs() <= bound).all(), (march, m)


@pytest.mark.parametrize("march", builds())
@pytest.mark.parametrize("n,k", SHAPES)
def test_float32_activations_equal_a_float32_matmul_on_the_up_cast_weight(march, n, k):
    lib = load(march)
    assert lib is not None
    torch.manual_seed(n * k)
    w = torch.randn(n, k).bfloat16()
    packed = packed_bf16.pack(w)
    bias = torch.randn(n)
    for m in (1, 3, 16, 17, 64):
        x = torch.randn(m, k)
        out = packed_bf16.linear(x, packed, bias, lib=lib)
        assert out.dtype == torch.float32
        ref = _reference(x, w) + bias.double()
        scale = x.double().abs() @ w.double().abs().t() + bias.double().abs()
        assert ((out.double() - ref).abs() <= 1e-6 * scale + 1e-6).all(), (march, m)


@pytest.mark.parametrize("march", builds())
def test_float32_rows_get_the_same_bits_alone_and_in_any_batch(march):
    """The widening kernel's paths (one row at a time, 4 rows over 4 blocks, and from 8 rows on
    the register kernels: AVX2's 4 rows x 1 block and from 24 rows its 6-row panel tiles, with
    sums carried through y between panels of 256 pairs of k; AVX-512's 8 rows x 2 blocks with an
    odd last block in 4-row passes) make the same FMAs in the same order. AVX-512 and AVX2
    builds serve every row count, so there a prompt-sized batch gives the same bits too."""
    lib = load(march)
    assert lib is not None
    torch.manual_seed(7)
    w = torch.randn(80, 1056).bfloat16()  # 5 blocks: a group of 4 and a remainder
    packed = packed_bf16.pack(w)
    any_rows = packed_bf16.widens_any_rows(lib)
    x = torch.randn(300 if any_rows else packed_bf16.WIDEN_MAX_ROWS, 1056)
    full = packed_bf16.linear(x, packed, lib=lib)
    for m in (1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 23, 24, 33, *((64, 65, 150) if any_rows else ())):
        assert torch.equal(packed_bf16.linear(x[:m], packed, lib=lib), full[:m]), (march, m)
    assert torch.equal(packed_bf16.linear(x[41:42], packed, lib=lib)[0], full[41])
    # And against float64 (the bits above could agree on a wrong sum).
    ref = _reference(x, w.float())
    scale = x.double().abs() @ w.double().abs().t()
    assert ((full.double() - ref).abs() <= 1e-5 * scale + 1e-6).all(), march


@pytest.mark.parametrize("march", builds())
def test_bf16_rows_without_avx512_bf16_get_the_same_bits_alone_and_in_a_prompt(march):
    """Without AVX512-BF16, in builds with float32 register kernels (AVX2, AVX-512), below 8
    bf16 rows take the portable loop (x widened as read, each output rounded once), from 8 on
    the register kernels on a widened copy of x, the output rounded once: the same sums, so
    the same bits on either side of 8 (and of the panel kernel's 24), and no torch bf16 matmul
    (5-10x slower on such CPUs)."""
    lib = load(march)
    assert lib is not None
    if packed_bf16.kernel_level(lib) >= 1 or not packed_bf16.widens_any_rows(lib):
        pytest.skip("AVX512-BF16 builds have their own bf16 kernels; others keep the dense matmul")
    torch.manual_seed(11)
    w = torch.randn(528, 2048).bfloat16()  # enough outputs that another order rounds some apart
    packed = packed_bf16.pack(w)
    bias = torch.randn(528)
    x = torch.randn(150, 2048).bfloat16()
    full = packed_bf16.linear(x, packed, bias, lib=lib)
    assert full.dtype == torch.bfloat16
    for m in (1, 5, 7, 8, 9, 23, 24, 64, 65, 100):
        assert torch.equal(packed_bf16.linear(x[:m], packed, bias, lib=lib), full[:m]), (march, m)
    assert torch.equal(packed_bf16.linear(x[97:98], packed, bias, lib=lib)[0], full[97])
    # The float32 sums rounded once, then the bias added in bf16 (the few-rows path's order).
    ref = (_reference(x.float(), w.float()).float().bfloat16() + bias.bfloat16()).double()
    assert (full.double() - ref).abs().max() <= 2**-6 * ref.abs().max(), march


def test_an_output_does_not_depend_on_the_thread_count_or_its_batch_mates_within_a_kernel(
    bf16_math,
):
    torch.manual_seed(0)
    w = torch.randn(1040, 256).bfloat16()
    packed = packed_bf16.pack(w)
    x = torch.randn(4, 256).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = packed_bf16.linear(x, packed)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, packed_bf16.linear(x, packed))
    # Each row is summed on its own: a row alone gives the same bits.
    for row in range(4):
        assert torch.equal(packed_bf16.linear(x[row : row + 1], packed)[0], one[row])


@pytest.mark.skipif(packed_bf16.kernel_level() < 1, reason="needs AVX512-BF16 (AMX or not)")
def test_with_avx512_bf16_a_row_gets_the_same_bits_alone_and_in_any_batch(bf16_math):
    """Decode batches of 1 to 40 rows and prompt-sized ones: with AMX its 16- and 32-row tile
    paths; without, the few-rows kernel (under 8 rows), the 6-row register tiles with their
    edges and, for the FMA way from 96 rows, the tiles on a widened panel, which must sum
    alike, also where a long k widens and multiplies the panel a chunk at a time. Also a
    narrow weight (fewer column groups than threads: rows split between them) and the fused
    SwiGLU."""
    torch.manual_seed(1)
    # 65 blocks; 33 gate blocks of a [gate | up] weight; 4 blocks; a panel of 1.06 MB (k in
    # two chunks)
    for n, k in ((1040, 512), (1056, 512), (64, 512), (64, 4160)):
        w = torch.randn(n, k).bfloat16()
        packed = packed_bf16.pack(w)
        x = torch.randn(300, k).bfloat16()
        full = packed_bf16.linear(x, packed)
        for m in (1, 3, 7, 8, 13, 16, 17, 40, 95, 96, 97):
            assert torch.equal(packed_bf16.linear(x[:m], packed), full[:m]), (n, m)
        assert torch.equal(packed_bf16.linear(x[37:38], packed)[0], full[37])
        if n % 32:
            continue  # no [gate | up] halves of whole blocks
        swiglu = packed_bf16.linear_swiglu(x, packed)
        assert swiglu is not None
        for m in (8, 40, 95, 96, 97):
            assert torch.equal(packed_bf16.linear_swiglu(x[:m], packed), swiglu[:m]), (n, m)


@pytest.mark.skipif(packed_bf16.kernel_level() < 1, reason="the fused SwiGLU needs AVX512-BF16")
@pytest.mark.parametrize("inter,k", [(48, 96), (64, 1056), (3072, 1024)])
def test_the_fused_swiglu_matmul_equals_the_matmul_then_the_silu_kernel(inter, k, bf16_math):
    """pc_linear_swiglu_bf16 pairs gate block j with up block j inside the AMX tiles or the
    register tiles: its output must be the two-step result bit for bit (batch sizes on the 16-
    and 32-row tile paths, an odd count of gate blocks, a prompt-sized batch; without AMX
    under 8 rows there is no fused kernel)."""
    from engine.cpu_kernels.elementwise import silu_and_mul

    torch.manual_seed(inter + k)
    w = (torch.randn(2 * inter, k) * 0.05).bfloat16()
    packed = packed_bf16.pack(w)
    amx = packed_bf16.kernel_level() == 2
    for m in (1, 3, 8, 13, 16, 17, 40, 300 if inter < 3072 else 64):
        x = (torch.randn(m, k) * 2).bfloat16()
        fused = packed_bf16.linear_swiglu(x, packed)
        if not amx and m < 8:
            assert fused is None, m
            continue
        assert fused is not None and fused.shape == (m, inter)
        two_steps = silu_and_mul(packed_bf16.linear(x, packed))
        assert torch.equal(fused, two_steps), m
    # and against float64: silu(gate) * up of the exact products, two bf16 roundings away
    ref = _reference(x, w)
    gate, up = ref[:, :inter], ref[:, inter:]
    want = gate / (1 + torch.exp(-gate)) * up
    scale = x.double().abs() @ w.double().abs().t()
    slack = scale[:, :inter] * scale[:, inter:] * 1e-4 + 1e-6
    assert ((fused.double() - want).abs() <= want.abs() * 2**-6 + slack).all()


@pytest.mark.skipif(packed_bf16.kernel_level() != 1, reason="a choice only without AMX")
def test_the_bf16_math_follows_the_setting_and_else_the_measured_rates(monkeypatch):
    from engine.cpu_kernels.build import BF16_MATH_ENV, FMA_MIN_ADVANTAGE, choose_bf16_math

    lib = load()
    assert lib is not None
    chosen = lib.pc_bf16_fma()
    try:
        for value, fma in (("fma", 1), ("dot", 0), ("FMA ", 1)):
            monkeypatch.setenv(BF16_MATH_ENV, value)
            choose_bf16_math(lib)
            assert lib.pc_bf16_fma() == fma, value
        monkeypatch.setenv(BF16_MATH_ENV, "fast")
        with pytest.raises(ValueError, match=BF16_MATH_ENV):
            choose_bf16_math(lib)
        monkeypatch.delenv(BF16_MATH_ENV)
        choose_bf16_math(lib)
        import ctypes

        rates = (ctypes.c_double * 2)()
        assert lib.pc_measure_bf16_math(rates) == 0 and rates[0] > 1e9 and rates[1] > 1e9
        clear = rates[1] > 1.5 * FMA_MIN_ADVANTAGE * rates[0] or rates[1] < rates[0]
        if clear:  # far from the threshold, a second measurement decides the same way
            assert lib.pc_bf16_fma() == int(rates[1] > FMA_MIN_ADVANTAGE * rates[0])
    finally:
        lib.pc_set_bf16_fma(chosen)


def test_a_model_with_packed_weights_matches_the_dense_model(tiny_checkpoint):
    """The loader packs every bf16 linear and the tied table; logits stay the dense model's
    within bf16 noise and the greedy choice is the same."""
    from engine.layers.attention import TorchAttentionBackend
    from engine.model_config import ModelConfig
    from engine.models.loader import load_model

    path = tiny_checkpoint
    config = ModelConfig.from_dir(path)
    packed = load_model(path, config, "bfloat16", "cpu", TorchAttentionBackend())
    dense = load_model(path, config, "bfloat16", "cpu", TorchAttentionBackend(), prepack=False)
    assert packed_bf16.is_packed(packed.model.layers[0].mlp.down_proj.weight)
    assert packed_bf16.is_packed(packed.model.embed_tokens.weight)  # tied: one packed table
    assert torch.equal(packed.model.embed_tokens.dense_weight(), dense.model.embed_tokens.weight)
    hidden = torch.randn(3, config.hidden_size).bfloat16()
    a, b = packed.compute_logits(hidden), dense.compute_logits(hidden)
    assert torch.allclose(a, b, rtol=2e-2, atol=2e-2)
    assert torch.equal(a.argmax(-1), b.argmax(-1))
