"""`python -m app [--host H] [--port P]`: the chat UI, its API and the engine in one process."""

from __future__ import annotations

import argparse
import logging
import os

from app.serving.server import REPO_ROOT


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

    import uvicorn

    from app.serving.server import create_app

    app = create_app(settings.model_copy(update={"host": args.host, "port": args.port}))
    print(f"pagechat: http://{args.host}:{args.port}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
