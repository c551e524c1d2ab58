"""One browser chat: its history, its settings, and the answer being generated.

app/chat/handlers.py registers the Chainlit callbacks and forwards each to a `ChatSession` kept in
`cl.user_session`. What the engine sees of the chat is a `ChatHistory` (app.chat.history: token
ids for the in-process engine, messages for a remote one, chosen once when the engine is known);
document reading lives in app.documents.extraction, the reading step in app.chat.progress. This
module is the glue with Chainlit's messages, steps and settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import chainlit as cl

from app.chat import options as chat_options
from app.chat.history import (
    ChatHistory,
    ContextOverflow,
    NewDocument,
    PreparedTurn,
    TurnSummary,
    new_history,
)
from app.chat.i18n import t
from app.chat.progress import ReadingProgress, SummaryProgress
from app.chat.sources import excerpt_note, source_elements
from app.chat.streaming import AnswerCollector, answer_stats, close_open_fence
from app.chat.summaries import MapProgress, Summarizer
from app.chat.thinking_step import AnswerView
from app.documents.extraction import Document, DocumentError, extract_file_async
from app.documents.progress_line import ExtractionLine
from app.serving.metrics import track
from app.serving.rate_limit import RateLimited, RateTicket, chat_caller
from app.serving.runtime import Runtime, get_runtime
from app.serving.tenancy import cache_salt, chat_tenant

if TYPE_CHECKING:
    from engine.client import EngineClient
    from engine.outputs import RequestOutput
    from engine.sampling_params import SamplingParams

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


def _user_identifier() -> str | None:
    """The logged-in user of the Chainlit session in context (its prefix-cache tenant)."""
    return getattr(cl.context.session.user, "identifier", None)


def _language() -> str:
    ctx_session = cl.context.session
    return getattr(ctx_session, "language", None) or "en-US"


class ChatSession:
    def __init__(self, runtime: Runtime, language: str) -> None:
        self.runtime = runtime
        self.language = language
        # Its kind depends on the engine (`new_history`), chosen once the engine is known.
        self._history: ChatHistory | None = None
        self._saved: dict[str, Any] | None = None  # a resumed chat's stored row, until then
        self._expects_history = False  # the resumed chat has messages: its history must be found
        self.options: dict[str, Any] | None = None
        self.request_id: str | None = None

    def t(self, key: str, **params: Any) -> str:
        return t(key, self.language, **params)

    async def say(self, text: str) -> cl.Message:
        message = cl.Message(content=text)
        await message.send()
        return message

    @property
    def history(self) -> ChatHistory:
        """The chat as the engine sees it; only once the engine is loaded."""
        if self._history is None:
            self._open_history()
        assert self._history is not None
        return self._history

    def _open_history(self) -> bool:
        """Choose the history's kind from the engine and restore a resumed chat's; False when
        a resumed chat's history is missing or unreadable (it starts empty then)."""
        engine = self._engine()
        history = new_history(engine.tokenizer, self.runtime.settings.passage_share)
        saved, self._saved = self._saved, None
        restored = False
        if saved is not None:
            try:
                history.restore(saved)
                restored = True
            except (KeyError, TypeError, ValueError):
                logger.exception("unreadable history (or one of another engine's kind) for this chat")
        self._history = history
        return not self._expects_history or (restored and len(history) > 0)

    def _engine(self) -> EngineClient:
        engine = self.runtime.engine
        if engine is None:
            raise RuntimeError("the chat needs the engine, which is not loaded")
        return engine

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

    async def resume(self, thread: Mapping[str, Any]) -> None:
        """A chat from the history: restore its history (token ids or messages) and settings."""
        rt = self.runtime
        saved = None
        if rt.data_layer is not None:
            try:
                saved = await rt.data_layer.load_history(thread["id"])
            except Exception:
                logger.exception("could not load the history of thread %s", thread.get("id"))
        if isinstance(saved, dict):
            self._saved = saved
            options = saved.get("options")
            self.options = options if isinstance(options, dict) else None
        self._expects_history = any(s.get("type") == "user_message" for s in thread.get("steps") or [])
        if rt.engine is not None:
            await self._restore()
        else:  # do not hold up the restored messages while the model loads
            asyncio.create_task(self._restore_when_ready())

    async def _restore_when_ready(self) -> None:
        if await self.runtime.wait_ready():
            await self._restore()

    async def _restore(self) -> None:
        if self._history is None and not self._open_history():
            await self.say(self.t("history_lost"))
        await self.send_settings()

    async def send_settings(self) -> None:
        engine = self._engine()
        defaults = chat_options.default_options(
            engine.generation_defaults, engine.max_model_len, self.runtime.settings.demo
        )
        saved = self.options or (cl.context.session.chat_settings or None)
        self.options = chat_options.merged_options(saved, defaults)
        switch = self.history.thinking_switch
        widgets = chat_options.widgets(self.options, engine.max_model_len, self.language, switch)
        await cl.ChatSettings(widgets).send()

    def update_options(self, values: dict[str, Any]) -> None:
        engine = self.runtime.engine
        if engine is None:
            return
        defaults = chat_options.default_options(
            engine.generation_defaults, engine.max_model_len, self.runtime.settings.demo
        )
        self.options = chat_options.merged_options({**(self.options or {}), **values}, defaults)

    def _options(self) -> dict[str, Any]:
        """The chat's settings; the panel's (or the defaults) when none were chosen yet."""
        if self.options is None:
            self.update_options(cl.context.session.chat_settings or {})
        if self.options is None:
            raise RuntimeError("the chat's settings need the engine, which is not loaded")
        return self.options

    async def abort(self) -> None:
        """Stop the answer in flight: its KV blocks are freed at once."""
        request_id, engine = self.request_id, self.runtime.engine
        if request_id and engine is not None:
            await engine.abort(request_id)

    # ---- one message ---------------------------------------------------------------------

    async def answer(self, message: cl.Message) -> None:
        rt = self.runtime
        if rt.drain.draining:  # the server is shutting down (app/serving/shutdown.py)
            await self.say(self.t("shutting_down"))
            return
        try:  # PAGECHAT_RATE_LIMIT_RPM / _TPM, per chat user (app/serving/rate_limit.py)
            ticket = rt.rate_limits.admit(rt.settings, chat_caller(_user_identifier()))
        except RateLimited as exc:
            wait = exc.response_headers().get("Retry-After", "60")
            await self.say(self.t("rate_limited_" + exc.kind, seconds=wait))
            return
        if not await self._engine_ready():
            return
        engine, history, options = self._engine(), self.history, self._options()
        question = (message.content or "").strip()
        # An edited message re-runs its turn (what followed is forgotten) with its documents.
        edited = history.documents_of(message.id)
        files = [el for el in (message.elements or []) if getattr(el, "path", None)]
        if not question and not files and not edited:
            await self.say(self.t("empty_message"))
            return
        documents = await self._read_documents(files)
        if not question and not documents and not edited:
            return  # every file failed; each got its message
        history.set_system_prompt(options["system_prompt"])
        history.set_thinking(bool(options.get("enable_thinking", True)))
        max_tokens = chat_options.requested_max_tokens(options, engine.max_model_len)
        try:
            turn = await asyncio.to_thread(
                history.prepare, question or self.t("default_question"),
                [NewDocument(d.name, d.text) for d in documents], message.id, engine.max_model_len,
                max_tokens,
            )
        except ContextOverflow as exc:
            await self.say(self.t("message_too_long", **exc.params))
            return
        try:
            params = chat_options.sampling_params(options, engine.generation_defaults, turn.summary.max_tokens)
            params.cache_salt = cache_salt(chat_tenant(rt.settings, _user_identifier()))
        except ValueError as exc:
            await self.say(self.t("request_refused", error=str(exc)))
            return
        turn = await self._summarize_documents(
            turn, params, question or self.t("default_question"), ticket
        )
        summary = turn.summary
        params.max_tokens = summary.max_tokens
        notes = self._plan_notes(summary, engine.max_model_len)
        if notes:
            await self.say("\n\n".join(notes))
        await self._stream_answer(turn, params, self._reading(summary, documents), ticket)
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

    async def _read_documents(self, files: list[Any]) -> list[Document]:
        max_bytes = self.runtime.settings.max_upload_mb * 1024 * 1024
        documents = []
        for element in files:
            name = element.name or "document"
            line = ExtractionLine(self.t, name)  # live page / OCR numbers while it is read
            document = None
            try:
                document = await extract_file_async(element.path, name, max_bytes, progress=line.update)
                documents.append(document)
            except DocumentError as exc:
                await self.say(self.t(f"doc_error_{exc.code}", **exc.params))
            except Exception as exc:  # a parser bug must not end the chat
                logger.exception("reading %s failed", name)
                await self.say(self.t("doc_error_other", name=name, error=type(exc).__name__))
            for note in await line.close(document):  # pages OCR'd or empty, with their numbers
                await self.say(note)
        return documents

    async def _summarize_documents(
        self, turn: PreparedTurn, params: SamplingParams, question: str, ticket: RateTicket
    ) -> PreparedTurn:
        """A question about a whole over-context document: the engine summarizes its parts
        (app.chat.summaries, with a live line), then the turn reads those summaries. A failed
        map step leaves the turn with its retrieved passages."""
        jobs = turn.summary.summary_jobs
        if not jobs:
            return turn
        engine, drain = self._engine(), self.runtime.drain
        summaries = {}
        for job in jobs:
            progress = SummaryProgress(self.language)

            async def show(p: MapProgress, progress: SummaryProgress = progress) -> None:
                await progress.update(p.document, p.done, p.total, p.started)

            summarizer = Summarizer(
                engine, job.codec, params,
                track=lambda request_id: drain.begin([request_id], engine.abort),
                untrack=lambda request_id: drain.end([request_id]),
                on_progress=show,
                meter=ticket.meter,
            )
            try:
                summaries[job.document.name] = await summarizer.run(job, question)
            except (RuntimeError, ValueError) as exc:
                logger.warning("summarizing %s failed: %s", job.document.name, exc)
                await progress.close(job.document.name, 0, failed=str(exc))
                continue
            await progress.close(job.document.name, len(job.parts))
        if not summaries:
            return turn
        return await asyncio.to_thread(turn.with_summaries, summaries)

    def _plan_notes(self, summary: TurnSummary, max_model_len: int) -> list[str]:
        notes = [excerpt_note(e, self.language) for e in summary.excerpts]
        if summary.dropped_turns:
            notes.append(self.t("trimmed", max_model_len=max_model_len, count=summary.dropped_turns))
        if summary.dropped_documents:
            notes.append(self.t("docs_dropped", names=", ".join(summary.dropped_documents)))
        return notes

    def _reading(self, summary: TurnSummary, documents: Sequence[Document]) -> ReadingProgress:
        """The reading step of this prompt, from its numbers (none: a size not known here)."""
        if summary.prompt_tokens is None:
            return ReadingProgress.hidden(self.language)
        pages = {d.name: d.pages for d in documents}
        lines = []
        for doc in summary.documents:
            if pages.get(doc.name):
                lines.append(self.t("doc_read_pages", name=doc.name, pages=pages[doc.name], tokens=doc.tokens))
            else:
                lines.append(self.t("doc_read", name=doc.name, tokens=doc.tokens))
        return ReadingProgress(
            self.language, summary.prompt_tokens, summary.prompt_tokens - summary.reused_tokens,
            [doc.name for doc in summary.documents], lines, PROGRESS_MIN_TOKENS, PROGRESS_INTERVAL_S,
            earlier_documents=self.history.document_names(),
        )

    # ---- generation ----------------------------------------------------------------------

    async def _stream_answer(
        self,
        turn: PreparedTurn,
        params: SamplingParams,
        reading: ReadingProgress,
        ticket: RateTicket,
    ) -> None:
        """Stream deltas into a coalesced message; stop, errors and refusals end it cleanly.

        The turn is committed with its (possibly partial) answer, except on an error or a
        refusal: the history then stays as it was.
        """
        engine = self._engine()
        request_id = uuid.uuid4().hex
        # In flight, saved included, until it ends: a shutdown waits for it, then aborts it.
        self.runtime.drain.begin([request_id], engine.abort)
        try:
            await self._generate(turn, params, reading, engine, request_id, ticket)
        finally:
            self.runtime.drain.end([request_id])

    async def _generate(
        self, turn: PreparedTurn, params: SamplingParams, reading: ReadingProgress,
        engine: EngineClient, request_id: str, ticket: RateTicket,
    ) -> None:
        self.request_id = request_id
        collected = AnswerCollector()
        view = AnswerView(self.language, turn.summary.thinking)  # thinking step, then answer
        last: RequestOutput | None = None
        try:
            await reading.open_if_needed()
            # track(): the chat's requests count in /metrics (latencies, finished requests).
            outputs = ticket.meter(turn.stream(engine, params, request_id))  # tokens per minute
            async with contextlib.aclosing(track(outputs, "chat")) as stream:
                async for out in stream:
                    last = out
                    collected.add(out)
                    if out.first_token_time is None and not out.finished:
                        await reading.progress(out.num_computed_prompt_tokens, out.num_cached_tokens)
                        continue
                    await _close_reading(reading, out)
                    if out.delta_text:
                        await view.add(out.delta_text)
        except asyncio.CancelledError:  # the stop button
            with contextlib.suppress(Exception):
                await engine.abort(request_id)
            await _close_reading(reading, last)
            await self._finish(turn, collected, view, last, stopped=True)
            raise
        except ValueError as exc:  # refused before the first output (numbers in the text)
            await reading.close(0, None)
            await self.say(self.t("request_refused", error=str(exc)))
            return
        finally:
            if self.request_id == request_id:
                self.request_id = None
        await self._finish(turn, collected, view, last, stopped=False)

    async def _finish(
        self,
        turn: PreparedTurn,
        collected: AnswerCollector,
        view: AnswerView,
        last: RequestOutput | None,
        stopped: bool,
    ) -> None:
        """Show the stats line, keep the (possibly partial) answer in the history, save it."""
        if last is not None and last.finish_reason == "error":
            if view.message is not None:
                await view.message.remove()
            await self.say(self.t("engine_error", error=last.error or "unknown"))
            return
        await view.finish()
        if view.coalescer is not None:
            await view.coalescer.flush()
        stopped = stopped or (last is not None and last.finish_reason == "abort")
        answer = view.start_message()
        # The passages (or part summaries) the model was given, under the answer.
        sources, elements = source_elements(turn.summary.sources, self.language)
        if sources:
            answer.content = close_open_fence(answer.content) + "\n\n" + sources
            answer.elements = list(answer.elements or []) + elements  # type: ignore[operator]
        if last is not None:
            answer.content = close_open_fence(answer.content) + "\n\n*" + self._stats_line(last, stopped) + "*"
            if self.runtime.drain.cut(last.request_id):
                answer.content += "\n\n**" + self.t("shutdown_cut") + "**"
        elif stopped:  # before the engine's first output: say so, not an empty answer
            answer.content = (close_open_fence(answer.content) + "\n\n*" + self.t("stats_stopped") + "*").lstrip()
        await answer.send()  # ends the stream and stores the message (update() would not date it)
        reason = "abort" if stopped else (last.finish_reason if last is not None else None)
        turn.commit(collected.answer(reason))
        await self.save()

    def _stats_line(self, out: RequestOutput, stopped: bool) -> str:
        stats = answer_stats(out, time.monotonic())
        line = self.t(
            "stats", prompt=stats.prompt_tokens, cached=stats.cached_tokens,
            ttft=stats.ttft_s or 0.0, tps=stats.tokens_per_s,
        )
        prefix = out.cached_prefix  # the cached tokens from below the device pool, by tier
        if prefix is not None and prefix.host_tokens:
            line += " · " + self.t("stats_from_host", tokens=prefix.host_tokens)
        if prefix is not None and prefix.disk_tokens:
            line += " · " + self.t(
                "stats_from_disk", tokens=prefix.disk_tokens, seconds=prefix.disk_load_seconds
            )
        if stopped:
            line += " · " + self.t("stats_stopped")
        elif out.finish_reason == "length":
            line += " · " + self.t("stats_length")
        return line

    async def save(self) -> None:
        rt = self.runtime
        thread_id = cl.context.session.thread_id
        if rt.data_layer is None or not thread_id or self._history is None:
            return
        try:
            # {"conversation": ...} (token ids) or {"transcript": ...} (messages), and the settings
            await rt.data_layer.save_history(thread_id, {**self._history.to_dict(), "options": self.options})
        except Exception:  # the chat goes on; the log says why it will not resume exactly
            logger.exception("could not save the history of thread %s", thread_id)


async def _close_reading(reading: ReadingProgress, out: RequestOutput | None) -> None:
    """Close the reading step with what the engine reused, and what of it came from disk."""
    prefix = out.cached_prefix if out is not None else None
    await reading.close(
        out.num_cached_tokens if out is not None else 0,
        _seconds_to_first_token(out),
        disk_tokens=prefix.disk_tokens if prefix is not None else 0,
        disk_load_seconds=prefix.disk_load_seconds if prefix is not None else 0.0,
    )


def _seconds_to_first_token(out: RequestOutput | None) -> float | None:
    if out is not None and out.first_token_time is not None and out.arrival_time:
        return out.first_token_time - out.arrival_time
    return None
