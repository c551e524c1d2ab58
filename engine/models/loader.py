"""Find a checkpoint (local directory or Hugging Face hub id) and load its safetensors weights.

Weights stream one tensor at a time from the memory-mapped safetensors files straight into the
model's (fused) parameters, already allocated on the target device in the target dtype: the
state dict is never materialised a second time. Everything that can be checked without reading
weights (config, presence of every shard) is checked first, and every failure names what is
missing and how to get it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from engine.cpu_capability import Precision, cpu_capability
from engine.cpu_kernels import packed_bf16
from engine.layers.attention import AttentionBackend
from engine.layers.embedding import VocabEmbedding
from engine.model_config import ModelConfig
from engine.models.qwen3 import Qwen3ForCausalLM

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
EXAMPLE_MODEL = "Qwen/Qwen3-4B-Instruct-2507"
# What a download fetches: configs, weights and tokenizer files, not other formats' weights.
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.jinja", "*.tiktoken"]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


class ModelNotFoundError(FileNotFoundError):
    """The checkpoint, or part of it, is not where it was looked for (the message says how to fix it)."""


def _how_to_get(repo_id: str = EXAMPLE_MODEL) -> str:
    return (
        f"Download it with `hf download {repo_id}` (huggingface_hub's CLI; "
        f"`huggingface-cli download {repo_id}` in older versions) on a machine with network "
        "access, or set PAGECHAT_MODEL to a local directory holding config.json, the tokenizer "
        "files and *.safetensors."
    )


# ---- where is the checkpoint ------------------------------------------------------------------


def resolve_model_path(model: str | Path) -> Path:
    """A local checkpoint directory, or a hub id resolved through the HF cache then a download."""
    text = str(model)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path} has no config.json: it is not a Hugging Face checkpoint directory. "
                + _how_to_get()
            )
        return path.resolve()
    if path.exists():
        raise ModelNotFoundError(f"{path} is a file; the model must be a checkpoint directory")
    if isinstance(model, Path) or not _HUB_ID.match(text):
        raise ModelNotFoundError(f"model directory {path} does not exist. " + _how_to_get())
    return _resolve_hub_id(text)


def _resolve_hub_id(repo_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download

    cached, cache_missing = _from_hub_cache(repo_id)
    if cached is not None and not cache_missing:
        return cached
    if cached is not None:
        where = (
            f"'{repo_id}' is only partly in the Hugging Face cache: {cached} lacks "
            f"{', '.join(cache_missing[:5])}"
        )
    else:
        where = (
            f"'{repo_id}' is not a local directory and is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE})"
        )
    if constants.HF_HUB_OFFLINE:
        raise ModelNotFoundError(
            f"{where}, and downloads are disabled (HF_HUB_OFFLINE=1). " + _how_to_get(repo_id)
        )
    logger.info("downloading %s from the Hugging Face hub into %s", repo_id, constants.HF_HUB_CACHE)
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS))
    except Exception as err:  # network, auth, missing repo: all end the same way for the user
        raise ModelNotFoundError(
            f"{where}, and downloading it failed ({_describe_hub_error(err)}). "
            + _how_to_get(repo_id)
        ) from err
    missing = _missing_checkpoint_files(path)
    if missing:
        raise ModelNotFoundError(
            f"the download of '{repo_id}' lacks {', '.join(missing[:5])}: it is not a "
            "safetensors Hugging Face checkpoint"
        )
    return path


def _from_hub_cache(repo_id: str) -> tuple[Path | None, list[str]]:
    """(cached snapshot or None, files it lacks); never touches the network."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(
            snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS, local_files_only=True)
        )
    except Exception as err:  # not cached, or (huggingface_hub >= 1.x) a partial snapshot
        snapshot = getattr(err, "snapshot_path", None)
        if snapshot:
            return Path(snapshot), ["files of an interrupted download"]
        return None, []
    return path, _missing_checkpoint_files(path)


def _describe_hub_error(err: Exception) -> str:
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    if isinstance(err, GatedRepoError):
        return "the repository is gated: accept its terms on huggingface.co and log in with `hf auth login`"
    if isinstance(err, RepositoryNotFoundError):
        return "no such repository on the hub, or it is private"
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, LocalEntryNotFoundError):
        return f"the hub could not be reached: {first_line.removeprefix('Got: ')}"
    return f"{type(err).__name__}: {first_line}"


def _missing_checkpoint_files(path: Path) -> list[str]:
    """Names of files a loadable checkpoint needs that `path` lacks (empty when complete)."""
    missing = [] if (path / "config.json").is_file() else ["config.json"]
    try:
        find_weight_files(path)
    except ModelNotFoundError:
        index = path / INDEX_FILE
        if index.is_file():
            missing += [f for f in _index_shards(index) if not (path / f).is_file()]
        else:
            missing.append(SINGLE_FILE)
    return missing


