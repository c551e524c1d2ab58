"""The API's waiting-queue limit (PAGECHAT_MAX_QUEUED_REQUESTS), counted at admission.

The engine's own count of waiting requests is a snapshot refreshed after each engine step, so
a burst of simultaneous requests all read the same old number and were all let in (20 of 20
against a limit of 2). Here every engine request the API starts (each prompt of a list times
`n`) is counted the moment it is admitted, on the event loop with no await between the check
and the count, and counted until it produces its first output (or ends): the requests that
have not been answered yet. A request is refused (503 + Retry-After, OpenAI's "overloaded")
when it would take that count, or the engine's own waiting count (which includes the chat's
requests), over the limit; a request larger than the limit alone is still admitted when
nothing waits, or it could never be served.
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncGenerator
from typing import TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    def __init__(self, waiting: int, limit: int) -> None:
        super().__init__(
            f"The server is overloaded: {waiting} requests are waiting (limit {limit}). "
            "Retry later."
        )
        self.waiting, self.limit = waiting, limit


class _Slot:
    """One admitted request's place in the count; freed once."""

    def __init__(self, queue: AdmissionQueue) -> None:
        self.queue: AdmissionQueue | None = queue

    def release(self) -> None:
        if self.queue is not None:
            self.queue.waiting -= 1
            self.queue = None


class AdmissionQueue:
    """Engine requests admitted by the API that have no output yet."""

    def __init__(self) -> None:
        self.waiting = 0

    def admit(
        self, streams: list[AsyncGenerator[T, None]], limit: int, engine_waiting: int = 0
    ) -> list[AsyncGenerator[T, None]]:
        """Count `streams` in (each is one engine request), or raise QueueFull.

        Returns the streams to consume instead: each leaves the count at its first output, when
        it ends, or when it is dropped without ever being consumed."""
        waiting = max(self.waiting, engine_waiting)
        if waiting and waiting + len(streams) > limit:
            raise QueueFull(waiting, limit)
        self.waiting += len(streams)
        tracked = []
        for stream in streams:
            slot = _Slot(self)
            gen = _until_first_output(stream, slot)
            weakref.finalize(gen, slot.release)  # a stream never started still leaves
            tracked.append(gen)
        return tracked


async def _until_first_output(
    stream: AsyncGenerator[T, None], slot: _Slot
) -> AsyncGenerator[T, None]:
    try:
        async for item in stream:
            slot.release()
            yield item
    finally:
        slot.release()
        await stream.aclose()
