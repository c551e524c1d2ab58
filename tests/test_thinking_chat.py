"""Issue 17 item 6 in the chat: thinking models with the token-id history.

The chat builds prompts as token ids (app/chat/token_history.py), not through the template,
so the reference is the real Qwen3 templates (engine/chat_templates.py) rendered by the
engine's tokenizer: every prompt the chat builds must equal the template's ids for the same
messages, thinking on and off, and earlier answers' thinking dropped as the model card asks;
only the last answer is computed again (everything before it is the previous prompt).
"""

from __future__ import annotations

import pytest

from app.api.reasoning import ThinkingMode
from app.chat.history import Answer
from app.chat.options import default_options, widgets
from app.chat.thinking import opening_mode
from app.chat.token_history import ChatCodec, TokenHistory
from engine.tiny import write_tokenizer
from engine.tokenizer import Tokenizer


@pytest.fixture(scope="module", params=["instruct", "hybrid", "thinking"])
def tokenizer(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    write_tokenizer(path, template=request.param)
    tok = Tokenizer.from_dir(path)
    tok.kind = request.param  # type: ignore[attr-defined]
    return tok


def generated(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text) + [tok.im_end_id]


def test_the_switch_shows_only_for_the_hybrid_template(tokenizer):
    codec = ChatCodec(tokenizer)
    assert codec.thinking.switchable is (tokenizer.kind == "hybrid")
    options = default_options({}, 4096)
    ids = [w.id for w in widgets(options, 4096, None, codec.thinking.switchable)]
    assert ("enable_thinking" in ids) is (tokenizer.kind == "hybrid")
    expected = {
        "instruct": (ThinkingMode.AUTO, ThinkingMode.AUTO),
        "hybrid": (ThinkingMode.AUTO, ThinkingMode.OFF),
        "thinking": (ThinkingMode.OPEN, ThinkingMode.OPEN),
    }[tokenizer.kind]
    assert tuple(opening_mode(codec.thinking.opening(on)) for on in (True, False)) == expected


@pytest.mark.parametrize("enable_thinking", [True, False])
def test_prompts_equal_the_template_and_drop_earlier_thinking(tokenizer, enable_thinking):
    history = TokenHistory(ChatCodec(tokenizer))
    history.set_thinking(enable_thinking)
    kwargs = {"enable_thinking": enable_thinking}
    messages = [{"role": "user", "content": "What is two plus two?"}]
    first = history.prepare("What is two plus two?", [], "m1", 4096, 64)
    assert first.plan.prompt_ids == tokenizer.apply_chat_template(messages, **kwargs)
    # The answer as the model wrote it after the prompt's opening (thinking included).
    opening = tokenizer.decode(first.plan.turn.opening_ids)
    no_thinking = "</think>" in opening or tokenizer.kind == "instruct"
    thinking = "" if no_thinking else "\nSECRET-THOUGHT\n</think>\n\n"
    if thinking and not opening.endswith("<think>\n"):
        thinking = "<think>" + thinking
    raw = thinking + "Four."
    first.commit(Answer(generated(tokenizer, raw), raw, "stop"))
    second = history.prepare("And three plus three?", [], "m2", 4096, 64)
    # The template renders the earlier answer from its full text (it drops the thinking).
    messages += [
        {"role": "assistant", "content": opening + raw},
        {"role": "user", "content": "And three plus three?"},
    ]
    reference = tokenizer.apply_chat_template(messages, **kwargs)
    assert second.plan.prompt_ids == reference
    assert "SECRET-THOUGHT" not in tokenizer.decode(second.plan.prompt_ids)
    # Everything up to the first answer is the first prompt: only the answer is recomputed.
    before_answer = tokenizer.apply_chat_template(messages[:1], **kwargs)
    before_answer = before_answer[: len(before_answer) - len(first.plan.turn.opening_ids)]
    assert second.plan.prompt_ids[: len(before_answer)] == before_answer
    sent = first.plan.prompt_ids + generated(tokenizer, raw)
    pairs = enumerate(zip(sent, second.plan.prompt_ids))
    same = next((i for i, (a, b) in pairs if a != b), len(sent))
    assert second.summary.reused_tokens == same
    if thinking:  # the answer changed: it starts where the thinking was
        assert same == len(before_answer)


@pytest.mark.parametrize("tokenizer", ["hybrid", "thinking"], indirect=True)
def test_an_answer_stopped_while_thinking_leaves_an_empty_turn(tokenizer):
    history = TokenHistory(ChatCodec(tokenizer))
    first = history.prepare("Hi", [], "m1", 4096, 64)
    raw = ("" if first.plan.turn.opening_ids else "<think>") + "SECRET-THOUGHT cut"
    first.commit(Answer(tokenizer.encode(raw), raw, "abort"))
    second = history.prepare("Bye", [], "m2", 4096, 64)
    text = tokenizer.decode(second.plan.prompt_ids)
    assert "SECRET-THOUGHT" not in text
    assert "<|im_start|>assistant\n<|im_end|>\n<|im_start|>user\nBye" in text


def test_the_turn_keeps_its_opening_when_stored(tokenizer):
    history = TokenHistory(ChatCodec(tokenizer))
    history.set_thinking(False)
    turn = history.prepare("Hi", [], "m1", 4096, 64)
    turn.commit(Answer(generated(tokenizer, "Hello"), "Hello", "stop"))
    restored = TokenHistory(ChatCodec(tokenizer))
    restored.restore(history.to_dict())
    restored.set_thinking(False)  # the switch is a chat setting, stored with the options
    a = history.prepare("Bye", [], "m2", 4096, 64).plan.prompt_ids
    assert restored.prepare("Bye", [], "m2", 4096, 64).plan.prompt_ids == a
