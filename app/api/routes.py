"""OpenAI-compatible API on the app's own server: /v1/models, /v1/chat/completions, /v1/completions.

The engine is the Runtime's `EngineClient` (app.state.runtime.engine): the in-process AsyncLLM
(chat messages go through its tokenizer's chat template, prompts reach it as token ids, so
lengths are checked here) or a RemoteEngine, which has no tokenizer (messages travel as they
are to the upstream server). `router` also carries /health and /metrics; include it
before mounting Chainlit at "/", which would otherwise shadow these paths.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.api.admission import AdmissionQueue, QueueFull
from app.api.errors import APIError, OpenAIRoute
from app.api.keys import key_is_valid
from app.api.logprobs import (
    TokenText,
    chat_logprobs,
    completion_logprobs,
    merge_completion_logprobs,
    prompt_logprobs,
)
from app.api.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    SamplingRequest,
    Usage,
    template_messages,
)
from app.api.reasoning import ReasoningSplitter, thinking_mode
from app.api.served_model import check_model, engine_of, served_model_id
from app.api.structured import InvalidRequest, structured_output_of
from app.api.tokenize import router as tokenize_router
from app.api.tools import ToolCallStreamer, parse_tool_calls, plan_tools
from app.serving import metrics
from app.serving.rate_limit import RateLimited, RateTicket, api_caller
from app.serving.remote_engine import UpstreamError
from app.serving.runtime import runtime_of
from app.serving.tenancy import api_tenant, cache_salt
from app.settings import AppSettings
from engine.client import ChatMessage as EngineMessage
from engine.client import EngineClient
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from engine.tokenizer_process import PromptTooLong, TokenizerProcess, TokenizerWorkerDied

Stream = AsyncGenerator[RequestOutput, None]

STARTED_AT = int(time.time())


# ---- app state ------------------------------------------------------------------------------


def _settings(request: Request) -> AppSettings:
    return runtime_of(request).settings


_bearer = HTTPBearer(auto_error=False)


async def require_api_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    keys = _settings(request).api_key_list()
    if keys and not key_is_valid(credentials.credentials if credentials else None, keys):
        raise APIError(
            401,
            "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    _admit(request, 0)  # a caller over its rate limit is refused before its request is parsed


def _queue(request: Request, engine: EngineClient, job: _Job) -> None:
    """Count the job's engine requests (prompts x n) into the waiting queue, or 503 when
    that would pass PAGECHAT_MAX_QUEUED_REQUESTS (app/api/admission.py)."""
    state = request.app.state
    if getattr(state, "admission", None) is None:
        state.admission = AdmissionQueue()
    limit = _settings(request).max_queued_requests
    try:
        job.streams = state.admission.admit(job.streams, limit, engine.stats().num_waiting)
    except QueueFull as exc:
        raise APIError(
            503, str(exc), type="server_error", code="queue_full", headers={"Retry-After": "1"}
        ) from None


# ---- request -> engine ----------------------------------------------------------------------


def _check_unsupported(body: SamplingRequest) -> None:
    if body.max_tokens == 0 and not (isinstance(body, CompletionRequest) and body.echo):
        raise APIError(400, "max_tokens must be >= 1 (0 only with echo).", param="max_tokens")
    if isinstance(body, ChatCompletionRequest):
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true.", param="top_logprobs")
        if body.continue_final_message and body.add_generation_prompt:
            raise APIError(
                400,
                "continue_final_message and add_generation_prompt cannot both be true.",
                param="continue_final_message",
            )
        if body.continue_final_message and body.messages[-1].role != "assistant":
            raise APIError(
                400,
                "continue_final_message needs an assistant message last.",
                param="continue_final_message",
            )
    if (
        isinstance(body, CompletionRequest)
        and body.echo
        and body.logprobs is not None
        and body.prompt_logprobs not in (None, body.logprobs)
    ):
        raise APIError(
            400,
            "With echo, prompt_logprobs must equal logprobs (the prompt's tokens are reported once).",
            param="prompt_logprobs",
        )
    if body.prompt_logprobs is not None and body.stream:
        raise APIError(
            400, "prompt_logprobs is not served with stream: true.", param="prompt_logprobs"
        )
    if isinstance(body, CompletionRequest):
        if body.suffix:
            raise APIError(400, "suffix is not supported by this server.", param="suffix")
        if body.best_of not in (None, 1):
            raise APIError(400, "Only best_of=1 is supported.", param="best_of")


async def _chat_prompt_ids(
    tokenizer: Tokenizer,
    messages: list[EngineMessage],
    max_model_len: int,
    tools: list[dict[str, Any]] | None = None,
    **options: Any,
) -> list[int]:
    # encode_chat: control tokens written in the messages stay plain text (issue 17); a long
    # conversation is encoded in a worker process (tokenizing holds the GIL), and one that
    # cannot fit comes back as its count only (no list of millions of ids on the event loop).
    try:
        return await TokenizerProcess.of(tokenizer).encode_chat(
            messages, max_len=max_model_len - 1, tools=tools, **options
        )
    except PromptTooLong as exc:
        _check_length(exc.num_tokens, None, max_model_len, "messages")
        raise AssertionError("unreachable: the prompt is longer than the context") from exc
    except TokenizerWorkerDied as exc:
        raise APIError(503, str(exc), type="server_error", headers={"Retry-After": "1"}) from exc
    except Exception as exc:  # the template refuses some message orders (raise_exception)
        raise APIError(
            400, f"The chat template could not render these messages: {exc}", param="messages"
        ) from exc


def _check_length(n_prompt: int, max_tokens: int | None, max_model_len: int, what: str) -> None:
    if n_prompt >= max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, your {what} "
            f"resulted in {n_prompt} tokens. Please reduce the length of the {what}.",
            param=what,
            code="context_length_exceeded",
        )
    if max_tokens is not None and n_prompt + max_tokens > max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{n_prompt + max_tokens} tokens ({n_prompt} in the {what}, {max_tokens} in the completion). "
            f"Please reduce the length of the {what} or completion.",
            param="max_tokens",
            code="context_length_exceeded",
        )


def _cache_salt(request: Request, body: SamplingRequest) -> str | None:
    """The request's prefix-cache salt: its tenant (API key) and the body's `cache_salt`."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    key = token.strip() if scheme.lower() == "bearer" else None
    return cache_salt(api_tenant(_settings(request), key), body.cache_salt)


