"""`BodyLimit`: an ASGI middleware that refuses a request body over a size limit (413)
before the app reads it.

Requests with a Content-Length over the limit are answered at once; a body sent without one is
counted as it arrives and cut off at the limit. Subclasses say which paths they guard and what
the refusal says: uploads (app/documents/uploads.py) and the /v1 API (app/api/body_limit.py).
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimit:
    """Refuse POST bodies over `limit` bytes to `path` (exactly, or as a prefix with `prefix`)."""

    def __init__(self, app: ASGIApp, max_bytes: int, path: str, prefix: bool = False) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.limit = max_bytes
        self.path = path
        self.prefix = prefix

    def applies_to(self, path: str) -> bool:
        return path.startswith(self.path) if self.prefix else path == self.path

    def refusal(self) -> bytes:
        """The 413's JSON body."""
        mb = self.max_bytes / (1024 * 1024)
        return json.dumps({"detail": f"Request body too large: the limit is {mb:g} MB"}).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope.get("method") != "POST"
            or not self.applies_to(scope.get("path", ""))
        ):
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await self._refuse(send)
            return
        received = 0
        too_large = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    too_large = True
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if too_large:
                return  # whatever the app makes of the cut-off body, the answer is 413
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except Exception:
            if not too_large:
                raise
        if too_large and not started:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = self.refusal()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]})
        await send({"type": "http.response.body", "body": body})
