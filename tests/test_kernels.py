"""Triton kernels (store + paged attention) against the torch reference of engine.layers.attention.

Without CUDA these run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), which
is slow, so shapes stay tiny. The interpreter does not enforce the GPU compiler's rules, so every
launch's compile-time constants are inspected, and the kernels are compiled for sm_90 with the
toolchain bundled in Triton's wheel. `gpu` tests repeat the comparison in bf16 at Qwen3-4B shapes.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import triton

import engine.kernels.store_kv as sk
import engine.kernels.unified_attention as pa
from engine.kernels import (
    AttentionLaunchConfig,
    SplitKVWorkspace,
    choose_launch_config,
    paged_attention,
    store_kv_cache,
)
from engine.layers.attention import AttentionMetadata, paged_attention_torch, store_kv_cache_torch

REPO = Path(__file__).resolve().parent.parent
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
# Plus one unit in the last place of the output's own dtype: kernel and reference both round a
# float32 result, and two roundings of nearly equal values may land one ulp apart (in bf16 that is
# 2**-6 for outputs in [2, 4), more than ATOL).
RTOL = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
# Interpreted on the CPU here; compiled for real when the machine has a GPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------- batch construction


@dataclass
class Batch:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    meta: AttentionMetadata
    scale: float


def make_batch(
    pairs: list[tuple[int, int]],
    *,
    num_kv_heads: int,
    group: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int,
    device: str = DEVICE,
    shared_blocks: bool = False,
    poison: bool = True,
) -> Batch:
    """A batch of (query_len, seq_len) sequences over a paged cache with shuffled block tables.

    Cache slots that no sequence owns (spare blocks, the tail of each last block) hold NaN when
    `poison` is set, so a kernel that reads past a sequence's keys fails loudly. With
    `shared_blocks` the block tables draw physical blocks with repetition (reads may alias).
    """
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-seq_len // block_size) for _, seq_len in pairs]
    num_blocks = sum(blocks_needed) + 3
    max_blocks = max(blocks_needed) + 1  # a padding column, as the runner may leave
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen)
    v_cache = torch.randn(shape, generator=gen)
    owned = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    block_tables = torch.zeros(len(pairs), max_blocks, dtype=torch.int32)
    if shared_blocks:
        physical = torch.randint(0, num_blocks, (sum(blocks_needed),), generator=gen)
    else:
        physical = torch.randperm(num_blocks, generator=gen)
    used = 0
    for s, ((_, seq_len), n) in enumerate(zip(pairs, blocks_needed)):
        block_tables[s, :n] = physical[used : used + n].int()
        used += n
        for j in range(n):
            owned[block_tables[s, j], : min(block_size, seq_len - j * block_size)] = True
    if poison:
        k_cache[~owned] = float("nan")
        v_cache[~owned] = float("nan")
    query_lens = [q for q, _ in pairs]
    seq_lens = [k for _, k in pairs]
    num_tokens = sum(query_lens)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    meta = AttentionMetadata(
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables.to(device),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
    )
    q = torch.randn(num_tokens, num_kv_heads * group, head_dim, generator=gen)
    return Batch(
        q=q.to(device=device, dtype=dtype),
        k_cache=k_cache.to(device=device, dtype=dtype),
        v_cache=v_cache.to(device=device, dtype=dtype),
        meta=meta,
        scale=head_dim**-0.5,
    )


def run_kernel(batch: Batch, **kwargs) -> torch.Tensor:
    out = torch.full_like(batch.q, float("nan"))
    m = batch.meta
    result = paged_attention(
        batch.q,
        batch.k_cache,
        batch.v_cache,
        out,
        m.query_start_loc,
        m.seq_lens,
        m.block_tables,
        max_query_len=m.max_query_len,
        max_seq_len=m.max_seq_len,
        scale=batch.scale,
        **kwargs,
    )
    assert result is out
    return out


def reference(batch: Batch) -> torch.Tensor:
    return paged_attention_torch(batch.q, batch.k_cache, batch.v_cache, batch.meta, batch.scale)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert not actual.isnan().any(), "kernel output holds NaN"
    torch.testing.assert_close(actual.float(), expected.float(), atol=ATOL[dtype], rtol=RTOL[dtype])


def small_config(
    group: int, head_dim: int, tile: int, num_segments: int = 1
) -> AttentionLaunchConfig:
    """The smallest legal tiles: many q blocks per sequence, many tiles per block or per tile."""
    block_m = max(16, triton.next_power_of_2(group))
    return AttentionLaunchConfig(
        block_m=block_m,
        block_q=block_m // group,
        tile=tile,
        block_d=max(16, triton.next_power_of_2(head_dim)),
        num_segments=num_segments,
        lowp_dot=False,
    )


def random_pairs(rng: random.Random, block_size: int) -> list[tuple[int, int]]:
    """A mixed batch: a decode, an extend whose cached prefix ends mid-block, a fresh prefill,
    sometimes another decode; shuffled."""
    prefix = rng.randrange(1, 3 * block_size)
    if prefix % block_size == 0:
        prefix += 1
    pairs = [
        (1, rng.randrange(2, 3 * block_size)),
        (rng.randrange(2, 24), 0),
        (rng.randrange(1, 30), 0),
    ]
    pairs[1] = (pairs[1][0], prefix + pairs[1][0])
    pairs[2] = (pairs[2][0], pairs[2][0])
    if rng.random() < 0.5:
        pairs.append((1, rng.randrange(1, 2 * block_size)))
    rng.shuffle(pairs)
    return pairs


# ---------------------------------------------------------------- launch inspection


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def check_compiler_rules(launch) -> None:
    """What the GPU compiler demands of a launch, checked on its compile-time constants."""
    c = launch.constexprs
    if launch.name == "_paged_attention_kernel":
        for name in ("BLOCK_M", "TILE", "BLOCK_D"):  # tl.arange lengths and tl.dot dims
            assert _is_pow2(c[name]) and c[name] >= 16, f"{name}={c[name]}"
        assert _is_pow2(c["NUM_SEGMENTS"])
        assert c["BLOCK_Q"] * c["GROUP"] <= c["BLOCK_M"] and c["BLOCK_D"] >= c["HEAD_DIM"]
        assert launch.grid[2] == c["NUM_SEGMENTS"]
    elif launch.name == "_merge_segments_kernel":
        assert _is_pow2(c["NUM_SEGMENTS"]) and _is_pow2(c["BLOCK_D"])
    elif launch.name == "_store_kv_kernel":
        assert _is_pow2(c["BLOCK_H"]) and _is_pow2(c["BLOCK_D"])
    else:
        raise AssertionError(f"unexpected kernel {launch.name}")
    assert all(dim >= 1 for dim in launch.grid)


@pytest.fixture
def launches(monkeypatch):
    """Every kernel launch made during the test, checked against the compiler's rules."""
    log = []

    def spy(plan):
        def planned(*args, **kwargs):
            result = plan(*args, **kwargs)
            log.extend(result)
            return result

        return planned

    monkeypatch.setattr(pa, "plan_paged_attention", spy(pa.plan_paged_attention))
    monkeypatch.setattr(sk, "plan_store_kv_cache", spy(sk.plan_store_kv_cache))
    yield log
    assert log, "no kernel was launched"
    for launch in log:
        check_compiler_rules(launch)