def _sampling_params(
    body: SamplingRequest,
    defaults: dict[str, Any],
    max_tokens: int | None,
    salt: str | None = None,
) -> SamplingParams:
    """SamplingParams from the request; what it leaves out comes from the model's generation config."""

    def pick(value: Any, name: str, fallback: Any) -> Any:
        return value if value is not None else defaults.get(name, fallback)

    top_k = pick(body.top_k, "top_k", -1)
    try:
        return SamplingParams(
            temperature=pick(body.temperature, "temperature", 1.0),
            top_p=pick(body.top_p, "top_p", 1.0),
            top_k=-1 if top_k == 0 else top_k,
            min_p=pick(body.min_p, "min_p", 0.0),
            # max_tokens 0 (echo only): one token is sampled, then dropped (_prompt_only).
            max_tokens=1 if body.max_tokens == 0 else max_tokens,
            stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
            stop_token_ids=body.stop_token_ids,
            min_tokens=body.min_tokens,
            logit_bias=_logit_bias(body),
            include_stop_str_in_output=body.include_stop_str_in_output,
            skip_special_tokens=body.skip_special_tokens,
            logprobs=_logprobs_wanted(body),
            prompt_logprobs=_prompt_logprobs_wanted(body),
            ignore_eos=body.ignore_eos,
            seed=body.seed,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=pick(body.repetition_penalty, "repetition_penalty", 1.0),
            cache_salt=salt,
        )
    except ValueError as exc:
        text = str(exc)
        field = (
            text.split(" ", 1)[0].removeprefix("SamplingParams.")
            if text.startswith("SamplingParams.")
            else None
        )
        raise APIError(400, text, param=field) from exc


def _prompt_logprobs_wanted(body: SamplingRequest) -> int | None:
    """How many top tokens per prompt position the engine computes: for `echo` with
    `logprobs` (completions) and for vLLM's `prompt_logprobs`, the larger of the two."""
    wanted = [body.prompt_logprobs]
    if isinstance(body, CompletionRequest) and body.echo:
        wanted.append(body.logprobs)
    values = [k for k in wanted if k is not None]
    return max(values) if values else None


