"""Tool calls in the OpenAI API, in Qwen3's format (vLLM's hermes parser, for Qwen3).

- `plan_tools`: checks `tools`, `tool_choice` and `parallel_tool_calls`; the tools go to the
  checkpoint's own chat template (which lists them in the system turn). `required` and a named
  function constrain decoding with xgrammar's Qwen3 structural tag, so the output is always a
  well-formed `<tool_call>` whose arguments match the function's JSON schema; `auto` lets the
  model choose and parses what it wrote; `none` parses nothing.
- `ToolCallStreamer`: turns the model's text, as it streams, into content deltas and OpenAI
  `delta.tool_calls` (first the call's index, id, type and name, then its arguments in pieces,
  as vLLM streams them). `parse_tool_calls` runs the same streamer over a whole answer, so a
  streamed call and a non-streamed one reassemble to the same name and arguments.

Qwen3 writes each call as `<tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>`; the
text before the first call is the message's content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from app.api.structured import InvalidRequest
from engine.structured_output import StructuredOutputParams, check_json_schema

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
# The head of a call's JSON, up to where its arguments start.
_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
# Most whitespace characters in a row inside constrained arguments (a random or confused model
# could otherwise pad forever; Qwen3 writes one-line JSON).
MAX_WHITESPACE = 1


@dataclass
class ToolPlan:
    """What a chat request's tools mean for the prompt, the decoding and the answer."""

    tools: list[dict[str, Any]] | None = None  # for the chat template
    parse: bool = False  # parse <tool_call> blocks out of the answer
    structured_output: StructuredOutputParams | None = None  # required / named function


def _check_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    checked = []
    for i, tool in enumerate(tools):
        param = f"tools.{i}"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise InvalidRequest("only tools of type `function` are supported", f"{param}.type")
        function = tool.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequest("a tool needs `function: {name, parameters}`", f"{param}.function")
        if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", function["name"]):
            raise InvalidRequest(
                "function names are 1-64 letters, digits, '_', '.' or '-'",
                f"{param}.function.name",
            )
        parameters = function.get("parameters")
        if parameters is not None:
            try:
                check_json_schema(parameters)
            except ValueError as exc:
                raise InvalidRequest(
                    f"{param}.function.parameters: {exc}", f"{param}.function.parameters"
                ) from exc
        checked.append({"type": "function", "function": function})
    return checked


