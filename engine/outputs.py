"""What the engine hands back: whole results for LLM, deltas for AsyncLLM streams, stats."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.kv_tiers import KVTierStats


@dataclass(frozen=True)
class CachedPrefix:
    """Where a request's cached prompt prefix came from at its first admission: tokens found in
    the device pool, the host tier and the disk tier (their sum is `num_cached_tokens`), and how
    long the request waited for its disk load (wall time from the load's start until the
    blocks were ready; 0 when nothing was loaded)."""

    device_tokens: int = 0
    host_tokens: int = 0
    disk_tokens: int = 0
    disk_load_seconds: float = 0.0


@dataclass
class RequestOutput:
    """One request's state after a step.

    Every output carries what this step added: `delta_token_ids`, `delta_text` and (when
    SamplingParams.logprobs asked for them) `delta_logprobs`. The whole answer, `token_ids`,
    `text` and `logprobs`, is filled in the final output only (`finished=True`); streamed
    outputs leave them empty, so a step costs the same at the 10th token as at the 100,000th.
    `error` is set (with finish_reason "error") when the request failed inside the engine.
    """

    request_id: str
    prompt_token_ids: list[int]
    text: str = ""  # final output only
    token_ids: list[int] = field(default_factory=list)  # final output only
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    num_cached_tokens: int = 0
    # The cached tokens by tier (None until the request is admitted, and from remote engines).
    cached_prefix: CachedPrefix | None = None
    error: str | None = None
    # Timing, seconds on time.monotonic(): when the request arrived and when it got its first token.
    arrival_time: float = 0.0
    first_token_time: float | None = None
    # Per generated token, the top log-probabilities asked for with SamplingParams.logprobs
    # (None when not asked): all of them in the final output, this step's in every output.
    logprobs: list[dict[int, float]] | None = None  # final output only
    delta_logprobs: list[dict[int, float]] | None = None
    # Prefill progress: prompt tokens whose KV is computed so far (for progress displays).
    num_computed_prompt_tokens: int = 0
    # Tokens generated so far (the final output's len(token_ids); known on every output).
    num_generated_tokens: int = 0
    # Final output of a request that ended on a stop token or stop string: that token id or
    # string (None otherwise; the API's `stop_reason` leaves out the checkpoint's EOS ids).
    stop_reason: int | str | None = None
    # With SamplingParams.prompt_logprobs, once the prompt is computed (every later output
    # carries it): per prompt token its top log-probabilities, None for the first token.
    prompt_logprobs: list[dict[int, float] | None] | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass
class EngineStats:
    """A snapshot of an engine's load and counters, for the UI, /metrics and benchmarks."""

    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    block_size: int
    prefix_cache_queries: int  # cacheable prompt tokens (full blocks) looked up at admission
    prefix_cache_hits: int  # of those, tokens found in the cache
    prompt_tokens_total: int
    generation_tokens_total: int
    requests_finished_total: int
    generation_tokens_per_s: float  # over the last few seconds
    # Prompt positions the model computed (not found in a cache tier nor copied from a running
    # sequence's block); a preempted request's recompute counts again.
    prompt_tokens_computed: int = 0
    kv_tiers: KVTierStats | None = None  # host and disk KV tiers' counters, when they are on

    @property
    def prefix_cache_hit_rate(self) -> float:
        return (
            self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
        )

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0
