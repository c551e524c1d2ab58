"""Which web pages may talk to the server: its own, and those PAGECHAT_CORS_ALLOW_ORIGINS names.

Chainlit answers every Origin with `Access-Control-Allow-Origin: <that origin>` and credentials
(its config.toml default is `allow_origins = ["*"]`), and its socket.io server checks no Origin
at all. Any web page the user opens could then read their chats with their cookie (the local
user's cookie is handed out without a login). Here the server is closed to other origins
unless PAGECHAT_CORS_ALLOW_ORIGINS names them: one CORS middleware on the whole app (here),
Chainlit's own set to allow nothing and the websocket limited to the page's own host and those
origins (`restrict_origins` in app/serving/chainlit_patches.py).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

SOCKET_PATH = "/ws/socket.io"  # Chainlit's socket.io, mounted at "/"


def parse_origins(spec: str) -> list[str]:
    """'https://a.example, http://b:3000' -> ['https://a.example', 'http://b:3000']."""
    return [o.strip().rstrip("/") for o in spec.split(",") if o.strip()]


def apply_cors(app: FastAPI, origins: list[str]) -> None:
    """Allow cross-origin requests from `origins` only (none when empty), UI and API alike."""
    if origins:
        app.add_middleware(CORSExceptSocket, socket_path=SOCKET_PATH, allow_origins=list(origins))


class CORSExceptSocket:
    """Starlette's CORS middleware for every path but socket.io's (which answers CORS itself:
    both would send the header twice, and browsers refuse a doubled Allow-Origin)."""

    def __init__(self, app: ASGIApp, socket_path: str, allow_origins: list[str]) -> None:
        self.app = app
        self.socket_path = socket_path
        self.cors = CORSMiddleware(app, allow_origins=allow_origins, allow_credentials=True,
                                   allow_methods=["*"], allow_headers=["*"])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.socket_path):
            await self.app(scope, receive, send)
        else:
            await self.cors(scope, receive, send)


def same_host(origin: str, environ: dict[str, Any]) -> bool:
    """The page that opens the websocket was served by this server (its Host, or the proxy's)."""
    netloc = urlsplit(origin).netloc.lower()
    hosts = {environ.get("HTTP_HOST", "").lower()}
    if forwarded := environ.get("HTTP_X_FORWARDED_HOST"):
        hosts.add(forwarded.split(",")[0].strip().lower())
    return bool(netloc) and netloc in hosts
