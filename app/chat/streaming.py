"""Streaming helpers: batch engine deltas into few websocket events, and the stats line.

Chainlit sends one websocket event per `stream_token` call and the browser re-renders the
whole message on each, so per-token calls leave the page minutes behind on long answers.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

FLUSH_INTERVAL_S = 0.04


class Coalescer:
    """Collects text deltas and emits them at most every `interval` seconds."""

    def __init__(
        self,
        emit: Callable[[str], Awaitable[None]],
        interval: float = FLUSH_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.emit = emit
        self.interval = interval
        self.clock = clock
        self.buffer: list[str] = []
        self.last_flush = float("-inf")
        self.emits = 0

    async def add(self, text: str) -> None:
        if text:
            self.buffer.append(text)
        if self.buffer and self.clock() - self.last_flush >= self.interval:
            await self.flush()

    async def flush(self) -> None:
        if not self.buffer:
            return
        text = "".join(self.buffer)
        self.buffer.clear()
        self.last_flush = self.clock()
        self.emits += 1
        await self.emit(text)


@dataclass
class AnswerStats:
    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int
    ttft_s: float | None
    decode_s: float | None

    @property
    def tokens_per_s(self) -> float:
        if not self.decode_s or self.generated_tokens < 2:
            return 0.0
        return (self.generated_tokens - 1) / self.decode_s


def answer_stats(out, now: float) -> AnswerStats:
    """Stats of a finished (or stopped) request from its last RequestOutput."""
    first = out.first_token_time
    ttft = first - out.arrival_time if first is not None and out.arrival_time else None
    decode = now - first if first is not None else None
    return AnswerStats(
        prompt_tokens=out.num_prompt_tokens,
        cached_tokens=out.num_cached_tokens,
        # A remote engine's outputs carry text and usage counts, not token ids.
        generated_tokens=getattr(out, "completion_tokens", 0) or len(out.token_ids),
        ttft_s=ttft,
        decode_s=decode,
    )


def close_open_fence(text: str) -> str:
    """Close a code block left open by a stopped answer, so the stats line renders as text."""
    fences = sum(1 for line in text.splitlines() if line.lstrip().startswith("```"))
    return text + ("\n```" if fences % 2 else "")