def _logprobs_wanted(body: SamplingRequest) -> int | None:
    if isinstance(body, ChatCompletionRequest):
        return (body.top_logprobs or 0) if body.logprobs else None
    if isinstance(body, CompletionRequest):
        return body.logprobs
    return None


def _logit_bias(body: SamplingRequest) -> dict[int, float] | None:
    if not body.logit_bias:
        return None
    try:
        return {int(token): float(value) for token, value in body.logit_bias.items()}
    except ValueError as exc:
        raise APIError(
            400, "logit_bias keys must be token ids (integers as strings).", param="logit_bias"
        ) from exc


def _template_options(body: ChatCompletionRequest) -> dict[str, Any]:
    """How the chat template renders the messages (vLLM's fields)."""
    return {
        **(body.chat_template_kwargs or {}),
        "add_generation_prompt": body.add_generation_prompt,
        "continue_final_message": body.continue_final_message,
    }


# What only the in-process engine serves: a remote engine is sent OpenAI's basic fields.
_LOCAL_ONLY = (
    "logprobs",
    "echo",
    "min_tokens",
    "logit_bias",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "chat_template_kwargs",
    "add_generation_prompt",
    "continue_final_message",
    "include_reasoning",
    "prompt_logprobs",
)
_DEFAULTS: dict[str, Any] = {
    "echo": False,
    "min_tokens": 0,
    "include_stop_str_in_output": False,
    "skip_special_tokens": True,
    "add_generation_prompt": True,
    "continue_final_message": False,
    "include_reasoning": True,
}


def _check_remote(body: SamplingRequest) -> None:
    for name in _LOCAL_ONLY:
        value = getattr(body, name, None)
        if value is not None and value != _DEFAULTS.get(name):
            raise APIError(400, f"{name} is not served through a remote engine.", param=name)


def _requested_max_tokens(body: SamplingRequest) -> int | None:
    if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens:
        return body.max_completion_tokens
    return body.max_tokens


def _engine_error(exc: Exception) -> APIError:
    """An exception from the engine (or the upstream server) as the matching API error."""
    status = exc.status if isinstance(exc, UpstreamError) else None
    if isinstance(exc, ValueError):
        return APIError(400, str(exc))
    if status in (429, 503):
        return APIError(status, str(exc), type="server_error", code="upstream_unavailable")
    if status is not None or isinstance(exc, ConnectionError):
        return APIError(
            502, f"The engine server failed: {exc}", type="server_error", code="bad_gateway"
        )
    return APIError(500, f"Internal error: {exc}", type="server_error")


# ---- engine -> response ---------------------------------------------------------------------


