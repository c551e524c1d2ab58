"""Issue 17 item 6: thinking models. A Qwen3 answer's <think> block comes back as
`reasoning_content`, apart from `content`, split exactly at </think>, streamed or not.

The parser (app/api/reasoning.py) is checked on strings, then end to end with the official
`openai` client on the tiny random checkpoint dressed with Qwen3's two thinking templates
(engine/chat_templates.py, what `python -m engine.tiny --template` writes): the
hybrid one (Qwen3-4B: the model writes <think>; `enable_thinking: false` closes an empty block
in the prompt) and the thinking-only one (Qwen3-4B-Thinking-2507: the prompt opens <think>).
Random weights write arbitrary text, so the answer's shape is forced with `guided_regex` or
`logit_bias`, and the reference split is the raw text of the same greedy answer obtained
through /v1/completions on the same prompt ids, cut with a regular expression.
"""

from __future__ import annotations

import json
import re
import shutil

import openai
import pytest

from app.api.reasoning import ReasoningSplitter, ThinkingMode
from engine.chat_templates import HYBRID_TEMPLATE, THINKING_TEMPLATE
from tests.api_helpers import api_server

THINK_START_ID, THINK_END_ID = 151667, 151668


MESSAGES = [{"role": "user", "content": "What is two plus two?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


# ---- the parser on strings ------------------------------------------------------------------


def pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def streamed(mode: ThinkingMode, text: str, size: int) -> tuple[str, str]:
    splitter = ReasoningSplitter(mode)
    reasoning = content = ""
    for piece in pieces(text, size) + [None]:
        r, c = splitter.finish() if piece is None else splitter.feed(piece)
        reasoning, content = reasoning + r, content + c
    return reasoning, content


CASES = [
    # (mode, answer, reasoning_content, content)
    (ThinkingMode.AUTO, "<think>\nadd them\n</think>\n\nFour.", "\nadd them\n", "\n\nFour."),
    (ThinkingMode.AUTO, "\n<think>a</think>b", "a", "b"),
    (ThinkingMode.AUTO, "Four. </think> stays", None, "Four. </think> stays"),
    (ThinkingMode.AUTO, "<thin", None, "<thin"),
    (ThinkingMode.AUTO, "<think>cut off", "cut off", None),
    (ThinkingMode.AUTO, "<think>all</think>", "all", None),
    (ThinkingMode.OPEN, "</think>", None, None),
    (ThinkingMode.OPEN, "add them\n</think>\n\nFour.", "add them\n", "\n\nFour."),
    (ThinkingMode.OPEN, "still thinking <", "still thinking <", None),
    (ThinkingMode.OPEN, "a</think>b</think>c", "a", "b</think>c"),
    (ThinkingMode.OFF, "<think>x</think>y", None, "<think>x</think>y"),
    (ThinkingMode.CONSTRAINED, '{"a": 1}', None, '{"a": 1}'),
    (ThinkingMode.CONSTRAINED, "ab</think>cd", "ab", "cd"),
]


@pytest.mark.parametrize("mode, text, reasoning, content", CASES)
def test_whole_answers_split_exactly_at_the_end_tag(mode, text, reasoning, content):
    assert ReasoningSplitter(mode).split(text) == (reasoning, content)


@pytest.mark.parametrize("mode, text, reasoning, content", CASES)
@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 1000])
def test_streamed_pieces_reassemble_to_the_whole_split(mode, text, reasoning, content, size):
    got_reasoning, got_content = streamed(mode, text, size)
    assert got_reasoning == (reasoning or "")
    assert got_content == (content or "")


def test_no_part_of_a_tag_leaks_into_either_side():
    splitter = ReasoningSplitter(ThinkingMode.AUTO)
    assert splitter.feed("<thi") == ("", "")
    assert splitter.feed("nk>ab</th") == ("ab", "")
    assert splitter.feed("ink>c") == ("", "c")


# ---- end to end -----------------------------------------------------------------------------


def checkpoint_with_template(tmp_path_factory, tiny_checkpoint, name: str, template: str):
    """The tiny checkpoint with another chat template (weights linked, not copied)."""
    target = tmp_path_factory.mktemp(name)
    for item in tiny_checkpoint.iterdir():
        if item.name == "tokenizer_config.json":
            config = json.loads(item.read_text())
            config["chat_template"] = template
            (target / item.name).write_text(json.dumps(config))
        elif item.suffix == ".safetensors":
            (target / item.name).symlink_to(item)
        else:
            shutil.copy(item, target / item.name)
    return target


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory, tiny_checkpoint):
    path = checkpoint_with_template(tmp_path_factory, tiny_checkpoint, "hybrid", HYBRID_TEMPLATE)
    with api_server(path, max_num_seqs=4) as live:
        yield live


