"""One FastAPI process: our routes first, then the Chainlit UI mounted at `/`.

The engine is loaded once, in a worker thread started by the FastAPI lifespan (Chainlit's own
startup hook does not run when it is mounted), so the page is served, and says the model is
loading, while the weights are read. The `Runtime` (app.state.runtime) holds the engine: None
until then, or the reason loading failed.

The data directory is locked for the life of the process (app/serving/datadir.py): a second
server on it stops with `DataDirBusy` before touching anything. Shutdown drains the answers in
flight first (app/serving/shutdown.py); the lifespan then waits for the database writes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from app.serving.startup_heap import freeze_startup_heap
from app.settings import AppSettings

if TYPE_CHECKING:
    from app.serving.remote_engine import RemoteEngine
    from app.serving.runtime import Runtime
    from app.serving.sessions import SessionTokens
    from app.serving.upload_quota import UploadQuota
    from engine.client import EngineClient
    from engine.config import EngineConfig

logger = logging.getLogger("pagechat")

APP_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = APP_DIR.parent


def create_app(settings: AppSettings | None = None, engine_config: EngineConfig | None = None) -> FastAPI:
    """Build the server. Call once per process: Chainlit's app and config are module globals."""
    settings = settings or AppSettings()
    os.environ.setdefault("CHAINLIT_APP_ROOT", str(REPO_ROOT))  # before chainlit is imported

    from app.serving.auth import ensure_auth_secret
    from app.serving.datadir import claim_data_dir, make_private, scratch_dir
    from app.serving.runtime import Runtime, set_runtime
    from app.serving.shutdown import DrainGate, PendingWrites
    from app.storage.data_layer import PagechatDataLayer
    from app.storage.files import LocalStorageClient, files_router
    from engine.config import EngineConfig

    engine_config = engine_config or EngineConfig()
    data_dir = settings.data_dir.resolve()
    if engine_config.kv_disk_dir is None:  # the disk KV tier keeps documents' KV across restarts
        engine_config = engine_config.model_copy(update={"kv_disk_dir": data_dir / "kv-cache"})
    claim_data_dir(data_dir)  # DataDirBusy when another server uses it; first of all
    make_private(data_dir)  # 0700 / 0600, and the umask for what comes
    sessions_dir = scratch_dir(data_dir)  # this process's own Chainlit upload folders
    tokens = _session_tokens(settings, ensure_auth_secret(data_dir), data_dir)

    storage = LocalStorageClient(data_dir / "files")
    data_layer = PagechatDataLayer(settings.sqlalchemy_url(), storage_provider=storage)
    writes = PendingWrites()
    writes.wrap(data_layer)  # the shutdown waits for the chat's last messages to be stored
    runtime = Runtime(
        settings=settings,
        engine_config=engine_config,
        data_layer=data_layer,
        storage=storage,
        model_name=settings.served_model_name or _display_name(engine_config.model),
    )
    set_runtime(runtime)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from app.storage.data_layer import prepare_database

        runtime.bind_loop(asyncio.get_running_loop())
        await prepare_database(settings.sqlalchemy_url())
        loader = asyncio.create_task(_load_engine(runtime))
        try:
            yield
        finally:
            loader.cancel()
            await writes.settle()
            if runtime.engine is not None:
                await runtime.engine.aclose()
            await data_layer.close()
            shutil.rmtree(sessions_dir, ignore_errors=True)

    docs = settings.docs_enabled()  # off by default once keys or users are set
    app = FastAPI(
        title="pagechat", lifespan=lifespan, docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None, openapi_url="/openapi.json" if docs else None,
    )
    app.state.runtime = runtime  # what the routes read (app.serving.runtime.runtime_of)

    # Every route of this app is included BEFORE the Chainlit mount: its catch-all GET would
    # shadow anything added after it.
    app.include_router(files_router(storage, data_layer.element_owner))

    @app.get("/pagechat/status")
    async def status() -> dict[str, Any]:
        """Whether the model is loaded: "loading", "ready" or "error" (with the reason)."""
        engine = runtime.engine
        if engine is not None:
            stats = engine.stats()
            return {
                "engine": "ready", "model": runtime.model_name,
                "max_model_len": engine.max_model_len,
                "running": stats.num_running, "waiting": stats.num_waiting,
                "kv_blocks_used": stats.kv_blocks_used,
            }
        if runtime.engine_error is not None:
            return {"engine": "error", "error": runtime.engine_error}
        return {"engine": "loading", "model": runtime.model_name}

    # The OpenAI-compatible API (/v1/*) and the ops endpoints (/health, /metrics).
    from app.api.routes import router as openai_router

    app.include_router(openai_router)

    from chainlit.utils import mount_chainlit

    from app.api.body_limit import apply_api_body_limit
    from app.documents.uploads import apply_upload_limit
    from app.serving.chainlit_patches import patch_chainlit
    from app.serving.cors import apply_cors, parse_origins
    from app.serving.disconnects import QuietDisconnects
    from app.serving.ops_access import OpsAccess
    from app.serving.security_headers import SecurityHeaders

    origins = parse_origins(settings.cors_allow_origins)
    patch_chainlit(sessions_dir, settings.max_upload_mb, origins, tokens=tokens,
                   quota=_upload_quota(settings))
    # Before CORS: a 413 (or a 503 while shutting down) keeps its CORS headers.
    apply_upload_limit(app, settings.max_upload_mb)
    apply_api_body_limit(app, settings.max_request_mb)
    app.add_middleware(OpsAccess, keys=settings.api_key_list(), token=settings.metrics_token,
                       users=bool(settings.auth_users.strip()), tokens=tokens)
    app.add_middleware(DrainGate, drain=runtime.drain)
    apply_cors(app, origins)
    app.add_middleware(SecurityHeaders, cookie_secure=settings.cookie_secure)
    app.add_middleware(QuietDisconnects)  # outermost: a client that left early logs no traceback
    mount_chainlit(app, target=str(APP_DIR / "chat" / "handlers.py"), path="/")
    return app