@dataclass
class _Job:
    """One API request: its engine streams (one per prompt) and how to shape the answer."""

    kind: str  # "chat" | "text"
    response_id: str
    model: str
    created: int
    stream: bool
    include_usage: bool
    request_ids: list[str]
    streams: list[Stream]
    body: SamplingRequest | None = None
    tokens: TokenText | None = None  # set by _respond for an in-process engine
    echo_texts: list[str] | None = None  # completions with echo: each prompt's text
    _echoed: set[int] = field(default_factory=set)
    _offsets: dict[int, int] = field(default_factory=dict)

    @property
    def logprobs(self) -> int | None:
        return _logprobs_wanted(self.body) if self.body is not None else None

    def echo_text(self, index: int) -> str:
        if self.echo_texts is None or self.body is None:
            return ""
        return self.echo_texts[index // self.body.n]

    def choice_logprobs(self, index: int, out: RequestOutput, delta: bool) -> Any:
        """The logprobs of one choice: this output's tokens (a stream) or all (`delta` False)."""
        if self.logprobs is None or self.tokens is None:
            return None
        ids = out.delta_token_ids if delta else out.token_ids
        entries = (out.delta_logprobs if delta else out.logprobs) or []
        ids = ids[: len(entries)]
        if self.kind == "chat":
            return chat_logprobs(self.tokens, ids, entries, self.logprobs)
        parts = []
        offset = self._offsets.get(index, 0) if delta else 0
        if self.echo_texts is not None and (not delta or index not in self._echoed):
            prompt_entries = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
            part, offset = completion_logprobs(
                self.tokens, out.prompt_token_ids, prompt_entries, offset
            )
            offset = len(self.echo_text(index))  # offsets in the text as the client sees it
            parts.append(part)
        part, offset = completion_logprobs(self.tokens, ids, entries, offset)
        parts.append(part)
        self._offsets[index] = offset
        return merge_completion_logprobs(parts)

    def output_chunk(self, index: int, out: RequestOutput) -> dict:
        """A streamed chunk of one output: its text (after the prompt, with echo), logprobs
        and, when it ends the choice, finish_reason and stop_reason."""
        logprobs = self.choice_logprobs(index, out, delta=True)
        text = out.delta_text
        if self.echo_texts is not None and index not in self._echoed:
            text = self.echo_text(index) + text
        self._echoed.add(index)
        data = self.chunk(index, text, out.finish_reason if out.finished else None)
        choice = data["choices"][0]
        choice["logprobs"] = logprobs
        if out.finished:
            choice["stop_reason"] = out.stop_reason
        return data

    def wants_chunk(self, out: RequestOutput) -> bool:
        return bool(
            out.delta_text or out.finished or (self.logprobs is not None and out.delta_logprobs)
        )

    # Chat with tools: each choice's text parsed into content and tool calls (app/api/tools.py).
    tool_streams: list[ToolCallStreamer] | None = None
    # Chat on the in-process engine: each choice's <think> block split off (app/api/reasoning.py).
    reasoning: list[ReasoningSplitter] | None = None
    include_reasoning: bool = True

    def parsed_chunks(self, index: int, out: RequestOutput) -> list[dict]:
        """Chunks of one output of a parsed chat: reasoning_content, content, tool_calls."""
        text, reasoning = out.delta_text, ""
        if self.reasoning is not None:
            splitter = self.reasoning[index]
            reasoning, text = splitter.feed(text)
            if out.finished:
                more_reasoning, more = splitter.finish()
                reasoning, text = reasoning + more_reasoning, text + more
            if not self.include_reasoning:
                reasoning = ""
        content, calls = text, list[dict[str, Any]]()
        if self.tool_streams is not None:
            streamer = self.tool_streams[index]
            content, calls = streamer.feed(text)
            if out.finished:
                more, more_calls = streamer.finish()
                content, calls = content + more, calls + more_calls
        data = self.output_chunk(index, out)  # logprobs, finish_reason and stop_reason
        choice = data["choices"][0]
        if (
            out.finished
            and out.finish_reason == "stop"
            and self.tool_streams is not None
            and self.tool_streams[index].has_calls
        ):
            choice["finish_reason"] = "tool_calls"
        delta: dict[str, Any] = {"reasoning_content": reasoning} if reasoning else {}
        if content or not (calls or reasoning):
            delta["content"] = content
        if calls:
            delta["tool_calls"] = calls
        if not (reasoning or content or calls or out.finished or choice["logprobs"]):
            return []
        choice["delta"] = delta
        return [data]

    def chunk(self, index: int, text: str, finish_reason: str | None, role: bool = False) -> dict:
        if self.kind == "chat":
            delta: dict[str, Any] = (
                {"role": "assistant", "content": text} if role else {"content": text}
            )
            choice = {
                "index": index,
                "delta": delta,
                "logprobs": None,
                "finish_reason": finish_reason,
            }
            obj = "chat.completion.chunk"
        else:
            choice = {
                "index": index,
                "text": text,
                "logprobs": None,
                "finish_reason": finish_reason,
            }
            obj = "text_completion"
        data = {
            "id": self.response_id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }
        if self.include_usage:
            data["usage"] = None
        return data

    def usage_chunk(self, usage: Usage) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {
            "id": self.response_id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage.model_dump(),
        }


def _usage(finals: list[RequestOutput | None]) -> Usage:
    prompt = completion = cached = 0
    for out in finals:
        if out is None:
            continue
        prompt += out.num_prompt_tokens
        completion += out.num_generated_tokens
        cached += out.num_cached_tokens
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


async def _merge(streams: list[Stream]) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """Outputs of several streams as (index, output), in arrival order."""
    if len(streams) == 1:
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: Stream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
        except Exception as exc:
            queue.put_nowait((i, exc))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _DisconnectGuard:
    """Aborts the job's engine requests as soon as the client goes away.

    Waits on the ASGI `receive` channel, which yields `http.disconnect` when the connection
    closes, so a client that leaves while its request is still queued is noticed too.
    """

    def __init__(self, request: Request, engine: EngineClient, request_ids: list[str]) -> None:
        self.request, self.engine, self.request_ids = request, engine, request_ids
        self.disconnected = False
        self.task = asyncio.create_task(self._watch())
        # In flight until stop(): a shutdown waits for it, then aborts it (app/serving/shutdown.py).
        self.drain = runtime_of(request).drain
        self.drain.begin(request_ids, engine.abort)

    async def _watch(self) -> None:
        while (await self.request.receive())["type"] != "http.disconnect":
            pass
        self.disconnected = True
        for request_id in self.request_ids:
            await self.engine.abort(request_id)

    def stop(self) -> None:
        self.task.cancel()
        self.drain.end(self.request_ids)

    def cut(self) -> bool:
        """Whether the server's shutdown aborted this job (its grace period ran out)."""
        return any(self.drain.cut(request_id) for request_id in self.request_ids)


def _shutdown_error() -> APIError:
    return APIError(
        503,
        "The server is shutting down: this answer was cut off when its grace period ran out. "
        "Retry shortly.",
        type="server_error",
        code="server_shutting_down",
        headers={"Retry-After": "5"},
    )


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _respond(request: Request, engine: EngineClient, job: _Job) -> Response:
    if engine.tokenizer is None and job.body is not None:
        _check_remote(job.body)
    ticket = _admit(request, len(job.request_ids))  # each prompt x n is one request
    job.tokens = TokenText(engine.tokenizer) if engine.tokenizer is not None else None
    guard = _DisconnectGuard(request, engine, job.request_ids)
    outputs = _merge([metrics.track(ticket.meter(s), kind="api") for s in job.streams])
    try:
        # Wait for the first output before answering, so a refused request gets its real status.
        first = await anext(outputs, None)
    except Exception as exc:
        guard.stop()
        await outputs.aclose()
        raise _engine_error(exc) from exc
    if job.stream:
        return StreamingResponse(
            _stream_events(job, first, outputs, guard),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **ticket.headers},
        )
    try:
        response = await _collect(job, first, outputs)
    finally:
        guard.stop()
        await outputs.aclose()
    if guard.cut():
        raise _shutdown_error()
    response.headers.update(ticket.headers)
    return response


