"""bfloat16 weights in the packed layout of packed_linear.c, and the matmuls that read it.

A packed weight is a 4-d tensor [N / 16, K / 2, 16, 2] holding W[N, K]: 16 output columns by
2 consecutive k per 64-byte row (see packed_linear.c for why one layout serves every kernel).
Being 4-d is what marks it: the linear layers dispatch on `is_packed`. The model keeps only
this copy; `unpack` gives the dense [N, K] view back (a copy) for readers such as tests.

Kernels by activation dtype and rows M:
  bfloat16 x: with AMX, AMX tiles for every M: as fast as the few-rows kernel at one row
              (both stream the weight at memory speed) and faster from a few rows on, and each
              output row is summed the same way whatever the other rows, so a request's
              result does not depend on its batch mates. With AVX512-BF16 but no AMX (AMD
              Zen 4/5) the few-rows kernel below 8 rows, from 8 on register tiles of the same
              vdpbf16ps sums (6 rows x 4 blocks, columns in L2-sized groups): the same bits
              for any M, so batch-invariant too, and faster than oneDNN on a dense copy.
              Without AVX512-BF16, where the build widens any rows (AVX2, AVX-512): below 8
              rows the portable float32 loop widening x as it reads, from 8 on x widened to a
              float32 copy in C and run through the float32 register kernels below, each
              output rounded once to bf16 (the same sums, so the same bits at any M; AVX2
              1.1-1.35x the loop at 8-128 rows, AVX-512 without BF16 2.2x). Other builds
              (NEON, generic): the portable loop up to WIDEN_MAX_ROWS rows, above it torch's
              matmul on the dense weight;
  float32 x:  the C widening kernel. AVX-512 and AVX2 builds run it at every row count (their
              register kernels: AVX-512's 1.2-3.9x torch's float32 matmul on a dense copy at
              64-512 rows and 0.9-1.03x at 2,048; AVX2's panel kernel 1.3-2.5x and 0.9-1.1x,
              against MKL and oneDNN capped at AVX2), so a row's bits do not depend on its
              batch. Other builds (NEON, generic) up to WIDEN_MAX_ROWS rows (decode: bytes
              bound), above it one dense float32 copy of the weight and torch's float32 matmul
              (prefill: math bound; the copy is amortised over the rows).
"""

from __future__ import annotations

import ctypes
import functools

import torch

from engine.cpu_kernels.build import load

BLOCK_COLS = 16
# From this many rows on, AMX (where the CPU has it) rather than the few-rows kernel: from the
# first, as fast at one row (0.6B shapes: 19-27 GB/s both) and batch-invariant.
AMX_MIN_ROWS = 1
# Above this many rows the float32-activation path (and the portable bf16 one) multiplies a
# dense copy of the weight instead, except where the build widens at any row count
# (`widens_any_rows`: AVX-512 and AVX2 builds). The portable loop's rows cost it a pass over the
# weights each 4 rows, and the dense copy costs its bytes on every call.
WIDEN_MAX_ROWS = 64


@functools.cache
def kernel_level(lib: ctypes.CDLL | None = None) -> int:
    """0: portable C; 1: AVX512-BF16; 2: AVX512-BF16 and AMX; -1: no library (not built).
    `lib`: another build."""
    lib = lib or load()
    return -1 if lib is None else int(lib.pc_kernel_level())


def describe() -> str:
    level = kernel_level()
    if level == 1 and uses_fma():
        return "AVX512-BF16 layout, float32 FMA math (PAGECHAT_CPU_BF16_MATH)"
    return {
        -1: "unavailable (torch's kernels)",
        0: "portable C (float32 math)",
        1: "AVX512-BF16",
        2: "AVX512-BF16 + AMX",
    }[level]


def uses_fma() -> bool:
    """Level 1 multiplying with float32 FMAs on widened pairs rather than vdpbf16ps (chosen
    when the library loads: engine.cpu_kernels.build.choose_bf16_math)."""
    lib = load()
    return lib is not None and bool(lib.pc_bf16_fma())