def plan_tools(
    tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None, parallel: bool
) -> ToolPlan:
    """The ToolPlan of a request; InvalidRequest (a 400) for what cannot be served."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise InvalidRequest("tool_choice needs `tools`", "tool_choice")
        return ToolPlan()
    checked = _check_tools(tools)
    names = [t["function"]["name"] for t in checked]
    choice: str | dict[str, Any] = tool_choice if tool_choice is not None else "auto"
    if choice == "none":
        return ToolPlan(tools=checked)
    if choice == "auto":
        return ToolPlan(tools=checked, parse=True)
    if isinstance(choice, dict):
        function = choice.get("function") if choice.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise InvalidRequest(
                'a named tool_choice is {"type": "function", "function": {"name": ...}}',
                "tool_choice",
            )
        if name not in names:
            raise InvalidRequest(
                f"tool_choice names `{name}`, which is not among the tools ({', '.join(names)})",
                "tool_choice.function.name",
            )
        choice = {"type": "function", "function": {"name": name}}
    elif choice != "required":
        raise InvalidRequest(
            f"tool_choice must be none, auto, required or a named function, got {choice!r}",
            "tool_choice",
        )
    return ToolPlan(
        tools=checked, parse=True, structured_output=_forced_calls(checked, choice, parallel)
    )


def _forced_calls(
    tools: list[dict[str, Any]], choice: str | dict[str, Any], parallel: bool
) -> StructuredOutputParams:
    """xgrammar's Qwen3 structural tag for `required` (one or more calls) or a named function."""
    import xgrammar as xgr

    # Forced calls always follow the schema (xgrammar would drop it for strict=False tools).
    constrained: list[Any] = [
        {"type": "function", "function": {k: v for k, v in t["function"].items() if k != "strict"}}
        for t in tools
    ]
    forced: Any = choice
    try:
        tag = xgr.get_model_structural_tag(
            "qwen_3",
            tools=constrained,
            tool_choice=forced,
            reasoning="disabled",  # Qwen3-Instruct-2507 does not think
            parallel_tool_calls=parallel,
            max_whitespace_cnt=MAX_WHITESPACE,
        )
    except ValueError as exc:
        raise InvalidRequest(f"these tools cannot be forced: {exc}", "tools") from exc
    return StructuredOutputParams(structural_tag=tag.model_dump_json())


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _held_back(text: str, marker: str) -> int:
    """Length of the longest end of `text` that could be the start of `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _final_arguments(region: str) -> str:
    """A call's arguments: its text after `"arguments":`, less the call object's closing brace."""
    region = region.strip()
    if region.endswith("}"):
        region = region[:-1]
    return region.rstrip()


@dataclass
class _Call:
    start: int  # index in the text where the call's JSON starts (after <tool_call>)
    id: str = field(default_factory=new_call_id)
    name: str | None = None
    args_start: int = 0
    sent_args: str = ""
    closed: bool = False
    raw: str = ""  # the call's JSON text once closed


class ToolCallStreamer:
    """Content and tool-call deltas of one answer, fed its text piece by piece.

    Content is what the model writes before its first `<tool_call>`; text after a call starts
    belongs to calls (the newline between two calls is not content), as vLLM's hermes parser
    reports it. `feed` and `finish` return (content delta, tool-call deltas).
    """

    def __init__(self) -> None:
        self.text = ""
        self.pos = 0  # everything before it has been handled
        self.calls: list[_Call] = []
        self.content = ""
        self.in_call = False

    @property
    def has_calls(self) -> bool:
        return any(c.name is not None for c in self.calls)

    def feed(self, delta: str) -> tuple[str, list[dict[str, Any]]]:
        self.text += delta
        return self._advance(final=False)

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        return self._advance(final=True)

    def _advance(self, final: bool) -> tuple[str, list[dict[str, Any]]]:
        content, deltas = "", []
        while True:
            if not self.in_call:
                start = self.text.find(TOOL_CALL_START, self.pos)
                if start < 0:
                    keep = 0 if final else _held_back(self.text[self.pos :], TOOL_CALL_START)
                    end = len(self.text) - keep
                    if not self.calls:  # text after the calls is not content
                        content += self.text[self.pos : end]
                    self.pos = end
                    break
                if not self.calls:
                    content += self.text[self.pos : start]
                self.pos = start + len(TOOL_CALL_START)
                self.calls.append(_Call(start=self.pos))
                self.in_call = True
            call = self.calls[-1]
            end = self.text.find(TOOL_CALL_END, call.start)
            closed = end >= 0 or final
            body_end = end if end >= 0 else len(self.text)
            if call.name is None:
                head = _CALL_HEAD.match(self.text, call.start, body_end)
                if head is None:
                    if not closed:
                        break  # the name is not complete yet
                    # Not a call we understand: its text stays in the answer as content.
                    call.raw = self.text[call.start : body_end]
                    if len(self.calls) == 1:
                        content += TOOL_CALL_START + call.raw + (TOOL_CALL_END if end >= 0 else "")
                    self.calls.pop()
                else:
                    call.name = json.loads(f'"{head.group(1)}"')
                    call.args_start = head.end()
                    deltas.append(
                        {
                            "index": self._index(call),
                            "id": call.id,
                            "type": "function",
                            "function": {"name": call.name},
                        }
                    )
            if call.name is not None:
                region = self.text[call.args_start : body_end]
                if closed:
                    args = _final_arguments(region)
                else:
                    region = region[: len(region) - _held_back(region, TOOL_CALL_END)]
                    args = _final_arguments(region)
                if args.startswith(call.sent_args) and len(args) > len(call.sent_args):
                    deltas.append(
                        {
                            "index": self._index(call),
                            "function": {"arguments": args[len(call.sent_args) :]},
                        }
                    )
                    call.sent_args = args
                if closed:
                    call.closed = True
                    call.raw = self.text[call.start : body_end]
            if not closed:
                break
            self.in_call = False
            self.pos = body_end + len(TOOL_CALL_END) if end >= 0 else len(self.text)
            if final and end < 0:
                break
        return content, deltas

    def _index(self, call: _Call) -> int:
        return [c for c in self.calls if c.name is not None].index(call)

    def tool_calls(self) -> list[dict[str, Any]]:
        """The calls so far in the shape of `message.tool_calls`."""
        return [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": c.sent_args},
            }
            for c in self.calls
            if c.name is not None
        ]


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls) of a whole answer; the whole text as content when a call is not
    valid JSON (as vLLM's hermes parser does)."""
    streamer = ToolCallStreamer()
    content, _ = streamer.feed(text)
    more, _ = streamer.finish()
    content += more
    calls = streamer.tool_calls()
    if not calls:
        return text, []
    for call in streamer.calls:
        try:
            json.loads(call.raw)
        except json.JSONDecodeError:
            return text, []
    return content or None, calls
