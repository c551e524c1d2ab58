"""`QuietDisconnects`: a client that leaves early leaves no traceback in the log.

A browser that closes a page while its files load drops connections before their answers
start. Starlette's `FileResponse` then stops before sending anything, and the
`BaseHTTPMiddleware` that Chainlit puts in front of its routes turns "no answer" into
`RuntimeError: No response returned.`, which uvicorn logs with a full traceback, once per
file. Likewise a body cut off mid-upload raises starlette's `ClientDisconnect`.

This middleware, the outermost of the app's own, watches the request's `receive` channel:
when it has said the client is gone, those two errors are the disconnect itself and are
dropped (logged at debug level). Any other error, or one while the client is still there,
goes on as before.
"""

from __future__ import annotations

import logging

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("pagechat")

NO_RESPONSE = "No response returned."  # starlette.middleware.base.BaseHTTPMiddleware


class QuietDisconnects:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        gone = False

        async def watched_receive() -> Message:
            nonlocal gone
            message = await receive()
            if message["type"] == "http.disconnect":
                gone = True
            return message

        try:
            await self.app(scope, watched_receive, send)
        except ClientDisconnect:
            logger.debug("client left during %s %s", scope.get("method"), scope.get("path"))
        except RuntimeError as exc:
            # (Chainlit's own error middleware may have started a 500 nobody will read.)
            if not (gone and str(exc) == NO_RESPONSE):
                raise
            logger.debug("client left before the answer to %s %s", scope.get("method"), scope.get("path"))
