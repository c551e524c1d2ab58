"""Every change this app makes to Chainlit's own code and module-level settings, in one place.

Chainlit 2.12 is mounted at "/" (app/serving/server.py) and used as it ships, except for:

1. `get_html_template` wrapped (`serve_offline_page`): the page it serves links Google Fonts
   and a KaTeX stylesheet on CDNs; the app runs offline, so those links are dropped.
2. `BaseSession.persist_file` wrapped (`accept_empty_uploads`): Chainlit takes empty content
   for no content and fails a 0-byte upload with a 500; it is stored instead, so the chat can
   say the file is empty.
3. `chainlit.config.FILES_DIRECTORY` set (`use_session_dir`): per-session upload folders live
   in this process's own scratch folder under the data directory (app/serving/datadir.py), not
   in the app root.
4. `config.features.spontaneous_file_upload.max_size_mb` set (`set_upload_limit`): Chainlit's
   own upload check uses PAGECHAT_MAX_UPLOAD_MB (app/documents/uploads.py refuses larger
   bodies before Chainlit reads them).
5. `sio.eio.max_http_buffer_size` raised (`set_socket_message_limit`): a pasted message above
   python-engineio's default 1 MB drops the websocket; the app answers such text instead.
6. Chainlit's CORS closed (`restrict_origins`): its `allow_origins = ["*"]` default answers
   every Origin with credentials, and its socket.io server checks no Origin at all. Its CORS
   middleware and config allow nothing; the websocket accepts the page's own host and the
   origins PAGECHAT_CORS_ALLOW_ORIGINS names (app/serving/cors.py has the app's CORS policy).
7. `BaseSession.files_dir` wrapped (`recreate_session_dirs`): Chainlit creates a session's
   upload folder with `mkdir(exist_ok=True)`, which fails with FileNotFoundError (a 500 on
   every later upload) once the scratch folder above it has vanished; it is created again.

`patch_chainlit` applies them all; each one is applied at most once per process.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

from app.serving.cors import same_host

# A pasted message above python-engineio's default 1 MB drops the websocket; let such text
# reach the app, which answers with a clear message (or fits it) instead.
MAX_SOCKET_MESSAGE_BYTES = 8 * 1024 * 1024
_EXTERNAL_LINK = re.compile(
    r"<link\b[^>]*https://(?:fonts\.googleapis\.com|fonts\.gstatic\.com|cdn\.jsdelivr\.net)[^>]*>",
    re.DOTALL,
)
_wrapped: set[str] = set()  # the Chainlit functions wrapped so far in this process


def patch_chainlit(files_dir: Path, max_upload_mb: int, origins: list[str]) -> None:
    """Apply every patch above; call before mounting Chainlit."""
    serve_offline_page()
    accept_empty_uploads()
    use_session_dir(files_dir)
    set_upload_limit(max_upload_mb)
    set_socket_message_limit(MAX_SOCKET_MESSAGE_BYTES)
    restrict_origins(origins)
    recreate_session_dirs()


def strip_external_links(html: str) -> str:
    """Drop the Google Fonts and KaTeX CDN links Chainlit's page carries: the app is offline."""
    return _EXTERNAL_LINK.sub("", html)


def serve_offline_page() -> None:
    """1. The page without its CDN links."""
    import chainlit.server as chainlit_server

    if "get_html_template" in _wrapped:
        return
    original: Callable[[str], str] = chainlit_server.get_html_template

    def get_html_template(root_path: str) -> str:
        return strip_external_links(original(root_path))

    chainlit_server.get_html_template = get_html_template
    _wrapped.add("get_html_template")


def accept_empty_uploads() -> None:
    """2. Store 0-byte uploads: Chainlit's persist_file takes empty content for no content."""
    from chainlit.session import BaseSession

    if "persist_file" in _wrapped:
        return
    original = cast(Callable[..., Awaitable[Any]], BaseSession.persist_file)

    async def persist_file(
        self: BaseSession,
        name: str,
        mime: str,
        path: str | None = None,
        content: bytes | str | None = None,
    ) -> Any:
        if path or content is None or len(content) > 0:
            return await original(self, name, mime, path=path, content=content)
        self.files_dir.mkdir(parents=True, exist_ok=True)
        empty = self.files_dir / f".empty-{uuid.uuid4().hex}"
        empty.touch()
        try:
            return await original(self, name, mime, path=str(empty))
        finally:
            empty.unlink(missing_ok=True)

    setattr(BaseSession, "persist_file", persist_file)  # noqa: B010  (mypy: method-assign)
    _wrapped.add("persist_file")


def use_session_dir(path: Path) -> None:
    """3. Keep Chainlit's per-session upload folders under `path` (this process's own)."""
    import chainlit.config

    path.mkdir(parents=True, exist_ok=True)
    chainlit.config.FILES_DIRECTORY = path


def set_upload_limit(max_upload_mb: int) -> None:
    """4. Chainlit's own upload size check uses PAGECHAT_MAX_UPLOAD_MB."""
    from chainlit.config import config

    upload = config.features.spontaneous_file_upload
    if upload is not None:
        upload.max_size_mb = max_upload_mb


def set_socket_message_limit(max_bytes: int) -> None:
    """5. The largest websocket message Chainlit's socket.io server takes."""
    from chainlit.server import sio

    sio.eio.max_http_buffer_size = max_bytes


def restrict_origins(origins: list[str]) -> None:
    """6. Chainlit's CORS allows nothing; its websocket, the page's own host and `origins`."""
    from chainlit.config import config
    from chainlit.server import app as chainlit_app
    from chainlit.server import sio
    from starlette.middleware.cors import CORSMiddleware

    config.project.allow_origins = []
    for middleware in chainlit_app.user_middleware:
        if cast(object, middleware.cls) is CORSMiddleware:
            middleware.kwargs["allow_origins"] = []
    chainlit_app.middleware_stack = None  # rebuilt with the new options on the next request
    allowed = frozenset(origins)

    def socket_origin_allowed(origin: str, environ: dict[str, Any]) -> bool:
        return origin in allowed or same_host(origin, environ)

    sio.eio.cors_allowed_origins = socket_origin_allowed  # it writes its own CORS headers


def recreate_session_dirs() -> None:
    """7. A session's upload folder comes with its parents, even after they were deleted."""
    from chainlit.session import BaseSession

    if "files_dir" in _wrapped:
        return
    original = cast(property, BaseSession.files_dir)
    assert original.fget is not None
    get_files_dir = original.fget

    def files_dir(self: BaseSession) -> Path:
        path: Path = get_files_dir(self)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    setattr(BaseSession, "files_dir", property(files_dir))  # noqa: B010  (mypy: method-assign)
    _wrapped.add("files_dir")
