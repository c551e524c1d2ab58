"""Triton kernels of the engine: the paged KV store and paged attention."""

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
    "paged_attention",
    "store_kv_cache",
]
