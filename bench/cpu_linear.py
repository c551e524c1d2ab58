"""Decode-shaped CPU matmuls (GEMVs) per weight dtype and kernel, in GB/s of weight streamed.

    python -m bench.cpu_linear [--rows 1 4] [--repeats 200]

Side by side on the projections of Qwen3-0.6B (and two of Qwen3-4B):
  f32 onednn        float32 weights, oneDNN inner product (the float32 path of engine.layers.linear)
  bf16 onednn       bfloat16 weights and activations on oneDNN: only where oneDNN computes bf16
                    natively (AVX512-bf16, AMX); skipped elsewhere
  bf16 F.linear     bfloat16 weights and activations, torch's default CPU kernel
  bf16w f32 full    bfloat16 weights up-cast whole per call, float32 oneDNN on the copy
  bf16w f32 blocks  engine.layers.linear's former bf16-weight / float32-math kernel (up-cast in
                    row blocks into a cache-sized scratch buffer, float32 oneDNN per block)
  bf16 packed dnn   bfloat16 on oneDNN with the weight prepacked into its blocked layout
  bf16 own          the engine's C kernels on their packed layout (engine.cpu_kernels), bf16 x
  bf16w f32 own     the same packed bf16 weight with float32 activations (float32 math)
  f32x own avx2     that kernel as an AVX2 CPU builds it (x86-64-v3), run on this CPU
  bf16 own avx2     bf16 x on that AVX2 build (PAGECHAT_DTYPE=bfloat16 on such a CPU)

GB/s = bytes of the weight as stored / time: what bounds a decode step. The last column is the
speed relative to f32 onednn (time ratio; above 1 = faster). The kernel choice of the engine is not consulted:
every path runs here whatever the CPU, so an AVX512-bf16 machine can show what an AVX2 one
would pick.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from engine.cpu_capability import LinearKernel, cpu_capability
from engine.cpu_kernels import packed_bf16
from engine.cpu_kernels.build import load
from engine.cpu_malloc import keep_freed_memory
from engine.layers.linear import linear_bf16_weight_f32_math, prepack_weight

SHAPES = {  # name: (in_features, out_features)
    "0.6B qkv": (1024, 4096),
    "0.6B o": (2048, 1024),
    "0.6B gate_up": (1024, 6144),
    "0.6B down": (3072, 1024),
    "1024x3072": (1024, 3072),
    "4B gate_up": (2560, 19456),
    "4B down": (9728, 2560),
}


def onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def upcast_whole(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return onednn(x, w.float())


def time_paths(paths: dict[str, Callable[[], torch.Tensor]], calls: int) -> dict[str, float]:
    """Seconds per call of each path: calls interleaved round-robin, the 10th percentile kept
    (the CPU is shared: contention only ever adds time, and hits every path alike)."""
    for fn in paths.values():
        for _ in range(3):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(calls):
        for name, fn in paths.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: sorted(v)[len(v) // 10] for name, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    args = parser.parse_args()
    keep_freed_memory()  # as the engine does on CPU: no mmap/munmap per large temporary
    cap = cpu_capability()
    print(f"{cap.describe()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    header = f"{'shape':>13} {'M':>3} | " + " | ".join(
        f"{n:>16}"
        for n in (
            "f32 onednn",
            "bf16 onednn",
            "bf16 F.linear",
            "bf16w f32 full",
            "bf16w f32 blocks",
            "bf16 packed dnn",
            "bf16 own",
            "bf16w f32 own",
            "f32x own avx2",
            "bf16 own avx2",
        )
    )
    print(header)
    print("-" * len(header))
    onednn_bf16 = cap.linear_kernel(torch.bfloat16, torch.bfloat16) is LinearKernel.ONEDNN
    with torch.inference_mode():
        for name in args.shapes:
            k, n = SHAPES[name]
            w32 = torch.randn(n, k) / k**0.5
            w16 = w32.bfloat16()
            own = packed_bf16.pack(w16) if packed_bf16.can_pack(w16) else None
            dnn = prepack_weight(w16) if onednn_bf16 else None
            avx2 = load("x86-64-v3") if cap.isa.startswith("AVX") else None
            for m in args.rows:
                x32 = torch.randn(m, k)
                x16 = x32.bfloat16()
                paths: dict[str, tuple[Callable[[], torch.Tensor], int] | None] = {
                    "f32 onednn": (partial(onednn, x32, w32), 4),
                    "bf16 onednn": (partial(onednn, x16, w16), 2) if onednn_bf16 else None,
                    "bf16 F.linear": (partial(F.linear, x16, w16), 2),
                    "bf16w f32 full": (partial(upcast_whole, x32, w16), 2),
                    "bf16w f32 blocks": (partial(linear_bf16_weight_f32_math, x32, w16), 2),
                    "bf16 packed dnn": (partial(onednn, x16, dnn), 2) if dnn is not None else None,
                    "bf16 own": (partial(packed_bf16.linear, x16, own), 2)
                    if own is not None
                    else None,
                    "bf16w f32 own": (partial(packed_bf16.linear, x32, own), 2)
                    if own is not None
                    else None,
                    "f32x own avx2": (partial(packed_bf16.linear, x32, own, None, avx2), 2)
                    if own is not None and avx2 is not None
                    else None,
                    "bf16 own avx2": (partial(packed_bf16.linear, x16, own, None, avx2), 2)
                    if own is not None and avx2 is not None
                    else None,
                }
                runnable = {p: path[0] for p, path in paths.items() if path is not None}
                seconds = time_paths(runnable, args.calls)
                base = seconds["f32 onednn"]
                cells = []
                for p, path in paths.items():
                    if path is None:
                        cells.append(f"{'n/a':>16}")
                        continue
                    gbs = n * k * path[1] / seconds[p] / 1e9
                    cells.append(f"{gbs:6.1f} GB/s {base / seconds[p]:4.2f}x")
                print(f"{name:>13} {m:>3} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
