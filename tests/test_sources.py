"""The chat side of over-context documents, in process with a mocked Chainlit context and the
real engine on the tiny checkpoint: sources under the answer (side elements named by page),
notes with numbers, a follow-up searched again, a whole-document question summarized part by
part with a live line, and the reading line of a re-read the history thought was cached."""

from __future__ import annotations

import asyncio
import re
import uuid
from unittest.mock import AsyncMock, Mock

import pytest

from app.serving.runtime import Runtime, set_runtime
from app.settings import AppSettings

MAX_MODEL_LEN = 4096


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    from engine import AsyncLLM, EngineConfig

    llm = AsyncLLM(EngineConfig(model=str(tiny_checkpoint), max_model_len=MAX_MODEL_LEN,
                                max_num_batched_tokens=512, kv_cache_memory_gb=0.1))
    yield llm
    llm.shutdown()


@pytest.fixture
async def emitter():
    from chainlit.context import ChainlitContext, context_var
    from chainlit.emitter import BaseChainlitEmitter
    from chainlit.session import WebsocketSession

    session = Mock(spec=WebsocketSession)
    session.id = str(uuid.uuid4())
    session.thread_id = str(uuid.uuid4())
    session.user, session.user_env, session.chat_settings = None, {}, {}
    session.files, session.has_first_interaction, session.language = {}, True, "en-US"
    session.chat_profile, session.client_type = None, "webapp"
    session.persist_file = AsyncMock(side_effect=lambda **kw: {"id": str(uuid.uuid4())})
    emitter = Mock(spec=BaseChainlitEmitter)
    for name in ("send_step", "update_step", "delete_step", "stream_start", "send_token", "emit",
                 "task_start", "task_end", "send_element"):
        setattr(emitter, name, AsyncMock())
    emitter.set_chat_settings = Mock()
    context_var.set(ChainlitContext(session, emitter=emitter))
    return emitter


def _calls(mock) -> list[dict]:
    return [call.args[0] for call in mock.call_args_list]


def _element_texts(session) -> dict[str, str]:
    """What each element sent carries (Chainlit keeps a text element's content as a file)."""
    return {c.kwargs["name"]: c.kwargs["content"] for c in session.persist_file.call_args_list}


def _chat(engine, tmp_path, language="en-US", **settings):
    from app.chat.session import ChatSession

    runtime = Runtime(settings=AppSettings(data_dir=tmp_path, **settings), model_name="tiny")
    runtime.bind_loop(asyncio.get_running_loop())
    runtime.set_engine(engine)
    set_runtime(runtime)
    chat = ChatSession(runtime, language)
    chat.options = {"system_prompt": "", "temperature": 0.0, "top_p": 1.0, "top_k": 0, "max_tokens": 8}
    return chat


def _report(tmp_path) -> str:
    pages = []
    for page in range(1, 121):
        body = "\n\n".join(
            f"Item {page}.{i}: the ledger records ordinary deliveries of grain and timber." for i in range(4)
        )
        if page == 57:
            body += "\n\nThe auditor found the missing sapphire brooch in the east granary."
        if page == 98:
            body += "\n\nThe harbour toll was raised to nine florins in spring."
        pages.append(f"[page {page}]\n{body}")
    path = tmp_path / "ledger.txt"
    path.write_text("\n\n".join(pages))
    return str(path)


