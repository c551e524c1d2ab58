"""Issue 17 item 6: a real tiny engine answers a hybrid-template chat with thinking.

Random weights never write `<think>` by themselves: the first turn is forced through
`<think>...</think>` and an answer with a guided regex, the answer's text is split by the API's
parser as the chat step shows it, and the follow-up's prompt reuses every full KV block
before the first answer (`num_cached_tokens`): only that answer, its thinking dropped, is
computed again.
"""

from __future__ import annotations

import re

import pytest

from app.api.reasoning import ReasoningSplitter
from app.chat.history import Answer
from app.chat.token_history import ChatCodec, TokenHistory
from engine import AsyncLLM, EngineConfig, SamplingParams
from engine.structured_output import StructuredOutputParams
from engine.tiny import write_checkpoint


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("hybrid"), template="hybrid")
    llm = AsyncLLM(EngineConfig(model=str(path)))
    yield llm
    llm.shutdown()


async def run(engine, prompt_ids, params):
    ids, text, last = [], "", None
    async for out in engine.generate(prompt_ids, params):
        ids += out.delta_token_ids
        text += out.delta_text
        last = out
    return ids, text, last


async def test_thinking_then_answer_and_the_follow_up_reuses_the_history(engine):
    tokenizer = engine.tokenizer
    history = TokenHistory(ChatCodec(tokenizer))
    assert history.thinking_switch
    first = history.prepare("What is two plus two?", [], "m1", 4096, 64)
    assert first.plan.turn.opening_ids == []  # the hybrid model opens <think> itself
    # The regex shapes the answer; the bias makes its tags the single tokens a real model writes.
    tags = {tokenizer.token_to_id("<think>"): 100.0, tokenizer.token_to_id("</think>"): 100.0}
    params = SamplingParams(
        temperature=0,
        max_tokens=40,
        logit_bias=tags,
        structured_output=StructuredOutputParams(regex=r"<think>[a-z]{3,10}</think>[a-z]{3,10}"),
    )
    ids, text, _ = await run(engine, first.plan.prompt_ids, params)
    match = re.fullmatch(r"<think>(.*)</think>(.*)", text, re.S)
    assert match, text
    assert ids[0] == tokenizer.token_to_id("<think>")
    assert tokenizer.token_to_id("</think>") in ids
    # What the chat's step and message show: the API's split of the same text.
    assert ReasoningSplitter(first.summary.thinking).split(text) == match.groups()
    first.commit(Answer(ids, text, "stop"))

    second = history.prepare("And three plus three?", [], "m2", 4096, 64)
    messages = [
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": text},
        {"role": "user", "content": "And three plus three?"},
    ]
    assert second.plan.prompt_ids == tokenizer.apply_chat_template(messages)
    assert match.group(1) not in tokenizer.decode(second.plan.prompt_ids)
    _, _, last = await run(engine, second.plan.prompt_ids, SamplingParams(max_tokens=1))
    before_answer = len(first.plan.prompt_ids)
    assert second.summary.reused_tokens == before_answer
    block = engine.config.block_size
    assert last.num_cached_tokens == before_answer // block * block


async def test_thinking_off_closes_an_empty_block_in_the_prompt(engine):
    history = TokenHistory(ChatCodec(engine.tokenizer))
    history.set_thinking(False)
    turn = history.prepare("Hi", [], "m1", 4096, 64)
    assert engine.tokenizer.decode(turn.plan.prompt_ids).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    # Even a forced <think> is content then: the switch is off.
    think = engine.tokenizer.token_to_id("<think>")
    params = SamplingParams(temperature=0, max_tokens=2, logit_bias={think: 100}, ignore_eos=True)
    _, text, _ = await run(engine, turn.plan.prompt_ids, params)
    assert text.startswith("<think>")
    assert ReasoningSplitter(turn.summary.thinking).split(text) == (None, text)