def _admit(request: Request, requests: int) -> RateTicket:
    """The caller's rate limits (app/serving/rate_limit.py): 429 in OpenAI's shape when over."""
    settings = _settings(request)
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    caller = api_caller(settings, token.strip() if scheme.lower() == "bearer" else None)
    limits = runtime_of(request).rate_limits
    try:
        if not requests:  # only check that one request could be admitted now
            limits.check(settings, caller)
        return limits.admit(settings, caller, requests)
    except RateLimited as exc:
        raise APIError(
            429,
            exc.message,
            type=exc.kind,
            code="rate_limit_exceeded",
            headers=exc.response_headers(),
        ) from None


async def _collect(
    job: _Job,
    first: tuple[int, RequestOutput] | None,
    outputs: AsyncGenerator[tuple[int, RequestOutput], None],
) -> Response:
    n = len(job.streams)
    texts = [""] * n
    finals: list[RequestOutput | None] = [None] * n
    pending = [first] if first else []
    try:
        while True:
            item = pending.pop() if pending else await anext(outputs, None)
            if item is None:
                break
            i, out = item
            texts[i] += out.delta_text
            if out.finished:
                finals[i] = out
    except Exception as exc:
        raise _engine_error(exc) from exc
    for final in finals:
        if final is not None and final.finish_reason == "error":
            raise APIError(
                500, f"The engine failed this request: {final.error}", type="server_error"
            )
    reasons = [final.finish_reason if final else "abort" for final in finals]
    usage = _usage(finals)
    if job.kind == "chat":
        body: Any = ChatCompletionResponse(
            id=job.response_id,
            created=job.created,
            model=job.model,
            choices=[_chat_choice(job, i, texts[i], reasons[i]) for i in range(n)],
            usage=usage,
        )
    else:
        body = CompletionResponse(
            id=job.response_id,
            created=job.created,
            model=job.model,
            choices=[
                CompletionChoice(index=i, text=texts[i], finish_reason=reasons[i]) for i in range(n)
            ],
            usage=usage,
        )
    for i, final in enumerate(finals):
        if final is None:
            continue
        body.choices[i].stop_reason = final.stop_reason
        body.choices[i].logprobs = job.choice_logprobs(i, final, delta=False)
        if job.body is not None and job.body.prompt_logprobs is not None and job.tokens:
            entries = final.prompt_logprobs or [None] * len(final.prompt_token_ids)
            values = prompt_logprobs(
                job.tokens, final.prompt_token_ids, entries, job.body.prompt_logprobs
            )
            if job.kind == "chat":
                body.prompt_logprobs = values  # vLLM: one prompt, on the response
            else:
                body.choices[i].prompt_logprobs = values
        if job.echo_texts is not None:
            body.choices[i].text = job.echo_text(i) + body.choices[i].text
    return JSONResponse(body.model_dump())


