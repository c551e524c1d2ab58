"""A thinking model's answer in the chat: its `<think>` part streams into a collapsible step
("Thinking..."), the rest into the answer message below it.

The text is split by the API's parser (app.api.reasoning.ReasoningSplitter), so the chat and
/v1/chat/completions agree to the character on what is thinking. Both sides are coalesced
(app.chat.streaming.Coalescer): one websocket event per token would leave the page behind.
"""

from __future__ import annotations

import time

import chainlit as cl
from chainlit.utils import utc_now

from app.api.reasoning import ReasoningSplitter, ThinkingMode
from app.chat.i18n import t
from app.chat.streaming import Coalescer


class AnswerView:
    """Routes an answer's text deltas to the thinking step and the answer message, each
    created when its first text arrives (so the step shows above the answer)."""

    def __init__(self, language: str, mode: ThinkingMode) -> None:
        self.language = language
        self.splitter = ReasoningSplitter(mode)
        self.step: cl.Step | None = None
        self.step_text: Coalescer | None = None
        self.started = 0.0
        self.message: cl.Message | None = None
        self.coalescer: Coalescer | None = None

    async def add(self, text: str) -> None:
        reasoning, content = self.splitter.feed(text)
        await self._route(reasoning, content)

    async def finish(self) -> None:
        """The answer ended (or was stopped): hand out held-back text, close the step."""
        reasoning, content = self.splitter.finish()
        await self._route(reasoning, content)
        await self._close_step()

    def start_message(self) -> cl.Message:
        """The answer message (created now if no answer text came yet)."""
        if self.message is None:
            # Dated now: a streamed message gets no date of its own.
            self.message = cl.Message(content="", created_at=utc_now())
            self.coalescer = Coalescer(self.message.stream_token)
        return self.message

    async def _route(self, reasoning: str, content: str) -> None:
        if reasoning:
            if self.step_text is None:
                await self._open_step()
            assert self.step_text is not None
            await self.step_text.add(reasoning)
        if content:
            await self._close_step()
            self.start_message()
            assert self.coalescer is not None
            await self.coalescer.add(content)

    async def _open_step(self) -> None:
        parent = cl.context.current_step  # the on_message run: the step shows above the answer
        # Open while it streams, folded once the answer starts (auto_collapse).
        self.step = cl.Step(
            name=t("thinking", self.language),
            type="llm",
            parent_id=parent.id if parent else None,
            show_input=False,
            default_open=True,
            auto_collapse=True,
        )
        self.step.start = utc_now()
        self.started = time.monotonic()
        await self.step.send()
        self.step_text = Coalescer(self.step.stream_token)

    async def _close_step(self) -> None:
        step, text = self.step, self.step_text
        if step is None or text is None or step.end is not None:
            return
        await text.flush()
        step.name = t("thought", self.language, seconds=time.monotonic() - self.started)
        step.end = utc_now()
        await step.update()
