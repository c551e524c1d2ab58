"""Structured output requested through the API: `response_format` and vLLM's `guided_*` fields.

Turns a request body into the engine's `StructuredOutputParams` (engine/structured_output.py),
checking what can be checked without compiling: a JSON schema against its meta-schema, so an
invalid one gets a 400 naming the problem before anything is queued. The engine compiles the
grammar (in a worker thread, cached) and refuses what xgrammar cannot compile, also with a 400.
"""

from __future__ import annotations

import json
from typing import Any

from engine.structured_output import StructuredOutputParams, check_json_schema


class InvalidRequest(ValueError):
    """A request the API answers with 400; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def _schema(value: Any, param: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"{param} is not valid JSON: {exc}", param) from exc
    if isinstance(value, bool):
        value = {} if value else {"not": {}}
    try:
        check_json_schema(value)
    except ValueError as exc:
        raise InvalidRequest(f"{param}: {exc}", param) from exc
    return value


def from_response_format(response_format: dict[str, Any] | None) -> StructuredOutputParams | None:
    """OpenAI's `response_format`: text (nothing), json_object, or json_schema (strict or not)."""
    if not response_format:
        return None
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputParams(json_object=True)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise InvalidRequest(
                "response_format json_schema needs `json_schema: {name, schema, strict}`",
                "response_format.json_schema",
            )
        schema = _schema(spec["schema"], "response_format.json_schema.schema")
        return StructuredOutputParams(json=schema)
    raise InvalidRequest(
        f"response_format type `{kind}` is not supported: use text, json_object or json_schema",
        "response_format.type",
    )


def from_guided_fields(body: Any) -> StructuredOutputParams | None:
    """vLLM's guided_json, guided_regex, guided_choice, guided_grammar (at most one)."""
    given = {
        name: getattr(body, name, None)
        for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
        if getattr(body, name, None) is not None
    }
    if not given:
        return None
    if len(given) > 1:
        raise InvalidRequest(f"give at most one of {', '.join(given)}", next(iter(given)))
    name, value = next(iter(given.items()))
    try:
        if name == "guided_json":
            return StructuredOutputParams(json=_schema(value, name))
        if name == "guided_regex":
            return StructuredOutputParams(regex=value)
        if name == "guided_choice":
            return StructuredOutputParams(choice=value)
        return StructuredOutputParams(grammar=value)
    except InvalidRequest:
        raise
    except ValueError as exc:
        raise InvalidRequest(f"{name}: {exc}", name) from exc


def structured_output_of(body: Any) -> StructuredOutputParams | None:
    """The request's output constraint from response_format or guided_* (not both)."""
    guided = from_guided_fields(body)
    response_format = from_response_format(getattr(body, "response_format", None))
    if guided is not None and response_format is not None:
        raise InvalidRequest(
            "response_format and guided_* cannot be combined: give one of them", "response_format"
        )
    return guided or response_format
