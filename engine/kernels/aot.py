"""Compile the engine's Triton kernels for a CUDA architecture on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1) runs kernels on the CPU but ignores the GPU compiler's rules:
power-of-two `tl.arange`, `tl.dot` dimensions >= 16, shared memory per block, register spills.
Triton's wheel ships the whole NVIDIA toolchain (MLIR passes and ptxas), so the same launches the
host wrappers plan can be compiled to a cubin here, and the resource use read back.

    python -m engine.kernels.aot            # JSON lines, one per representative launch
    python -m engine.kernels.aot --arch 80

Must run with TRITON_INTERPRET unset (the interpreter replaces @triton.jit functions).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import torch
import triton

from engine.kernels.activation import plan_silu_and_mul
from engine.kernels.launch import KernelLaunch
from engine.kernels.rmsnorm import plan_rms_norm
from engine.kernels.rotary import plan_qk_rotary
from engine.kernels.store_kv import plan_store_kv_cache
from engine.kernels.unified_attention import choose_launch_config, plan_paged_attention

# Largest dynamic shared memory one block may use, by compute capability (CUDA guide, table 21).
MAX_SHARED_BYTES = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


@dataclass
class CompiledKernelInfo:
    label: str
    kernel: str
    arch: int
    constexprs: dict
    num_warps: int
    num_stages: int
    shared_bytes: int  # dynamic shared memory of one block
    registers: int  # per thread
    spill_bytes: int  # ptxas local memory per thread (register spills)
    uses_tensor_cores: bool  # wgmma (sm90) or mma.sync in the PTX


_POINTER_TYPES = {
    torch.float32: "*fp32",
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.int32: "*i32",
    torch.int64: "*i64",
}


def _signature(launch: KernelLaunch) -> tuple[dict, dict, dict]:
    """Signature, constexprs and attributes as Triton's launcher specialises them: integers equal
    to 1 become constants, and pointers and integers divisible by 16 are marked as such."""
    kernel = launch.kernel
    do_not_specialize = {kernel.arg_names[p.num] for p in kernel.params if p.do_not_specialize}
    signature: dict[str, str] = {}
    constexprs: dict[tuple[int], object] = {}
    attrs: dict[tuple[int], list] = {}
    for index, name in enumerate(kernel.arg_names):
        if name in launch.constexprs:
            signature[name] = "constexpr"
            constexprs[(index,)] = launch.constexprs[name]
            continue
        arg = launch.args[name]
        specialize = name not in do_not_specialize
        aligned = False
        if isinstance(arg, torch.Tensor):
            signature[name] = _POINTER_TYPES[arg.dtype]
            aligned = arg.data_ptr() % 16 == 0
        elif isinstance(arg, bool):
            signature[name] = "i1"
        elif isinstance(arg, int):
            if arg == 1 and specialize:
                signature[name] = "constexpr"
                constexprs[(index,)] = 1
                continue
            signature[name] = "i32" if -(2**31) <= arg < 2**31 else "i64"
            aligned = arg % 16 == 0
        elif isinstance(arg, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"argument {name} has unsupported type {type(arg).__name__}")
        if aligned and specialize:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def compile_launch(label: str, launch: KernelLaunch, arch: int = 90) -> CompiledKernelInfo:
    """Compile one planned launch to a cubin for sm_<arch> and report its resource use."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    if not isinstance(launch.kernel, JITFunction):
        raise RuntimeError("ahead-of-time compilation needs TRITON_INTERPRET unset")
    signature, constexprs, attrs = _signature(launch)
    source = ASTSource(launch.kernel, signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options=dict(launch.options)
    )
    registers, spill = _resource_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    return CompiledKernelInfo(
        label=label,
        kernel=launch.name,
        arch=arch,
        constexprs=dict(launch.constexprs),
        num_warps=compiled.metadata.num_warps,
        num_stages=compiled.metadata.num_stages,
        shared_bytes=compiled.metadata.shared,
        registers=registers,
        spill_bytes=spill,
        uses_tensor_cores="wgmma.mma_async" in ptx or "mma.sync" in ptx,
    )


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, local bytes) of the cubin's kernel, from the bundled cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        report = subprocess.run(
            [tool, "-res-usage", path], capture_output=True, text=True, check=True
        ).stdout
    registers = re.search(r"REG:(\d+)", report)
    local = re.search(r"LOCAL:(\d+)", report)
    if registers is None or local is None:
        raise RuntimeError(f"unexpected cuobjdump output: {report!r}")
    return int(registers.group(1)), int(local.group(1))