def _session_tokens(settings: AppSettings, secret: str, data_dir: Path) -> SessionTokens:
    """Login tokens whose credential version follows PAGECHAT_AUTH_USERS (app/serving/sessions.py)."""
    from app.serving.auth import LOCAL_USER, parse_users
    from app.serving.sessions import SessionTokens, credential_version

    users = parse_users(settings.auth_users) or {LOCAL_USER: ""}
    versions = {name: credential_version(secret, name, password) for name, password in users.items()}
    return SessionTokens(secret, versions.get, data_dir, settings.session_hours * 3600)


def _upload_quota(settings: AppSettings) -> UploadQuota:
    from app.serving.upload_quota import MB, QuotaLimits, UploadQuota

    return UploadQuota(QuotaLimits(
        files_per_chat=settings.upload_files_per_chat, bytes_per_chat=settings.upload_mb_per_chat * MB,
        files_per_day=settings.upload_files_per_day, bytes_per_day=settings.upload_mb_per_day * MB,
    ))


async def _load_engine(runtime: Runtime) -> None:
    """Load the model (or connect to PAGECHAT_ENGINE_URL) into `runtime`, or record why not."""
    engine: EngineClient
    try:
        if runtime.settings.engine_url:
            engine = await _connect_remote_engine(runtime)
        else:
            from engine import AsyncLLM
            from engine.config import EngineConfig

            config = runtime.engine_config or EngineConfig()
            logger.info("loading the model %s", config.model)
            engine = await asyncio.to_thread(AsyncLLM, config)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # the page shows the reason; the server keeps running
        logger.exception("the model could not be loaded")
        runtime.set_error(f"{type(exc).__name__}: {exc}")
        return
    runtime.set_engine(engine)
    logger.info("model ready: %s (max_model_len %d)", runtime.model_name, engine.max_model_len)
    freeze_startup_heap()  # before the first answer: no full collection walks the model's heap


async def _connect_remote_engine(runtime: Runtime) -> RemoteEngine:
    """PAGECHAT_ENGINE_URL: an OpenAI-compatible server (vLLM, SGLang) does the generating."""
    from app.serving.remote_engine import RemoteEngine

    model = runtime.engine_config.model if runtime.engine_config is not None else None
    engine = RemoteEngine.from_settings(runtime.settings, model=model)
    logger.info("using the engine server at %s", engine.base_url)
    await engine.start()  # False while the upstream still loads: /health says 503 meanwhile
    return engine


def _display_name(model: str) -> str:
    path = Path(model)
    return path.name if path.is_dir() else model
