"""Linear layers with checkpoint-aware weight loading.

Weights are stored [out_features, in_features] like Hugging Face checkpoints. A MergedLinear
runs several projections of the same input as one matmul (QKV, gate/up): fewer, larger kernels,
and each checkpoint tensor is copied straight into its row slice, never concatenated in memory.

On CPU the kernel for each (weight dtype, activation dtype) pair is chosen once, from what torch
reports about the CPU (engine.cpu_capability), and looked up per call:
  - oneDNN (`torch.ops.mkldnn._linear_pointwise`) for float32, and for bfloat16 where oneDNN
    computes it natively (AVX512-bf16, AMX): for the skinny batches of decoding it runs about
    twice as fast as the default BLAS call behind `F.linear`, on the same weights in place;
  - 16-bit weights with float32 activations (the CPU's "bf16 weights, float32 math"): the
    weights are up-cast in row blocks into a cache-sized float32 scratch buffer, each block
    multiplied as soon as it is converted, so memory streams only the 16-bit weights once;
    the result is the float32 product with the up-cast weights, exactly;
  - everything else (bfloat16 without native support, float16, float64): F.linear.

Prepacking (`Linear.prepack`, called once by the loader after the weights are in) stores each
bfloat16 weight in the layout its fastest kernel reads, dropping the dense copy (memory does not
grow):
  - the engine's own C kernels (engine.cpu_kernels: built for this CPU on first use) where they
    build: a 4-d packed tensor read by AVX512-BF16 / AMX / portable float32 loops; decode GEMVs
    stream the weight at close to memory speed, for bfloat16 and for float32 activations
    (bench/cpu_linear.py has the figures against oneDNN);
  - else, where the bfloat16 kernel is oneDNN, oneDNN's blocked layout
    (`torch.ops.mkldnn._reorder_linear_weight`): 1.5-1.6x faster than the dense weight at 1
    and 16 rows, bit for bit the same results.
`dense_weight()` gives the plain tensor back for the rare reader (tests). float32 is not
packed: no gain measured there.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from engine.cpu_capability import LinearKernel, cpu_capability
from engine.cpu_kernels import packed_bf16

# float32 bytes of weight up-cast per block: with the block split across the threads, each
# thread's share stays in its core's L2, so the converted block is multiplied from cache
# (0.5-4 MB measured on decode GEMVs, bench/cpu_linear.py: 2 MB best, 1 MB close).
UPCAST_BLOCK_BYTES = 2 << 20
# Above this many rows the matmul is compute-bound: one whole up-cast is amortised over the rows,
# and one oneDNN call beats re-reading the activations once per block.
UPCAST_BLOCKED_MAX_ROWS = 16

_scratch = threading.local()


def _scratch_buffer(numel: int) -> torch.Tensor:
    buf: torch.Tensor | None = getattr(_scratch, "buf", None)
    if buf is None or buf.numel() < numel:
        # A normal tensor even when first needed under inference_mode: an inference tensor
        # could not be written again by a caller outside it (LLM and tests run both ways).
        with torch.inference_mode(False):
            buf = torch.empty(numel, dtype=torch.float32)
        _scratch.buf = buf
    return buf[:numel]


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


def _float32_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    if cpu_capability().onednn_linear:
        return _onednn(x, weight, bias)
    return F.linear(x, weight, bias)


def linear_bf16_weight_f32_math(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [M, K] float32 times 16-bit weight [N, K] -> float32 [M, N], computed in float32.

    Equal to `F.linear(x, weight.float(), bias.float())`. For decode-sized M the weight is
    converted block by block into a reused scratch buffer that stays in cache; larger M (prefill)
    converts it whole once and makes one float32 call.
    """
    bias = None if bias is None else bias.float()
    rows_in, k = x.shape
    if rows_in > UPCAST_BLOCKED_MAX_ROWS:
        return _float32_linear(x, weight.float(), bias)
    n = weight.shape[0]
    block = max(16, UPCAST_BLOCK_BYTES // (4 * k))
    if block >= n:
        return _float32_linear(x, weight.float(), bias)
    out_t = torch.empty(n, rows_in, dtype=torch.float32)  # y^T: each block fills whole rows
    x_t = x.t()
    scratch = _scratch_buffer(block * k)
    for start in range(0, n, block):
        rows = min(block, n - start)
        w = scratch[: rows * k].view(rows, k)
        w.copy_(weight[start : start + rows])
        torch.mm(w, x_t, out=out_t[start : start + rows])
    out = out_t.t()
    if bias is not None:
        out = out + bias
    return out if rows_in == 1 else out.contiguous()


def _kernel_table() -> dict[tuple[torch.dtype, torch.dtype], LinearKernel]:
    cap = cpu_capability()
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    return {(w, x): cap.linear_kernel(w, x) for w in dtypes for x in dtypes}


# (weight dtype, activation dtype) -> kernel, for CPU tensors; decided once per process.
CPU_KERNELS = _kernel_table()


def can_prepack(weight: torch.Tensor) -> bool:
    """A weight the CPU bfloat16 oneDNN kernel would use, so worth reordering once at load."""
    return (
        weight.device.type == "cpu"
        and not weight.is_mkldnn
        and weight.dim() == 2
        and weight.dtype == torch.bfloat16
        and CPU_KERNELS.get((torch.bfloat16, torch.bfloat16)) is LinearKernel.ONEDNN
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def prepack_weight(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's blocked layout of a [N, K] bfloat16 weight (an opaque mkldnn tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)


def pack_for_cpu(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight in the layout of its fastest CPU kernel, or None to keep it dense."""
    if packed_bf16.can_pack(weight):
        return packed_bf16.pack(weight)
    if can_prepack(weight):
        return prepack_weight(weight)
    return None


def dense(weight: torch.Tensor) -> torch.Tensor:
    """A weight as a plain [out, in] tensor, whatever its packing (a copy when packed)."""
    if packed_bf16.is_packed(weight):
        return packed_bf16.unpack(weight)
    return weight.to_dense() if weight.is_mkldnn else weight


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ b), on the kernel CPU_KERNELS names for a 2-d CPU input; F.linear otherwise.

    A weight packed for the engine's C kernels (4-d) or for oneDNN (mkldnn) takes its kernel."""
    if packed_bf16.is_packed(weight):
        n = packed_bf16.out_features(weight)
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] == 0:
            return x.new_empty(*x.shape[:-1], n)
        out = packed_bf16.linear(flat, weight, bias)
        return out if x.dim() == 2 else out.view(*x.shape[:-1], n)
    if weight.is_mkldnn:  # prepacked: only ever built where the kernel is oneDNN
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] == 0:
            return x.new_empty(*x.shape[:-1], weight.shape[0])
        out = torch.ops.mkldnn._linear_pointwise(flat.contiguous(), weight, bias, "none", [], "")
        return out if x.dim() == 2 else out.view(*x.shape[:-1], weight.shape[0])
    if x.device.type == "cpu":
        kernel = CPU_KERNELS.get((weight.dtype, x.dtype), LinearKernel.TORCH)
        if kernel is LinearKernel.ONEDNN and x.dim() == 2 and x.shape[0] > 0:
            return _onednn(x, weight, bias)
        if kernel is LinearKernel.UPCAST:
            flat = x.reshape(-1, x.shape[-1])
            return linear_bf16_weight_f32_math(flat, weight, bias).view(
                *x.shape[:-1], weight.shape[0]
            )
    return F.linear(x, weight, bias)


def copy_checked(target: torch.Tensor, loaded: torch.Tensor, name: str) -> None:
    """Copy a checkpoint tensor into a parameter (slice), converting dtype and device."""
    if tuple(target.shape) != tuple(loaded.shape):
        raise ValueError(
            f"checkpoint tensor {name} has shape {tuple(loaded.shape)}, the model expects "
            f"{tuple(target.shape)}: config.json does not describe this checkpoint"
        )
    target.copy_(loaded)


class Linear(nn.Module):
    """y = x W^T (+ b); parameters allocated uninitialised, filled by the loader."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    @property
    def num_shards(self) -> int:
        return 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """The weight as a plain [out, in] tensor (a copy when it is prepacked)."""
        return dense(self.weight)

    @torch.no_grad()
    def prepack(self) -> bool:
        """Swap the weight for the packed form its fastest kernel reads (see the module
        docstring); True if done."""
        packed = pack_for_cpu(self.weight)
        if packed is None:
            return False
        self.weight = nn.Parameter(packed, requires_grad=False)
        return True

    @torch.no_grad()
    def load_weight(self, param_name: str, loaded: torch.Tensor, shard: int, name: str) -> None:
        if self.weight.is_mkldnn or packed_bf16.is_packed(self.weight):
            raise RuntimeError("weights are prepacked: load them before prepack()")
        copy_checked(getattr(self, param_name), loaded, name)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class MergedLinear(Linear):
    """Several projections of one input stacked along the output dim, loaded shard by shard."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False) -> None:
        super().__init__(in_features, sum(output_sizes), bias)
        self.output_sizes = list(output_sizes)

    @property
    def num_shards(self) -> int:
        return len(self.output_sizes)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Split an output [.., sum(output_sizes)] back into the per-projection views."""
        return y.split(self.output_sizes, dim=-1)

    @torch.no_grad()
    def load_weight(self, param_name: str, loaded: torch.Tensor, shard: int, name: str) -> None:
        offset = sum(self.output_sizes[:shard])
        target = getattr(self, param_name).narrow(0, offset, self.output_sizes[shard])
        copy_checked(target, loaded, name)
