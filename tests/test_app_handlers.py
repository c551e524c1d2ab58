"""Handlers in-process with a mocked Chainlit context (no browser, no socket) and the real
engine on the tiny checkpoint: the loading notice, prefill progress of a long document, the
chat's requests in /metrics, a stopped answer kept, and resuming stored histories."""

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
    session.chat_profile, session.client_type = None, "webapp"  # read by cl.user_session
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
    progress = [s["name"] for s in steps if " tokens (" in s["name"] and "%" in s["name"]]  # the live line
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


def _metrics(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


async def _scrape(runtime) -> dict[str, float]:
    """GET /metrics of an app serving `runtime`, as Prometheus would."""
    import httpx
    from fastapi import FastAPI

    from app.serving import metrics

    app = FastAPI()
    app.state.runtime = runtime
    app.include_router(metrics.router)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as http:
        response = await http.get("/metrics")
    assert response.status_code == 200
    return _metrics(response.text)


def _finished(samples: dict[str, float]) -> float:
    return sum(v for k, v in samples.items() if k.startswith("pagechat_requests_finished_total{"))


def _change(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


async def test_a_chat_answer_counts_in_metrics(emitter, engine, tmp_path):
    """The browser chat's requests are in /metrics like the API's: first token, end to end,
    finished, and served by kind "chat"."""
    import chainlit as cl

    from app.chat import session as chat_session

    runtime = Runtime(settings=AppSettings(data_dir=tmp_path), model_name="tiny")
    runtime.bind_loop(asyncio.get_running_loop())
    runtime.set_engine(engine)
    set_runtime(runtime)
    before = await _scrape(runtime)
    chat = chat_session.new_session()  # what @cl.on_chat_start does
    chat.options = {"system_prompt": "", "temperature": 0.0, "top_p": 1.0, "top_k": 0, "max_tokens": 6}
    await chat_session.current().answer(cl.Message(content="Hello there"))  # what @cl.on_message does
    after = await _scrape(runtime)

    answer = [s for s in _outputs(emitter.send_step) if s["type"] == "assistant_message"][-1]
    assert "token" in answer["output"]  # the stats line (the session's language is zh-CN)
    assert _change(after, before, "pagechat_time_to_first_token_seconds_count") == 1
    assert _change(after, before, "pagechat_e2e_request_latency_seconds_count") == 1
    assert _change(after, before, "pagechat_e2e_request_latency_seconds_sum") > 0
    assert _finished(after) - _finished(before) == 1
    reason = chat.history.conversation.turns[-1].finish_reason  # stop or length
    assert _change(after, before, f'pagechat_requests_finished_total{{finish_reason="{reason}"}}') == 1
    generated = len(chat.history.conversation.turns[-1].answer_ids) - 1  # without the closing <|im_end|>
    if reason == "stop":
        generated += 1  # the end-of-answer token was generated too
    assert _change(after, before, "pagechat_inter_token_latency_seconds_count") == generated - 1
    assert _change(after, before, 'pagechat_requests_served_total{kind="chat"}') == 1


async def test_stop_keeps_the_answer_streamed_so_far(emitter, engine, tmp_path):
    """Streamed outputs carry deltas only: a stopped answer is kept as what its deltas add up to,
    and the request counts as aborted in /metrics."""
    import chainlit as cl

    from app.chat import session as chat_session

    runtime = Runtime(settings=AppSettings(data_dir=tmp_path), model_name="tiny")
    runtime.bind_loop(asyncio.get_running_loop())
    runtime.set_engine(engine)
    set_runtime(runtime)
    before = await _scrape(runtime)
    chat = chat_session.new_session()
    chat.options = {"system_prompt": "", "temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_tokens": 3000}
    task = asyncio.create_task(chat.answer(cl.Message(content="Tell a long story.")))
    for _ in range(500):
        if len(emitter.send_token.call_args_list) >= 3:
            break
        await asyncio.sleep(0.01)
    assert not task.done(), "the answer ended before it could be stopped"
    task.cancel()  # what Chainlit does on the stop button
    with pytest.raises(asyncio.CancelledError):
        await task

    [turn] = chat.history.conversation.turns
    assert turn.finish_reason == "abort"
    [start] = [c.args[0] for c in emitter.stream_start.call_args_list]  # with the first chunk
    streamed = start["output"] + "".join(c.kwargs["token"] for c in emitter.send_token.call_args_list)
    kept = engine.tokenizer.decode(turn.answer_ids[:-1])
    assert len(turn.answer_ids) - 1 >= 3 and kept.startswith(streamed)
    assert turn.answer_ids[-1] == engine.tokenizer.im_end_id
    answer = [s for s in _outputs(emitter.send_step) if s["type"] == "assistant_message"][-1]
    assert answer["output"].startswith(streamed)
    after = await _scrape(runtime)
    assert _change(after, before, 'pagechat_requests_finished_total{finish_reason="abort"}') == 1


async def test_stop_before_the_first_output_says_stopped(emitter, engine, tmp_path, monkeypatch):
    """Stopped while the engine has produced nothing yet (a long prompt's prefill): the answer
    says it was stopped instead of staying empty, and the turn is kept as aborted."""
    import chainlit as cl

    from app.chat import session as chat_session
    from app.chat.token_history import TokenTurn

    started = asyncio.Event()

    async def no_output_yet(self, engine, params, request_id):
        started.set()
        await asyncio.Event().wait()  # the prefill that never ends before the stop
        yield  # an async generator, like the engine's stream

    monkeypatch.setattr(TokenTurn, "stream", no_output_yet)
    runtime = Runtime(settings=AppSettings(data_dir=tmp_path), model_name="tiny")
    runtime.bind_loop(asyncio.get_running_loop())
    runtime.set_engine(engine)
    set_runtime(runtime)
    chat = chat_session.new_session()
    chat.options = {"system_prompt": "", "temperature": 0.0, "top_p": 1.0, "top_k": 0, "max_tokens": 8}
    task = asyncio.create_task(chat.answer(cl.Message(content="Summarise the whole archive.")))
    await asyncio.wait_for(started.wait(), 30)
    task.cancel()  # the stop button
    with pytest.raises(asyncio.CancelledError):
        await task

    [turn] = chat.history.conversation.turns
    assert turn.finish_reason == "abort"
    answer = [s for s in _outputs(emitter.send_step) if s["type"] == "assistant_message"][-1]
    assert answer["output"] == "*" + chat.t("stats_stopped") + "*"


class _Rows:
    """A data layer holding stored history rows in memory."""

    def __init__(self, rows: dict) -> None:
        self.rows = rows

    async def load_history(self, thread_id: str) -> dict | None:
        return self.rows.get(thread_id)

    async def save_history(self, thread_id: str, data: dict) -> None:
        self.rows[thread_id] = data


async def test_resume_restores_old_rows_and_says_when_the_history_is_lost(emitter, engine, tmp_path):
    import chainlit as cl

    from app.chat.session import ChatSession

    runtime = Runtime(settings=AppSettings(data_dir=tmp_path), model_name="tiny")
    runtime.bind_loop(asyncio.get_running_loop())
    runtime.set_engine(engine)
    set_runtime(runtime)
    runtime.data_layer = _Rows({})
    first = ChatSession(runtime, "en-US")
    first.options = {"system_prompt": "", "temperature": 0.0, "top_p": 1.0, "top_k": 0, "max_tokens": 4}
    await first.answer(cl.Message(content="Remember heron."))
    thread_id = cl.context.session.thread_id
    row = runtime.data_layer.rows[thread_id]
    assert set(row) == {"conversation", "options"}
    # a row as saved before 2026-12: both kinds' keys
    runtime.data_layer.rows["old"] = {**row, "transcript": {"system_prompt": "", "turns": []}}
    runtime.data_layer.rows["remote"] = {"transcript": {"system_prompt": "", "turns": [
        {"user": "hi", "assistant": "hello"}]}, "options": row["options"]}
    steps = [{"type": "user_message"}]

    resumed = ChatSession(runtime, "en-US")
    await resumed.resume({"id": "old", "steps": steps})
    assert resumed.history.to_dict() == first.history.to_dict()
    assert resumed.options == {**first.options, "enable_thinking": True}  # new key: its default
    assert not any("could not be restored" in s["output"] for s in _outputs(emitter.send_step))

    lost = ChatSession(runtime, "en-US")
    await lost.resume({"id": "remote", "steps": steps})  # saved with a remote engine: no token ids
    assert "could not be restored" in _outputs(emitter.send_step)[-1]["output"]
    assert len(lost.history) == 0
