"""The chat UI with PAGECHAT_ENGINE_URL: the history travels as messages to an OpenAI-compatible
upstream (a fake one on 127.0.0.1), with the same streaming, stats and stop behaviour."""

from __future__ import annotations

import asyncio
import gc

import pytest

from app.chat.message_history import Transcript, estimate_tokens, user_content
from app.serving.runtime import Runtime, set_runtime
from app.settings import AppSettings
from engine import EngineConfig
from tests.api_helpers import UPSTREAM_MODEL, LiveServer, UpstreamLog, fake_upstream
from tests.test_app_handlers import _outputs, emitter  # noqa: F401  (fixture)


@pytest.fixture(autouse=True)
def unfrozen():
    """_load_engine freezes the heap, as the server does once; not the rest of the test run's."""
    yield
    gc.unfreeze()


@pytest.fixture(scope="module")
def upstream():
    log = UpstreamLog()
    with LiveServer(fake_upstream(log)) as server:
        server.log = log
        yield server


async def remote_runtime(upstream, tmp_path) -> Runtime:
    from app.serving.server import _load_engine

    settings = AppSettings(data_dir=tmp_path, engine_url=upstream.url)
    runtime = Runtime(settings=settings, model_name=UPSTREAM_MODEL,
                      engine_config=EngineConfig(model=UPSTREAM_MODEL))
    runtime.bind_loop(asyncio.get_running_loop())
    set_runtime(runtime)
    await _load_engine(runtime)
    assert runtime.engine is not None and runtime.engine.tokenizer is None
    return runtime


async def test_follow_up_sends_the_whole_history_as_messages(emitter, upstream, tmp_path):  # noqa: F811
    import chainlit as cl

    from app.chat.session import ChatSession

    upstream.log.bodies.clear()
    runtime = await remote_runtime(upstream, tmp_path)
    assert runtime.engine.max_model_len == 4096  # from the upstream's model card
    chat = ChatSession(runtime, "en-US")
    chat.options = {"system_prompt": "Be brief.", "temperature": 0.0, "top_p": 1.0, "top_k": 0,
                    "max_tokens": 64}
    await chat.answer(cl.Message(content="alpha beta"))
    await chat.answer(cl.Message(content="gamma"))

    first, second = upstream.log.bodies[-2:]
    assert first["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "alpha beta"},
    ]
    assert second["messages"][1:] == [
        {"role": "user", "content": "alpha beta"},
        {"role": "assistant", "content": "alpha beta "},  # the fake upstream echoes
        {"role": "user", "content": "gamma"},
    ]
    answers = [s for s in _outputs(emitter.send_step) if s["type"] == "assistant_message"]
    assert answers[-1]["output"].startswith("gamma")
    assert "prompt tokens" in answers[-1]["output"]
    restored = Transcript.from_dict(chat.history.transcript.to_dict())
    assert restored == chat.history.transcript and len(restored.turns) == 2
    await runtime.engine.aclose()


async def test_upstream_refusal_is_shown_and_the_chat_goes_on(emitter, upstream, tmp_path):  # noqa: F811
    import chainlit as cl

    from app.chat.session import ChatSession

    runtime = await remote_runtime(upstream, tmp_path)
    chat = ChatSession(runtime, "en-US")
    chat.options = {"system_prompt": "", "temperature": 0.0, "top_p": 1.0, "top_k": 0, "max_tokens": 16}
    await chat.answer(cl.Message(content="bad"))
    assert "prompt is bad" in _outputs(emitter.send_step)[-1]["output"]
    assert chat.history.transcript.turns == []
    await chat.answer(cl.Message(content="fine"))
    assert len(chat.history.transcript.turns) == 1
    await runtime.engine.aclose()


def test_transcript_drops_oldest_turns_to_fit():
    transcript = Transcript(system_prompt="sys")
    for i in range(10):
        transcript.commit(f"question {i} " + "x" * 400, "answer " + "y" * 400)
    content = user_content("last?", [("notes.txt", "z" * 100)])
    messages, dropped = transcript.messages(content, max_model_len=1200, max_tokens=100)
    assert dropped > 0 and messages[0]["role"] == "system"
    assert messages[-1]["content"].startswith('<document name="notes.txt">')
    assert sum(estimate_tokens(m["content"]) for m in messages) <= 1100
    kept = [m["content"] for m in messages if m["role"] == "user"][:-1]
    assert kept[0].startswith(f"question {dropped} ")  # the oldest went first
