"""The server's life on its data directory, against the real server (`python -m app`, tiny
checkpoint) in a subprocess: graceful shutdown on SIGTERM (answers in flight finish or end with
an error event and `[DONE]`, new requests get 503, chats are saved, exit 0, no traceback), one
server per data directory (a lock file), each process's own upload scratch folder (recreated
when it vanishes), and clients that leave early without tracebacks in the log.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.app_client import ROOT, ChatClient, Server

LONG = 1900  # tokens: far more than a 2 s grace period lets the tiny model write
SHORT = 4


async def _chat(server: Server, max_tokens: int) -> ChatClient:
    client = ChatClient(server.url)
    await client.login()
    await client.connect()
    await client.wait_event("chat_settings")
    await client.settings({"max_tokens": max_tokens, "temperature": 1.0})
    return client


async def _stream(http: httpx.AsyncClient, model: str, max_tokens: int, started: asyncio.Event) -> list:
    """One streamed completion: its events (JSON objects, then the string "[DONE]")."""
    events: list = []
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "temperature": 1.0}
    async with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
                started.set()
    return events


def _ending(events: list) -> str:
    """"finished" (the whole answer), "cut" (the shutdown's error event), else what came."""
    assert events and events[-1] == "[DONE]", events[-3:]
    last = events[-2]
    if "error" in last:
        assert last["error"]["code"] == "server_shutting_down", last
        return "cut"
    assert last["choices"][0]["finish_reason"] == "length", last
    return "finished"


def _wait_exit(server: Server, timeout: float) -> int:
    try:
        return server.proc.wait(timeout)
    finally:
        server.log.close()


async def test_sigterm_drains_the_answers_saves_the_chats_and_exits_0(tiny_checkpoint, tmp_path):
    data_dir = tmp_path / "data"
    server = Server(tiny_checkpoint, data_dir, log_level="info", PAGECHAT_SHUTDOWN_GRACE_S="2")
    try:
        server.wait_ready()
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            model = (await http.get("/v1/models")).json()["data"][0]["id"]
            chat = await _chat(server, LONG)
            idle = await _chat(server, SHORT)
            start = await chat.send("Tell me a very long story.", wait=False)
            started = [asyncio.Event() for _ in range(8)]
            streams = [
                asyncio.create_task(_stream(http, model, SHORT if i % 2 else LONG, started[i]))
                for i in range(8)
            ]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
            deadline = time.monotonic() + 30
            while not chat.tokens(start) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert chat.tokens(start), "the chat's answer did not start"
            thread_id = chat.thread_id()

            server.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            refused = await http.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 2})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
            assert refused.json()["error"]["code"] == "server_shutting_down"
            assert (await http.get("/health")).status_code == 503
            late = await idle.send("Are you there?")  # an open chat, a new message: told why not
            assert any("shutting down" in m["output"] for m in idle.assistant_messages(late))

            endings = [_ending(events) for events in await asyncio.gather(*streams)]
            await chat.wait_task_end(30)
            assert endings.count("cut") >= 3, endings  # the long ones at least
            answer = chat.assistant_messages(start)[-1]["output"]
            assert "this answer was cut off" in answer and "prompt tokens" in answer
            await chat.close()
            await idle.close()
        code = _wait_exit(server, 30)
        log = server.output()
        assert code == 0, log[-3000:]
        assert "Traceback" not in log and "CancelledError" not in log, log[-5000:]
        assert "aborting" in log and "Finished server process" in log

        db = sqlite3.connect(data_dir / "pagechat.db")
        steps = db.execute('SELECT type, output FROM steps WHERE "threadId" = ?', (thread_id,)).fetchall()
        saved = db.execute('SELECT data FROM pagechat_histories WHERE "threadId" = ?', (thread_id,)).fetchone()
        db.close()
        assert ("user_message", "Tell me a very long story.") in steps
        assert any(kind == "assistant_message" and "cut off" in (text or "") for kind, text in steps)
        [turn] = json.loads(saved[0])["conversation"]["turns"]  # the partial answer is kept
        assert turn["finish_reason"] == "abort" and turn["answer_ids"]

        server = Server(tiny_checkpoint, data_dir)  # restarts on the same data directory
        server.wait_ready()
        client = ChatClient(server.url)
        try:
            await client.login()
            threads = (await client.http.post("/project/threads", json={
                "pagination": {"first": 20, "cursor": None}, "filter": {}})).json()["data"]
            assert thread_id in {t["id"] for t in threads}
        finally:
            await client.http.aclose()
    finally:
        server.stop()


