"""One browser chat: its token history, its settings, and the answer being generated.

app/chat/handlers.py registers the Chainlit callbacks and forwards each to a `ChatSession` kept in
`cl.user_session`. The token bookkeeping lives in app.chat.token_history, document reading in
app.documents.extraction; this module is the glue with Chainlit's messages, steps and settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

import chainlit as cl
from chainlit.utils import utc_now

from app.chat import options as chat_options
from app.chat.i18n import t
from app.chat.message_history import Transcript, user_content
from app.chat.streaming import Coalescer, answer_stats, close_open_fence
from app.chat.token_history import ContextOverflow, Conversation, NewDocument, Piece, Plan
from app.documents.extraction import DocumentError, extract_file_async
from app.serving.runtime import Runtime, get_runtime

logger = logging.getLogger("pagechat.chat")

SESSION_KEY = "pagechat"
# A prompt with this many tokens to compute (or any new document) shows a reading step.
PROGRESS_MIN_TOKENS = 2048
PROGRESS_INTERVAL_S = 0.5


def current() -> ChatSession:
    """The ChatSession of the Chainlit session in context (created on first use)."""
    session = cl.user_session.get(SESSION_KEY)
    if not isinstance(session, ChatSession):
        session = ChatSession(get_runtime(), _language())
        cl.user_session.set(SESSION_KEY, session)
    return session


def new_session() -> ChatSession:
    session = ChatSession(get_runtime(), _language())
    cl.user_session.set(SESSION_KEY, session)
    return session


def _language() -> str:
    ctx_session = cl.context.session
    return getattr(ctx_session, "language", None) or "en-US"


class ChatSession:
    def __init__(self, runtime: Runtime, language: str) -> None:
        self.runtime = runtime
        self.language = language
        self.conversation = Conversation()
        self.transcript = Transcript()  # the history as messages, when the engine is remote
        self.options: dict[str, Any] | None = None
        self.request_id: str | None = None
        self.doc_lines: list[str] = []

    def t(self, key: str, **params) -> str:
        return t(key, self.language, **params)

    async def say(self, text: str) -> cl.Message:
        message = cl.Message(content=text)
        await message.send()
        return message

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """A new chat: say whether the model is ready (or loading), then show the settings."""
        rt = self.runtime
        if rt.engine is None and rt.engine_error is None:
            # Return at once: the input stays usable while the model loads.
            notice = await self.say(self.t("loading", model=rt.model_name))
            asyncio.create_task(self._announce_when_ready(notice))
            return
        if rt.engine_error is not None or rt.settings.demo:
            await self.say(self._status_text())
        if rt.engine is not None:
            await self.send_settings()

    async def _announce_when_ready(self, notice: cl.Message) -> None:
        await self.runtime.wait_ready()
        notice.content = self._status_text()
        await notice.update()
        if self.runtime.engine is not None:
            await self.send_settings()

    def _status_text(self) -> str:
        rt = self.runtime
        if rt.engine is None:
            return self.t("load_failed", error=rt.engine_error)
        ready = self.t("ready", model=rt.model_name, max_model_len=rt.engine.max_model_len)
        if rt.settings.demo:
            return f"> {self.t('demo_notice')}\n\n{ready}"
        return ready

    async def resume(self, thread: dict) -> None:
        """A chat from the history: restore its token ids and settings."""
        rt = self.runtime
        saved = None
        if rt.data_layer is not None:
            try:
                saved = await rt.data_layer.load_history(thread["id"])
            except Exception:
                logger.exception("could not load the history of thread %s", thread.get("id"))
        if saved:
            try:
                self.conversation = Conversation.from_dict(saved["conversation"])
                self.transcript = Transcript.from_dict(saved.get("transcript") or {})
                self.options = saved.get("options")
            except (KeyError, TypeError, ValueError):
                logger.exception("unreadable history for thread %s", thread.get("id"))
                saved = None
        if not saved and any(s.get("type") == "user_message" for s in thread.get("steps") or []):
            await self.say(self.t("history_lost"))
        if rt.engine is not None:
            await self.send_settings()
        else:  # do not hold up the restored messages while the model loads
            asyncio.create_task(self._settings_when_ready())

    async def _settings_when_ready(self) -> None:
        if await self.runtime.wait_ready():
            await self.send_settings()

    async def send_settings(self) -> None:
        engine = self.runtime.engine
        defaults = chat_options.default_options(
            engine.generation_defaults, engine.max_model_len, self.runtime.settings.demo
        )
        saved = self.options or (cl.context.session.chat_settings or None)
        self.options = chat_options.merged_options(saved, defaults)
        widgets = chat_options.widgets(self.options, engine.max_model_len, self.language)
        await cl.ChatSettings(widgets).send()

    def update_options(self, values: dict[str, Any]) -> None:
        engine = self.runtime.engine
        if engine is None:
            return
        defaults = chat_options.default_options(
            engine.generation_defaults, engine.max_model_len, self.runtime.settings.demo
        )
        self.options = chat_options.merged_options({**(self.options or {}), **values}, defaults)

    async def abort(self) -> None:
        """Stop the answer in flight: its KV blocks are freed at once."""
        request_id, engine = self.request_id, self.runtime.engine
        if request_id and engine is not None:
            await engine.abort(request_id)

    # ---- one message ---------------------------------------------------------------------

    async def answer(self, message: cl.Message) -> None:
        rt = self.runtime
        if not await self._engine_ready():
            return
        engine, codec = rt.engine, rt.codec
        if self.options is None:
            self.update_options(cl.context.session.chat_settings or {})
        question = (message.content or "").strip()
        reused = self._follow_edit(message.id)
        files = [el for el in (message.elements or []) if getattr(el, "path", None)]
        if not question and not files and not reused:
            await self.say(self.t("empty_message"))
            return
        documents = await self._read_documents(files)
        if not question and not documents and not reused:
            return  # every file failed; each got its message
        if codec is None:  # a remote engine: the history travels as messages
            await self._answer_remote(question, documents)
            return
        self.conversation.set_system_prompt(self.options["system_prompt"], codec)
        max_tokens = chat_options.requested_max_tokens(self.options, engine.max_model_len)
        try:
            plan = await asyncio.to_thread(
                self.conversation.prepare, codec, question or self.t("default_question"),
                [NewDocument(d.name, d.text) for d in documents], engine.max_model_len,
                max_tokens, reused,
            )
        except ContextOverflow as exc:
            await self.say(self.t("message_too_long", **exc.params))
            return
        plan.turn.message_id = message.id
        plan.turn.question = question
        notes = self._plan_notes(plan)
        if notes:
            await self.say("\n\n".join(notes))
        try:
            params = chat_options.sampling_params(self.options, engine.generation_defaults, plan.max_tokens)
        except ValueError as exc:
            await self.say(self.t("request_refused", error=str(exc)))
            return
        self.doc_lines = self._document_lines(plan, documents)
        await self._generate(plan, params)
        if not question and documents and rt.data_layer is not None:
            with contextlib.suppress(Exception):  # name the chat after its files
                await rt.data_layer.update_thread(
                    cl.context.session.thread_id, name=", ".join(d.name for d in documents)
                )

    async def _engine_ready(self) -> bool:
        rt = self.runtime
        if rt.engine is None and rt.engine_error is None:
            waiting = await self.say(self.t("waiting_model"))
            await rt.wait_ready()
            await waiting.remove()
        if rt.engine is None:
            await self.say(self.t("load_failed", error=rt.engine_error))
            return False
        return True

    def _follow_edit(self, message_id: str) -> list[Piece]:
        """An edited message re-runs its turn: forget it and what followed, keep its files."""
        for index, turn in enumerate(self.conversation.turns):
            if turn.message_id and turn.message_id == message_id:
                return self.conversation.truncate(index).documents
        return []

    async def _read_documents(self, files: list) -> list:
        max_bytes = self.runtime.settings.max_upload_mb * 1024 * 1024
        documents = []
        for element in files:
            name = element.name or "document"
            try:
                documents.append(await extract_file_async(element.path, name, max_bytes))
            except DocumentError as exc:
                await self.say(self.t(f"doc_error_{exc.code}", **exc.params))
            except Exception as exc:  # a parser bug must not end the chat
                logger.exception("reading %s failed", name)
                await self.say(self.t("doc_error_other", name=name, error=type(exc).__name__))
        return documents

    def _plan_notes(self, plan: Plan) -> list[str]:
        notes = [
            self.t(
                "excerpt", name=e.name, full_tokens=e.full_tokens, room=plan.document_room,
                kept=e.passages_kept, total=e.passages_total, kept_tokens=e.kept_tokens,
            )
            for e in plan.excerpts
        ]
        if plan.dropped_turns:
            notes.append(
                self.t("trimmed", max_model_len=self.runtime.engine.max_model_len, count=plan.dropped_turns)
            )
        if plan.dropped_documents:
            notes.append(self.t("docs_dropped", names=", ".join(plan.dropped_documents)))
        return notes

    def _document_lines(self, plan: Plan, documents: list) -> list[str]:
        pages = {d.name: d.pages for d in documents}
        lines = []
        for piece in plan.turn.documents:
            if piece.name in pages and pages[piece.name]:
                lines.append(self.t("doc_read_pages", name=piece.name, pages=pages[piece.name], tokens=len(piece.ids)))
            else:
                lines.append(self.t("doc_read", name=piece.name, tokens=len(piece.ids)))
        return lines

    # ---- generation ----------------------------------------------------------------------

    async def _generate(self, plan: Plan, params) -> None:
        engine = self.runtime.engine
        request_id = uuid.uuid4().hex

        def record(last, reason) -> None:
            generated = list(last.token_ids) if last is not None else []
            self.conversation.commit(plan, generated, reason, self.runtime.codec)

        stream = engine.generate(plan.prompt_ids, params, request_id=request_id)
        await self._stream_answer(stream, request_id, _Reading(self, plan), record)

    async def _answer_remote(self, question: str, documents: list) -> None:
        engine = self.runtime.engine
        content = user_content(
            question or self.t("default_question"), [(d.name, d.text) for d in documents]
        )
        self.transcript.system_prompt = self.options["system_prompt"]
        max_tokens = chat_options.requested_max_tokens(self.options, engine.max_model_len)
        messages, dropped = self.transcript.messages(content, engine.max_model_len, max_tokens)
        if dropped:
            await self.say(self.t("trimmed", max_model_len=engine.max_model_len, count=dropped))
        try:
            params = chat_options.sampling_params(self.options, engine.generation_defaults, max_tokens)
        except ValueError as exc:
            await self.say(self.t("request_refused", error=str(exc)))
            return
        request_id = uuid.uuid4().hex

        def record(last, reason) -> None:
            self.transcript.commit(content, last.text if last is not None else "")

        stream = engine.chat(messages, params, request_id=request_id)
        await self._stream_answer(stream, request_id, None, record)

    async def _stream_answer(self, stream, request_id: str, reading, record) -> None:
        """Stream deltas into a coalesced message; stop, errors and refusals end it cleanly.

        `record(last_output, finish_reason)` keeps the (possibly partial) answer in the history.
        """
        engine = self.runtime.engine
        self.request_id = request_id
        reading = reading or _Reading(self, None)
        answer: cl.Message | None = None
        coalescer: Coalescer | None = None
        last = None
        try:
            await reading.open_if_needed()
            async with contextlib.aclosing(stream):
                async for out in stream:
                    last = out
                    if out.first_token_time is None and not out.finished:
                        await reading.progress(out)
                        continue
                    await reading.close(out)
                    if answer is None:  # dated now: a streamed message gets no date of its own
                        answer = cl.Message(content="", created_at=utc_now())
                        coalescer = Coalescer(answer.stream_token)
                    if out.delta_text:
                        await coalescer.add(out.delta_text)
        except asyncio.CancelledError:  # the stop button
            with contextlib.suppress(Exception):
                await engine.abort(request_id)
            await reading.close(last)
            await self._finish(record, answer, coalescer, last, stopped=True)
            raise
        except ValueError as exc:  # refused before the first output (numbers in the text)
            await reading.close(None)
            await self.say(self.t("request_refused", error=str(exc)))
            return
        finally:
            if self.request_id == request_id:
                self.request_id = None
        await self._finish(record, answer, coalescer, last, stopped=False)

    async def _finish(self, record, answer, coalescer, last, stopped: bool) -> None:
        """Show the stats line, keep the (possibly partial) answer in the history, save it."""
        if last is not None and last.finish_reason == "error":
            if answer is not None:
                await answer.remove()
            await self.say(self.t("engine_error", error=last.error or "unknown"))
            return
        if coalescer is not None:
            await coalescer.flush()
        stopped = stopped or (last is not None and last.finish_reason == "abort")
        if answer is None:
            answer = cl.Message(content="")
        if last is not None:
            answer.content = close_open_fence(answer.content) + "\n\n*" + self._stats_line(last, stopped) + "*"
        await answer.send()  # ends the stream and stores the message (update() would not date it)
        reason = "abort" if stopped else (last.finish_reason if last is not None else None)
        record(last, reason)
        await self.save()

    def _stats_line(self, out, stopped: bool) -> str:
        stats = answer_stats(out, time.monotonic())
        line = self.t(
            "stats", prompt=stats.prompt_tokens, cached=stats.cached_tokens,
            ttft=stats.ttft_s or 0.0, tps=stats.tokens_per_s,
        )
        if stopped:
            line += " · " + self.t("stats_stopped")
        elif out.finish_reason == "length":
            line += " · " + self.t("stats_length")
        return line

    async def save(self) -> None:
        rt = self.runtime
        thread_id = cl.context.session.thread_id
        if rt.data_layer is None or not thread_id:
            return
        try:
            await rt.data_layer.save_history(
                thread_id,
                {
                    "conversation": self.conversation.to_dict(),
                    "transcript": self.transcript.to_dict(),
                    "options": self.options,
                },
            )
        except Exception:  # the chat goes on; the log says why it will not resume exactly
            logger.exception("could not save the history of thread %s", thread_id)


class _Reading:
    """The "Reading N tokens" step: documents read and prefill progress of a long prompt."""

    def __init__(self, chat: ChatSession, plan: Plan | None) -> None:
        """With no plan (a remote engine: no token counts) the step stays closed."""
        self.chat = chat
        self.total = len(plan.prompt_ids) if plan else 0
        self.to_compute = self.total - plan.reused_tokens if plan else 0
        documents = plan.turn.documents if plan else []
        self.wanted = bool(documents) or self.to_compute >= PROGRESS_MIN_TOKENS
        names = [piece.name for piece in documents]
        self.what = ", ".join(names) if names else chat.t("reading_chat")
        self.step: cl.Step | None = None
        self.started = time.monotonic()
        self.last_update = 0.0
        self.closed = False

    async def open_if_needed(self) -> None:
        if not self.wanted:
            return
        parent = cl.context.current_step  # the on_message run: the step shows above the answer
        self.step = cl.Step(
            name=self.chat.t("reading", what=self.what, tokens=self.to_compute), type="tool",
            parent_id=parent.id if parent else None, show_input=False,
        )
        self.step.start = utc_now()
        self.step.output = self._text(None)
        await self.step.send()

    def _text(self, done: int | None) -> str:
        lines = list(self.chat.doc_lines)
        if done is not None:
            percent = round(100 * done / self.total) if self.total else 100
            lines.append(self.chat.t("reading_progress", done=done, total=self.total, percent=percent))
        return "\n\n".join(lines)

    async def progress(self, out) -> None:
        if self.step is None or self.closed:
            return
        now = time.monotonic()
        if now - self.last_update < PROGRESS_INTERVAL_S:
            return
        self.last_update = now
        self.step.output = self._text(out.num_computed_prompt_tokens)
        await self.step.update()

    async def close(self, out) -> None:
        if self.step is None or self.closed:
            return
        self.closed = True
        seconds = time.monotonic() - self.started
        if out is not None and out.first_token_time is not None and out.arrival_time:
            seconds = out.first_token_time - out.arrival_time
        computed = self.total - (out.num_cached_tokens if out is not None else 0)
        self.step.name = self.chat.t("reading_done", what=self.what, tokens=computed, seconds=seconds)
        self.step.output = self._text(self.total)
        self.step.end = utc_now()
        await self.step.update()
