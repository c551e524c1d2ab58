"""pagechat's inference engine: Qwen3 on paged KV blocks with continuous batching.

Public API: LLM, AsyncLLM, SamplingParams, EngineConfig, RequestOutput.
"""

from engine.config import EngineConfig
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["EngineConfig", "RequestOutput", "SamplingParams", "LLM", "AsyncLLM"]


def __getattr__(name: str) -> type:
    # LLM and AsyncLLM import torch and the model; keep `import engine` cheap for config users.
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    if name == "AsyncLLM":
        from engine.async_llm import AsyncLLM

        return AsyncLLM
    raise AttributeError(name)