def _index_shards(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{index} is not a valid safetensors index ({err!r})") from None
    return sorted(set(weight_map.values()))


def find_weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint; every shard of a sharded one must be present."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        shards = _index_shards(index)
        missing = [f for f in shards if not (path / f).is_file()]
        if missing:
            raise ModelNotFoundError(
                f"{path} is missing {len(missing)} of the {len(shards)} weight shards listed in "
                f"{INDEX_FILE}: {', '.join(missing[:5])}"
                f"{' ...' if len(missing) > 5 else ''}. The download was interrupted or the "
                "directory is incomplete; download the checkpoint again. " + _how_to_get()
            )
        return [path / f for f in shards]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pytorch_bins = sorted(p.name for p in path.glob("*.bin"))
    extra = (
        f" It holds PyTorch .bin weights ({', '.join(pytorch_bins[:3])}), which this engine does "
        "not read: use a safetensors checkpoint."
        if pytorch_bins
        else ""
    )
    raise ModelNotFoundError(
        f"no weights in {path}: expected {SINGLE_FILE}, or {INDEX_FILE} with its shards.{extra} "
        + _how_to_get()
    )


# ---- reading weights --------------------------------------------------------------------------


def iter_weights(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of the files, one at a time, from memory-mapped files."""
    from safetensors import safe_open

    for file in files:
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as err:
            raise ValueError(f"cannot read {file}: not a valid safetensors file ({err})") from err
        with handle as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def resolve_precision(
    dtype: str | torch.dtype | Precision, config: ModelConfig, device: str
) -> Precision:
    """Weight and compute dtypes for a dtype setting (PAGECHAT_DTYPE) on `device`.

    'auto': on CUDA the checkpoint's dtype (float16 if the GPU lacks bf16); on CPU what
    `CpuCapability.auto_precision` says for the checkpoint's dtype: a bfloat16 checkpoint
    computes in bfloat16 where oneDNN does so natively, and elsewhere keeps its weights in
    bfloat16 with float32 math. A named dtype is used for weights and math alike, everywhere.
    """
    if isinstance(dtype, Precision):
        return dtype
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}")
        return Precision(dtype, dtype)
    if dtype == "auto":
        checkpoint = DTYPES[config.torch_dtype]
        if not str(device).startswith("cuda"):
            return cpu_capability().auto_precision(checkpoint)
        if checkpoint is torch.bfloat16 and not torch.cuda.is_bf16_supported():
            return Precision(torch.float16, torch.float16)
        return Precision(checkpoint, checkpoint)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {', '.join(DTYPES)}, got {dtype!r}")
    return Precision(DTYPES[dtype], DTYPES[dtype])


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig, device: str) -> torch.dtype:
    """The compute dtype (activations, KV cache) of `resolve_precision`."""
    return resolve_precision(dtype, config, device).compute_dtype


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_model(
    path: str | Path,
    config: ModelConfig,
    dtype: str | torch.dtype | Precision,
    device: str | torch.device,
    attention_backend: AttentionBackend,
    prepack: bool = True,
) -> Qwen3ForCausalLM:
    """Build Qwen3ForCausalLM on `device` and fill it from the checkpoint at `path`.

    `prepack`: on a CPU, store bfloat16 linear weights once in the layout of their fastest
    kernel: the engine's own C kernels where they build, else oneDNN's blocked layout where
    bfloat16 runs on oneDNN (see engine.layers.linear).

    Every parameter is allocated in the precision's weight dtype; activations run in its compute
    dtype (the embedding casts on lookup when the two differ, and the linear layers pick their
    kernel by the pair, see engine.layers.linear).
    """
    path = Path(path)
    precision = resolve_precision(dtype, config, str(device))
    files = find_weight_files(path)  # all shards present before any allocation or read
    with _default_dtype(precision.weight_dtype), torch.device(device):
        model = Qwen3ForCausalLM(config, attention_backend)
    for module in model.modules():
        if isinstance(module, VocabEmbedding):
            module.output_dtype = precision.compute_dtype
    model.load_weights(iter_weights(files))
    model.eval()
    if prepack and torch.device(device).type == "cpu":
        start = time.perf_counter()
        extra = model.prepack()
        own = sum(packed_bf16.is_packed(p) for p in model.parameters())
        onednn = sum(p.is_mkldnn for p in model.parameters())
        if own or onednn:
            logger.info(
                "packed %d weights for the engine's CPU kernels (%s) and %d for oneDNN "
                "in %.2f s (%.0f MB extra for the tied head)",
                own,
                packed_bf16.describe(),
                onednn,
                time.perf_counter() - start,
                extra / 1e6,
            )
    where = str(device)
    if torch.device(device).type == "cpu":
        where += f" ({cpu_capability().describe()})"
    setting = f"dtype {dtype}, " if isinstance(dtype, str) else ""
    logger.info(
        "loaded %s: %.2fB parameters, %s (%scheckpoint %s) on %s",
        path,
        sum(p.numel() for p in model.parameters()) / 1e9,
        precision.describe(),
        setting,
        config.torch_dtype,
        where,
    )
    return model
