"""Streaming helpers: batch engine deltas into few websocket events, collect the answer, and
the stats line.

Chainlit sends one websocket event per `stream_token` call and the browser re-renders the
whole message on each, so per-token calls leave the page minutes behind on long answers.
Streamed outputs carry only what each step added (`delta_token_ids`, `delta_text`); the whole
answer is in the final output only, so a stopped answer is what its deltas add up to.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from app.chat.history import Answer

if TYPE_CHECKING:
    from engine.outputs import RequestOutput

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


class AnswerCollector:
    """Adds up a request's streamed outputs into the `Answer` the history keeps."""

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.pieces: list[str] = []
        self.final: RequestOutput | None = None

    def add(self, out: RequestOutput) -> None:
        self.token_ids += out.delta_token_ids
        if out.delta_text:
            self.pieces.append(out.delta_text)
        if out.finished:
            self.final = out

    def answer(self, finish_reason: str | None) -> Answer:
        """The whole answer: the final output's, or (stopped before it) the deltas so far."""
        final = self.final
        if final is not None:
            # A remote engine's final output has text but no token ids: its deltas had none either.
            return Answer(list(final.token_ids) or self.token_ids, final.text or "".join(self.pieces), finish_reason)
        return Answer(list(self.token_ids), "".join(self.pieces), finish_reason)


def answer_stats(out: RequestOutput, now: float) -> AnswerStats:
    """Stats of a finished (or stopped) request from its last RequestOutput."""
    first = out.first_token_time
    ttft = first - out.arrival_time if first is not None and out.arrival_time else None
    decode = now - first if first is not None else None
    return AnswerStats(
        prompt_tokens=out.num_prompt_tokens,
        cached_tokens=out.num_cached_tokens,
        generated_tokens=out.num_generated_tokens,  # known on every output, not only the final one
        ttft_s=ttft,
        decode_s=decode,
    )


def close_open_fence(text: str) -> str:
    """Close a code block left open by a stopped answer, so the stats line renders as text."""
    fences = sum(1 for line in text.splitlines() if line.lstrip().startswith("```"))
    return text + ("\n```" if fences % 2 else "")
