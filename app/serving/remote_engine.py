"""`RemoteEngine`: an external OpenAI-compatible server (vLLM, SGLang) as an `EngineClient`.

PAGECHAT_ENGINE_URL points the app at a deployment that outgrew one GPU. The chat history
then travels as messages (`chat(...)`), since the upstream applies its own chat template; the
outputs are RequestOutput deltas parsed from the upstream's server-sent events, so the UI and
the API consume them exactly like the local engine's.

Each request streams on its own task feeding a queue (as AsyncLLM does); `abort` cancels that
task, which closes the HTTP stream, and vLLM and SGLang abort a request whose client closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import httpx

from app.settings import AppSettings
from engine.client import ChatMessage, EngineClient
from engine.outputs import EngineStats, RequestOutput
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class UpstreamError(RuntimeError):
    """The upstream server failed or refused a request (other than a 400, raised as ValueError)."""

    def __init__(self, message: str, status: int = 502) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class RemoteRequestOutput(RequestOutput):
    """A RequestOutput parsed from an upstream stream: text only (no token ids), the prompt's
    token count from `usage`. `num_generated_tokens` counts text deltas until the final
    output, which has the upstream's `usage.completion_tokens`."""

    prompt_tokens: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return self.prompt_tokens


def api_root(url: str) -> str:
    """`http://host:8000`, `.../v1` or `.../v1/` all mean the same server; return its `/v1` URL."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


def sampling_body(params: SamplingParams) -> dict[str, Any]:
    """Request fields for `params`. Extras (top_k, min_p, ...) are sent only when they do something,
    so a strict OpenAI-compatible server is not handed fields it does not know."""
    body: dict[str, Any] = {"temperature": params.temperature, "top_p": params.top_p}
    if params.max_tokens is not None:
        body["max_tokens"] = params.max_tokens
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    if params.presence_penalty:
        body["presence_penalty"] = params.presence_penalty
    if params.frequency_penalty:
        body["frequency_penalty"] = params.frequency_penalty
    if params.top_k != -1:
        body["top_k"] = params.top_k
    if params.min_p:
        body["min_p"] = params.min_p
    if params.repetition_penalty != 1.0:
        body["repetition_penalty"] = params.repetition_penalty
    if params.ignore_eos:
        body["ignore_eos"] = True
    if params.stop_token_ids:
        body["stop_token_ids"] = list(params.stop_token_ids)
    if params.cache_salt is not None:  # vLLM's field: the upstream isolates tenants' caches too
        body["cache_salt"] = params.cache_salt
    return body


def _error_message(response: httpx.Response) -> str:
    try:
        data = response.json()
        error = data.get("error", data)
        message = error.get("message") if isinstance(error, dict) else str(error)
        return str(message or data)
    except (ValueError, AttributeError):
        return response.text[:500] or response.reason_phrase


class _Progress:
    """What one upstream stream has produced so far."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.arrival = time.monotonic()
        self.first_token_time: float | None = None
        self.text = ""
        self.chunks = 0
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.error: str | None = None

    def delta(self, text: str) -> RemoteRequestOutput:
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        self.text += text
        self.chunks += 1
        return self._output(delta_text=text, finished=False, reason=None)

    def final(self, reason: str, error: str | None = None) -> RemoteRequestOutput:
        return self._output(delta_text="", finished=True, reason=reason, error=error)

    def _output(
        self, delta_text: str, finished: bool, reason: str | None, error: str | None = None
    ) -> RemoteRequestOutput:
        usage = self.usage or {}
        details = usage.get("prompt_tokens_details") or {}
        return RemoteRequestOutput(
            request_id=self.request_id,
            prompt_token_ids=[],
            text=self.text,
            delta_text=delta_text,
            finished=finished,
            finish_reason=reason,
            num_cached_tokens=int(details.get("cached_tokens") or 0),
            error=error,
            arrival_time=self.arrival,
            first_token_time=self.first_token_time,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            num_generated_tokens=int(usage.get("completion_tokens") or self.chunks),
        )


