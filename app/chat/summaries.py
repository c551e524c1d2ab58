"""Whole-document questions over an over-context document, answered map-reduce.

"Summarize this" (or a question that names nothing particular in the document) cannot be
answered from a few retrieved passages. The document is cut into parts that each fit the
context; the engine summarizes every part with the question in view (the map step, requests
run side by side through continuous batching); the question's turn then carries those part
summaries in place of passages and the answer is written from them (the reduce step). When
the summaries together exceed their room, they are summarized again in groups until they fit,
so every part of the document is covered.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from app.chat.long_documents import LongDocument, Source
from app.documents import retrieval
from app.documents.retrieval import Passage

if TYPE_CHECKING:
    from app.chat.token_history import ChatCodec
    from engine.client import EngineClient
    from engine.outputs import RequestOutput
    from engine.sampling_params import SamplingParams

PART_TOKENS_MAX = 16_384  # a part of the document, as one map request reads it
SUMMARY_TOKENS_MIN, SUMMARY_TOKENS_MAX = 48, 512  # one part's summary
LABEL_TOKENS = 20  # "[part 3 of 12, pages 20-29]" and the blank line after a summary
CONCURRENT_REQUESTS = 4  # map requests in flight at once (their KV must fit together)
INSTRUCTION = (
    "Summarize this part of the document in at most {words} words. Keep names, numbers, dates "
    "and conclusions; leave out nothing that helps answer this question: {question}"
)


@dataclass
class SummaryJob:
    """The map step for one document: its parts, how long each summary may be, and the
    room the summaries have in the question's turn."""

    document: LongDocument
    parts: list[list[Passage]]
    summary_tokens: int
    room: int
    codec: ChatCodec  # builds the map requests' token ids

    @classmethod
    def plan(
        cls, document: LongDocument, room: int, max_model_len: int, codec: ChatCodec
    ) -> SummaryJob:
        part_tokens = max(256, min(PART_TOKENS_MAX, max_model_len // 2))
        parts = document.sections(part_tokens)
        each = room // max(1, len(parts)) - LABEL_TOKENS
        return cls(
            document, parts, max(SUMMARY_TOKENS_MIN, min(SUMMARY_TOKENS_MAX, each)), room, codec
        )


def _pages(passages: Sequence[Passage]) -> list[int]:
    return sorted({p.page for p in passages if p.page is not None})


def _label(source: Source, total: int) -> str:
    pages = f", pages {retrieval.page_ranges(source.pages)}" if source.pages else ""
    return f"[part {source.index + 1} of {total}{pages}]"


def summary_body(parts: Sequence[Source], room: int, codec: ChatCodec) -> tuple[str, list[Source]]:
    """The part summaries as one document body within `room` tokens (the last ones left out
    when even the re-summarized ones do not fit); returns (body, the parts kept)."""
    total = max((s.index for s in parts), default=-1) + 1
    kept: list[Source] = []
    blocks: list[str] = []
    used = 0
    for source in parts:
        block = f"{_label(source, total)}\n{source.text.strip()}"
        size = len(codec.text(block + "\n\n"))
        if used + size > room and kept:
            break
        kept.append(source)
        blocks.append(block)
        used += size
    return "\n\n".join(blocks), kept


@dataclass
class MapProgress:
    """Parts summarized so far, for the live line."""

    document: str
    total: int
    done: int = 0
    started: float = 0.0

    def seconds_left(self) -> float | None:
        if not self.done:
            return None
        elapsed = time.monotonic() - self.started
        return elapsed / self.done * (self.total - self.done)


class Summarizer:
    """Runs the map step of a `SummaryJob` on the engine.

    `track(request_id)` / `untrack(request_id)` are called around every engine request (the
    server's shutdown drain waits for them); `on_progress` after each finished part; `meter`
    wraps each request's outputs (the caller's token rate limit counts them).
    """

    def __init__(
        self,
        engine: EngineClient,
        codec: ChatCodec,
        params: SamplingParams,
        track: Callable[[str], None],
        untrack: Callable[[str], None],
        on_progress: Callable[[MapProgress], Awaitable[None]],
        meter: Callable[
            [AsyncGenerator[RequestOutput, None]], AsyncGenerator[RequestOutput, None]
        ] = lambda outputs: outputs,
    ) -> None:
        self.engine = engine
        self.codec = codec
        self.params = params
        self.track, self.untrack = track, untrack
        self.on_progress = on_progress
        self.meter = meter
        self.max_model_len = engine.max_model_len

    async def run(self, job: SummaryJob, question: str) -> list[Source]:
        """One summary per part (Source kind "section", its pages), re-summarized in groups
        until they fit `job.room`."""
        name = job.document.name
        texts = ["\n\n".join(p.text for p in part) for part in job.parts]
        pages = [_pages(part) for part in job.parts]
        summaries = await self._map(name, texts, pages, job.summary_tokens, question)
        sources = [
            Source(name, i, text, pages[i], "section") for i, (text, _) in enumerate(summaries)
        ]
        size = sum(n + LABEL_TOKENS for _, n in summaries)  # as the model wrote them, in tokens
        # Too long together: summarize consecutive groups of summaries again (reduce levels).
        while len(sources) > 1 and size > job.room:
            group = max(2, -(-size // max(1, job.room)) + 1)
            grouped = [sources[i : i + group] for i in range(0, len(sources), group)]
            texts = [
                "\n\n".join(f"{_label(s, len(sources))}\n{s.text}" for s in g) for g in grouped
            ]
            pages = [sorted({p for s in g for p in s.pages}) for g in grouped]
            covers = [sum(s.covers for s in g) for g in grouped]
            each = job.room // len(grouped) - LABEL_TOKENS
            each = max(SUMMARY_TOKENS_MIN, min(SUMMARY_TOKENS_MAX, each))
            summaries = await self._map(name, texts, pages, each, question)
            sources = [
                Source(name, i, text, pages[i], "section", covers[i])
                for i, (text, _) in enumerate(summaries)
            ]
            size = sum(n + LABEL_TOKENS for _, n in summaries)
        return sources

    async def _map(
        self,
        name: str,
        texts: Sequence[str],
        pages: Sequence[list[int]],
        tokens: int,
        question: str,
    ) -> list[tuple[str, int]]:
        """Each text summarized: (summary, its length in generated tokens)."""
        progress = MapProgress(name, len(texts), started=time.monotonic())
        await self.on_progress(progress)
        gate = asyncio.Semaphore(CONCURRENT_REQUESTS)

        async def one(i: int) -> tuple[str, int]:
            async with gate:
                text = await self._summarize(
                    name, texts[i], pages[i], i, len(texts), tokens, question
                )
            progress.done += 1
            await self.on_progress(progress)
            return text

        return list(await asyncio.gather(*(one(i) for i in range(len(texts)))))

    async def _summarize(
        self,
        name: str,
        text: str,
        pages: list[int],
        index: int,
        total: int,
        tokens: int,
        question: str,
    ) -> tuple[str, int]:
        codec = self.codec
        span = f", pages {retrieval.page_ranges(pages)}" if pages else ""
        head = codec.user_prefix + codec.document(name, text, f"part {index + 1} of {total}{span}")
        ask = codec.text(
            INSTRUCTION.format(words=max(20, tokens * 2 // 3), question=question.strip())
        )
        room = self.max_model_len - tokens - len(ask) - len(codec.turn_suffix)
        prompt = head[: max(0, room)] + ask + codec.turn_suffix
        params = replace(self.params, max_tokens=tokens)
        request_id = uuid.uuid4().hex
        self.track(request_id)
        final, generated = "", 0
        try:
            async with contextlib.aclosing(
                self.meter(self.engine.generate(prompt, params, request_id=request_id))
            ) as outputs:
                async for out in outputs:
                    if out.finished:
                        if out.finish_reason == "error":
                            raise RuntimeError(out.error or "the engine failed on a part summary")
                        final, generated = out.text, len(out.token_ids)
        except asyncio.CancelledError:  # the stop button: free the engine at once
            with contextlib.suppress(Exception):
                await self.engine.abort(request_id)
            raise
        finally:
            self.untrack(request_id)
        return final.strip(), generated
