"""Errors of the OpenAI API in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

`OpenAIRoute` answers every error of a /v1 route in that shape: request validation (400, not
FastAPI's 422), a body that is not JSON, not UTF-8 or nested too deeply to parse (FastAPI's
`{"detail": ...}` otherwise), and every `APIError` the handlers raise.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def validation_error(exc: RequestValidationError) -> APIError:
    parts, param = [], None
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "")
            return APIError(400, f"The request body is not valid JSON: {detail}".rstrip(": "))
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "extra_forbidden":
            name = ".".join(loc)
            return APIError(
                400,
                f"Unrecognized request argument supplied: {name} (not served here).",
                param=name,
            )
        param = param or ".".join(loc) or None
        parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}")
    return APIError(400, "; ".join(parts) or "invalid request", param=param)


def _http_error(exc: HTTPException) -> APIError:
    """FastAPI's own HTTP errors (a body it could not parse) as OpenAI errors."""
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        message = f"The request body is not valid UTF-8: {cause.reason} at byte {cause.start}."
    elif isinstance(cause, RecursionError):
        message = "The request body is JSON nested too deeply to parse."
    elif isinstance(cause, ValueError):
        message = f"The request body is not valid JSON: {cause}"
    else:
        message = str(exc.detail)
    type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
    headers = dict(exc.headers) if exc.headers else None
    return APIError(exc.status_code, message, type=type_, headers=headers)


class OpenAIRoute(APIRoute):
    """A route whose errors, request validation included, come back as OpenAI error JSON (400, not 422)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return validation_error(exc).response()
            except APIError as exc:
                return exc.response()
            except HTTPException as exc:
                return _http_error(exc).response()

        return route
