"""Compile the engine's C kernels for this CPU once, cache the library, load it with ctypes.

The kernels (packed_linear.c, paged_attention.c, prefill_attention.c, elementwise.c and
decoder_step.c, which chains them: one library) are plain C with OpenMP, built with `-O3 -march=native`, so the
compiler targets exactly the vector units this CPU has (AVX512-BF16 and AMX, AVX2, NEON). A
build takes about a second; the library is cached under the user's cache directory, keyed by a
digest of the source, the compiler and the instruction-set macros it defines for this CPU, so
a copied home directory on another CPU builds its own. Written to a temporary name and renamed:
concurrent processes never load a half-written file.

OpenMP: the library links `libgomp.so.1`, the soname torch's own bundled runtime is loaded
under, so the dynamic loader reuses torch's copy: one thread pool, no second runtime spinning
against it.

No compiler, or a build that fails: `load()` returns None with one warning naming the reason,
and the linear layers keep torch's kernels (engine.cpu_capability describes the choice).

PAGECHAT_KERNEL_MARCH builds for another `-march` target than this CPU (`x86-64-v3`: the
kernels an AVX2-only CPU builds; `make test-avx2` runs the suite so on an AVX512 machine).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

SOURCES = tuple(
    Path(__file__).with_name(name)
    for name in (
        "packed_linear.c",
        "paged_attention.c",
        "prefill_attention.c",
        "elementwise.c",
        "decoder_step.c",
    )
)
FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
BF16_MATH_ENV = "PAGECHAT_CPU_BF16_MATH"
MARCH_ENV = "PAGECHAT_KERNEL_MARCH"
# FMAs must beat vdpbf16ps by this much in multiply-adds a second: each FMA way also widens the
# weight (2 more vector operations per 64 bytes), and a close call would flip between starts.
FMA_MIN_ADVANTAGE = 1.25


def cache_dir() -> Path:
    """PAGECHAT_KERNEL_CACHE, else $XDG_CACHE_HOME/pagechat/cpu-kernels (~/.cache/...)."""
    explicit = os.environ.get("PAGECHAT_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pagechat" / "cpu-kernels"


def compiler() -> str | None:
    """$CC, else the first of cc, gcc, clang on PATH."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def kernel_march() -> str:
    """The `-march` the engine's kernels are built for: PAGECHAT_KERNEL_MARCH, else native."""
    return os.environ.get(MARCH_ENV, "").strip() or "native"


