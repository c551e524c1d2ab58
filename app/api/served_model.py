"""Which model the API serves, under which names, and the engine that serves it.

The listed id is PAGECHAT_SERVED_MODEL_NAME, else the hub id the user gave
(`Qwen/Qwen3-4B-Instruct-2507`) or a checkpoint directory's last component (answers never
show server paths). Requests may name the model by that id, by the hub id's last part
(`Qwen3-4B-Instruct-2507`, as the README's example does), or by the model path the engine was
started with; answers always carry the listed id.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import Request

from app.api.errors import APIError
from app.serving.runtime import runtime_of
from engine.client import EngineClient


def engine_of(request: Request) -> EngineClient:
    """The app's engine; 503 while it loads (or why it failed to)."""
    runtime = runtime_of(request)
    engine = runtime.engine
    if engine is None:
        error = runtime.engine_error
        message = (
            f"The model failed to load: {error}"
            if error
            else "The model is still loading; retry shortly."
        )
        raise APIError(
            503, message, type="server_error", code="model_not_ready", headers={"Retry-After": "5"}
        )
    return engine


async def served_model_id(request: Request, engine: EngineClient) -> str:
    """The model id /v1/models lists and every answer carries."""
    served = runtime_of(request).settings.served_model_name
    if served:
        return served
    model_id = engine.model_id
    if model_id is None and await engine.health():  # a remote engine reached at last
        model_id = engine.model_id
    if model_id is None:
        raise APIError(
            503,
            "The engine server is not reachable yet; retry shortly.",
            type="server_error",
            code="model_not_ready",
            headers={"Retry-After": "5"},
        )
    return public_model_id(model_id)


def public_model_id(model: str) -> str:
    """A checkpoint directory is named by its last component: answers never show server paths."""
    path = Path(model)
    return path.name if path.is_absolute() or path.is_dir() else model


def model_aliases(model_id: str, engine_model: str | None) -> set[str]:
    """Every name a request may use for the served model."""
    names = {model_id}
    for name in (model_id, engine_model):
        if name:
            names.add(name)
            names.add(name.rstrip("/").rsplit("/", 1)[-1])  # the hub id's or path's last part
    return names


async def check_model(request: Request, engine: EngineClient, model: str) -> str:
    """The listed id, when `model` names the served model; 404 in OpenAI's shape otherwise."""
    model_id = await served_model_id(request, engine)
    if model not in model_aliases(model_id, engine.model_id):
        raise APIError(
            404,
            f"The model `{model}` does not exist. This server serves `{model_id}`.",
            param="model",
            code="model_not_found",
        )
    return model_id