def _chat_choice(job: _Job, index: int, text: str, reason: str | None) -> ChatChoice:
    """One choice of a chat answer: its <think> block as message.reasoning_content and, with
    tools, the <tool_call> blocks after it as message.tool_calls."""
    reasoning: str | None = None
    content: str | None = text
    if job.reasoning is not None:
        reasoning, content = job.reasoning[index].split(text)
        if not job.include_reasoning:
            reasoning = None
    if job.tool_streams is None or content is None:
        message = AssistantMessage(content=content, reasoning_content=reasoning)
        return ChatChoice(index=index, message=message, finish_reason=reason)
    content, calls = parse_tool_calls(content)
    if calls and reason == "stop":
        reason = "tool_calls"
    message = AssistantMessage.model_validate(
        {"content": content, "reasoning_content": reasoning, "tool_calls": calls}
    )
    return ChatChoice(index=index, message=message, finish_reason=reason)


async def _stream_events(
    job: _Job,
    first: tuple[int, RequestOutput] | None,
    outputs: AsyncGenerator[tuple[int, RequestOutput], None],
    guard: _DisconnectGuard,
) -> AsyncGenerator[str, None]:
    finals: list[RequestOutput | None] = [None] * len(job.streams)
    try:
        if job.kind == "chat":
            for i in range(len(job.streams)):
                yield _sse(job.chunk(i, "", None, role=True))
        item = first
        while item is not None:
            i, out = item
            if out.finished and out.finish_reason == "abort" and guard.cut():
                yield _sse(_shutdown_error().body())
                break
            if out.finished and out.finish_reason == "error":
                error = APIError(
                    500, f"The engine failed this request: {out.error}", type="server_error"
                )
                yield _sse(error.body())
                break
            if job.tool_streams is not None or job.reasoning is not None:
                for data in job.parsed_chunks(i, out):
                    yield _sse(data)
            elif job.wants_chunk(out):
                yield _sse(job.output_chunk(i, out))
            if out.finished:
                finals[i] = out
            item = await anext(outputs, None)
        else:
            if job.include_usage:
                yield _sse(job.usage_chunk(_usage(finals)))
    except Exception as exc:
        yield _sse(_engine_error(exc).body())
    finally:
        guard.stop()
        await outputs.aclose()
    yield "data: [DONE]\n\n"


# ---- endpoints ------------------------------------------------------------------------------

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": why}
    for status, why in [
        (400, "Invalid request, or prompt longer than the model's context"),
        (401, "Missing or wrong API key"),
        (404, "Unknown model"),
        (503, "Model still loading, or too many requests waiting"),
    ]
}

v1 = APIRouter(
    prefix="/v1", route_class=OpenAIRoute, dependencies=[Depends(require_api_key)], tags=["openai"]
)


@v1.get("/models", response_model=ModelList, responses=ERRORS)
async def list_models(request: Request) -> ModelList:
    engine = engine_of(request)
    return ModelList(data=[await _model_card(request, engine)])


@v1.get("/models/{model:path}", response_model=ModelCard, responses=ERRORS)
async def retrieve_model(model: str, request: Request) -> ModelCard:
    """OpenAI's `models.retrieve`: the served model under any of its names, else 404."""
    engine = engine_of(request)
    await check_model(request, engine, model)
    return await _model_card(request, engine)


async def _model_card(request: Request, engine: EngineClient) -> ModelCard:
    return ModelCard(
        id=await served_model_id(request, engine),
        created=STARTED_AT,
        max_model_len=engine.max_model_len,
    )


