"""Handlers in-process with a mocked Chainlit context (no browser, no socket) and the real
engine on the tiny checkpoint: the loading notice, and prefill progress of a long document."""

from __future__ import annotations

import asyncio
import uuid
from unittest.mock import AsyncMock, Mock

import pytest

from app.serving.runtime import Runtime, set_runtime
from app.settings import AppSettings


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    from engine import AsyncLLM, EngineConfig

    # small prefill chunks, so a short document takes several steps to read
    llm = AsyncLLM(EngineConfig(model=str(tiny_checkpoint), max_model_len=4096,
                                max_num_batched_tokens=128, kv_cache_memory_gb=0.05))
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
    session.files, session.has_first_interaction, session.language = {}, True, "zh-CN"
    emitter = Mock(spec=BaseChainlitEmitter)
    for name in ("send_step", "update_step", "delete_step", "stream_start", "send_token", "emit",
                 "task_start", "task_end", "send_element"):
        setattr(emitter, name, AsyncMock())
    emitter.set_chat_settings = Mock()  # Chainlit calls it without awaiting
    context_var.set(ChainlitContext(session, emitter=emitter))
    return emitter


def _outputs(mock) -> list[dict]:
    return [call.args[0] for call in mock.call_args_list]


async def test_page_says_the_model_is_loading_then_ready(emitter, engine, tmp_path):
    from app.chat.session import ChatSession

    runtime = Runtime(settings=AppSettings(data_dir=tmp_path, demo=True), model_name="tiny-qwen3")
    runtime.bind_loop(asyncio.get_running_loop())
    set_runtime(runtime)
    chat = ChatSession(runtime, "zh-CN")
    await asyncio.wait_for(chat.start(), 5)  # returns at once: the input stays usable
    [notice] = _outputs(emitter.send_step)
    assert "正在加载模型" in notice["output"] and "tiny-qwen3" in notice["output"]

    runtime.set_engine(engine)  # what the lifespan does once the weights are loaded
    for _ in range(100):
        if emitter.update_step.call_args_list and emitter.emit.call_args_list:
            break
        await asyncio.sleep(0.02)
    updated = _outputs(emitter.update_step)[-1]
    assert updated["id"] == notice["id"] and "已就绪" in updated["output"] and "演示模式" in updated["output"]
    event, widgets = emitter.emit.call_args.args
    assert event == "chat_settings"
    initial = {w["id"]: w["initial"] for w in widgets}
    assert initial["temperature"] == engine.generation_defaults["temperature"]  # 0.7 from the checkpoint
    assert initial["top_k"] == engine.generation_defaults["top_k"]
    assert initial["max_tokens"] == 200  # demo default


async def test_reading_a_document_shows_prefill_progress(emitter, engine, tmp_path, monkeypatch):
    import chainlit as cl

    from app.chat import session as chat_session
    from app.chat.session import ChatSession

    monkeypatch.setattr(chat_session, "PROGRESS_INTERVAL_S", 0.0)  # every chunk, not every 0.5 s
    runtime = Runtime(settings=AppSettings(data_dir=tmp_path), model_name="tiny")
    runtime.bind_loop(asyncio.get_running_loop())
    runtime.set_engine(engine)
    set_runtime(runtime)
    chat = ChatSession(runtime, "en-US")
    chat.options = {"system_prompt": "", "temperature": 0.0, "top_p": 1.0, "top_k": 0, "max_tokens": 4}

    path = tmp_path / "report.txt"
    path.write_text("\n\n".join(f"Line {i} of the quarterly report." for i in range(120)))
    message = cl.Message(content="Summarize.", elements=[cl.File(name="report.txt", path=str(path))])
    await chat.answer(message)

    steps = [s for s in _outputs(emitter.send_step) + _outputs(emitter.update_step) if s["type"] == "tool"]
    progress = [s["output"] for s in steps if "tokens (" in s["output"] and "%" in s["output"]]
    assert steps[0]["name"].startswith("report.txt (")
    assert len({p for p in progress}) >= 2  # the count grew while the prompt was read
    assert steps[-1]["name"].startswith("report.txt (") and " s)" in steps[-1]["name"]
    assert steps[-1]["end"] and "(100%)" in steps[-1]["output"]
    answer = [s for s in _outputs(emitter.send_step) if s["type"] == "assistant_message"][-1]
    assert "prompt tokens" in answer["output"]
    assert len(chat.history.conversation.turns) == 1 and chat.history.conversation.turns[0].documents


async def test_a_model_that_fails_to_load_is_explained(emitter, tmp_path):
    from app.chat.session import ChatSession
    from app.serving.server import _load_engine
    from engine import EngineConfig

    runtime = Runtime(settings=AppSettings(data_dir=tmp_path), model_name="missing",
                      engine_config=EngineConfig(model=str(tmp_path / "no-such-model")))
    runtime.bind_loop(asyncio.get_running_loop())
    set_runtime(runtime)
    await _load_engine(runtime)  # what the lifespan runs in the background
    assert runtime.engine is None and "no-such-model" in (runtime.engine_error or "")

    chat = ChatSession(runtime, "en-US")
    await chat.start()
    [notice] = _outputs(emitter.send_step)
    assert "could not be loaded" in notice["output"] and "no-such-model" in notice["output"]
    import chainlit as cl

    await chat.answer(cl.Message(content="Hello?"))
    assert "could not be loaded" in _outputs(emitter.send_step)[-1]["output"]
