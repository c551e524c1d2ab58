"""Live progress lines above an answer: reading the prompt (prefill) and summarizing the parts
of a long document. The numbers are in the step's name, which the page shows without
expanding anything ("Reading handbook.md: 12,000 / 30,000 tokens (40%, about 8 s left)").

They are told numbers (the prompt's size, what the engine reuses, what is computed so far)
and texts, and know nothing of the chat they belong to.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import chainlit as cl
from chainlit.utils import utc_now

from app.chat.i18n import t


def _seconds_left(
    language: str, done: float, total: float, started: float, start_done: float
) -> str:
    """The "about 8 s left" part, from the rate so far (empty until there is a rate)."""
    elapsed = time.monotonic() - started
    if done <= start_done or elapsed <= 0 or done >= total:
        return ""
    rate = (done - start_done) / elapsed
    return t("seconds_left", language, seconds=max(1, round((total - done) / rate)))


class ReadingProgress:
    """Shown when the prompt brings documents or many tokens to compute; its name carries the
    live numbers while the prompt is read (updated at most every `interval` seconds), and the
    time it took once read.

    Whether there is much to read is first estimated from the history (the previous request's
    ids are assumed cached), then taken from the engine's first output (`num_cached_tokens`:
    what it actually reuses), so a re-read after the cache was evicted, or after a restart,
    shows the line too."""

    def __init__(
        self,
        language: str,
        total_tokens: int,
        to_compute: int,
        documents: Sequence[str],
        lines: Sequence[str],
        min_tokens: int,
        interval: float,
        earlier_documents: Sequence[str] = (),
    ) -> None:
        """`total_tokens` of the prompt, `to_compute` of them not shared with the previous
        request, the `documents` (names) it brings and their `lines` (one each); the chat's
        `earlier_documents` are named when the prompt comes from the cache on disk."""
        self.language = language
        self.total = total_tokens
        self.to_compute = to_compute
        self.lines = list(lines)
        self.interval = interval
        self.min_tokens = min_tokens
        self.wanted = bool(documents) or to_compute >= min_tokens
        self.what = ", ".join(documents) if documents else t("reading_chat", language)
        self.cached_what = ", ".join(documents or earlier_documents) or self.what
        self.step: cl.Step | None = None
        self.started = time.monotonic()
        self.start_done = 0
        self.last_update = 0.0
        self.closed = False

    @classmethod
    def hidden(cls, language: str) -> ReadingProgress:
        """A step never shown (a prompt whose size is not known here)."""
        progress = cls(language, 0, 0, [], [], min_tokens=1, interval=0.0)
        progress.closed = True
        return progress

    async def open_if_needed(self) -> None:
        if self.wanted:
            await self._open(self.to_compute)

    async def _open(self, to_compute: int) -> None:
        parent = cl.context.current_step  # the on_message run: the step shows above the answer
        self.step = cl.Step(
            name=t("reading", self.language, what=self.what, tokens=to_compute),
            type="tool",
            parent_id=parent.id if parent else None,
            show_input=False,
        )
        self.step.start = utc_now()
        self.step.output = "\n\n".join(self.lines)
        await self.step.send()

    async def progress(self, computed_tokens: int, cached_tokens: int = 0) -> None:
        """`computed_tokens` of the prompt have their KV (`cached_tokens` of them reused)."""
        if self.closed:
            return
        if self.step is None:
            if self.total - cached_tokens < self.min_tokens:
                return
            self.to_compute = self.total - cached_tokens  # the engine reuses less than hoped
            await self._open(self.to_compute)
        assert self.step is not None
        now = time.monotonic()
        if not self.start_done:
            self.start_done, self.started = max(computed_tokens, cached_tokens), now
        if now - self.last_update < self.interval:
            return
        self.last_update = now
        self.step.name = self.title(computed_tokens)
        await self.step.update()

    def title(self, done: int) -> str:
        """The live line: what is read, tokens done of all, percent, time left."""
        percent = round(100 * done / self.total) if self.total else 100
        left = _seconds_left(self.language, done, self.total, self.started, self.start_done)
        return t(
            "reading_live",
            self.language,
            what=self.what,
            done=done,
            total=self.total,
            percent=percent,
            left=left,
        )

    async def close(
        self,
        cached_tokens: int,
        seconds: float | None,
        disk_tokens: int = 0,
        disk_load_seconds: float = 0.0,
    ) -> None:
        """The prompt is read: `cached_tokens` came from the cache, in `seconds` (None: since
        the step opened); `disk_tokens` of them were loaded from the disk tier in
        `disk_load_seconds` (after a restart: the step then says so, even with little to read)."""
        if self.closed:
            return
        if self.step is None and disk_tokens > 0:
            await self._open(self.total - cached_tokens)
        if self.step is None:
            self.closed = True
            return
        self.closed = True
        if seconds is None:
            seconds = time.monotonic() - self.started
        computed = self.total - cached_tokens
        self.step.name = t(
            "reading_done", self.language, what=self.what, tokens=computed, seconds=seconds
        )
        done = t("reading_progress", self.language, done=self.total, total=self.total, percent=100)
        lines = [*self.lines, done]
        if disk_tokens > 0:
            if computed < self.min_tokens:  # nothing worth naming was read: the cache is the news
                self.step.name = t(
                    "reading_from_disk",
                    self.language,
                    what=self.cached_what,
                    tokens=disk_tokens,
                    seconds=disk_load_seconds,
                )
            lines.append(
                t(
                    "reading_from_disk_line",
                    self.language,
                    tokens=disk_tokens,
                    seconds=disk_load_seconds,
                )
            )
        self.step.output = "\n\n".join(lines)
        self.step.end = utc_now()
        await self.step.update()


class SummaryProgress:
    """The live line of the map step: "Summarizing report.pdf: 3 / 12 parts (25%, about 40 s
    left)", then what it took."""

    def __init__(self, language: str) -> None:
        self.language = language
        self.step: cl.Step | None = None
        self.started = time.monotonic()

    async def update(self, name: str, done: int, total: int, started: float) -> None:
        percent = round(100 * done / total) if total else 100
        left = _seconds_left(self.language, done, total, started, 0)
        title = t(
            "summarizing",
            self.language,
            name=name,
            done=done,
            total=total,
            percent=percent,
            left=left,
        )
        if self.step is None:
            parent = cl.context.current_step
            self.step = cl.Step(
                name=title, type="tool", parent_id=parent.id if parent else None, show_input=False
            )
            self.step.start = utc_now()
            await self.step.send()
            return
        self.step.name = title
        await self.step.update()

    async def close(self, name: str, parts: int, failed: str | None = None) -> None:
        if self.step is None:
            return
        seconds = time.monotonic() - self.started
        if failed:
            self.step.name = t("summarizing_failed", self.language, name=name, error=failed)
            self.step.is_error = True
        else:
            self.step.name = t("summarized", self.language, name=name, parts=parts, seconds=seconds)
        self.step.end = utc_now()
        await self.step.update()