def _job(
    kind: str,
    request_id: str,
    model: str,
    body: SamplingRequest,
    starts: list[tuple[Callable[[str, SamplingParams], Stream], SamplingParams]],
) -> _Job:
    """The job of a request: `n` choices per prompt (index prompt * n + choice).

    A choice's seed is the request's seed + its number, so the n answers differ and each is
    reproducible. Choices after the first start once the first has produced its first token:
    its full prompt blocks are in the prefix cache by then and the scheduler copies its last,
    partial block (engine.scheduler), so each later choice computes only the prompt's last token.
    """
    n = body.n
    count = len(starts) * n
    ids = [request_id] if count == 1 else [f"{request_id}-{i}" for i in range(count)]
    streams: list[Stream] = []
    for p, (start, params) in enumerate(starts):
        first_ready = asyncio.Event()
        for j in range(n):
            choice_params = params
            if j and params.seed is not None:
                choice_params = copy.copy(params)
                choice_params.seed = params.seed + j
            stream = start(ids[p * n + j], choice_params)
            if n > 1 and params.prompt_logprobs is None:  # prompt logprobs skip the cache
                stream = _after_first(stream, first_ready) if j else _first(stream, first_ready)
            if body.max_tokens == 0:
                stream = _prompt_only(stream)
            streams.append(stream)
    return _Job(
        kind=kind,
        response_id=request_id,
        model=model,
        created=int(time.time()),
        stream=body.stream,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        request_ids=ids,
        streams=streams,
        body=body,
    )


async def _first(stream: Stream, ready: asyncio.Event) -> Stream:
    """The first choice's stream; sets `ready` at its first token (or its end)."""
    try:
        async for out in stream:
            if out.delta_token_ids or out.finished:
                ready.set()
            yield out
    finally:
        ready.set()
        await stream.aclose()


async def _after_first(stream: Stream, ready: asyncio.Event) -> Stream:
    """A later choice's stream: its request reaches the engine once `ready` is set."""
    await ready.wait()
    try:
        async for out in stream:
            yield out
    finally:
        await stream.aclose()


async def _prompt_only(stream: Stream) -> Stream:
    """max_tokens 0 (completions with echo): the one sampled token is dropped from the answer."""
    try:
        async for out in stream:
            yield dataclasses.replace(
                out,
                delta_text="",
                delta_token_ids=[],
                delta_logprobs=None,
                text="",
                token_ids=[],
                logprobs=None,
                num_generated_tokens=0,
                stop_reason=None,
                finish_reason="length" if out.finish_reason == "stop" else out.finish_reason,
            )
    finally:
        await stream.aclose()


@v1.post("/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    engine = engine_of(request)
    model = await check_model(request, engine, body.model)
    _check_unsupported(body)
    plan, structured = _tools_and_structured_output(body)
    messages = template_messages(body.messages)
    max_tokens = _requested_max_tokens(body)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    salt = _cache_salt(request, body)
    tokenizer = engine.tokenizer
    if tokenizer is None:  # a remote engine: the messages go as they are
        if plan.tools or structured:
            raise APIError(
                400,
                "Tools and structured output are not served through a remote engine.",
                param="tools" if plan.tools else "response_format",
            )
        params = _sampling_params(body, engine.generation_defaults, max_tokens, salt)

        def start(rid: str, params: SamplingParams) -> Stream:
            return engine.chat(messages, params, request_id=rid)
    else:
        ids = await _chat_prompt_ids(
            tokenizer, messages, engine.max_model_len, plan.tools, **_template_options(body)
        )
        _check_length(len(ids), max_tokens, engine.max_model_len, "messages")
        mode = thinking_mode(
            tokenizer, ids, body.chat_template_kwargs or {}, constrained=structured is not None
        )
        budget = max_tokens or engine.max_model_len - len(ids)
        params = _sampling_params(body, engine.generation_defaults, budget, salt)
        params.structured_output = structured

        def start(rid: str, params: SamplingParams) -> Stream:
            return engine.generate(ids, params, request_id=rid)

    job = _job("chat", request_id, model, body, [(start, params)])
    _queue(request, engine, job)
    if plan.parse:
        job.tool_streams = [ToolCallStreamer() for _ in job.streams]
    if tokenizer is not None:
        job.reasoning = [ReasoningSplitter(mode) for _ in job.streams]
        job.include_reasoning = body.include_reasoning
    return await _respond(request, engine, job)


def _tools_and_structured_output(body: ChatCompletionRequest) -> tuple[Any, Any]:
    """The request's ToolPlan and output constraint (forced tool calls, response_format or
    guided_*); 400 for what cannot be served."""
    try:
        plan = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls)
        structured = structured_output_of(body)
    except InvalidRequest as exc:
        raise APIError(400, str(exc), param=exc.param) from exc
    if plan.structured_output is not None and structured is not None:
        raise APIError(
            400,
            "tool_choice required or a named function cannot be combined with response_format "
            "or guided_*.",
            param="tool_choice",
        )
    return plan, plan.structured_output or structured


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty.", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