def can_pack(weight: torch.Tensor) -> bool:
    """A 2-d bfloat16 CPU weight whose shape the kernels take, with the library built."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and weight.dim() == 2
        and not weight.is_mkldnn
        and weight.shape[0] % BLOCK_COLS == 0
        and weight.shape[1] % 32 == 0
        and kernel_level() >= 0
    )


def pack(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] bfloat16 -> packed [N / 16, K / 2, 16, 2] (a new tensor)."""
    n, k = weight.shape
    return (
        weight.detach()
        .reshape(n // BLOCK_COLS, BLOCK_COLS, k // 2, 2)
        .permute(0, 2, 1, 3)
        .contiguous()
    )


def is_packed(weight: torch.Tensor) -> bool:
    return weight.dim() == 4


def out_features(packed: torch.Tensor) -> int:
    return packed.shape[0] * BLOCK_COLS


def in_features(packed: torch.Tensor) -> int:
    return packed.shape[1] * 2


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """The dense [N, K] weight (a copy)."""
    return packed.permute(0, 2, 1, 3).reshape(out_features(packed), in_features(packed))


def rows(packed: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of the dense weight, [len(ids), K]: the embedding lookup of a packed table."""
    return packed[ids // BLOCK_COLS, :, ids % BLOCK_COLS].reshape(ids.shape[0], in_features(packed))


def c_kernel_serves_bf16(rows: int, lib: ctypes.CDLL | None = None) -> bool:
    """pc_linear_bf16 multiplies `rows` bf16 rows itself: any count with AVX512-BF16 (AMX or
    not) or float32 register kernels (AVX2, AVX-512), up to WIDEN_MAX_ROWS with the portable
    loop alone."""
    return rows <= WIDEN_MAX_ROWS or kernel_level(lib) >= 1 or widens_any_rows(lib)


@functools.cache
def widens_any_rows(lib: ctypes.CDLL | None = None) -> bool:
    """The build's float32-activation kernel serves every row count (AVX-512, AVX2: as fast as
    the dense copy at prompt sizes or faster); else only up to WIDEN_MAX_ROWS. `lib`: another
    build."""
    lib = lib or load()
    return lib is not None and bool(lib.pc_widen_any_rows())


def c_kernel_serves_float32(rows: int, lib: ctypes.CDLL | None = None) -> bool:
    """pc_linear_bf16w_f32 multiplies `rows` float32 rows (no dense fallback)."""
    return rows <= WIDEN_MAX_ROWS or widens_any_rows(lib)


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    bias: torch.Tensor | None = None,
    lib: ctypes.CDLL | None = None,
) -> torch.Tensor:
    """x [M, K] (bfloat16 or float32, contiguous) times the packed weight -> [M, N] in x's dtype.

    `lib`: another build of the kernels (tests and benchmarks); this CPU's own by default."""
    lib = lib or load()
    assert lib is not None, "packed weights exist only where the kernels were built"
    m, k = x.shape
    n = out_features(packed)
    if k != in_features(packed):
        raise ValueError(f"input has {k} features, the packed weight expects {in_features(packed)}")
    x = x.contiguous()
    threads = torch.get_num_threads()
    if x.dtype == torch.bfloat16 and c_kernel_serves_bf16(m, lib):
        out = torch.empty(m, n, dtype=torch.bfloat16)
        lib.pc_linear_bf16(_ptr(x), _ptr(packed), _ptr(out), m, n, k, threads, AMX_MIN_ROWS)
    elif x.dtype == torch.float32 and c_kernel_serves_float32(m, lib):
        out = torch.empty(m, n, dtype=torch.float32)
        lib.pc_linear_bf16w_f32(_ptr(x), _ptr(packed), _ptr(out), m, n, k, threads)
    elif x.dtype == torch.float32:
        out = torch.nn.functional.linear(x, unpack(packed).float())
    elif x.dtype == torch.bfloat16:
        out = torch.nn.functional.linear(x, unpack(packed))
    else:
        raise TypeError(f"packed bfloat16 weights take bfloat16 or float32 inputs, not {x.dtype}")
    if bias is not None:
        out += bias.to(out.dtype)
    return out


def linear_swiglu(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up of x [M, K] bfloat16 times a packed [gate | up] weight, in one pass (the
    matmul writes silu(gate) * up from its own tiles: the same bits as `linear` then the SiLU
    kernel, without the 2x wider intermediate). None where this CPU or batch has no such kernel
    (no AVX512-BF16; without AMX, fewer than 8 rows): the caller runs the two steps."""
    lib = load()
    if lib is None or x.dtype != torch.bfloat16 or kernel_level() < 1:
        return None
    m, k = x.shape
    n = out_features(packed)
    if k != in_features(packed) or n % (2 * BLOCK_COLS):
        return None
    x = x.contiguous()
    out = torch.empty(m, n // 2, dtype=torch.bfloat16)
    status = lib.pc_linear_swiglu_bf16(
        _ptr(x), _ptr(packed), _ptr(out), m, n // 2, k, torch.get_num_threads(), AMX_MIN_ROWS
    )
    return out if status == 0 else None
