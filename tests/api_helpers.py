"""Helpers for the API tests: a uvicorn server on a free loopback port, and a fake upstream.

The fake upstream speaks OpenAI's streaming protocol with chunks built from the official
`openai` package's own types, so RemoteEngine is tested against the shapes clients expect.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from openai.types import Completion, CompletionChoice, CompletionUsage
from openai.types.chat import ChatCompletionChunk

UPSTREAM_MODEL = "upstream/qwen3"
UPSTREAM_CACHED_TOKENS = 7


class LiveServer:
    """Runs an ASGI app with uvicorn on 127.0.0.1 in a thread (lifespan off)."""

    def __init__(self, app) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2
        )
        self.server = uvicorn.Server(config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.serve(sockets=[self.sock]))

    def call(self, coro, timeout: float = 30.0):
        """Run a coroutine on the server's event loop (objects used by the app live there)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@dataclass
class UpstreamLog:
    """What the fake upstream saw: request bodies, and streams whose client went away."""

    bodies: list[dict] = field(default_factory=list)
    disconnected: list[str] = field(default_factory=list)
    healthy: bool = True


def reply_words(prompt_text: str) -> list[str]:
    """The fake model's answer: the prompt's words, echoed back one per chunk."""
    return [f"{w} " for w in prompt_text.split()] or ["(empty) "]


def fake_upstream(log: UpstreamLog) -> FastAPI:
    """An OpenAI-compatible server: echoes the last message word by word.

    Special prompts: "bad" -> 400; "busy" -> 503; "slow ..." -> 200 words, 20 ms apart;
    "explode" -> two words, then an error event.
    """
    app = FastAPI()

    @app.get("/health")
    async def health():
        return JSONResponse({}, status_code=200 if log.healthy else 503)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": UPSTREAM_MODEL, "object": "model", "max_model_len": 4096}],
        }

    async def stream(request: Request, body: dict, prompt_text: str, chat: bool):
        log.bodies.append(body)
        if prompt_text == "bad":
            return JSONResponse(
                {"error": {"message": "prompt is bad", "type": "BadRequestError", "code": 400}},
                status_code=400,
            )
        if prompt_text == "busy":
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=503)
        words = reply_words(prompt_text)
        delay = 0.0
        if prompt_text == "explode":
            words = ["a ", "b ", "c "]
        if prompt_text.startswith("slow"):
            words, delay = [f"w{i} " for i in range(200)], 0.02
        usage = CompletionUsage(
            prompt_tokens=len(prompt_text.split()) + 10,
            completion_tokens=len(words),
            total_tokens=len(prompt_text.split()) + 10 + len(words),
            prompt_tokens_details={"cached_tokens": UPSTREAM_CACHED_TOKENS},
        )

        def chunk(text: str | None, finish: str | None, with_usage: bool = False) -> str:
            if chat:
                obj = ChatCompletionChunk(
                    id="chatcmpl-up",
                    object="chat.completion.chunk",
                    created=0,
                    model=body["model"],
                    choices=[]
                    if with_usage
                    else [{"index": 0, "delta": {"content": text}, "finish_reason": finish}],
                    usage=usage if with_usage else None,
                )
            else:
                # Streamed text chunks carry finish_reason null, which the (non-streaming) type forbids.
                choice = CompletionChoice.model_construct(
                    index=0, text=text or "", finish_reason=finish or None, logprobs=None
                )
                obj = Completion.model_construct(
                    id="cmpl-up",
                    object="text_completion",
                    created=0,
                    model=body["model"],
                    choices=[] if with_usage else [choice],
                    usage=usage if with_usage else None,
                )
            return f"data: {obj.model_dump_json()}\n\n"

        async def events():
            try:
                for i, word in enumerate(words):
                    if prompt_text == "explode" and i == 2:
                        yield 'data: {"error": {"message": "upstream blew up", "code": 500}}\n\n'
                        return
                    yield chunk(word, None)
                    if delay:
                        await asyncio.sleep(delay)
                yield chunk("", "length" if body.get("max_tokens") == len(words) else "stop")
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield chunk(None, None, with_usage=True)
                yield "data: [DONE]\n\n"
            except (asyncio.CancelledError, GeneratorExit):
                log.disconnected.append(prompt_text)
                raise

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        return await stream(request, body, body["messages"][-1]["content"], chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        return await stream(request, body, body["prompt"], chat=False)

    return app


@contextmanager
def api_server(checkpoint, **engine_overrides):
    """The API router and /health, /metrics on their own FastAPI app with a real AsyncLLM.

    One sequence at a time (max_num_seqs=1) so tests can make a request wait behind another;
    a small KV pool. Chainlit is not mounted: its lifespan would end the test process.
    """
    from app.api.routes import router
    from app.serving.runtime import Runtime
    from app.serving.startup_heap import freeze_startup_heap
    from app.settings import AppSettings
    from engine import AsyncLLM, EngineConfig

    config = dict(
        model=str(checkpoint), device="cpu", max_num_seqs=1, num_kv_blocks=512, max_model_len=4096
    )
    engine = AsyncLLM(EngineConfig(**{**config, **engine_overrides}))
    app = FastAPI()
    app.include_router(router)
    app.state.runtime = Runtime(settings=AppSettings(), engine=engine)
    freeze_startup_heap()  # as the app does once its model is loaded (no 0.2 s full collections)
    try:
        with LiveServer(app) as live:
            live.app, live.engine = app, engine
            yield live
    finally:
        engine.shutdown()
        gc.unfreeze()