@pytest.fixture(scope="module")
def thinking(tmp_path_factory, tiny_checkpoint):
    path = checkpoint_with_template(
        tmp_path_factory, tiny_checkpoint, "thinking", THINKING_TEMPLATE
    )
    with api_server(path, max_num_seqs=4) as live:
        yield live


def client_of(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def model_of(server) -> str:
    return str(server.engine.config.model)


def raw_answer(server, messages, max_tokens: int, extra: dict, tools=None, **template) -> str:
    """The same greedy answer as raw text: the chat's prompt ids through /v1/completions."""
    ids = server.engine.tokenizer.apply_chat_template(messages, tools=tools, **template)
    done = client_of(server).completions.create(
        model=model_of(server),
        prompt=ids,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={k: v for k, v in extra.items() if k != "chat_template_kwargs"},
    )
    return done.choices[0].text


def chat(server, stream: bool, **kw):
    """A greedy chat answer: (reasoning_content, content, tool_calls, finish_reason).

    Streamed, the deltas are joined (None when a side got no text, as non-streamed)."""
    client = client_of(server)
    kw = {"model": model_of(server), "messages": MESSAGES, "temperature": 0, **kw}
    if not stream:
        choice = client.chat.completions.create(**kw).choices[0]
        message = choice.message
        calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
        reasoning = getattr(message, "reasoning_content", None)
        return reasoning, message.content, calls, choice.finish_reason
    reasoning = content = ""
    calls: dict[int, list[str]] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kw):
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, "reasoning_content", None) or ""
        content += delta.content or ""
        for call in delta.tool_calls or []:
            entry = calls.setdefault(call.index, ["", ""])
            entry[0] += call.function.name or ""
            entry[1] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return (reasoning or None, content or None, [tuple(calls[i]) for i in sorted(calls)], finish)


HYBRID_REGEX = r"<think>[a-z]{3,10}</think>[a-z]{3,10}"


@pytest.mark.parametrize("stream", [False, True])
def test_hybrid_model_thinking_splits_at_the_end_tag(hybrid, stream):
    extra = {"guided_regex": HYBRID_REGEX}
    raw = raw_answer(hybrid, MESSAGES, 40, extra)
    match = re.fullmatch(r"<think>(.*)</think>(.*)", raw, re.S)
    assert match, raw
    got = chat(hybrid, stream, max_tokens=40, extra_body=extra)
    assert got == (match.group(1), match.group(2), [], "stop")


@pytest.mark.parametrize("stream", [False, True])
def test_hybrid_model_with_thinking_off_answers_content_only(hybrid, stream):
    options = {"enable_thinking": False}
    ids = hybrid.engine.tokenizer.apply_chat_template(MESSAGES, **options)
    assert hybrid.engine.tokenizer.decode(ids).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    extra = {"chat_template_kwargs": options, "guided_regex": "[a-z]{3,10}", "ignore_eos": True}
    raw = raw_answer(hybrid, MESSAGES, 8, extra, **options)
    got = chat(hybrid, stream, max_tokens=8, extra_body=extra)
    assert got[:2] == (None, raw)


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_after_the_thinking(hybrid, stream):
    extra = {
        "guided_regex": r'<think>[a-z]{3,10}</think>\n<tool_call>\n\{"name": "get_weather", '
        r'"arguments": \{"city": "[a-z]{2,8}"\}\}\n</tool_call>',
    }
    raw = raw_answer(hybrid, MESSAGES, 80, extra, tools=[WEATHER])
    match = re.fullmatch(
        r'<think>(.*)</think>\n<tool_call>\n\{"name": "get_weather", '
        r'"arguments": (\{.*\})\}\n</tool_call>',
        raw,
        re.S,
    )
    assert match, raw
    reasoning, content, calls, finish = chat(
        hybrid, stream, max_tokens=80, tools=[WEATHER], extra_body=extra
    )
    assert reasoning == match.group(1)
    assert content in (None, "\n")  # the newline between </think> and the call
    assert [(name, json.loads(args)) for name, args in calls] == [
        ("get_weather", json.loads(match.group(2)))
    ]
    assert finish == "tool_calls"