@v1.post("/completions", response_model=CompletionResponse, responses=ERRORS)
async def completions(body: CompletionRequest, request: Request) -> Response:
    engine = engine_of(request)
    model = await check_model(request, engine, body.model)
    _check_unsupported(body)
    prompts = _prompts(body.prompt)
    max_tokens = _requested_max_tokens(body)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    salt = _cache_salt(request, body)
    try:
        structured = structured_output_of(body)
    except InvalidRequest as exc:
        raise APIError(400, str(exc), param=exc.param) from exc
    starts = []
    echo_texts: list[str] = []
    tokenizer = engine.tokenizer
    for prompt in prompts:
        if tokenizer is None:  # a remote engine: text or token ids go as they are
            if structured is not None:
                raise APIError(
                    400,
                    "Structured output is not served through a remote engine.",
                    param="guided_json",
                )
            params = _sampling_params(body, engine.generation_defaults, max_tokens, salt)
            prompt_input: str | list[int] = prompt
        else:
            if isinstance(prompt, str):
                try:
                    prompt_input = await TokenizerProcess.of(tokenizer).encode(
                        prompt, max_len=engine.max_model_len - 1
                    )
                except PromptTooLong as exc:
                    _check_length(exc.num_tokens, None, engine.max_model_len, "prompt")
                    raise AssertionError("unreachable: longer than the context") from exc
                except TokenizerWorkerDied as exc:
                    raise APIError(
                        503, str(exc), type="server_error", headers={"Retry-After": "1"}
                    ) from exc
            else:
                prompt_input = prompt
            if not prompt_input:
                raise APIError(400, "prompt must not be empty.", param="prompt")
            _check_length(len(prompt_input), max_tokens, engine.max_model_len, "prompt")
            budget = max_tokens or engine.max_model_len - len(prompt_input)
            params = _sampling_params(body, engine.generation_defaults, budget, salt)
            params.structured_output = structured
        starts.append((_bind(engine, prompt_input), params))
        if body.echo:
            echo_texts.append(prompt if isinstance(prompt, str) else _decode(engine, prompt))
    job = _job("text", request_id, model, body, starts)
    _queue(request, engine, job)
    job.echo_texts = echo_texts if body.echo else None
    return await _respond(request, engine, job)


def _decode(engine: EngineClient, ids: list[int]) -> str:
    return engine.tokenizer.decode(ids) if engine.tokenizer is not None else ""


def _bind(engine: EngineClient, prompt: str | list[int]) -> Callable[[str, SamplingParams], Stream]:
    return lambda rid, params: engine.generate(prompt, params, request_id=rid)


@v1.api_route(
    "/{path:path}",
    methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
    include_in_schema=False,
)
async def unknown_path(path: str, request: Request) -> Response:
    """Any other /v1 path or method: 404 (405 for a known path) in OpenAI's shape, not the
    chat page Chainlit would serve. Registered last, so every real route matches first."""
    for route in v1.routes:
        if isinstance(route, APIRoute) and route.endpoint is not unknown_path:
            if route.path_regex.match(request.url.path):
                allowed = ", ".join(sorted(route.methods or ()))
                raise APIError(
                    405,
                    f"Method {request.method} is not allowed on {request.url.path} (use {allowed}).",
                    headers={"Allow": allowed},
                )
    raise APIError(
        404,
        f"Unknown path {request.url.path}: this server serves /v1/models, "
        "/v1/chat/completions and /v1/completions.",
        code="not_found",
    )


router = APIRouter()
router.include_router(v1)
router.include_router(tokenize_router, dependencies=[Depends(require_api_key)])
router.include_router(metrics.router)


@router.head("/health", include_in_schema=False)
async def health_head(request: Request) -> Response:
    """HEAD /health for load balancers: /health's status, no body."""
    return Response(status_code=(await metrics.health(request)).status_code)
