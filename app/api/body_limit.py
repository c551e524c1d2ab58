"""The /v1 request-body cap (PAGECHAT_MAX_REQUEST_MB): a client cannot make the server buffer
an unbounded JSON body; the 413 comes in OpenAI's error shape."""

from __future__ import annotations

import json

from fastapi import FastAPI
from starlette.types import ASGIApp

from app.serving.body_limit import BodyLimit

API_PREFIX = "/v1/"


class ApiBodyLimit(BodyLimit):
    """`BodyLimit` on every path under /v1/, answered as an OpenAI error."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        super().__init__(app, max_bytes, path=API_PREFIX, prefix=True)

    def refusal(self) -> bytes:
        mb = self.max_bytes / (1024 * 1024)
        return json.dumps(
            {
                "error": {
                    "message": f"Request body too large: the limit is {mb:g} MB (PAGECHAT_MAX_REQUEST_MB)",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "request_too_large",
                }
            }
        ).encode()


def apply_api_body_limit(app: FastAPI, max_request_mb: int) -> None:
    app.add_middleware(ApiBodyLimit, max_bytes=max_request_mb * 1024 * 1024)
