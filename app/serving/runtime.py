"""The process-wide state every part reads: settings, the engine, data layer, storage.

`Runtime` is the one holder of the engine (an `EngineClient`: the in-process AsyncLLM or a
RemoteEngine) and of the reason it failed to load. `create_app` fills it in before Chainlit
loads app/chat/handlers.py and keeps it as `app.state.runtime` for the routes; the engine
arrives later, when the FastAPI lifespan has loaded it in a worker thread (or connected to
PAGECHAT_ENGINE_URL), and `wait_ready` returns then, also on failure.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from app.serving.rate_limit import RateLimits
from app.serving.shutdown import Drain
from app.settings import AppSettings

if TYPE_CHECKING:
    from fastapi import Request

    from app.storage.data_layer import PagechatDataLayer
    from app.storage.files import LocalStorageClient
    from engine.client import EngineClient
    from engine.config import EngineConfig


@dataclass
class Runtime:
    settings: AppSettings
    engine_config: EngineConfig | None = None
    engine: EngineClient | None = None  # None until loaded (or connected)
    engine_error: str | None = None  # why loading failed
    data_layer: PagechatDataLayer | None = None
    storage: LocalStorageClient | None = None
    model_name: str = ""
    drain: Drain = field(default_factory=Drain)  # answers in flight; the shutdown's progress
    rate_limits: RateLimits = field(default_factory=RateLimits)  # PAGECHAT_RATE_LIMIT_*
    _ready: asyncio.Event | None = field(default=None, repr=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Create the readiness event on the server's event loop."""
        self._loop = loop
        self._ready = asyncio.Event()
        if self.engine is not None or self.engine_error is not None:
            self._ready.set()

    def set_engine(self, engine: EngineClient) -> None:
        self.engine = engine
        self._signal()

    def set_error(self, error: str) -> None:
        self.engine_error = error
        self._signal()

    def _signal(self) -> None:
        if self._ready is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._ready.set)

    async def wait_ready(self) -> bool:
        """Wait for the engine; True when it loaded, False when loading failed."""
        if self.engine is None and self.engine_error is None:
            if self._ready is None:
                self.bind_loop(asyncio.get_running_loop())
            assert self._ready is not None
            await self._ready.wait()
        return self.engine is not None


_runtime: Runtime | None = None


def set_runtime(runtime: Runtime) -> None:
    global _runtime
    _runtime = runtime


def get_runtime() -> Runtime:
    if _runtime is None:
        raise RuntimeError("the app runtime is not set up: start the server with app.serving.server.create_app")
    return _runtime


def runtime_of(request: Request) -> Runtime:
    """The Runtime of the app serving `request` (`create_app` keeps it as app.state.runtime)."""
    runtime: Runtime = request.app.state.runtime
    return runtime
