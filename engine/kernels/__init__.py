"""Triton kernels of the engine: the paged KV store, paged attention and the fused layer ops."""

from engine.kernels.activation import silu_and_mul
from engine.kernels.rmsnorm import fused_add_rms_norm, rms_norm
from engine.kernels.rotary import qk_norm_rotary
from engine.kernels.store_kv import store_kv_cache
from engine.kernels.unified_attention import (
    DEFAULT_NUM_SEGMENTS,
    SPLIT_KV_MAX_PROGRAMS,
    AttentionLaunchConfig,
    SplitKVWorkspace,
    choose_launch_config,
    paged_attention,
)

__all__ = [
    "DEFAULT_NUM_SEGMENTS",
    "SPLIT_KV_MAX_PROGRAMS",
    "AttentionLaunchConfig",
    "SplitKVWorkspace",
    "choose_launch_config",
    "fused_add_rms_norm",
    "paged_attention",
    "qk_norm_rotary",
    "rms_norm",
    "silu_and_mul",
    "store_kv_cache",
]
