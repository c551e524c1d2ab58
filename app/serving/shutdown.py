"""Graceful shutdown: drain the answers in flight, then stop.

On SIGTERM or SIGINT (`GracefulServer`, app/__main__.py) the server:

1. stops taking new work: `DrainGate` answers every new HTTP request 503 with Retry-After
   (the OpenAI error shape under /v1), and the chat answers a new message with a line saying
   the server is shutting down; /metrics and the open chat sockets keep working;
2. lets the answers in flight (API requests and chat answers, each registered in `Drain`)
   finish for PAGECHAT_SHUTDOWN_GRACE_S seconds;
3. aborts the rest through the engine: the API streams end with an error event
   (code "server_shutting_down") and `[DONE]`, a non-streamed request gets a 503, and a chat
   answer keeps what it had with a line saying it was cut off; every chat is saved;
4. lets uvicorn close the connections and run the FastAPI lifespan's shutdown, which waits for
   the data layer's writes (`PendingWrites`) before closing the database, and exits 0.

A second signal skips the rest of the grace period; a third exits at once.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger("pagechat")

RETRY_AFTER_S = 5  # what a refused client is told to wait (a restarted server, a peer)
ABORT_WAIT_S = 5.0  # how long aborted answers get to send their last words
REABORT_S = 0.5  # an abort sent before the engine had the request is sent again
SHUTDOWN_MESSAGE = "The server is shutting down; retry shortly."

Abort = Callable[[str], Awaitable[None]]


class Drain:
    """The answers in flight, by engine request id, and the shutdown's progress."""

    def __init__(self) -> None:
        self.draining = False  # new work is refused
        self._answers: dict[str, Abort] = {}  # request id -> how to abort it
        self._cut: dict[str, float] = {}  # request ids aborted by the shutdown -> when
        self._hurry: asyncio.Event | None = None
        self._hurry_now = False

    # ---- the answers' side ---------------------------------------------------------------

    def begin(self, request_ids: list[str], abort: Abort) -> None:
        """An answer starts: it counts until `end`, and is aborted with `abort` if too slow."""
        for request_id in request_ids:
            self._answers[request_id] = abort

    def end(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._answers.pop(request_id, None)

    def cut(self, request_id: str | None) -> bool:
        """Whether the shutdown aborted this request (rather than its client)."""
        return request_id is not None and request_id in self._cut

    @property
    def active(self) -> int:
        return len(self._answers)

    # ---- the server's side ---------------------------------------------------------------

    def hurry(self) -> None:
        """End the grace period now (a second signal)."""
        self._hurry_now = True
        if self._hurry is not None:
            self._hurry.set()

    async def run(self, grace_s: float) -> None:
        """Refuse new work, wait up to `grace_s` for the answers, abort what is left."""
        self.draining = True
        self._hurry = asyncio.Event()
        if self._hurry_now:
            self._hurry.set()
        if self._answers:
            logger.info(
                "shutting down: new requests get 503; waiting up to %gs for %d answer(s) in flight",
                grace_s, len(self._answers),
            )
        else:
            logger.info("shutting down: no answers in flight")
        deadline = time.monotonic() + grace_s
        while self._answers and not self._hurry.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(self._hurry.wait(), min(remaining, 0.05))
            except TimeoutError:
                pass
        if not self._answers:
            return
        logger.warning("shutting down: aborting %d answer(s) still running", len(self._answers))
        end = time.monotonic() + ABORT_WAIT_S
        while self._answers and time.monotonic() < end:
            now = time.monotonic()
            for request_id, abort in list(self._answers.items()):
                sent = self._cut.get(request_id)
                if sent is None or now - sent > REABORT_S:
                    self._cut[request_id] = now
                    try:
                        await abort(request_id)
                    except Exception as exc:  # the engine is going away anyway
                        logger.warning("aborting %s failed: %s", request_id, exc)
            await asyncio.sleep(0.02)
        if self._answers:
            logger.warning("shutting down: %d answer(s) did not end; closing anyway", len(self._answers))


class PendingWrites:
    """Counts the data layer's writes in flight, so the shutdown can wait for them.

    Chainlit stores messages from tasks it does not keep (`asyncio.create_task(...)`); without
    this, a chat's last message could be lost when the database closes.
    """

    PREFIXES = ("create_", "update_", "delete_", "save_", "upsert_")

    def __init__(self) -> None:
        self.count = 0

    def wrap(self, obj: Any) -> None:
        """Count the calls of every write method of `obj` (create_*, update_*, ...)."""
        for name in dir(type(obj)):
            if not name.startswith(self.PREFIXES):
                continue
            method = getattr(obj, name)
            if asyncio.iscoroutinefunction(method):
                setattr(obj, name, self._counted(method))

    def _counted(self, method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(method)
        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.count += 1
            try:
                return await method(*args, **kwargs)
            finally:
                self.count -= 1

        return counted

    async def settle(self, timeout: float = 10.0) -> None:
        """Wait until no write is in flight (twice in a row: a just-created task starts late)."""
        deadline = time.monotonic() + timeout
        quiet = 0
        while quiet < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            quiet = quiet + 1 if self.count == 0 else 0
        if self.count:
            logger.warning("shutting down with %d database write(s) unfinished", self.count)


class DrainGate:
    """ASGI middleware: while draining, a new request gets 503 + Retry-After.

    Left through: /metrics, and the socket.io traffic of chat sessions already open (their
    `sid`), so an answer still streaming to a browser is not cut by its own transport.
    """

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.drain.draining or scope["type"] not in ("http", "websocket") or self._passes(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1012})  # service restart
            return
        path = scope.get("path", "")
        if path.startswith("/v1/"):
            error: dict[str, Any] = {"error": {
                "message": SHUTDOWN_MESSAGE, "type": "server_error", "param": None,
                "code": "server_shutting_down",
            }}
        else:
            error = {"detail": SHUTDOWN_MESSAGE}
        body = json.dumps(error).encode()
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(RETRY_AFTER_S).encode()), (b"connection", b"close"),
        ]})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    def _passes(scope: Scope) -> bool:
        path = scope.get("path", "")
        if path == "/metrics":
            return True
        return "/socket.io" in path and b"sid=" in scope.get("query_string", b"")