async def test_sources_under_the_answer_and_a_follow_up_searched_again(emitter, engine, tmp_path):
    import chainlit as cl

    chat = _chat(engine, tmp_path)
    message = cl.Message(
        content="Where was the sapphire brooch found?",
        elements=[cl.File(name="ledger.txt", path=_report(tmp_path))],
    )
    await chat.answer(message)
    sent = _calls(emitter.send_step)
    notes = [s["output"] for s in sent if s["type"] == "assistant_message" and "ledger.txt" in s["output"]]
    assert any("searched again for every question" in n and "from pages 57" in n for n in notes)
    answer = [s for s in sent if s["type"] == "assistant_message"][-1]
    assert re.search(r"\*\*Sources:\*\* p\. 57(\n|$| ·)", answer["output"])
    assert answer["output"].index("**Sources:**") < answer["output"].index("prompt tokens")
    elements = _calls(emitter.send_element)
    brooch = [e for e in elements if e["name"] == "p. 57"]
    assert brooch and brooch[0]["display"] == "side" and brooch[0]["forId"] == answer["id"]
    from chainlit.context import context

    assert "sapphire brooch" in _element_texts(context.session)["p. 57"]
    turns = chat.history.conversation.turns
    assert [p.kind for p in turns[0].pieces] == ["passages", "question"]
    first_prompt = len(turns[0].pieces[0].ids)

    emitter.send_element.reset_mock()
    emitter.send_step.reset_mock()
    await chat.answer(cl.Message(content="How much was the harbour toll raised to?"))
    answer = [s for s in _calls(emitter.send_step) if s["type"] == "assistant_message"][-1]
    assert "p. 98" in answer["output"]
    assert any(e["name"] == "p. 98" for e in _calls(emitter.send_element))
    assert "nine florins" in _element_texts(context.session)["p. 98"]
    stats = re.search(r"([\d,]+) prompt tokens · ([\d,]+) cached", answer["output"])
    assert stats and int(stats.group(2).replace(",", "")) > first_prompt  # the first turn was reused
    assert len(chat.history.conversation.turns) == 2 and chat.history.conversation.first_turn == 0


async def test_a_summary_question_is_answered_from_part_summaries_with_a_live_line(emitter, engine, tmp_path):
    import chainlit as cl

    chat = _chat(engine, tmp_path, passage_share=0.2)  # short part summaries: a fast map step
    message = cl.Message(
        content="Summarize this document.",
        elements=[cl.File(name="ledger.txt", path=_report(tmp_path))],
    )
    await chat.answer(message)
    steps = [s for s in _calls(emitter.send_step) + _calls(emitter.update_step) if s["type"] == "tool"]
    live = [s["name"] for s in steps if s["name"].startswith("Summarizing ledger.txt")]
    assert live[0].startswith("Summarizing ledger.txt: 0 / ")
    total = int(re.search(r"/ (\d+) parts", live[0]).group(1))
    assert total > 1 and any(f": {total} / {total} parts (100%" in name for name in live)
    assert any(re.fullmatch(rf"Summarized ledger\.txt: {total} parts in [\d.]+ s", s["name"]) for s in steps)
    sent = _calls(emitter.send_step)
    note = next(s["output"] for s in sent if "about the whole document" in s["output"])
    assert f"summarized each of its {total} parts (pages 1-120)" in note
    answer = [s for s in sent if s["type"] == "assistant_message"][-1]
    assert "**Sources:** part 1 · part 2" in answer["output"]
    turn = chat.history.conversation.turns[-1]
    assert any(s.kind == "section" for p in turn.pieces for s in p.sources)


async def test_reading_line_opens_when_the_engine_reuses_less_than_the_history_expected(emitter):
    from app.chat.progress import ReadingProgress

    # The history expected its 9,000-token prefix cached (100 new tokens): no line at first ...
    reading = ReadingProgress("en-US", 9100, 100, [], [], min_tokens=2048, interval=0.0)
    await reading.open_if_needed()
    assert not emitter.send_step.called
    # ... but the engine reuses nothing (evicted, or a restart): the line appears with numbers.
    await reading.progress(512, cached_tokens=0)
    opened = _calls(emitter.send_step)[0]
    assert opened["name"] == "the conversation (9,100 tokens)"
    await reading.progress(4096, cached_tokens=0)
    assert _calls(emitter.update_step)[-1]["name"].startswith("the conversation: 4,096 / 9,100 tokens (45%")
    await reading.close(0, 3.0)
    assert _calls(emitter.update_step)[-1]["name"] == "the conversation (9,100 tokens in 3.0 s)"

    emitter.send_step.reset_mock()
    cached = ReadingProgress("en-US", 9100, 100, [], [], min_tokens=2048, interval=0.0)
    await cached.progress(9000, cached_tokens=8992)  # the engine did reuse it: no line
    assert not emitter.send_step.called
