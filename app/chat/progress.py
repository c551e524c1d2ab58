"""The "Reading N tokens" step above an answer: the documents read and the prefill progress.

It is told numbers (the prompt's size, what is cached, what is computed so far) and texts, and
knows nothing of the chat it belongs to.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import chainlit as cl
from chainlit.utils import utc_now

from app.chat.i18n import t


class ReadingProgress:
    """Shown when the prompt brings documents or many tokens to compute; updated at most every
    `interval` seconds while the prompt is read, closed with the time it took."""

    def __init__(
        self,
        language: str,
        total_tokens: int,
        to_compute: int,
        documents: Sequence[str],
        lines: Sequence[str],
        min_tokens: int,
        interval: float,
    ) -> None:
        """`total_tokens` of the prompt, `to_compute` of them not shared with the previous
        request, the `documents` (names) it brings and their `lines` (one each); the step is
        shown when there are documents or at least `min_tokens` to compute."""
        self.language = language
        self.total = total_tokens
        self.to_compute = to_compute
        self.lines = list(lines)
        self.interval = interval
        self.wanted = bool(documents) or to_compute >= min_tokens
        self.what = ", ".join(documents) if documents else t("reading_chat", language)
        self.step: cl.Step | None = None
        self.started = time.monotonic()
        self.last_update = 0.0
        self.closed = False

    @classmethod
    def hidden(cls, language: str) -> ReadingProgress:
        """A step never shown (a prompt whose size is not known here)."""
        return cls(language, 0, 0, [], [], min_tokens=1, interval=0.0)

    async def open_if_needed(self) -> None:
        if not self.wanted:
            return
        parent = cl.context.current_step  # the on_message run: the step shows above the answer
        self.step = cl.Step(
            name=t("reading", self.language, what=self.what, tokens=self.to_compute), type="tool",
            parent_id=parent.id if parent else None, show_input=False,
        )
        self.step.start = utc_now()
        self.step.output = self._text(None)
        await self.step.send()

    def _text(self, done: int | None) -> str:
        lines = list(self.lines)
        if done is not None:
            percent = round(100 * done / self.total) if self.total else 100
            lines.append(t("reading_progress", self.language, done=done, total=self.total, percent=percent))
        return "\n\n".join(lines)

    async def progress(self, computed_tokens: int) -> None:
        """`computed_tokens` of the prompt have their KV computed (cached ones included)."""
        if self.step is None or self.closed:
            return
        now = time.monotonic()
        if now - self.last_update < self.interval:
            return
        self.last_update = now
        self.step.output = self._text(computed_tokens)
        await self.step.update()

    async def close(self, cached_tokens: int, seconds: float | None) -> None:
        """The prompt is read: `cached_tokens` came from the cache, in `seconds` (None: since
        the step opened)."""
        if self.step is None or self.closed:
            return
        self.closed = True
        if seconds is None:
            seconds = time.monotonic() - self.started
        computed = self.total - cached_tokens
        self.step.name = t("reading_done", self.language, what=self.what, tokens=computed, seconds=seconds)
        self.step.output = self._text(self.total)
        self.step.end = utc_now()
        await self.step.update()
