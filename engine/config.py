"""Engine configuration: one pydantic-settings model, each field also read from PAGECHAT_<NAME>."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class EngineConfig(BaseSettings):
    """Everything the engine needs to start; keyword arguments override the environment."""

    model_config = SettingsConfigDict(
        env_prefix="PAGECHAT_", extra="ignore", protected_namespaces=()
    )

    model: str = Field("Qwen/Qwen3-4B-Instruct-2507", description="local directory or HF hub id")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="auto: the checkpoint's dtype on CUDA; on CPU bf16 where oneDNN computes it "
        "natively (AVX512-bf16, AMX), else bf16 weights with float32 math (float32 checkpoints "
        "stay float32). A named dtype is used for weights and math alike",
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    max_model_len: int | None = Field(None, description="defaults to the checkpoint's context")
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(2048, ge=1)
    block_size: int = Field(16, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    kv_cache_memory_gb: float = Field(2.0, gt=0.0, description="KV pool size on CPU")
    num_kv_blocks: int | None = Field(None, ge=1, description="override the computed KV pool size")
    enable_prefix_caching: bool = True
    attention_backend: Literal["auto", "triton", "torch"] = "auto"
    enforce_eager: bool = False
    async_output: bool | None = Field(
        None,
        description="emit each step's outputs (detokenized text, stop strings) while the next "
        "step runs on the device, one step later, as vLLM's async output processing does. "
        "Default: on for CUDA; off on the CPU, whose steps leave no idle device to overlap",
    )
    cpu_attention: Literal["auto", "float32", "native"] = Field(
        "auto",
        description="torch backend attention of 16-bit models: auto (decode in float32 math "
        "on the C kernel, prompts in the model's dtype), float32 (everything in float32: the "
        "bit-exact reference) or native (everything in the model's dtype)",
    )
    seed: int = 0
    kv_host_gb: float | None = Field(
        None,
        ge=0,
        description="host-memory KV tier for blocks evicted from the device pool (GiB; 0 = off). "
        "Default: on CUDA a quarter of RAM up to 32; on the CPU 0 (the pool is host memory)",
    )
    kv_disk_dir: Path | None = Field(
        None,
        description="disk KV tier directory (blocks outlive restarts); None = off. The server "
        "defaults it to <PAGECHAT_DATA_DIR>/kv-cache",
    )
    kv_disk_gb: float = Field(16.0, ge=0, description="disk KV tier cap (GiB; 0 = off)")

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"block_size must be a power of two, got {value}")
        return value

    @field_validator("kv_disk_dir", mode="before")
    @classmethod
    def _empty_is_off(cls, value: object) -> object:
        """PAGECHAT_KV_DISK_DIR= (empty) means unset, never the current directory."""
        return None if value == "" else value

    def resolved_device(self) -> str:
        import torch

        if self.device != "auto":
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_async_output(self) -> bool:
        if self.async_output is not None:
            return self.async_output
        return self.resolved_device().startswith("cuda")

    def resolved_attention_backend(self) -> str:
        if self.attention_backend != "auto":
            return self.attention_backend
        return "triton" if self.resolved_device().startswith("cuda") else "torch"
