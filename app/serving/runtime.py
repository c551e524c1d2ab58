"""The process-wide state the Chainlit handlers need: settings, engine, data layer, storage.

`create_app` fills it in before Chainlit loads app/chat/handlers.py; the engine arrives later, when the
FastAPI lifespan has loaded it in a worker thread (`ready` is set then, also on failure).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from app.settings import AppSettings

if TYPE_CHECKING:
    from app.chat.token_history import ChatCodec
    from app.storage.data_layer import PagechatDataLayer
    from app.storage.files import LocalStorageClient
    from engine.config import EngineConfig


@dataclass
class Runtime:
    settings: AppSettings
    engine_config: EngineConfig | None = None
    engine: Any = None  # engine.AsyncLLM once loaded
    engine_error: str | None = None
    codec: ChatCodec | None = None
    data_layer: PagechatDataLayer | None = None
    storage: LocalStorageClient | None = None
    model_name: str = ""
    _ready: asyncio.Event | None = field(default=None, repr=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, repr=False)

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Create the readiness event on the server's event loop."""
        self._loop = loop
        self._ready = asyncio.Event()
        if self.engine is not None or self.engine_error is not None:
            self._ready.set()

    def set_engine(self, engine: Any) -> None:
        from app.chat.token_history import ChatCodec

        # A remote engine has no tokenizer: the chat then keeps its history as messages.
        self.codec = ChatCodec(engine.tokenizer) if engine.tokenizer is not None else None
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
