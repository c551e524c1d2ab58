"""Who may talk to the server from a browser, and how much a client may upload.

CORS: Chainlit answers every Origin with `Access-Control-Allow-Origin: <that origin>` and
credentials (its config.toml default is `allow_origins = ["*"]`), and its socket.io server
checks no Origin at all. Any web page the user opens could then read their chats with their
cookie (the local user's cookie is handed out without a login). Here the server is closed to
other origins unless PAGECHAT_CORS_ALLOW_ORIGINS names them: one CORS middleware on the whole
app, Chainlit's own set to allow nothing, the websocket limited to the page's own host.

Uploads: Chainlit reads a whole upload into memory before checking its size, so the size limit
(PAGECHAT_MAX_UPLOAD_MB) is enforced here from the request's length, before the body is read.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

from fastapi import FastAPI

UPLOAD_PATH = "/project/file"
# Room for the multipart envelope (boundary, part headers) around the file itself.
MULTIPART_OVERHEAD_BYTES = 1024 * 1024


def parse_origins(spec: str) -> list[str]:
    """'https://a.example, http://b:3000' -> ['https://a.example', 'http://b:3000']."""
    return [o.strip().rstrip("/") for o in spec.split(",") if o.strip()]


def apply_cors(app: FastAPI, origins: list[str]) -> None:
    """Allow cross-origin requests from `origins` only (none when empty), UI and API alike."""
    from chainlit.config import config
    from chainlit.server import app as chainlit_app
    from chainlit.server import sio
    from starlette.middleware.cors import CORSMiddleware

    config.project.allow_origins = []
    for middleware in chainlit_app.user_middleware:
        if middleware.cls is CORSMiddleware:
            middleware.kwargs["allow_origins"] = []
    chainlit_app.middleware_stack = None  # rebuilt with the new options on the next request
    allowed = frozenset(origins)

    def socket_origin_allowed(origin: str, environ: dict) -> bool:
        return origin in allowed or _same_host(origin, environ)

    sio.eio.cors_allowed_origins = socket_origin_allowed
    if origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(origins), allow_credentials=True,
            allow_methods=["*"], allow_headers=["*"],
        )


def _same_host(origin: str, environ: dict) -> bool:
    """The page that opens the websocket was served by this server (its Host, or the proxy's)."""
    netloc = urlsplit(origin).netloc.lower()
    hosts = {environ.get("HTTP_HOST", "").lower()}
    if forwarded := environ.get("HTTP_X_FORWARDED_HOST"):
        hosts.add(forwarded.split(",")[0].strip().lower())
    return bool(netloc) and netloc in hosts


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

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") != self.path:
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
        mb = self.max_bytes / (1024 * 1024)
        body = json.dumps({"detail": f"File size too large: the upload limit is {mb:g} MB"}).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]})
        await send({"type": "http.response.body", "body": body})


def apply_upload_limit(app: FastAPI, max_upload_mb: int) -> None:
    app.add_middleware(UploadLimit, max_bytes=max_upload_mb * 1024 * 1024)
