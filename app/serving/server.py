"""One FastAPI process: our routes first, then the Chainlit UI mounted at `/`.

The engine is loaded once, in a worker thread started by the FastAPI lifespan (Chainlit's own
startup hook does not run when it is mounted), so the page is served, and says the model is
loading, while the weights are read. `app.state.engine` stays None until then.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from app.settings import AppSettings

logger = logging.getLogger("pagechat")

APP_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = APP_DIR.parent
# A pasted message above python-engineio's default 1 MB drops the websocket; let such text
# reach the app, which answers with a clear message (or fits it) instead.
MAX_SOCKET_MESSAGE_BYTES = 8 * 1024 * 1024
_EXTERNAL_LINK = re.compile(
    r"<link\b[^>]*https://(?:fonts\.googleapis\.com|fonts\.gstatic\.com|cdn\.jsdelivr\.net)[^>]*>",
    re.DOTALL,
)


def create_app(settings: AppSettings | None = None, engine_config=None) -> FastAPI:
    """Build the server. Call once per process: Chainlit's app and config are module globals."""
    settings = settings or AppSettings()
    os.environ.setdefault("CHAINLIT_APP_ROOT", str(REPO_ROOT))  # before chainlit is imported

    from app.serving.auth import ensure_auth_secret
    from app.serving.runtime import Runtime, set_runtime
    from app.storage.data_layer import PagechatDataLayer
    from app.storage.files import LocalStorageClient, files_router
    from engine.config import EngineConfig

    engine_config = engine_config or EngineConfig()
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    ensure_auth_secret(data_dir)
    _use_session_dir(data_dir / "sessions")

    storage = LocalStorageClient(data_dir / "files")
    runtime = Runtime(
        settings=settings,
        engine_config=engine_config,
        data_layer=PagechatDataLayer(settings.sqlalchemy_url(), storage_provider=storage),
        storage=storage,
        model_name=settings.served_model_name or _display_name(engine_config.model),
    )
    set_runtime(runtime)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from app.storage.data_layer import prepare_database

        runtime.bind_loop(asyncio.get_running_loop())
        await prepare_database(settings.sqlalchemy_url())
        loader = asyncio.create_task(_load_engine(app, runtime))
        try:
            yield
        finally:
            loader.cancel()
            if runtime.engine is not None:
                await asyncio.to_thread(runtime.engine.shutdown)
                if hasattr(runtime.engine, "aclose"):  # a remote engine's HTTP client
                    await runtime.engine.aclose()
            if runtime.data_layer is not None:
                await runtime.data_layer.close()
            shutil.rmtree(data_dir / "sessions", ignore_errors=True)

    app = FastAPI(title="pagechat", lifespan=lifespan)
    app.state.engine = None
    app.state.engine_error = None
    app.state.settings = settings
    app.state.engine_config = engine_config
    app.state.runtime = runtime

    # Routes of this app go here, BEFORE the Chainlit mount: its catch-all GET would shadow
    # anything added after it.
    app.include_router(files_router(storage, runtime.data_layer.element_owner))

    @app.get("/pagechat/status")
    async def status() -> dict:
        """Whether the model is loaded: "loading", "ready" or "error" (with the reason)."""
        engine = app.state.engine
        if engine is not None:
            stats = engine.stats()
            return {
                "engine": "ready", "model": runtime.model_name,
                "max_model_len": engine.max_model_len,
                "running": stats.num_running, "waiting": stats.num_waiting,
                "kv_blocks_used": stats.kv_blocks_used,
            }
        if app.state.engine_error is not None:
            return {"engine": "error", "error": app.state.engine_error}
        return {"engine": "loading", "model": runtime.model_name}

    # ---- OpenAI-compatible API: app.include_router(...) for /v1 goes here ----
    from app.api.routes import router as openai_router

    app.include_router(openai_router)  # /v1/*, /health, /metrics

    from chainlit.server import sio
    from chainlit.utils import mount_chainlit

    sio.eio.max_http_buffer_size = MAX_SOCKET_MESSAGE_BYTES
    _apply_upload_limit(settings.max_upload_mb)
    from app.documents.uploads import accept_empty_uploads, apply_upload_limit
    from app.serving.cors import apply_cors, parse_origins

    accept_empty_uploads()
    # Before CORS: a 413 keeps its CORS headers.
    apply_upload_limit(app, settings.max_upload_mb, settings.max_request_mb)
    apply_cors(app, parse_origins(settings.cors_allow_origins))
    _serve_offline_page()
    mount_chainlit(app, target=str(APP_DIR / "chat" / "handlers.py"), path="/")
    return app


async def _load_engine(app: FastAPI, runtime) -> None:
    try:
        if runtime.settings.engine_url:
            engine = await _connect_remote_engine(runtime)
        else:
            from engine import AsyncLLM

            logger.info("loading the model %s", runtime.engine_config.model)
            engine = await asyncio.to_thread(AsyncLLM, runtime.engine_config)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the page shows the reason; the server keeps running
        logger.exception("the model could not be loaded")
        app.state.engine_error = f"{type(exc).__name__}: {exc}"
        runtime.set_error(app.state.engine_error)
        return
    app.state.engine = engine
    runtime.set_engine(engine)
    logger.info("model ready: %s (max_model_len %d)", runtime.model_name, engine.max_model_len)


# Context assumed for an upstream that does not report its max_model_len.
REMOTE_DEFAULT_MAX_MODEL_LEN = 32768


async def _connect_remote_engine(runtime):
    """PAGECHAT_ENGINE_URL: an OpenAI-compatible server (vLLM, SGLang) does the generating."""
    from app.serving.remote_engine import RemoteEngine

    engine = RemoteEngine.from_settings(runtime.settings, model=runtime.engine_config.model)
    logger.info("using the engine server at %s", engine.base_url)
    await engine.start()  # False while the upstream still loads: /health says 503 meanwhile
    engine.max_model_len = engine.max_model_len or REMOTE_DEFAULT_MAX_MODEL_LEN
    return engine


def _apply_upload_limit(max_upload_mb: int) -> None:
    """PAGECHAT_MAX_UPLOAD_MB is the limit: Chainlit checks it at upload, the app when reading."""
    from chainlit.config import config

    upload = config.features.spontaneous_file_upload
    if upload is not None:
        upload.max_size_mb = max_upload_mb


def _display_name(model: str) -> str:
    path = Path(model)
    return path.name if path.is_dir() else model


def _use_session_dir(path: Path) -> None:
    """Keep Chainlit's per-session upload folders under data_dir, not in the app root."""
    import chainlit.config

    shutil.rmtree(path, ignore_errors=True)  # leftovers of a previous run
    path.mkdir(parents=True, exist_ok=True)
    chainlit.config.FILES_DIRECTORY = path


def strip_external_links(html: str) -> str:
    """Drop the Google Fonts and KaTeX CDN links Chainlit's page carries: the app is offline."""
    return _EXTERNAL_LINK.sub("", html)


def _serve_offline_page() -> None:
    import chainlit.server as chainlit_server

    original = chainlit_server.get_html_template
    if getattr(original, "offline", False):
        return

    def get_html_template(root_path):
        return strip_external_links(original(root_path))

    get_html_template.offline = True
    chainlit_server.get_html_template = get_html_template