async def test_sigterm_lets_short_answers_finish(tiny_checkpoint, tmp_path):
    """Within the grace period nothing is cut, and the server does not wait out the rest of it."""
    server = Server(tiny_checkpoint, tmp_path / "data", log_level="info", PAGECHAT_SHUTDOWN_GRACE_S="60")
    try:
        server.wait_ready()
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            model = (await http.get("/v1/models")).json()["data"][0]["id"]
            started = [asyncio.Event() for _ in range(4)]
            streams = [asyncio.create_task(_stream(http, model, 24, e)) for e in started]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
            server.proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            endings = [_ending(events) for events in await asyncio.gather(*streams)]
        assert endings == ["finished"] * 4
        code = _wait_exit(server, 50)
        assert time.monotonic() - sent < 40  # did not sit out the 60 s
        log = server.output()
        assert code == 0 and "Traceback" not in log and "aborting" not in log, log[-3000:]
    finally:
        server.stop()


def test_a_second_server_on_the_same_data_dir_is_refused(tiny_checkpoint, tmp_path):
    data_dir = tmp_path / "data"
    first = Server(tiny_checkpoint, data_dir)
    second: Server | None = None
    try:
        first.wait_ready()
        scratch = list((data_dir / "sessions").iterdir())
        assert [p.name.split("-")[0] for p in scratch] == [str(first.proc.pid)]

        second = Server(tiny_checkpoint, data_dir)
        code = _wait_exit(second, 60)
        said = second.output()
        assert code == 1, said
        assert f"another pagechat server (pid {first.proc.pid}) is already using the data directory" in said
        assert "PAGECHAT_DATA_DIR" in said and "Traceback" not in said
        assert list((data_dir / "sessions").iterdir()) == scratch  # the first one's, untouched
        assert httpx.get(first.url + "/pagechat/status").json()["engine"] == "ready"

        first.proc.kill()  # a crash: the kernel drops the lock with the process
        first.proc.wait(10)
        second = Server(tiny_checkpoint, data_dir)
        assert second.wait_ready()["engine"] == "ready"
        mine = list((data_dir / "sessions").iterdir())
        assert [p.name.split("-")[0] for p in mine] == [str(second.proc.pid)]  # leftovers gone
    finally:
        first.stop()
        if second is not None:
            second.stop()


def test_the_lock_is_refused_in_process_with_the_holders_pid(tmp_path):
    """The lock itself, without a server: a holder in another process blocks it, until it exits."""
    from app.serving.datadir import DataDirBusy, DataDirLock

    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, time; from pathlib import Path; "
            "from app.serving.datadir import claim_data_dir; "
            f"claim_data_dir(Path({str(tmp_path)!r})); print('held', flush=True); time.sleep(60)")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(DataDirBusy, match=f"pid {holder.pid}"):
            DataDirLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = DataDirLock(tmp_path)
    lock.acquire()
    lock.release()


@pytest.fixture(scope="module")
def live(tiny_checkpoint, tmp_path_factory):
    server = Server(tiny_checkpoint, tmp_path_factory.mktemp("lifecycle") / "data")
    server.wait_ready()
    try:
        yield server
    finally:
        server.stop()


async def test_an_upload_works_after_the_scratch_folder_vanished(live):
    client = await _chat(live, 8)
    try:
        first = await client.upload("a.txt", b"The first file.")
        sessions = Path(live.log_path).parent / "data" / "sessions"
        shutil.rmtree(sessions)  # whatever deleted it: a cleanup job, an older server
        second = await client.upload("b.txt", b"The lighthouse keeper is called Morwenna.")
        assert first != second
        start = await client.send("Who keeps the lighthouse?", (second,))
        said = " ".join(m["output"] for m in client.messages(start).values())
        assert "b.txt" in said and "prompt tokens" in said
    finally:
        await client.close()
    assert "Traceback" not in live.output() and "FileNotFoundError" not in live.output()


