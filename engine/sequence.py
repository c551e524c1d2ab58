"""One request as the scheduler sees it: its token ids, how many have KV in the cache, its blocks."""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch

    from engine.structured_output import GrammarState


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()  # holds no blocks; queued for (re-)admission
    RUNNING = enum.auto()  # holds blocks; scheduled every step it can progress
    FINISHED = enum.auto()  # blocks released; finish_reason says why


class Sequence:
    """Prompt plus generated token ids and the state the scheduler and block manager keep for them.

    `num_computed_tokens` counts the leading tokens whose KV is already in the cache (prefix-cache
    hits included); the next forward pass runs the tokens after it. Token ids only ever grow, so
    the block hashes memoized in `block_hashes` stay valid across preemptions.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self.token_ids: list[int] = list(self.prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.params = params
        # The request's own random stream when params.seed is set (sampler.make_generator).
        self.generator: torch.Generator | None = None
        # The request's grammar matcher when params.structured_output is set (the engine makes it).
        self.grammar: GrammarState | None = None
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        # Prefix-cache hit found when the prompt was first admitted (what users are told).
        self.num_cached_tokens = 0
        self.finish_reason: str | None = None
        # Chained hash of each full block of token_ids, filled lazily by the block manager.
        self.block_hashes: list[bytes] = []
        self.num_preemptions = 0
        self.admitted_once = False
        # The stop token id (or, set by the engine, the stop string) that finished it, if any.
        self.stop_reason: int | str | None = None
        # With params.prompt_logprobs: entry p is for prompt token p (None for the first one);
        # filled in order by the prefill, kept across preemptions.
        self.prompt_logprobs: list[dict[int, float] | None] | None = (
            [None] if params.prompt_logprobs is not None else None
        )
        # Ids the sampler must not pick before params.min_tokens tokens (set by the engine).
        self.min_tokens_banned: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})"
        )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        """A copy of the generated ids (O(n): for final results, penalties and tests)."""
        return self.token_ids[self.num_prompt_tokens :]

    def output_token_ids_from(self, index: int) -> list[int]:
        """Generated ids from the index-th on (O(new ids): for deltas)."""
        return self.token_ids[self.num_prompt_tokens + index :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Some prompt tokens still lack their log-probabilities."""
        return (
            self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens
        )

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