# ---------------------------------------------------------------- randomized attention cases

# Every block size x head_dim x GQA ratio, in fp32 and fp16: 36 randomized mixed batches.
CASES = [
    (dtype, block_size, head_dim, group)
    for dtype in (torch.float32, torch.float16)
    for block_size in (16, 32, 64)
    for head_dim in (64, 128)
    for group in (1, 4, 8)
]


@pytest.mark.parametrize(
    "dtype,block_size,head_dim,group",
    CASES,
    ids=[f"{str(d)[6:]}-bs{b}-d{h}-g{g}" for d, b, h, g in CASES],
)
def test_mixed_batch_matches_reference(launches, dtype, block_size, head_dim, group):
    seed = CASES.index((dtype, block_size, head_dim, group))
    rng = random.Random(seed)
    pairs = random_pairs(rng, block_size)
    batch = make_batch(
        pairs,
        num_kv_heads=1 + (seed // 2) % 2,
        group=group,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        seed=seed,
    )
    # Alternate the engine's own tile choice with the smallest legal tiles: q blocks of 1-16
    # tokens, key tiles spanning two cache blocks (16) or a part of one (64).
    tile = 16 if block_size == 64 else 32
    config = small_config(group, head_dim, tile=tile) if seed % 2 else None
    assert_close(run_kernel(batch, config=config), reference(batch), dtype)


@pytest.mark.parametrize("seed", range(6))
def test_split_kv_equals_single_pass(launches, seed):
    """Split-KV (forced, also on prefill rows) agrees with the single pass and the reference."""
    rng = random.Random(100 + seed)
    block_size = (16, 32, 64)[seed % 3]
    group = (1, 4, 8)[seed % 3]
    head_dim = 64 if seed < 3 else 128
    dtype = torch.float32 if seed % 2 == 0 else torch.float16
    pairs = (
        random_pairs(rng, block_size)
        if seed % 3 == 0
        else [(1, rng.randrange(1, 130)) for _ in range(3)]
    )
    batch = make_batch(
        pairs,
        num_kv_heads=1,
        group=group,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        seed=seed,
    )
    segments = 4 if seed < 4 else 16
    single = run_kernel(batch, config=small_config(group, head_dim, tile=32))
    split = run_kernel(batch, config=small_config(group, head_dim, tile=16, num_segments=segments))
    ref = reference(batch)
    assert_close(single, ref, dtype)
    assert_close(split, ref, dtype)
    tight = 1e-5 if dtype == torch.float32 else 2e-3  # fp16: an output rounding or so
    assert (split.float() - single.float()).abs().max().item() <= tight


def test_decode_batch_picks_split_kv_and_uses_workspace(launches):
    pairs = [(1, 130), (1, 5), (1, 64)]
    batch = make_batch(
        pairs, num_kv_heads=1, group=4, head_dim=64, block_size=16, dtype=torch.float32, seed=7
    )
    workspace = SplitKVWorkspace.allocate(8, 4, 64, DEVICE)
    workspace.out.fill_(float("nan"))  # stale contents of a reused buffer must not leak
    out = run_kernel(batch, workspace=workspace)
    assert [launch.name for launch in launches] == [
        "_paged_attention_kernel",
        "_merge_segments_kernel",
    ]
    assert launches[0].args["segm_out_ptr"] is workspace.out
    assert_close(out, reference(batch), torch.float32)


def test_prefill_batch_is_single_pass_and_split_can_be_forbidden(launches):
    batch = make_batch(
        [(1, 40)], num_kv_heads=1, group=4, head_dim=64, block_size=16, dtype=torch.float32, seed=3
    )
    run_kernel(batch, split_kv=False)
    assert [launch.constexprs["NUM_SEGMENTS"] for launch in launches] == [1]
    prefill = make_batch(
        [(9, 40), (1, 3)],
        num_kv_heads=1,
        group=4,
        head_dim=64,
        block_size=16,
        dtype=torch.float32,
        seed=3,
    )
    launches.clear()
    assert_close(run_kernel(prefill), reference(prefill), torch.float32)
    assert len(launches) == 1 and launches[0].constexprs["NUM_SEGMENTS"] == 1


def test_shared_blocks_empty_sequences_and_strided_q(launches):
    """Block tables that repeat physical blocks, a zero-length query, a q view with padding."""
    pairs = [(3, 50), (0, 20), (1, 17), (12, 12)]
    batch = make_batch(
        pairs,
        num_kv_heads=2,
        group=4,
        head_dim=64,
        block_size=16,
        dtype=torch.float32,
        seed=11,
        shared_blocks=True,
        poison=False,
    )
    wide = torch.randn(batch.q.shape[0], batch.q.shape[1], 3 * 64, device=DEVICE)
    wide[:, :, 64:128] = batch.q
    batch.q = wide[:, :, 64:128]  # token and head strides differ from a contiguous tensor
    assert not batch.q.is_contiguous()
    assert_close(
        run_kernel(batch, config=small_config(4, 64, tile=16)), reference(batch), torch.float32
    )


def test_low_precision_dot_path_fp16(launches):
    """The GPU path feeds fp16 operands to tl.dot (P rounded to fp16); fp16 arithmetic is exact
    in the interpreter, so its numerics can be checked here."""
    rng = random.Random(5)
    pairs = random_pairs(rng, 32)
    batch = make_batch(
        pairs, num_kv_heads=1, group=4, head_dim=128, block_size=32, dtype=torch.float16, seed=5
    )
    config = AttentionLaunchConfig(
        block_m=64, block_q=16, tile=32, block_d=128, num_segments=1, lowp_dot=True
    )
    assert_close(run_kernel(batch, config=config), reference(batch), torch.float16)


def test_head_dim_not_power_of_two(launches):
    batch = make_batch(
        [(5, 21), (1, 9)],
        num_kv_heads=1,
        group=2,
        head_dim=80,
        block_size=16,
        dtype=torch.float32,
        seed=2,
    )
    assert_close(run_kernel(batch), reference(batch), torch.float32)
    assert launches[0].constexprs["BLOCK_D"] == 128


def test_rejects_inconsistent_inputs():
    batch = make_batch(
        [(2, 5)], num_kv_heads=2, group=2, head_dim=64, block_size=16, dtype=torch.float32, seed=0
    )
    m = batch.meta
    with pytest.raises(ValueError, match="multiple"):
        paged_attention(
            batch.q[:, :3],
            batch.k_cache,
            batch.v_cache,
            torch.empty_like(batch.q[:, :3]),
            m.query_start_loc,
            m.seq_lens,
            m.block_tables,
            max_query_len=2,
            max_seq_len=5,
            scale=1.0,
        )
    with pytest.raises(ValueError, match="workspace"):
        paged_attention(
            batch.q,
            batch.k_cache,
            batch.v_cache,
            torch.empty_like(batch.q),
            m.query_start_loc,
            m.seq_lens,
            m.block_tables,
            max_query_len=2,
            max_seq_len=5,
            scale=1.0,
            split_kv=True,
            workspace=SplitKVWorkspace.allocate(1, 4, 64, DEVICE),
        )


# ---------------------------------------------------------------- store kernel


@pytest.mark.parametrize(
    "dtype,cache_dtype,block_size,num_kv_heads,head_dim",
    [
        (torch.float32, torch.float32, 16, 2, 64),
        (torch.float16, torch.float16, 32, 1, 128),
        (torch.bfloat16, torch.bfloat16, 64, 8, 128),  # a pure copy: bf16 is safe to interpret
        (torch.float32, torch.float16, 16, 3, 80),  # cast on store; heads and dim not pow2
    ],
)
def test_store_kv_cache_exact(launches, dtype, cache_dtype, block_size, num_kv_heads, head_dim):
    gen = torch.Generator().manual_seed(block_size)
    num_blocks, num_tokens = 5, 23
    qkv = torch.randn(num_tokens, num_kv_heads * 3, head_dim, generator=gen).to(DEVICE, dtype)
    k, v = qkv[:, :num_kv_heads], qkv[:, num_kv_heads : 2 * num_kv_heads]  # strided views
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(DEVICE)
    slots[[0, 7, 22]] = -1  # padding tokens are not stored
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(DEVICE, cache_dtype)
    v_cache = torch.randn(shape, generator=gen).to(DEVICE, cache_dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_cache(k, v, k_cache, v_cache, slots)
    store_kv_cache_torch(k, v, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    keep = slots >= 0
    stored = v_cache.view(-1, num_kv_heads, head_dim)[slots[keep]]
    assert torch.equal(stored, v[keep].to(cache_dtype))
    store_kv_cache(k, v, k_cache, v_cache, slots.int())  # int32 slot mappings work too
    assert torch.equal(k_cache, k_ref)


def test_store_then_attend_matches_torch_backend(launches):
    """The Triton backend end to end (store + attention) against the torch backend."""
    from engine.layers.attention import TorchAttentionBackend, TritonAttentionBackend

    pairs = [(4, 20), (1, 33)]
    batch = make_batch(
        pairs,
        num_kv_heads=2,
        group=2,
        head_dim=64,
        block_size=16,
        dtype=torch.float32,
        seed=9,
        poison=False,
    )
    m = batch.meta
    # The new tokens' slots: the last query_len positions of each sequence.
    slots = []
    for s, (query_len, seq_len) in enumerate(pairs):
        for pos in range(seq_len - query_len, seq_len):
            slots.append(int(m.block_tables[s, pos // 16]) * 16 + pos % 16)
    m.slot_mapping = torch.tensor(slots, device=DEVICE)
    k = torch.randn(len(slots), 2, 64, device=DEVICE)
    v = torch.randn(len(slots), 2, 64, device=DEVICE)
    caches = (batch.k_cache.clone(), batch.v_cache.clone())
    expected = TorchAttentionBackend().forward(batch.q, k, v, *caches, m, batch.scale)
    actual = TritonAttentionBackend().forward(
        batch.q, k, v, batch.k_cache, batch.v_cache, m, batch.scale
    )
    assert torch.equal(batch.k_cache, caches[0]) and torch.equal(batch.v_cache, caches[1])
    assert_close(actual, expected, torch.float32)


# ---------------------------------------------------------------- what the GPU compiler needs


@pytest.mark.parametrize("on_gpu", [False, True])
def test_launch_configs_keep_gpu_rules(on_gpu):
    """Every tile shape the engine can choose: powers of two, tl.dot dims >= 16, K+V tiles of a
    pipeline stage within 64 KiB of shared memory."""
    for group in range(1, 33):
        for head_dim in (32, 64, 80, 96, 128, 256):
            for max_query_len in (1, 2, 7, 64, 8192):
                for dtype in (torch.float32, torch.float16, torch.bfloat16):
                    c = choose_launch_config(
                        num_queries_per_kv=group,
                        head_dim=head_dim,
                        max_query_len=max_query_len,
                        num_seqs=4,
                        num_kv_heads=8,
                        dtype=dtype,
                        on_gpu=on_gpu,
                    )
                    for size in (c.block_m, c.tile, c.block_d):
                        assert _is_pow2(size) and size >= 16, c
                    assert c.block_q >= 1 and c.block_q * group <= c.block_m
                    assert c.block_d >= head_dim
                    elem = 2 if c.lowp_dot else 4
                    assert 2 * c.tile * c.block_d * elem <= 64 * 1024, c
                    assert c.lowp_dot == (on_gpu and dtype != torch.float32 and not _interpreting())
                    assert (c.num_segments > 1) == (max_query_len == 1)  # 4 x 8 programs


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def test_kernels_compile_for_sm90():
    """Compile the engine's launches (Qwen3-4B bf16 prefill/decode/split, fp16, fp32, store) to
    sm_90 cubins with Triton's bundled toolchain: no GPU needed, and the compiler's rules on
    tl.arange / tl.dot / shared memory are enforced for real."""
    nvidia = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not nvidia.exists():
        pytest.skip("this triton build ships no NVIDIA toolchain")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "engine.kernels.aot", "--arch", "90"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    infos = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    kernels = {info["kernel"] for info in infos}
    assert kernels == {
        "_paged_attention_kernel",
        "_merge_segments_kernel",
        "_store_kv_kernel",
        "_rms_norm_kernel",
        "_qk_rotary_kernel",
        "_silu_and_mul_kernel",
    }
    for info in infos:
        assert info["shared_bytes"] <= 232448, info  # sm_90 limit per block
        assert info["spill_bytes"] == 0, info
        if info["constexprs"].get("LOWP_DOT"):
            assert info["uses_tensor_cores"], info
    bf16_prefill = next(i for i in infos if i["label"] == "qwen3-4b bf16 prefill")
    assert bf16_prefill["constexprs"]["BLOCK_M"] == 128


# ---------------------------------------------------------------- on a real GPU


QWEN3_4B = dict(num_kv_heads=8, group=4, head_dim=128)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [16, 32, 64])
def test_gpu_bf16_mixed_batch_qwen3_4b(block_size):
    pairs = [(1, 1328), (5, 18), (129, 463), (300, 300), (1, 37), (64, 2000)]
    batch = make_batch(
        pairs,
        block_size=block_size,
        dtype=torch.bfloat16,
        seed=block_size,
        device="cuda",
        **QWEN3_4B,
    )
    ref = reference(batch)
    assert_close(run_kernel(batch), ref, torch.bfloat16)
    # The fp32-operand path (upcast after load) is available on the GPU too.
    config = AttentionLaunchConfig(
        block_m=64, block_q=16, tile=32, block_d=128, num_segments=1, lowp_dot=False
    )
    assert_close(run_kernel(batch, config=config), ref, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("seq_len", [1, 100, 4096, 32768])
def test_gpu_bf16_decode_split_kv(seq_len):
    pairs = [(1, seq_len), (1, max(1, seq_len // 3))]
    batch = make_batch(
        pairs, block_size=16, dtype=torch.bfloat16, seed=seq_len, device="cuda", **QWEN3_4B
    )
    ref = reference(batch)
    split = run_kernel(batch)  # 2 seqs x 8 KV heads: split-KV by default
    single = run_kernel(batch, split_kv=False)
    assert_close(split, ref, torch.bfloat16)
    assert_close(single, ref, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_store_kv_cache_exact_bf16():
    k = torch.randn(300, 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    slots = torch.randperm(64 * 16, device="cuda")[:300]
    slots[::7] = -1
    caches = [torch.randn(64, 16, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    refs = [c.clone() for c in caches]
    store_kv_cache(k, v, *caches, slots)
    store_kv_cache_torch(k, v, *refs, slots)
    assert torch.equal(caches[0], refs[0]) and torch.equal(caches[1], refs[1])


@pytest.mark.gpu
@pytest.mark.parametrize("split_kv", [True, False])
def test_gpu_decode_is_cuda_graph_capturable(split_kv):
    """Capture one decode step, then replay it with longer sequences and new block tables."""
    batch = make_batch(
        [(1, 40), (1, 700)],
        block_size=16,
        dtype=torch.bfloat16,
        seed=1,
        device="cuda",
        poison=False,
        **QWEN3_4B,
    )
    m = batch.meta
    workspace = SplitKVWorkspace.allocate(2, 32, 128, "cuda")
    out = torch.empty_like(batch.q)

    def step():
        paged_attention(
            batch.q,
            batch.k_cache,
            batch.v_cache,
            out,
            m.query_start_loc,
            m.seq_lens,
            m.block_tables,
            max_query_len=1,
            max_seq_len=0,
            scale=batch.scale,
            split_kv=split_kv,
            workspace=workspace,
        )

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seq_lens in ([41, 701], [200, 3]):
        m.seq_lens.copy_(torch.tensor(seq_lens))
        m.seq_lens_cpu = seq_lens
        m.block_tables.copy_(m.block_tables.roll(1, dims=0))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, reference(batch), torch.bfloat16)