def _leave_early(port: int, request: bytes, wait: float) -> None:
    """Send `request`, then drop the connection (RST) before reading any answer."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(request)
    if wait:
        time.sleep(wait)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_clients_that_leave_early_leave_no_traceback(live):
    page = httpx.get(live.url + "/").text
    assets = [part.split('"')[1] for part in page.split("src=")[1:] if part.startswith('"/assets/')]
    assert assets
    cookie = httpx.post(live.url + "/auth/header").cookies["access_token"]
    gets = [*assets, "/", "/favicon", "/auth/config", "/project/translations?language=en-US"]
    for _ in range(3):
        for path in gets:
            for wait in (0.0, 0.002):
                _leave_early(live.port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode(), wait)
    # Bodies cut off midway: an upload, an API request, a streamed answer.
    _leave_early(live.port, (
        "POST /project/file?session_id=none HTTP/1.1\r\nHost: x\r\n"
        f"Cookie: access_token={cookie}\r\n"
        "Content-Type: multipart/form-data; boundary=XX\r\nContent-Length: 100000\r\n\r\n"
        '--XX\r\nContent-Disposition: form-data; name="file"; filename="a.txt"\r\n\r\n').encode()
        + b"a" * 5000, 0.3)
    _leave_early(live.port, (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 500\r\n\r\n{\"model\":"), 0.3)
    model = httpx.get(live.url + "/v1/models").json()["data"][0]["id"]
    body = json.dumps({"model": model, "prompt": "Hi", "max_tokens": 400, "stream": True}).encode()
    _leave_early(live.port, (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode() + body), 0.5)
    time.sleep(1.5)
    assert httpx.get(live.url + "/pagechat/status").json()["engine"] == "ready"
    log = live.output()
    assert "Traceback" not in log and "No response returned" not in log, log[-4000:]


# ---- the pieces, in process ---------------------------------------------------------------


async def test_drain_waits_for_answers_and_aborts_only_the_slow_ones():
    from app.serving.shutdown import Drain

    drain = Drain()
    aborted: list[str] = []

    async def abort(request_id: str) -> None:
        aborted.append(request_id)
        drain.end([request_id])  # the engine ends the stream; its answer unregisters

    drain.begin(["quick"], abort)
    drain.begin(["slow-0", "slow-1"], abort)
    asyncio.get_running_loop().call_later(0.1, drain.end, ["quick"])
    started = time.monotonic()
    await drain.run(grace_s=0.5)
    assert drain.draining and 0.45 < time.monotonic() - started < 3
    assert sorted(aborted) == ["slow-0", "slow-1"] and drain.active == 0
    assert drain.cut("slow-0") and not drain.cut("quick") and not drain.cut(None)

    idle = Drain()
    started = time.monotonic()
    await idle.run(grace_s=30)  # nothing in flight: no wait at all
    assert time.monotonic() - started < 0.5


async def test_drain_hurry_ends_the_grace_period_and_aborts_are_resent():
    from app.serving.shutdown import Drain

    drain = Drain()
    calls: list[str] = []

    async def late_abort(request_id: str) -> None:  # the first abort beats the request
        calls.append(request_id)
        if len(calls) == 2:
            drain.end([request_id])

    drain.begin(["r"], late_abort)
    asyncio.get_running_loop().call_later(0.1, drain.hurry)
    started = time.monotonic()
    await drain.run(grace_s=30)
    assert time.monotonic() - started < 3 and calls == ["r", "r"]


async def _asgi(app, path: str, query: bytes = b"", kind: str = "http") -> list[dict]:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await app({"type": kind, "path": path, "method": "GET", "query_string": query, "headers": []},
              receive, send)
    return sent


async def test_drain_gate_refuses_new_work_with_503_and_retry_after():
    from app.serving.shutdown import Drain, DrainGate

    async def ok(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    drain = Drain()
    gate = DrainGate(ok, drain)
    assert (await _asgi(gate, "/v1/models"))[0]["status"] == 200
    drain.draining = True
    start, body = await _asgi(gate, "/v1/chat/completions")
    headers = dict(start["headers"])
    assert start["status"] == 503 and headers[b"retry-after"] == b"5"
    assert json.loads(body["body"])["error"]["code"] == "server_shutting_down"
    start, body = await _asgi(gate, "/")
    assert start["status"] == 503 and "shutting down" in json.loads(body["body"])["detail"]
    assert (await _asgi(gate, "/metrics"))[0]["status"] == 200
    assert (await _asgi(gate, "/ws/socket.io/", b"EIO=4&transport=polling&sid=abc"))[0]["status"] == 200
    assert (await _asgi(gate, "/ws/socket.io/", b"EIO=4&transport=polling"))[0]["status"] == 503
    assert (await _asgi(gate, "/ws/socket.io/", b"EIO=4", "websocket")) == [
        {"type": "websocket.close", "code": 1012}]


async def test_quiet_disconnects_drops_only_a_departed_clients_errors():
    from starlette.requests import ClientDisconnect

    from app.serving.disconnects import QuietDisconnects

    def app_raising(exc: Exception, read_disconnect: bool):
        async def app(scope, receive, send):
            if read_disconnect:
                await receive()
            raise exc

        return app

    async def run(app) -> None:
        async def receive():
            return {"type": "http.disconnect"}

        async def send(message):
            pass

        await QuietDisconnects(app)({"type": "http", "path": "/x", "method": "GET"}, receive, send)

    await run(app_raising(RuntimeError("No response returned."), read_disconnect=True))
    await run(app_raising(ClientDisconnect(), read_disconnect=False))
    with pytest.raises(RuntimeError):  # the client was still there: a real error
        await run(app_raising(RuntimeError("No response returned."), read_disconnect=False))
    with pytest.raises(ValueError):
        await run(app_raising(ValueError("a bug"), read_disconnect=True))


async def test_pending_writes_are_waited_for():
    from app.serving.shutdown import PendingWrites

    class Layer:
        def __init__(self) -> None:
            self.stored: list[str] = []

        async def create_step(self, name: str) -> None:
            await asyncio.sleep(0.3)
            self.stored.append(name)

        async def get_thread(self, name: str) -> str:  # a read: not counted
            return name

    layer, writes = Layer(), PendingWrites()
    writes.wrap(layer)
    asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(layer.create_step("last")))
    await writes.settle(timeout=5)
    assert layer.stored == ["last"] and writes.count == 0
    assert await layer.get_thread("t") == "t"
