"""Helpers shared by engine tests: an HF greedy oracle and random prompts."""

from __future__ import annotations

import platform
import random
from functools import lru_cache
from pathlib import Path

import torch


def torch_reports_native_bf16() -> bool:
    """What torch says about bf16 here: oneDNN has bf16 kernels, and on x86 the CPU has
    AVX512-BF16 or AMX (oneDNN also has them, emulated, on plain AVX512)."""
    onednn = torch.backends.mkldnn.is_available() and bool(
        torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )
    if platform.machine().lower() in ("x86_64", "amd64"):
        return onednn and (
            torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        )
    return onednn


def random_prompts(lengths: list[int], seed: int = 0, vocab: int = 150_000) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(n)] for n in lengths]


@lru_cache(maxsize=4)
def hf_model(path: str):
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


@torch.inference_mode()
def hf_greedy(path: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation by full recomputation with transformers: the independent reference."""
    model = hf_model(str(path))
    ids = list(prompt)
    out = []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids + out]), use_cache=False, logits_to_keep=1).logits
        out.append(int(logits[0, -1].argmax()))
    return out


@torch.inference_mode()
def hf_last_logprobs(path: Path, ids: list[int]) -> torch.Tensor:
    model = hf_model(str(path))
    logits = model(torch.tensor([ids])).logits[0, -1].float()
    return torch.log_softmax(logits, dim=-1)