def _attention_launches(
    label: str,
    *,
    dtype: torch.dtype,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    query_lens: list[int],
    split_kv: bool | None = None,
) -> list[tuple[str, KernelLaunch]]:
    """Plan attention for a batch shape as a GPU would (tensors stay small CPU placeholders)."""
    num_tokens = sum(query_lens)
    num_seqs = len(query_lens)
    q = torch.empty(num_tokens, num_heads, head_dim, dtype=dtype)
    cache = torch.empty(4, block_size, num_kv_heads, head_dim, dtype=dtype)
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    max_query_len = max(query_lens)
    config = choose_launch_config(
        num_queries_per_kv=num_heads // num_kv_heads,
        head_dim=head_dim,
        max_query_len=max_query_len,
        num_seqs=num_seqs,
        num_kv_heads=num_kv_heads,
        dtype=dtype,
        on_gpu=True,
        split_kv=split_kv,
    )
    launches = plan_paged_attention(
        q,
        cache,
        cache,
        torch.empty_like(q),
        starts,
        torch.ones(num_seqs, dtype=torch.int32),
        torch.zeros(num_seqs, 4, dtype=torch.int32),
        max_query_len=max_query_len,
        scale=head_dim**-0.5,
        config=config,
    )
    return [(label, launch) for launch in launches]


def _fused_op_launches(
    label: str,
    *,
    dtype: torch.dtype,
    num_tokens: int,
    hidden: int,
    intermediate: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> list[tuple[str, KernelLaunch]]:
    """The fused layer ops of one model shape, laid out as the Qwen3 forward calls them."""
    x = torch.empty(num_tokens, hidden, dtype=dtype)
    weight = torch.empty(hidden, dtype=dtype)
    launches = [(f"{label} rmsnorm", launch) for launch in plan_rms_norm(x, weight, 1e-6, x)]
    launches += [
        (f"{label} add+rmsnorm", launch)
        for launch in plan_rms_norm(x, weight, 1e-6, torch.empty_like(x), x, x)
    ]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = torch.empty(num_tokens, q_size + 2 * kv_size, dtype=dtype)
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = q.reshape(num_tokens, num_heads, head_dim)
    k = k.reshape(num_tokens, num_kv_heads, head_dim)
    cos, sin = torch.empty(num_tokens, 1, head_dim, dtype=torch.float32).chunk(2, dim=-1)
    norm_weight = torch.empty(head_dim, dtype=dtype)
    q_out, k_out = torch.empty(q.shape, dtype=dtype), torch.empty(k.shape, dtype=dtype)
    launches += [
        (f"{label} q/k norm+rotary", launch)
        for launch in plan_qk_rotary(q, k, cos, sin, q_out, k_out, norm_weight, norm_weight)
    ]
    launches += [
        (f"{label} rotary", launch) for launch in plan_qk_rotary(q, k, cos, sin, q_out, k_out)
    ]
    gate_up = torch.empty(num_tokens, 2 * intermediate, dtype=dtype)
    act = torch.empty(num_tokens, intermediate, dtype=dtype)
    launches += [(f"{label} silu_and_mul", launch) for launch in plan_silu_and_mul(gate_up, act)]
    return launches


def standard_launches() -> list[tuple[str, KernelLaunch]]:
    """Launches the engine makes: Qwen3-4B shapes in bf16, plus fp16/fp32 and other head dims."""
    qwen3_4b: dict[str, Any] = dict(num_heads=32, num_kv_heads=8, head_dim=128, block_size=16)
    launches = []
    launches += _attention_launches(
        "qwen3-4b bf16 prefill", dtype=torch.bfloat16, query_lens=[2048, 1, 1], **qwen3_4b
    )
    launches += _attention_launches(
        "qwen3-4b bf16 decode x64", dtype=torch.bfloat16, query_lens=[1] * 64, **qwen3_4b
    )
    launches += _attention_launches(
        "qwen3-4b bf16 decode x1 split", dtype=torch.bfloat16, query_lens=[1], **qwen3_4b
    )
    launches += _attention_launches(
        "group 8 fp16 head_dim 64 prefill",
        dtype=torch.float16,
        num_heads=16,
        num_kv_heads=2,
        head_dim=64,
        block_size=64,
        query_lens=[300, 7],
    )
    launches += _attention_launches(
        "fp32 head_dim 128 prefill",
        dtype=torch.float32,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        block_size=32,
        query_lens=[512],
    )
    launches += _attention_launches(
        "tiny fp32 head_dim 32 decode split",
        dtype=torch.float32,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        block_size=16,
        query_lens=[1, 1],
    )
    k = torch.empty(64, 8, 128, dtype=torch.bfloat16)
    cache = torch.empty(4, 16, 8, 128, dtype=torch.bfloat16)
    slots = torch.zeros(64, dtype=torch.int64)
    launches += [
        ("qwen3-4b bf16 store", launch) for launch in plan_store_kv_cache(k, k, cache, cache, slots)
    ]
    launches += _fused_op_launches(
        "qwen3-4b bf16",
        dtype=torch.bfloat16,
        num_tokens=64,
        hidden=2560,
        intermediate=9728,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
    )
    launches += _fused_op_launches(
        "qwen3-0.6b fp16",
        dtype=torch.float16,
        num_tokens=64,
        hidden=1024,
        intermediate=3072,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
    )
    launches += _fused_op_launches(
        "fp32 head_dim 64 hidden 8192",
        dtype=torch.float32,
        num_tokens=7,
        hidden=8192,
        intermediate=1000,
        num_heads=12,
        num_kv_heads=3,
        head_dim=64,
    )
    return launches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    args = parser.parse_args(argv)
    for label, launch in standard_launches():
        info = compile_launch(label, launch, args.arch)
        print(json.dumps(asdict(info)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
