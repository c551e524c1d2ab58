"""`python -m app [--host H] [--port P]`: the chat UI, its API and the engine in one process."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from types import FrameType

import uvicorn

from app.serving.server import REPO_ROOT
from app.serving.shutdown import Drain

# After the drain, uvicorn's own wait for the connections to close (they are idle by then).
CONNECTIONS_CLOSE_S = 5


class GracefulServer(uvicorn.Server):
    """uvicorn, with a drain before its shutdown (app/serving/shutdown.py).

    uvicorn alone, on SIGTERM, stops listening at once, waits `timeout_graceful_shutdown` for
    the open connections, then cancels them (streams cut without an ending, CancelledError
    tracebacks) and finally re-raises the signal, so the process dies by it (exit -15). Here
    the first SIGTERM/SIGINT starts `Drain.run` (503 for new requests, the grace period, the
    aborts); uvicorn's shutdown starts when it is over, and the process exits 0. A second
    signal ends the grace period, a third exits at once.
    """

    def __init__(self, config: uvicorn.Config, drain: Drain, grace_s: float) -> None:
        super().__init__(config)
        self.drain, self.grace_s = drain, grace_s
        self.signals = 0
        self._drain_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in _captured_signals: uvicorn would re-raise it after a clean shutdown.
        self.signals += 1
        if self.signals == 2:
            self.drain.hurry()
        elif self.signals >= 3:
            self.should_exit = self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.signals and self._drain_task is None:
            self._drain_task = asyncio.create_task(self.drain.run(self.grace_s))
        if self._drain_task is not None and self._drain_task.done():
            self.should_exit = True
        return await super().on_tick(counter)


def main(argv: list[str] | None = None) -> None:
    from app.settings import AppSettings

    settings = AppSettings()
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    parser.add_argument("--host", default=settings.host, help="default %(default)s (PAGECHAT_HOST)")
    parser.add_argument("--port", type=int, default=settings.port, help="default %(default)s (PAGECHAT_PORT)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("CHAINLIT_APP_ROOT", str(REPO_ROOT))

    from app.serving.datadir import DataDirBusy
    from app.serving.runtime import get_runtime
    from app.serving.server import create_app

    try:
        app = create_app(settings.model_copy(update={"host": args.host, "port": args.port}))
    except DataDirBusy as exc:
        print(f"pagechat: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(f"pagechat: http://{args.host}:{args.port}", flush=True)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level,
        timeout_graceful_shutdown=CONNECTIONS_CLOSE_S,
        # X-Forwarded-For/-Proto from these addresses set the client's address (login throttle)
        # and scheme (Secure cookies); anyone else's are ignored.
        proxy_headers=True, forwarded_allow_ips=settings.trusted_proxies,
    )
    server = GracefulServer(config, get_runtime().drain, settings.shutdown_grace_s)
    server.run()
    if server.force_exit:
        sys.exit(128 + signal.SIGTERM)
    # The interpreter's teardown garbage-collects every object the model, the tokenizer and
    # Chainlit left behind: seconds of a service manager's stop timeout. Nothing is left to
    # finalize (the lifespan closed the engine and the database), so skip that collection.
    gc.freeze()


if __name__ == "__main__":
    main()