def target_macros(cc: str, march: str) -> str:
    """The instruction-set macros `-march=<march>` defines here (what the build depends on)."""
    out = subprocess.run(
        [cc, f"-march={march}", "-dM", "-E", "-x", "c", os.devnull],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    keep = ("__AVX", "__AMX", "__ARM_FEATURE", "__SSE", "__FMA", "__F16C", "__GNUC__", "__clang")
    return "\n".join(sorted(line for line in out.splitlines() if any(k in line for k in keep)))


def library_path(cc: str, march: str) -> Path:
    digest = hashlib.sha256()
    headers = ("bf16.h", "amx.h", "swiglu.h")
    for source in (*SOURCES, *(Path(__file__).with_name(h) for h in headers)):
        digest.update(source.read_bytes())
    digest.update(" ".join(FLAGS).encode())
    digest.update(target_macros(cc, march).encode())
    return cache_dir() / f"pagechat_kernels-{march}-{digest.hexdigest()[:16]}.so"


def _compile(cc: str, march: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        result = subprocess.run(
            [cc, *FLAGS, f"-march={march}", "-o", tmp, *map(str, SOURCES), "-lm"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            raise RuntimeError(result.stderr.strip()[-2000:] or f"{cc} exited {result.returncode}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(march: str | None = None) -> ctypes.CDLL | None:
    """The compiled kernel library (built on first use), or None where it cannot be built.

    `march`: the engine's is `kernel_march()` (native unless PAGECHAT_KERNEL_MARCH says
    otherwise); tests and benchmarks also build e.g. "x86-64-v3" (AVX2) to run the portable
    kernels of CPUs without AVX512-BF16 on this one."""
    return _load(march or kernel_march())


@functools.cache
def _load(march: str) -> ctypes.CDLL | None:
    import torch  # noqa: F401  (torch's libgomp must be loaded first: see the module docstring)

    cc = compiler()
    if cc is None:
        logger.warning(
            "no C compiler (cc, gcc or clang) found: CPU linear layers use torch's kernels"
        )
        return None
    if march != "native" and march == kernel_march():
        _check_target(cc, march)
    try:
        path = library_path(cc, march)
        if not path.exists():
            _compile(cc, march, path)
            logger.info("compiled the CPU kernels with %s into %s", cc, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        logger.warning(
            "could not build the CPU kernels (%s): linear layers use torch's kernels", err
        )
        return None
    _declare(lib)
    if lib.pc_init() != 0:  # AMX permission refused (old kernel): the AMX path must not run
        logger.warning("the kernel refused AMX tile data: CPU kernels left unused")
        return None
    choose_bf16_math(lib)
    return lib


def _check_target(cc: str, march: str) -> None:
    """A PAGECHAT_KERNEL_MARCH the compiler rejects is an error, not a silent fallback."""
    try:
        target_macros(cc, march)
    except subprocess.CalledProcessError as err:
        reason = (err.stderr or "").strip().splitlines()
        raise ValueError(
            f"{MARCH_ENV}={march!r}: {cc} rejects -march={march}"
            + (f" ({reason[0]})" if reason else "")
        ) from err


def choose_bf16_math(lib: ctypes.CDLL) -> None:
    """AVX512-BF16 without AMX: multiply with vdpbf16ps, or with float32 FMAs on the bf16 pairs
    widened in registers where this CPU runs FMAs that much faster (PAGECHAT_CPU_BF16_MATH:
    auto, dot or fma); the matmuls and the prompt attention follow the choice. Measured, not looked up: CPUs with the same flags differ (a Zen 5 runs
    vdpbf16ps at twice its FMA rate in multiply-adds, an Intel Xeon here at half)."""
    choice = os.environ.get(BF16_MATH_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "dot", "fma"):
        raise ValueError(f"{BF16_MATH_ENV} must be auto, dot or fma, got {choice!r}")
    rates = (ctypes.c_double * 2)()
    if lib.pc_measure_bf16_math(rates) != 0:  # AMX, or no AVX512-BF16: nothing to choose
        return
    dot, fma = rates[0], rates[1]
    use_fma = choice == "fma" or (choice == "auto" and fma > FMA_MIN_ADVANTAGE * dot)
    lib.pc_set_bf16_fma(int(use_fma))
    logger.info(
        "bf16 matmuls and prompt attention: %s (%s; one core: vdpbf16ps %.0f GMAC/s, float32 FMA %.0f GFMA/s)",
        "float32 FMAs on widened bf16" if use_fma else "vdpbf16ps",
        f"{BF16_MATH_ENV}={choice}",
        dot / 1e9,
        fma / 1e9,
    )


def _declare(lib: ctypes.CDLL) -> None:
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.pc_kernel_level.restype = i32
    lib.pc_kernel_level.argtypes = []
    lib.pc_init.restype = i32
    lib.pc_init.argtypes = []
    lib.pc_set_bf16_fma.restype = None
    lib.pc_set_bf16_fma.argtypes = [i32]
    lib.pc_bf16_fma.restype = i32
    lib.pc_bf16_fma.argtypes = []
    lib.pc_measure_bf16_math.restype = i32
    lib.pc_measure_bf16_math.argtypes = [ptr]
    lib.pc_linear_bf16.restype = None
    lib.pc_linear_bf16.argtypes = [ptr, ptr, ptr, i64, i64, i64, i32, i64]
    lib.pc_linear_swiglu_bf16.restype = i32
    lib.pc_linear_swiglu_bf16.argtypes = [ptr, ptr, ptr, i64, i64, i64, i32, i64]
    lib.pc_widen_any_rows.restype = i32
    lib.pc_widen_any_rows.argtypes = []
    lib.pc_linear_bf16w_f32.restype = None
    lib.pc_linear_bf16w_f32.argtypes = [ptr, ptr, ptr, i64, i64, i64, i32]
    lib.pc_paged_decode_attention.restype = i32
    lib.pc_paged_decode_attention.argtypes = [
        *(ptr, ptr, ptr, ptr, ptr, ptr),  # q, out, q_rows, k_cache, v_cache, block_tables
        *(i64, ptr, i64),  # table_stride, seq_lens, num_seqs
        *(i64, i64, i64, i64),  # q_heads, kv_heads, head_dim, block_size
        ctypes.c_float,
        *(i32, i32),  # is_bf16, threads
    ]
    lib.pc_prefill_attention_level.restype = i32
    lib.pc_prefill_attention_level.argtypes = []
    lib.pc_paged_prefill_attention.restype = i32
    lib.pc_paged_prefill_attention.argtypes = [
        *(ptr, i64, ptr, i64, i64),  # q, q_stride, out, out_stride, query_len
        *(ptr, ptr, ptr, i64),  # k_cache, v_cache, block_table, seq_len
        *(i64, i64, i64, i64),  # q_heads, kv_heads, head_dim, block_size
        ctypes.c_float,
        i32,  # threads
    ]
    lib.pc_decoder_decode_bf16.restype = i32
    lib.pc_decoder_decode_bf16.argtypes = [
        ptr,  # hidden
        *(i64, i64, i64, i64, i64, i64, i64),  # m, layers, hidden, q_heads, kv_heads, d, inter
        *(ptr, ptr, i64),  # layer params, final norm, block_size
        *(ptr, ptr, i64),  # cos, sin, cs_stride
        *(ptr, ptr, i64, ptr),  # slots, block_tables, table_stride, seq_lens
        *(ctypes.c_float, ctypes.c_float, i64, i32),  # eps, scale, amx_min_rows, threads
    ]
    lib.pc_decoder_decode_f32.restype = i32
    lib.pc_decoder_decode_f32.argtypes = [
        ptr,  # hidden
        *(i64, i64, i64, i64, i64, i64, i64),  # m, layers, hidden, q_heads, kv_heads, d, inter
        *(ptr, ptr, i64),  # layer params, final norm, block_size
        *(ptr, ptr, i64),  # cos, sin, cs_stride
        *(ptr, ptr, i64, ptr),  # slots, block_tables, table_stride, seq_lens
        *(ctypes.c_float, ctypes.c_float, i32),  # eps, scale, threads
    ]
    f32 = ctypes.c_float
    lib.pc_add_rms_norm_bf16.restype = None
    lib.pc_add_rms_norm_bf16.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, f32, i32]
    lib.pc_qk_norm_rotary_bf16.restype = None
    lib.pc_qk_norm_rotary_bf16.argtypes = [
        *(ptr, i64, ptr, i64),  # q, q_stride, k, k_stride
        *(ptr, ptr, i64),  # cos, sin, cs_stride
        *(ptr, ptr, ptr, ptr),  # q_w, k_w, q_out, k_out
        *(i64, i64, i64, i64),  # tokens, q_heads, kv_heads, d
        f32,
        i32,
    ]
    lib.pc_silu_and_mul_bf16.restype = None
    lib.pc_silu_and_mul_bf16.argtypes = [ptr, ptr, i64, i64, i32]
    lib.pc_add_rms_norm_f32.restype = None
    lib.pc_add_rms_norm_f32.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, f32, i32]
    lib.pc_qk_norm_rotary_f32.restype = None
    lib.pc_qk_norm_rotary_f32.argtypes = lib.pc_qk_norm_rotary_bf16.argtypes
    lib.pc_silu_and_mul_f32.restype = None
    lib.pc_silu_and_mul_f32.argtypes = [ptr, ptr, i64, i64, i32]
