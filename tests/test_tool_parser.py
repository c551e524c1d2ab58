"""Qwen3 tool-call parsing (app/api/tools.py) on strings: whole answers, and the same answers
streamed in pieces of every size, which must reassemble to the same calls."""

from __future__ import annotations

import json

import pytest

from app.api.structured import InvalidRequest
from app.api.tools import ToolCallStreamer, parse_tool_calls, plan_tools

ONE = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "n": {"a": [1, 2]}}}\n</tool_call>'
TWO = (
    'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def stream(text: str, size: int) -> tuple[str, list[dict]]:
    """Feed `text` in pieces of `size` characters; reassemble content and calls by index."""
    streamer = ToolCallStreamer()
    content, calls = "", {}
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    results = [streamer.feed(p) for p in pieces] + [streamer.finish()]
    for text_delta, deltas in results:
        content += text_delta
        for d in deltas:
            call = calls.setdefault(d["index"], {"id": None, "name": None, "arguments": ""})
            if "id" in d:
                assert call["id"] is None, "id and name come once, in the call's first delta"
                assert d["type"] == "function"
                call["id"], call["name"] = d["id"], d["function"]["name"]
            else:
                assert call["id"] is not None, "arguments come after the name"
            call["arguments"] += d["function"].get("arguments", "")
    return content, [calls[i] for i in sorted(calls)]


def test_one_call_parses_to_name_and_arguments_text():
    content, calls = parse_tool_calls(ONE)
    assert content is None
    assert len(calls) == 1 and calls[0]["type"] == "function"
    assert calls[0]["id"].startswith("call_")
    assert calls[0]["function"]["name"] == "get_weather"
    args = calls[0]["function"]["arguments"]
    assert json.loads(args) == {"city": "Paris", "n": {"a": [1, 2]}}


def test_content_before_the_calls_and_two_calls():
    content, calls = parse_tool_calls(TWO)
    assert content == "Let me look.\n"
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Rome"}, {}]
    assert calls[0]["id"] != calls[1]["id"]


@pytest.mark.parametrize("text", [ONE, TWO, "plain answer, no calls", "a < b <tool"])
@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13, 1000])
def test_streamed_pieces_reassemble_to_the_whole_answer(text, size):
    whole_content, whole_calls = parse_tool_calls(text)
    content, calls = stream(text, size)
    assert (content or None) == (whole_content if whole_calls else (text or None))
    assert [(c["name"], c["arguments"]) for c in calls] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in whole_calls
    ]


def test_marker_split_across_chunks_is_not_leaked_as_content():
    streamer = ToolCallStreamer()
    assert streamer.feed("Sure<tool")[0] == "Sure"  # '<tool' might start a call: held back
    content, deltas = streamer.feed('_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool')
    assert content == "" and deltas[0]["function"] == {"name": "f"}
    args = "".join(d["function"].get("arguments", "") for d in deltas)
    assert args == '{"x": 1}', "the call object's own closing brace is held back"
    _, more = streamer.feed("_call>")
    assert more == [] and streamer.finish() == ("", [])


def test_unterminated_last_call_is_still_a_call():
    content, calls = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {"x": 1}}')
    assert content is None and calls[0]["function"]["arguments"] == '{"x": 1}'


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>\n{"name": "f", "arguments": {"x": }}\n</tool_call>',  # bad JSON
        "<tool_call>not json at all</tool_call>",
    ],
)
def test_malformed_calls_leave_the_text_as_content(text):
    assert parse_tool_calls(text) == (text, [])


def test_plan_tools_choices():
    assert plan_tools(None, None, True).tools is None
    auto = plan_tools([WEATHER], None, True)
    assert auto.parse and auto.structured_output is None and auto.tools
    none = plan_tools([WEATHER], "none", True)
    assert not none.parse and none.tools  # still rendered, as vLLM does
    required = plan_tools([WEATHER], "required", False)
    assert required.parse and required.structured_output is not None
    named = plan_tools([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, True)
    assert named.structured_output is not None
    assert named.structured_output != required.structured_output


@pytest.mark.parametrize(
    "tools, choice, param",
    [
        (None, "required", "tool_choice"),
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice.function.name"),
        ([WEATHER], "sometimes", "tool_choice"),
        ([{"type": "retrieval"}], "auto", "tools.0.type"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}],
            "auto",
            "tools.0.function.parameters",
        ),
    ],
)
def test_plan_tools_refusals_name_the_field(tools, choice, param):
    with pytest.raises(InvalidRequest) as info:
        plan_tools(tools, choice, True)
    assert info.value.param == param
