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
8. Chainlit's JWTs routed through `SessionTokens` (`use_session_tokens`): every token names a
   session the server can revoke and the user's credential version; logout revokes it
   (`revoke_on_logout`); its lifetime is PAGECHAT_SESSION_HOURS. The user each HTTP request
   was authenticated as is recorded for the data layer's owner checks (app/storage/ownership.py).
9. POST /login guarded (`guard_login`): cross-site posts refused (403), failed sign-ins
   throttled per account and per address (429 + Retry-After), app/serving/login_guard.py.
10. GET /project/file/<id> (a session's uploads) served like /pagechat/files (`serve_session_files_safely`):
   harmless types inline, anything else as an attachment, with `nosniff` and `CSP: sandbox`
   (it served an uploaded .html as text/html in the app's origin, with the client's type).
11. Feedback and custom-element writes refused for another user's chat (`refuse_foreign_writes`):
   the data layer raises NotThreadOwner, answered 404 instead of Chainlit's 500.
12. Thread sharing off means off (`enforce_thread_sharing`): with `allow_thread_sharing = false`
   PUT /project/thread/share and GET /project/share/<id> answer 404.
13. POST /project/file counts against the upload quotas (`enforce_upload_quota`,
   app/serving/upload_quota.py), and the file's name is cut to 255 bytes with bidi and control
   characters removed before Chainlit stores or shows it.
14. `ChainlitEmitter.process_message` checked (`check_client_messages`): a socket message that
   reuses the id of a message of another chat is refused (Chainlit's upsert moved it into the
   sender's chat), and so is one with more files than a message may carry.
15. Chainlit's own /docs, /redoc and /openapi.json removed (`drop_chainlit_docs`): they
   described its internal routes to anyone; the app's API docs are PAGECHAT_API_DOCS's.
16. Markdown images on other hosts shown as links (`external_images_as_links`): the page's CSP
   (app/serving/security_headers.py) does not fetch them, so instead of a broken image the
   messages Chainlit sends (new, updated, resumed, or read through GET /project/thread/<id>)
   carry `[image: alt](url)`; what is stored is left as written.

`patch_chainlit` applies them all; each one is applied at most once per process (the wrappers
read the current guards from `_guards`, so a second app in one process uses its own).
"""

from __future__ import annotations

import functools
import math
import re
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from app.serving.cors import same_host
from app.serving.login_guard import LoginThrottle, is_cross_site
from app.serving.upload_quota import QuotaExceeded, UploadQuota
from app.storage.files import display_name, file_response
from app.storage.ownership import NotThreadOwner, record_acting_user

if TYPE_CHECKING:
    from app.serving.sessions import SessionTokens

Endpoint = Callable[..., Awaitable[Any]]

# A pasted message above python-engineio's default 1 MB drops the websocket; let such text
# reach the app, which answers with a clear message (or fits it) instead.
MAX_SOCKET_MESSAGE_BYTES = 8 * 1024 * 1024
_EXTERNAL_LINK = re.compile(
    r"<link\b[^>]*https://(?:fonts\.googleapis\.com|fonts\.gstatic\.com|cdn\.jsdelivr\.net)[^>]*>",
    re.DOTALL,
)
# ![alt](https://elsewhere/x.png "title") and ![alt](//elsewhere/x.png): images the CSP blocks.
_EXTERNAL_IMAGE = re.compile(
    r"!\[([^\]\n]*)\]\(\s*<?((?:https?:)?//[^\s)>]+)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)",
    re.IGNORECASE,
)
_wrapped: set[str] = set()  # the Chainlit functions wrapped so far in this process
_guards: dict[str, Any] = {}  # what the wrappers consult: tokens, throttle, quota, origins


def patch_chainlit(
    files_dir: Path,
    max_upload_mb: int,
    origins: list[str],
    tokens: SessionTokens | None = None,
    quota: UploadQuota | None = None,
) -> None:
    """Apply every patch above; call before mounting Chainlit."""
    serve_offline_page()
    accept_empty_uploads()
    use_session_dir(files_dir)
    set_upload_limit(max_upload_mb)
    set_socket_message_limit(MAX_SOCKET_MESSAGE_BYTES)
    restrict_origins(origins)
    recreate_session_dirs()
    if tokens is not None:
        use_session_tokens(tokens)
        revoke_on_logout()
    guard_login(LoginThrottle(), origins)
    serve_session_files_safely()
    refuse_foreign_writes()
    enforce_thread_sharing()
    if quota is not None:
        enforce_upload_quota(quota)
    check_client_messages()
    drop_chainlit_docs()
    external_images_as_links()


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


# ---- routes --------------------------------------------------------------------------------


def wrap_route(path: str, method: str, wrapper: Callable[[Endpoint], Endpoint]) -> None:
    """Replace the endpoint of Chainlit's `method path` by `wrapper(endpoint)`.

    The wrapper must keep the endpoint's signature (functools.wraps): FastAPI reads the
    parameters it injects from it. Applied once per process.
    """
    from chainlit.server import app as chainlit_app
    from chainlit.server import router as chainlit_router
    from fastapi.routing import APIRoute

    key = f"route {method} {path}"
    if key in _wrapped:
        return
    # FastAPI >= 0.160 serves an included router's routes from the router itself (it notices
    # changes through _mark_routes_changed); older ones copied them into the app's router.
    for router in (chainlit_router, chainlit_app.router):
        routes = router.routes
        for i, route in enumerate(routes):
            if (
                isinstance(route, APIRoute)
                and route.path == path
                and method in (route.methods or ())
            ):
                routes[i] = APIRoute(
                    route.path,
                    wrapper(route.endpoint),
                    methods=[method],
                    name=route.name,
                    response_class=route.response_class,
                    dependencies=route.dependencies,
                    include_in_schema=route.include_in_schema,
                )
                if (changed := getattr(router, "_mark_routes_changed", None)) is not None:
                    changed()
                _wrapped.add(key)
                return
    raise RuntimeError(f"Chainlit has no route {method} {path}: the patches need an update")


def use_session_tokens(tokens: SessionTokens) -> None:
    """8. Chainlit's JWTs are SessionTokens; the authenticated user is recorded per request."""
    import chainlit.auth
    import chainlit.server
    from chainlit.config import config
    from chainlit.user import User

    _guards["tokens"] = tokens
    config.project.user_session_timeout = int(tokens.lifetime_s)
    if "jwt" in _wrapped:
        return

    def create_jwt(data: User) -> str:
        return cast("SessionTokens", _guards["tokens"]).encode(data.to_dict())

    def decode_jwt(token: str) -> User:
        return User(**cast("SessionTokens", _guards["tokens"]).decode(token))

    original_authenticate = cast(Endpoint, chainlit.auth.authenticate_user)

    async def authenticate_user(token: str = "") -> Any:
        user = await original_authenticate(token)
        record_acting_user(getattr(user, "identifier", None))
        return user

    chainlit.auth.decode_jwt = decode_jwt
    chainlit.server.decode_jwt = decode_jwt
    chainlit.server.create_jwt = create_jwt
    chainlit.auth.authenticate_user = authenticate_user  # get_current_user looks it up by name
    _wrapped.add("jwt")


def revoke_on_logout() -> None:
    """8. POST /logout also ends the session of the token it was sent with."""
    from chainlit.auth import get_token_from_cookies
    from fastapi import Request

    def wrapper(endpoint: Endpoint) -> Endpoint:
        @functools.wraps(endpoint)
        async def logout(*args: Any, **kwargs: Any) -> Any:
            request = cast(Request, kwargs["request"])
            token = get_token_from_cookies(dict(request.cookies))
            if not token:
                scheme, _, value = request.headers.get("authorization", "").partition(" ")
                token = value if scheme.lower() == "bearer" else None
            if token and (tokens := _guards.get("tokens")) is not None:
                await tokens.revoke(token)
            return await endpoint(*args, **kwargs)

        return logout

    wrap_route("/logout", "POST", wrapper)


def guard_login(throttle: LoginThrottle, origins: list[str]) -> None:
    """9. /login: cross-site posts refused, failed sign-ins throttled."""
    from fastapi import HTTPException, Request
    from fastapi.responses import JSONResponse

    _guards["throttle"], _guards["origins"] = throttle, list(origins)

    def wrapper(endpoint: Endpoint) -> Endpoint:
        @functools.wraps(endpoint)
        async def login(*args: Any, **kwargs: Any) -> Any:
            request = cast(Request, kwargs["request"])
            if is_cross_site(request.headers, _guards["origins"]):
                raise HTTPException(status_code=403, detail="Sign-in from another site refused")
            limiter = cast(LoginThrottle, _guards["throttle"])
            account = str(getattr(kwargs.get("form_data"), "username", ""))
            address = request.client.host if request.client else "?"
            if (wait := limiter.retry_after(account, address)) > 0:
                seconds = math.ceil(wait)
                return JSONResponse(
                    {"detail": f"Too many failed sign-ins; try again in {seconds} s."},
                    status_code=429,
                    headers={"Retry-After": str(seconds)},
                )
            try:
                response = await endpoint(*args, **kwargs)
            except HTTPException as exc:
                if exc.status_code == 401:
                    limiter.failed(account, address)
                raise
            limiter.succeeded(account)
            return response

        return login

    wrap_route("/login", "POST", wrapper)


def serve_session_files_safely() -> None:
    """10. A session's uploads: never served as active content in the app's origin."""
    from fastapi.responses import FileResponse

    def wrapper(endpoint: Endpoint) -> Endpoint:
        @functools.wraps(endpoint)
        async def get_file(*args: Any, **kwargs: Any) -> Any:
            response = await endpoint(*args, **kwargs)
            if isinstance(response, FileResponse):
                from chainlit.session import WebsocketSession

                session = WebsocketSession.get_by_id(kwargs["session_id"])
                name = session.files[kwargs["file_id"]]["name"] if session else "file"
                return file_response(Path(response.path), display_name(name) or "file")
            return response

        return get_file

    wrap_route("/project/file/{file_id}", "GET", wrapper)


def refuse_foreign_writes() -> None:
    """11. Another user's feedback or element: 404, not a write and not Chainlit's 500."""
    from fastapi import HTTPException

    def wrapper(endpoint: Endpoint) -> Endpoint:
        @functools.wraps(endpoint)
        async def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return await endpoint(*args, **kwargs)
            except NotThreadOwner:
                raise HTTPException(status_code=404, detail="Message not found") from None
            except HTTPException as exc:
                if isinstance(exc.__cause__, NotThreadOwner):
                    raise HTTPException(status_code=404, detail="Message not found") from None
                raise

        return guarded

    for path, method in (
        ("/feedback", "PUT"),
        ("/feedback", "DELETE"),
        ("/project/element", "PUT"),
        ("/project/element", "DELETE"),
    ):
        wrap_route(path, method, wrapper)


def enforce_thread_sharing() -> None:
    """12. With thread sharing off, its routes answer 404 (they worked regardless)."""
    from chainlit.config import config
    from fastapi import HTTPException

    def wrapper(endpoint: Endpoint) -> Endpoint:
        @functools.wraps(endpoint)
        async def sharing(*args: Any, **kwargs: Any) -> Any:
            if not config.features.allow_thread_sharing:
                raise HTTPException(status_code=404, detail="Thread sharing is off")
            return await endpoint(*args, **kwargs)

        return sharing

    wrap_route("/project/thread/share", "PUT", wrapper)
    wrap_route("/project/share/{thread_id}", "GET", wrapper)


def enforce_upload_quota(quota: UploadQuota) -> None:
    """13. Uploads count against the user's quotas; names made safe to store and show."""
    from chainlit.config import config
    from chainlit.session import WebsocketSession
    from fastapi import HTTPException, UploadFile

    _guards["quota"] = quota
    upload = config.features.spontaneous_file_upload
    if upload is not None and upload.max_files:
        quota.limits.files_per_message = upload.max_files

    def wrapper(endpoint: Endpoint) -> Endpoint:
        @functools.wraps(endpoint)
        async def upload_file(*args: Any, **kwargs: Any) -> Any:
            file = cast(UploadFile, kwargs["file"])
            file.filename = display_name(file.filename or "") or "file"
            session = WebsocketSession.get_by_id(kwargs["session_id"])
            if session is None:  # Chainlit's own 404
                return await endpoint(*args, **kwargs)
            user = getattr(kwargs.get("current_user"), "identifier", None) or "local"
            size = file.size or 0
            counter = cast(UploadQuota, _guards["quota"])
            try:
                counter.admit(user, session.thread_id, size)
            except QuotaExceeded as exc:
                headers = (
                    {"Retry-After": str(math.ceil(exc.retry_after_s))}
                    if exc.retry_after_s
                    else None
                )
                raise HTTPException(
                    status_code=exc.status, detail=str(exc), headers=headers
                ) from None
            try:
                return await endpoint(*args, **kwargs)
            except BaseException:
                counter.refund(user, session.thread_id, size)
                raise

        return upload_file

    wrap_route("/project/file", "POST", wrapper)


def check_client_messages() -> None:
    """14. A message may not take another chat's message id, nor carry too many files."""
    from chainlit.data import get_data_layer
    from chainlit.emitter import ChainlitEmitter

    if "process_message" in _wrapped:
        return
    original = cast(Callable[..., Awaitable[Any]], ChainlitEmitter.process_message)

    async def process_message(self: ChainlitEmitter, payload: Any) -> Any:
        files = len(payload.get("fileReferences") or [])
        if (quota := _guards.get("quota")) is not None:
            try:
                quota.check_message(self.session.thread_id, files)
            except QuotaExceeded as exc:
                raise ValueError(str(exc)) from None
        data_layer = get_data_layer()
        step_thread = getattr(data_layer, "step_thread", None)
        if step_thread is not None:
            stored_in = await step_thread(str(payload["message"]["id"]))
            if stored_in is not None and stored_in != self.session.thread_id:
                raise ValueError(
                    "This message id belongs to another chat; the message was not taken."
                )
        return await original(self, payload)

    setattr(ChainlitEmitter, "process_message", process_message)  # noqa: B010
    _wrapped.add("process_message")


def drop_chainlit_docs() -> None:
    """15. No /docs, /redoc, /openapi.json from Chainlit's app (its catch-all serves the page)."""
    from chainlit.server import app as chainlit_app
    from starlette.routing import Route

    docs = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
    routes = chainlit_app.router.routes
    routes[:] = [r for r in routes if not (isinstance(r, Route) and r.path in docs)]
    chainlit_app.openapi_url = chainlit_app.docs_url = chainlit_app.redoc_url = None
    if (changed := getattr(chainlit_app.router, "_mark_routes_changed", None)) is not None:
        changed()


def images_as_links(text: str) -> str:
    """`![alt](https://elsewhere/x.png)` -> `[image: alt](https://elsewhere/x.png)`."""
    return _EXTERNAL_IMAGE.sub(lambda m: f"[image: {m.group(1) or m.group(2)}]({m.group(2)})", text)


def _step_with_links(step: Any) -> Any:
    if isinstance(step, dict) and isinstance(step.get("output"), str) and "![" in step["output"]:
        return {**step, "output": images_as_links(step["output"])}
    return step


def _thread_with_links(thread: Any) -> Any:
    if isinstance(thread, dict) and isinstance(thread.get("steps"), list):
        return {**thread, "steps": [_step_with_links(s) for s in thread["steps"]]}
    return thread


def external_images_as_links() -> None:
    """16. What Chainlit shows of a message has its external images as links."""
    import json

    from chainlit.emitter import ChainlitEmitter
    from fastapi.responses import JSONResponse

    if "images_as_links" not in _wrapped:
        for name, rewrite in (
            ("send_step", _step_with_links),
            ("update_step", _step_with_links),
            ("resume_thread", _thread_with_links),
        ):
            original = cast(Callable[..., Awaitable[Any]], getattr(ChainlitEmitter, name))

            def make(original: Callable[..., Awaitable[Any]], rewrite: Callable[[Any], Any]) -> Any:
                @functools.wraps(original)
                async def emit(self: ChainlitEmitter, data: Any) -> Any:
                    return await original(self, rewrite(data))

                return emit

            setattr(ChainlitEmitter, name, make(original, rewrite))
        _wrapped.add("images_as_links")

    def wrapper(endpoint: Endpoint) -> Endpoint:
        @functools.wraps(endpoint)
        async def get_thread(*args: Any, **kwargs: Any) -> Any:
            response = await endpoint(*args, **kwargs)
            if isinstance(response, JSONResponse):
                thread = _thread_with_links(json.loads(bytes(response.body)))
                return JSONResponse(content=thread, status_code=response.status_code)
            return response

        return get_thread

    wrap_route("/project/thread/{thread_id}", "GET", wrapper)