def test_include_reasoning_false_drops_it(hybrid):
    extra = {"guided_regex": HYBRID_REGEX, "include_reasoning": False}
    raw = raw_answer(hybrid, MESSAGES, 40, {"guided_regex": HYBRID_REGEX})
    got = chat(hybrid, False, max_tokens=40, extra_body=extra)
    assert got[:2] == (None, raw.split("</think>")[1])


def test_earlier_reasoning_is_dropped_from_the_prompt(hybrid):
    """The model card: past turns' thinking is not shown to the model again; the template
    does it, fed the assistant message's reasoning_content (accepted in the history)."""
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "SECRET-THOUGHT"},
        {"role": "user", "content": "Bye"},
    ]
    ids = hybrid.engine.tokenizer.apply_chat_template(history)
    assert "SECRET-THOUGHT" not in hybrid.engine.tokenizer.decode(ids)
    done = client_of(hybrid).chat.completions.create(
        model=model_of(hybrid), messages=history, max_tokens=2, temperature=0
    )
    assert done.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_model_answer_starts_inside_the_block(thinking, stream):
    ids = thinking.engine.tokenizer.apply_chat_template(MESSAGES)
    assert thinking.engine.tokenizer.decode(ids).endswith("<|im_start|>assistant\n<think>\n")
    # </think> forced first: the reasoning is empty and everything after it is content.
    extra = {"logit_bias": {str(THINK_END_ID): 100}, "ignore_eos": True}
    raw = raw_answer(thinking, MESSAGES, 1, extra)
    assert raw == "</think>"
    got = chat(thinking, stream, max_tokens=1, extra_body=extra)
    assert got == (None, None, [], "length")
    # </think> never sampled: the answer was cut off while thinking, all of it reasoning.
    extra = {"logit_bias": {str(THINK_END_ID): -100}, "ignore_eos": True}
    raw = raw_answer(thinking, MESSAGES, 6, extra)
    got = chat(thinking, stream, max_tokens=6, extra_body=extra)
    assert got == (raw, None, [], "length")


@pytest.mark.parametrize("stream", [False, True])
def test_thinking_model_under_a_grammar_splits_only_at_an_end_tag(thinking, stream):
    extra = {"guided_regex": r"[a-z]{3,10}</think>[a-z]{3,10}"}
    raw = raw_answer(thinking, MESSAGES, 40, extra)
    match = re.fullmatch(r"(.*)</think>(.*)", raw, re.S)
    assert match, raw
    assert chat(thinking, stream, max_tokens=40, extra_body=extra) == (
        match.group(1),
        match.group(2),
        [],
        "stop",
    )
    # A JSON answer (response_format) has no </think>: it is content, not reasoning.
    done = client_of(thinking).chat.completions.create(
        model=model_of(thinking),
        messages=MESSAGES,
        max_tokens=30,
        temperature=0,
        response_format={"type": "json_object"},
    )
    message = done.choices[0].message
    assert getattr(message, "reasoning_content", None) is None
    assert message.content and message.content.lstrip().startswith("{")


def test_a_follow_up_reuses_the_history_up_to_the_last_answer(hybrid):
    """The answer's thinking is not part of the next prompt (the template drops it), so only
    the last answer is computed again: every full KV block of the history before it is a
    prefix-cache hit."""
    extra = {"guided_regex": HYBRID_REGEX}
    first = client_of(hybrid).chat.completions.create(
        model=model_of(hybrid), messages=MESSAGES, max_tokens=40, temperature=0, extra_body=extra
    )
    message = first.choices[0].message
    assert getattr(message, "reasoning_content", None)
    history = [
        *MESSAGES,
        {"role": "assistant", "content": message.content},
        {"role": "user", "content": "And three plus three?"},
    ]
    tokenizer = hybrid.engine.tokenizer
    before_answer = tokenizer.apply_chat_template(MESSAGES)  # up to "<|im_start|>assistant\n"
    follow_up = tokenizer.apply_chat_template(history)
    assert follow_up[: len(before_answer)] == before_answer
    done = client_of(hybrid).chat.completions.create(
        model=model_of(hybrid), messages=history, max_tokens=1, temperature=0
    )
    block = hybrid.engine.config.block_size
    cached = done.usage.prompt_tokens_details.cached_tokens
    assert done.usage.prompt_tokens == len(follow_up)
    assert cached == len(before_answer) // block * block, (cached, len(before_answer))
