"""Who may read /metrics and /pagechat/status once the server is shared.

They tell anyone how busy the server is, which model it runs and how much KV cache is used
(a side channel on other users' activity). With no API keys, no password users and no
PAGECHAT_METRICS_TOKEN (one local user) they stay open; otherwise a request needs
`Authorization: Bearer <an API key or PAGECHAT_METRICS_TOKEN>` or a signed-in chat session, and
gets 401 without. /health stays open: it says only whether the model is loaded.
"""

from __future__ import annotations

import json
from http.cookies import SimpleCookie
from typing import TYPE_CHECKING

import jwt
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.keys import key_is_valid

if TYPE_CHECKING:
    from app.serving.sessions import SessionTokens

OPS_PATHS = ("/metrics", "/pagechat/status")


class OpsAccess:
    """ASGI middleware: /metrics and /pagechat/status for key holders and signed-in users."""

    def __init__(
        self, app: ASGIApp, keys: list[str], token: str, users: bool, tokens: SessionTokens | None
    ) -> None:
        self.app = app
        self.secrets = [*keys, *([token] if token else [])]
        self.closed = bool(self.secrets) or users
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.closed or scope["path"].rstrip("/") not in OPS_PATHS:
            await self.app(scope, receive, send)
            return
        if self._allowed(dict(scope.get("headers", []))):
            await self.app(scope, receive, send)
            return
        body = json.dumps(
            {"detail": "Unauthorized: send an API key or the metrics token as a Bearer token"}
        )
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body.encode()})

    def _allowed(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, value = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and key_is_valid(value.strip(), self.secrets):
            return True
        return self._signed_in(headers.get(b"cookie", b"").decode("latin-1"))

    def _signed_in(self, cookie_header: str) -> bool:
        if self.tokens is None or not cookie_header:
            return False
        from chainlit.auth import get_token_from_cookies

        cookies = SimpleCookie()
        try:
            cookies.load(cookie_header)
        except Exception:
            return False
        token = get_token_from_cookies({k: m.value for k, m in cookies.items()})
        if not token:
            return False
        try:
            self.tokens.decode(token)
        except jwt.InvalidTokenError:
            return False
        return True
