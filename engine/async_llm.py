"""`AsyncLLM`: the engine on its own thread, streaming RequestOutput deltas to asyncio callers.

The engine thread owns the LLMEngine (scheduler, blocks, model); callers talk to it only
through a command queue, and results come back to each caller's event loop with
`loop.call_soon_threadsafe`, so GPU work never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass
from typing import Any

from engine.client import ChatMessage, EngineClient
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import EngineStats, RequestOutput
from engine.sampling_params import SamplingParams
from engine.tokenizer_process import TokenizerProcess

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncLLM:
    """Thread-backed async front end. Construct it off the event loop: it loads the weights.

    Implements `engine.client.EngineClient`, the surface the app uses.
    """

    def __init__(self, config: EngineConfig | None = None, **kwargs: Any) -> None:
        config = config.model_copy(update=kwargs) if config else EngineConfig(**kwargs)
        self.config = config
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self.model_config = self.engine.model_config
        self.max_model_len = self.engine.max_model_len
        self.generation_defaults: dict[str, Any] = dict(self.engine.generation_defaults)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._stats = self.engine.stats()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pagechat-engine", daemon=True)
        self._thread.start()

    # ---- caller side (event loop) -------------------------------------------------------------

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream deltas until the request finishes. Cancelling the consumer aborts the request.

        Raises ValueError before the first output when the request can never be served.
        """
        if self._stopped.is_set():
            raise RuntimeError("engine is shut down")
        params = params or SamplingParams()
        request_id = request_id or uuid.uuid4().hex
        if isinstance(prompt, str):  # a long one in a worker process: it holds the GIL
            prompt = await TokenizerProcess.of(self.tokenizer).encode(prompt)
        if params.structured_output is not None:
            # Compile (or find in the cache) in a worker thread: not on the event loop, nor on
            # the engine thread between steps. An invalid grammar raises ValueError here.
            await asyncio.to_thread(self.engine.structured_output.compile, params.structured_output)
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue())
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
        self._commands.put(("add", request_id, prompt, params))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id))

    async def chat(
        self,
        messages: list[ChatMessage],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """`generate` for the prompt that the model's chat template makes of `messages`.

        The messages are untrusted text: control tokens written in them stay plain text
        (`Tokenizer.encode_chat`)."""
        prompt = await TokenizerProcess.of(self.tokenizer).encode_chat(messages)
        stream = self.generate(prompt, params, request_id)
        try:
            async for out in stream:
                yield out
        finally:
            await stream.aclose()

    async def abort(self, request_id: str) -> None:
        """Abort a request; its blocks are freed on the engine thread's next turn."""
        done = asyncio.get_running_loop().create_future()
        self._commands.put(("abort", request_id, done))
        await done

    def stats(self) -> EngineStats:
        """The latest snapshot, refreshed by the engine thread after every step."""
        return self._stats

    @property
    def model_id(self) -> str:
        return str(self.config.model)

    async def health(self) -> bool:
        """True while the engine thread runs."""
        return not self._stopped.is_set() and self._thread.is_alive()

    async def aclose(self) -> None:
        """`shutdown` off the event loop (it joins the engine thread)."""
        await asyncio.to_thread(self.shutdown)

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._commands.put(("stop",))
        self._thread.join(timeout)
        if not self._thread.is_alive():  # the engine is the caller's now: no step can race
            self.engine.close()  # writes the KV blocks still waiting for the disk tier

    # ---- engine thread ------------------------------------------------------------------------

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, items: Iterable[tuple[str, RequestOutput | BaseException]]) -> None:
        """Each item to its request's stream, with one wake-up per event loop, not one per
        item: each `call_soon_threadsafe` writes to the loop's self-pipe and wakes its thread,
        which then contends for the GIL with this one (64 of them a step at batch 64)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        with self._lock:
            for request_id, item in items:
                stream = self._streams.get(request_id)
                if stream is not None:
                    by_loop.setdefault(stream.loop, []).append((stream.queue, item))
        for loop, queued in by_loop.items():
            if not loop.is_closed():
                loop.call_soon_threadsafe(_put_all, queued)

    def _handle(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, request_id, prompt, params = command
            try:
                self.engine.add_request(prompt, params, request_id=request_id)
            except Exception as exc:  # refused: tell that caller only
                self._deliver(
                    request_id, exc if isinstance(exc, ValueError) else RuntimeError(str(exc))
                )
        elif kind == "abort":
            out = self.engine.abort(command[1])
            if out is not None:  # a caller still listening sees the request end
                self._deliver(command[1], out)
            if len(command) > 2:
                done = command[2]
                done.get_loop().call_soon_threadsafe(_resolve, done)

    def _loop(self) -> None:
        while not self._stopped.is_set():
            try:
                block = not self.engine.has_unfinished()
                command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
            except queue.Empty:
                command = None
            while command is not None:
                if command[0] == "stop":
                    self._fail_all("engine shut down")
                    return
                self._handle(command)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if not self.engine.has_unfinished():
                self._stats = self.engine.stats()
                continue
            try:
                outputs = self.engine.step()
            except Exception:
                logger.exception("engine step failed outside the model; failing running requests")
                self._fail_all("internal engine error")
                continue
            self._deliver_all((out.request_id, out) for out in outputs)
            self._stats = self.engine.stats()

    def _fail_all(self, why: str) -> None:
        failed = [self.engine.fail(request_id, why) for request_id in list(self.engine.requests)]
        self._deliver_all((out.request_id, out) for out in failed if out is not None)


def _put_all(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for stream_queue, item in items:
        stream_queue.put_nowait(item)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


_: type[EngineClient] = AsyncLLM  # mypy checks that AsyncLLM implements the app's engine seam
