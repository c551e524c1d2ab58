"""Uploads: the size limit enforced before the body is read, and empty files accepted.

The same guard caps the JSON bodies of the OpenAI-compatible API (ApiBodyLimit).

Chainlit reads a whole upload into memory before checking its size, so PAGECHAT_MAX_UPLOAD_MB
is enforced here from the request's length (or its bytes as they arrive), answering 413.
Chainlit also fails a 0-byte upload with an internal error (500); it is stored instead, so the
chat can say the file is empty.
"""

from __future__ import annotations

import json
import uuid

from fastapi import FastAPI

UPLOAD_PATH = "/project/file"
# Room for the multipart envelope (boundary, part headers) around the file itself.
MULTIPART_OVERHEAD_BYTES = 1024 * 1024


class UploadLimit:
    """ASGI middleware: refuse an upload larger than the limit before reading its body (413).

    Requests with a Content-Length over the limit are answered at once; a body sent without
    one is counted as it arrives and cut off at the limit.
    """

    def __init__(self, app, max_bytes: int, path: str = UPLOAD_PATH) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.limit = max_bytes + MULTIPART_OVERHEAD_BYTES
        self.path = path

    def applies_to(self, path: str) -> bool:
        return path == self.path

    def refusal(self) -> bytes:
        mb = self.max_bytes / (1024 * 1024)
        return json.dumps({"detail": f"File size too large: the upload limit is {mb:g} MB"}).encode()

    async def __call__(self, scope, receive, send) -> None:
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

        async def counting_receive():
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    too_large = True
                    return {"type": "http.disconnect"}
            return message

        async def tracking_send(message):
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

    async def _refuse(self, send) -> None:
        body = self.refusal()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]})
        await send({"type": "http.response.body", "body": body})


class ApiBodyLimit(UploadLimit):
    """The same guard for the JSON bodies of /v1 (PAGECHAT_MAX_REQUEST_MB), answered in
    OpenAI's error shape: a client cannot make the server buffer an unbounded request."""

    def __init__(self, app, max_bytes: int) -> None:
        super().__init__(app, max_bytes, path="/v1/")
        self.limit = max_bytes

    def applies_to(self, path: str) -> bool:
        return path.startswith(self.path)

    def refusal(self) -> bytes:
        mb = self.max_bytes / (1024 * 1024)
        return json.dumps({"error": {
            "message": f"Request body too large: the limit is {mb:g} MB (PAGECHAT_MAX_REQUEST_MB)",
            "type": "invalid_request_error", "param": None, "code": "request_too_large",
        }}).encode()


def apply_upload_limit(app: FastAPI, max_upload_mb: int, max_request_mb: int | None = None) -> None:
    app.add_middleware(UploadLimit, max_bytes=max_upload_mb * 1024 * 1024)
    if max_request_mb is not None:
        app.add_middleware(ApiBodyLimit, max_bytes=max_request_mb * 1024 * 1024)


def accept_empty_uploads() -> None:
    """Store 0-byte uploads: Chainlit's persist_file takes empty content for no content."""
    from chainlit.session import BaseSession

    original = BaseSession.persist_file
    if getattr(original, "accepts_empty", False):
        return

    async def persist_file(self, name, mime, path=None, content=None):
        if path or content is None or len(content) > 0:
            return await original(self, name, mime, path=path, content=content)
        self.files_dir.mkdir(parents=True, exist_ok=True)
        empty = self.files_dir / f".empty-{uuid.uuid4().hex}"
        empty.touch()
        try:
            return await original(self, name, mime, path=str(empty))
        finally:
            empty.unlink(missing_ok=True)

    persist_file.accepts_empty = True
    BaseSession.persist_file = persist_file