# Context assumed for an upstream that does not report its max_model_len.
REMOTE_DEFAULT_MAX_MODEL_LEN = 32768


class RemoteEngine:
    """The `EngineClient` the app uses, served by an OpenAI-compatible server over httpx."""

    tokenizer: None = None  # no local tokenizer: callers send messages, not token ids

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        model: str | None = None,
        timeout: float = 600.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = api_root(base_url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
            transport=transport,
        )
        self.requested_model = model
        self.model: str | None = None
        # From the upstream's model card once reached (vLLM reports it), else a default.
        self.max_model_len: int = REMOTE_DEFAULT_MAX_MODEL_LEN
        self.generation_defaults: dict[str, Any] = {}  # the upstream applies its own
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._cached_tokens = 0
        self._finished = 0

    @classmethod
    def from_settings(cls, settings: AppSettings, model: str | None = None) -> RemoteEngine:
        if not settings.engine_url:
            raise ValueError("PAGECHAT_ENGINE_URL is not set")
        return cls(settings.engine_url, settings.engine_api_key, model=model)

    # ---- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> bool:
        """Learn the upstream's model name and context length; False (logged) if it is not up yet.

        The app can start before the upstream (vLLM takes minutes to load): /health answers 503
        and the model is looked up again on the next request.
        """
        try:
            await self._discover()
            return True
        except (httpx.HTTPError, UpstreamError, ValueError) as exc:
            logger.warning("engine server %s not reachable yet: %s", self.base_url, exc)
            return False

    async def _discover(self) -> str:
        response = await self._client.get("/models", timeout=10.0)
        if response.status_code >= 400:
            raise UpstreamError(f"GET /v1/models: {_error_message(response)}", response.status_code)
        cards = response.json().get("data") or []
        if not cards:
            raise UpstreamError("the engine server lists no models")
        card = next((c for c in cards if c.get("id") == self.requested_model), None)
        if card is None:
            if self.requested_model:
                logger.warning(
                    "engine server does not serve %r; using %r",
                    self.requested_model,
                    cards[0].get("id"),
                )
            card = cards[0]
        self.model = str(card["id"])
        self.max_model_len = int(card.get("max_model_len") or REMOTE_DEFAULT_MAX_MODEL_LEN)
        logger.info(
            "using %s at %s (max_model_len %s)", self.model, self.base_url, self.max_model_len
        )
        return self.model

    async def health(self) -> bool:
        """True when the upstream answers its /health (vLLM, SGLang) or, lacking one, /v1/models."""
        root = self.base_url.removesuffix("/v1")
        try:
            response = await self._client.get(f"{root}/health", timeout=5.0)
            if response.status_code == 404:
                response = await self._client.get("/models", timeout=5.0)
            if response.status_code != 200:
                return False
            if self.model is None:
                await self._discover()
            return True
        except (httpx.HTTPError, UpstreamError, ValueError):
            return False

    @property
    def model_id(self) -> str | None:
        return self.model

    async def aclose(self) -> None:
        """Cancel the streams in flight and close the HTTP client."""
        for task in list(self._tasks.values()):
            task.cancel()
        await self._client.aclose()

    # ---- requests -----------------------------------------------------------------------------

    async def chat(
        self,
        messages: list[ChatMessage],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncGenerator[RemoteRequestOutput, None]:
        """Stream the assistant's answer to `messages` (OpenAI format) as deltas, then a final output."""
        body = {"messages": messages}
        async for out in self._stream("/chat/completions", body, params, request_id, chat=True):
            yield out

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncGenerator[RemoteRequestOutput, None]:
        """A plain text completion of `prompt` (text, or token ids of the upstream's tokenizer)."""
        async for out in self._stream(
            "/completions", {"prompt": prompt}, params, request_id, chat=False
        ):
            yield out

    async def abort(self, request_id: str) -> None:
        """Stop a request: its stream is closed and its consumer gets a final "abort" output."""
        task = self._tasks.get(request_id)
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])

    def stats(self) -> EngineStats:
        """What this process knows: requests in flight and token counts from upstream usage."""
        return EngineStats(
            num_running=len(self._tasks),
            num_waiting=0,
            kv_blocks_used=0,
            kv_blocks_total=0,
            block_size=0,
            prefix_cache_queries=self._prompt_tokens,
            prefix_cache_hits=self._cached_tokens,
            prompt_tokens_total=self._prompt_tokens,
            generation_tokens_total=self._generation_tokens,
            requests_finished_total=self._finished,
            generation_tokens_per_s=0.0,
            # As the upstream's usage tells: its prompt tokens not served from its cache.
            prompt_tokens_computed=self._prompt_tokens - self._cached_tokens,
        )

    async def _stream(
        self,
        path: str,
        body: dict,
        params: SamplingParams | None,
        request_id: str | None,
        chat: bool,
    ) -> AsyncGenerator[RemoteRequestOutput, None]:
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._tasks:
            raise ValueError(f"request id {request_id!r} is already in use")
        model = self.model or await self._discover_or_raise()
        payload = {
            "model": model,
            **body,
            **sampling_body(params or SamplingParams()),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        queue: asyncio.Queue = asyncio.Queue()
        task = asyncio.create_task(self._pump(path, payload, _Progress(request_id), queue, chat))
        self._tasks[request_id] = task
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            self._tasks.pop(request_id, None)
            if not task.done():
                task.cancel()

    async def _discover_or_raise(self) -> str:
        try:
            return await self._discover()
        except httpx.HTTPError as exc:
            raise UpstreamError(f"engine server {self.base_url} unreachable: {exc}") from exc

    async def _pump(
        self, path: str, payload: dict, progress: _Progress, queue: asyncio.Queue, chat: bool
    ) -> None:
        """Read one upstream stream into `queue`: deltas, then exactly one final output or an exception."""
        try:
            async with self._client.stream("POST", path, json=payload) as response:
                if response.status_code >= 400:
                    await response.aread()
                    message = _error_message(response)
                    if response.status_code == 400:
                        raise ValueError(message)
                    raise UpstreamError(
                        f"engine server answered {response.status_code}: {message}",
                        response.status_code,
                    )
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    self._read_chunk(json.loads(data), progress, queue, chat)
                    if progress.error is not None:
                        break
            if progress.error is not None:
                queue.put_nowait(self._finish(progress, "error"))
            else:
                queue.put_nowait(self._finish(progress, progress.finish_reason or "stop"))
        except asyncio.CancelledError:
            queue.put_nowait(self._finish(progress, "abort"))
            raise
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            if progress.chunks:
                progress.error = f"engine server stream failed: {exc}"
                queue.put_nowait(self._finish(progress, "error"))
            else:
                queue.put_nowait(UpstreamError(f"engine server {self.base_url} failed: {exc}"))
        except (ValueError, UpstreamError) as exc:
            queue.put_nowait(exc)

    @staticmethod
    def _read_chunk(chunk: dict, progress: _Progress, queue: asyncio.Queue, chat: bool) -> None:
        if "error" in chunk:
            error = chunk["error"]
            progress.error = str(error.get("message", error) if isinstance(error, dict) else error)
            return
        if chunk.get("usage"):
            progress.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
            if text:
                queue.put_nowait(progress.delta(text))
            if choice.get("finish_reason"):
                progress.finish_reason = choice["finish_reason"]

    def _finish(self, progress: _Progress, reason: str) -> RemoteRequestOutput:
        out = progress.final(reason, progress.error)
        self._prompt_tokens += out.prompt_tokens
        self._generation_tokens += out.num_generated_tokens
        self._cached_tokens += out.num_cached_tokens
        self._finished += 1
        return out


_: type[EngineClient] = RemoteEngine  # mypy checks that RemoteEngine implements the engine seam
