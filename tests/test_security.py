"""Security and hostile input against the real server (`python -m app`, tiny checkpoint) on
127.0.0.1, configured as on a shared network: password users, an API key, a 1 MB upload limit,
one allowed CORS origin, default (info) logging, and its own temporary directory.

Covered here: login enforced everywhere (HTTP, websocket, uploads, files, API); the generated
JWT secret (mode 0600, the one in use); CORS and the websocket's origin check; the upload limit
enforced by the server before it reads the body; hostile uploads (zip-bomb DOCX, empty, path
traversal, HTML in names) answered with a clear message and nothing written outside the data
directory; HTML in messages kept as text; no key, password, secret or document text in the log.
The last test kills the server mid-answer (SIGKILL) and restarts it on the same data directory:
no finished chat is lost, and the database is intact.
"""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
import stat
import time
import zipfile
from pathlib import Path

import httpx
import jwt
import psutil
import pytest
import socketio

from tests.app_client import ChatClient, Server

USERS = {"alice": "correct horse battery", "bob": "hunter2-but-longer"}
API_KEY = "sk-pagechat-test-7f3a9c1e5b"
ALLOWED_ORIGIN = "http://allowed.example:3000"
FOREIGN_ORIGIN = "http://evil.example"
MARKER = "The vault combination is 31-41-59 and the courier is named Quillfeather."
HOSTILE = "<script>window.__pwned = 1</script><img src=x onerror=\"alert(1)\"> **bold**"


class Guarded:
    """The module's server, its directories, and a way to crash and restart it."""

    def __init__(self, checkpoint: Path, root: Path) -> None:
        self.checkpoint, self.root = checkpoint, root
        self.data_dir = root / "data"
        self.tmp_dir = root / "tmp"  # the server's TMPDIR: spooled uploads would land here
        self.tmp_dir.mkdir(parents=True)
        self.server = self._start(cors=True)

    def _start(self, cors: bool) -> Server:
        env = {
            "PAGECHAT_AUTH_USERS": ",".join(f"{u}:{p}" for u, p in USERS.items()),
            "PAGECHAT_API_KEYS": API_KEY,
            "PAGECHAT_MAX_UPLOAD_MB": "1",
            "PAGECHAT_MAX_REQUEST_MB": "1",
            "TMPDIR": str(self.tmp_dir),
        }
        if cors:
            env["PAGECHAT_CORS_ALLOW_ORIGINS"] = ALLOWED_ORIGIN
        server = Server(self.checkpoint, self.data_dir, log_level="info", **env)
        server.wait_ready()
        return server

    def crash_and_restart(self) -> Server:
        """SIGKILL (no shutdown code runs), then a fresh server, without the CORS setting."""
        self.server.proc.kill()
        self.server.proc.wait(10)
        self.server.log.close()
        self.server = self._start(cors=False)
        return self.server


@pytest.fixture(scope="module")
def guarded(tiny_checkpoint, tmp_path_factory):
    holder = Guarded(tiny_checkpoint, tmp_path_factory.mktemp("guarded"))
    try:
        yield holder
    finally:
        holder.server.stop()


def files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*") if p.is_file()}


async def alice(server: Server, max_tokens: int = 8) -> ChatClient:
    client = ChatClient(server.url)
    await client.login("alice", USERS["alice"])
    await client.connect()
    await client.wait_event("chat_settings")
    await client.settings({"max_tokens": max_tokens, "temperature": 0.0})
    return client


async def threads_of(client: ChatClient) -> list[dict]:
    response = await client.http.post(
        "/project/threads", json={"pagination": {"first": 50, "cursor": None}, "filter": {}})
    response.raise_for_status()
    return response.json()["data"]


def outputs(client: ChatClient, start: int) -> list[str]:
    return [m.get("output") or "" for m in client.messages(start).values()]


def prompt_tokens(said: list[str]) -> int:
    """The prompt size from an answer's stats line ("*N prompt tokens · ...*")."""
    stats = next(o for o in said if " prompt tokens · " in o)
    return int(stats.rsplit("*", 2)[-2].split(" prompt tokens")[0].replace(",", ""))


# ---- constant-time checks (no server) ---------------------------------------------------------


class NoEquality(str):
    """A string that fails the test if anything compares it with == (a short-circuiting check)."""

    def __eq__(self, other):
        raise AssertionError("a secret was compared with ==")

    __hash__ = str.__hash__


@pytest.fixture
def compare_digest_calls(monkeypatch):
    import hmac

    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    return calls


def test_api_key_check_is_constant_time(compare_digest_calls):
    """Every configured key is compared with hmac.compare_digest, never ==, also after a match:
    the time taken tells neither how much of a guess was right nor which key it was near."""
    from app.api.keys import key_is_valid

    keys = [NoEquality(k) for k in ("sk-first-aaaaaaaa", "sk-second-bbbbbbb", "sk-third-cccccccc")]
    for token, valid in [("sk-first-aaaaaaaa", True), ("sk-third-cccccccc", True),
                         ("sk-first-aaaaaaab", False), ("s", False), ("", False)]:
        compare_digest_calls.clear()
        assert key_is_valid(NoEquality(token), keys) is valid
        assert len(compare_digest_calls) == len(keys)
    assert key_is_valid(None, keys) is False


async def test_the_api_checks_keys_through_the_constant_time_check(monkeypatch):
    from unittest.mock import Mock

    from fastapi.security import HTTPAuthorizationCredentials

    from app.api import routes as openai_api
    from app.settings import AppSettings

    seen = []
    monkeypatch.setattr(openai_api, "key_is_valid", lambda token, keys: seen.append((token, keys)))
    request = Mock()
    request.app.state.runtime.settings = AppSettings(api_keys="k1, k2")
    with pytest.raises(openai_api.APIError) as err:
        await openai_api.require_api_key(
            request, HTTPAuthorizationCredentials(scheme="Bearer", credentials="k2"))
    assert err.value.status == 401 and seen == [("k2", ["k1", "k2"])]


def test_password_check_is_constant_time(compare_digest_calls):
    from app.serving.auth import PasswordUsers

    users = PasswordUsers({"alice": "correct horse"})
    for name, password, ok in [("alice", "correct horse", True), ("alice", "wrong", False),
                               ("nobody", "correct horse", False)]:
        compare_digest_calls.clear()
        assert users.check(name, NoEquality(password)) is ok
        assert len(compare_digest_calls) == 1  # unknown users are compared with a dummy too


# ---- login ---------------------------------------------------------------------------------


async def test_login_is_enforced_everywhere(guarded):
    url = guarded.server.url
    secret = (guarded.data_dir / "chainlit_auth_secret").read_text().strip()
    forged = {
        "wrong secret": jwt.encode({"identifier": "alice", "metadata": {}}, "not-the-secret" * 4,
                                   algorithm="HS256"),
        "unsigned": jwt.encode({"identifier": "alice", "metadata": {}}, None, algorithm="none"),
        "expired": jwt.encode({"identifier": "alice", "metadata": {}, "exp": int(time.time()) - 60},
                              secret, algorithm="HS256"),
    }
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        config = (await http.get("/auth/config")).json()
        assert config["requireLogin"] and config["passwordAuth"] and not config["headerAuth"]
        assert (await http.post("/auth/header")).status_code in (400, 401, 404)
        bad = await http.post("/login", data={"username": "alice", "password": "correct horse"})
        assert bad.status_code == 401 and "access_token" not in bad.cookies
        unknown = await http.post("/login", data={"username": "mallory", "password": "x"})
        assert unknown.status_code == 401
        page = {"pagination": {"first": 5, "cursor": None}, "filter": {}}
        assert (await http.post("/project/threads", json=page)).status_code == 401
        for why, token in forged.items():
            response = await http.post("/project/threads", json=page,
                                       headers={"Cookie": f"access_token={token}"})
            assert response.status_code == 401, why
        upload = await http.post("/project/file", params={"session_id": "x"},
                                 files={"file": ("a.txt", b"hello", "text/plain")})
        assert upload.status_code == 401
        assert (await http.get("/pagechat/files/anything/at/all.txt")).status_code == 401
        assert (await http.get("/v1/models")).status_code == 401
        assert (await http.get("/v1/models", headers={"Authorization": "Bearer sk-wrong"})).status_code == 401
        ok = await http.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
        assert ok.status_code == 200

    for why, cookie in [("no cookie", ""), *((w, f"access_token={t}") for w, t in forged.items())]:
        sio = socketio.AsyncClient(reconnection=False)
        with pytest.raises(socketio.exceptions.ConnectionError):
            await sio.connect(url, socketio_path="/ws/socket.io", transports=["websocket"],
                              headers={"Cookie": cookie} if cookie else {}, wait_timeout=10,
                              auth={"clientType": "webapp", "sessionId": "s-" + why, "threadId": "",
                                    "userEnv": "{}", "chatProfile": ""})
        await sio.disconnect()

    client = await alice(guarded.server)  # the right password works, socket included
    await client.close()


def test_jwt_secret_is_generated_private_and_in_use(guarded):
    path = guarded.data_dir / "chainlit_auth_secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secret = path.read_text().strip()
    assert len(secret) >= 32
    response = httpx.post(guarded.server.url + "/login",
                          data={"username": "bob", "password": USERS["bob"]})
    token = response.cookies["access_token"]
    claims = jwt.decode(token, secret, algorithms=["HS256"])  # signed with the file's secret
    assert claims["identifier"] == "bob"


# ---- CORS and the websocket's origin ---------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/auth/config", "/project/settings", "/user", "/v1/models",
                                  "/pagechat/status", "/health", "/metrics"])
def test_cors_answers_only_the_configured_origin(guarded, path):
    url = guarded.server.url + path
    foreign = httpx.get(url, headers={"Origin": FOREIGN_ORIGIN, "Cookie": "access_token=x"})
    assert "access-control-allow-origin" not in foreign.headers
    preflight = httpx.options(url, headers={
        "Origin": FOREIGN_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert "access-control-allow-origin" not in preflight.headers
    allowed = httpx.get(url, headers={"Origin": ALLOWED_ORIGIN})
    assert allowed.headers.get("access-control-allow-origin") == ALLOWED_ORIGIN
    assert allowed.headers.get_list("access-control-allow-origin") == [ALLOWED_ORIGIN]  # once
    preflight = httpx.options(url, headers={
        "Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST"})
    assert preflight.headers.get("access-control-allow-origin") == ALLOWED_ORIGIN


async def test_websocket_refuses_pages_of_other_origins(guarded):
    server = guarded.server
    handshake = server.url + "/ws/socket.io/?EIO=4&transport=polling"
    assert httpx.get(handshake, headers={"Origin": FOREIGN_ORIGIN}).status_code == 400
    for origin in (server.url, ALLOWED_ORIGIN):
        response = httpx.get(handshake, headers={"Origin": origin})
        assert response.status_code == 200 and response.headers["access-control-allow-origin"] == origin

    # A logged-in user's cookie, sent by a page of another site (cross-site websocket hijacking).
    login = httpx.post(server.url + "/login", data={"username": "alice", "password": USERS["alice"]})
    cookie = f"access_token={login.cookies['access_token']}"
    auth = {"clientType": "webapp", "sessionId": "hijack", "threadId": "", "userEnv": "{}",
            "chatProfile": ""}
    sio = socketio.AsyncClient(reconnection=False)
    with pytest.raises(socketio.exceptions.ConnectionError):
        await sio.connect(server.url, socketio_path="/ws/socket.io", transports=["websocket"],
                          headers={"Cookie": cookie, "Origin": FOREIGN_ORIGIN}, auth=auth,
                          wait_timeout=10)
    await sio.disconnect()
    sio = socketio.AsyncClient(reconnection=False)
    await sio.connect(server.url, socketio_path="/ws/socket.io", transports=["websocket"],
                      headers={"Cookie": cookie, "Origin": server.url},
                      auth={**auth, "sessionId": "same-origin"}, wait_timeout=10)
    await sio.disconnect()


# ---- uploads ----------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def declare_huge_upload(server: Server, client: ChatClient) -> tuple[int, str]:
    """Send only the headers of a 64 MB upload and read what the server answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        f"POST /project/file?session_id={client.session_id} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{server.port}\r\nCookie: {client.cookie}\r\n"
        "Content-Type: multipart/form-data; boundary=x\r\n"
        f"Content-Length: {64 * 1024 * 1024}\r\n\r\n".encode())
    await writer.drain()
    answer = (await asyncio.wait_for(reader.read(), 10)).decode()  # it closes the connection
    writer.close()
    return int(answer.split(" ", 2)[1]), answer


async def test_upload_limit_is_enforced_by_the_server(guarded):
    client = await alice(guarded.server)
    before = files_under(guarded.root)
    try:
        limit = 1024 * 1024
        just_over = b"a" * (limit + 1)  # the file alone is over: Chainlit's own check answers
        with pytest.raises(httpx.HTTPStatusError) as err:
            await client.upload("over.txt", just_over)
        assert err.value.response.status_code == 400
        assert "too large" in err.value.response.text

        # Over the limit by its length: answered 413 before the body is read. A client still
        # sending may see the connection closed before it reads that answer.
        status, answer = await declare_huge_upload(guarded.server, client)
        assert status == 413 and "the upload limit is 1 MB" in answer
        rss = rss_mb(guarded.server.proc.pid)
        huge = b"\0" * (64 * 1024 * 1024)
        try:
            response = await client.http.post(
                "/project/file", params={"session_id": client.session_id},
                files={"file": ("huge.txt", huge, "text/plain")})
            assert response.status_code == 413
        except httpx.TransportError:
            pass  # closed while sending: the server did not read the rest
        assert rss_mb(guarded.server.proc.pid) - rss < 32  # never held in memory

        assert files_under(guarded.root) == before  # nothing stored, not even in TMPDIR
        file_id = await client.upload("fine.txt", b"small and fine")
        start = await client.send("Read it", (file_id,))
        assert any("prompt tokens" in o for o in outputs(client, start))
    finally:
        await client.close()


class BodyReadingApp:
    """An ASGI app that reads the whole body (like a multipart or JSON parser), then answers 200;
    `read` records the chunk sizes it got."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.read: list[int] = []

    async def __call__(self, scope, receive, send):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RuntimeError("client went away")
            self.read.append(len(message.get("body", b"")))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": self.answer})


async def post_through(guard, total: int, path: str, declared: bool = False,
                       chunk: int = 64 * 1024) -> tuple[int, bytes]:
    """POST `total` bytes in chunks through an ASGI guard; (status, body) of its answer."""
    sizes = [chunk] * (total // chunk) + ([total % chunk] if total % chunk else [])
    messages = [{"type": "http.request", "body": b"x" * n, "more_body": i < len(sizes) - 1}
                for i, n in enumerate(sizes)]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    headers = [(b"content-length", str(total).encode())] if declared else []
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    await guard(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


async def test_upload_limit_counts_a_body_sent_without_its_length():
    """Chunked uploads carry no Content-Length: the body is cut off at the limit (413)."""
    from app.documents.uploads import MULTIPART_OVERHEAD_BYTES, UploadLimit

    app = BodyReadingApp(b"stored")
    guard = UploadLimit(app, max_bytes=1024 * 1024)
    limit = 1024 * 1024 + MULTIPART_OVERHEAD_BYTES
    assert await post_through(guard, limit, "/project/file") == (200, b"stored")
    app.read.clear()
    status, body = await post_through(guard, limit + 1, "/project/file")
    assert status == 413 and b"the upload limit is 1 MB" in body
    assert sum(app.read) <= limit + 64 * 1024  # stopped reading at the limit
    # other routes: untouched
    assert await post_through(guard, limit + 1, "/v1/completions") == (200, b"stored")


def zip_bomb_docx(unpacked_mb: int) -> bytes:
    """A DOCX whose document.xml inflates from ~0.1% of its size (zeros compress 1000:1)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        with archive.open("word/document.xml", "w") as member:
            chunk = b"\0" * (1024 * 1024)
            for _ in range(unpacked_mb):
                member.write(chunk)
    return buf.getvalue()


async def test_hostile_uploads_get_clear_messages_and_stay_in_the_data_dir(guarded):
    outside_before = files_under(guarded.root) - files_under(guarded.data_dir)
    client = await alice(guarded.server)
    try:
        bomb = zip_bomb_docx(245)  # the report's: 245 MiB of XML in a small DOCX
        assert len(bomb) < 1024 * 1024  # under the upload limit: the app must catch it
        uploads = [
            ("bomb.docx", bomb, "application/octet-stream"),
            ("empty.txt", b"", "text/plain"),
            ("../../../../escape.txt", b"traversal one", "text/plain"),
            ("..\\..\\escape2.md", b"traversal two", "text/markdown"),
            ("/etc/cron.d/escape3.txt", b"traversal three", "text/plain"),
            ("<img src=x onerror=alert(1)>.md", b"html name", "text/markdown"),
        ]
        ids = [await client.upload(name, data, mime) for name, data, mime in uploads]
        server = psutil.Process(guarded.server.proc.pid)
        rss_before = peak = server.memory_info().rss
        sending = asyncio.create_task(client.send("Read these", tuple(ids)))
        health = []  # another user's request while the bomb is read (in a worker process)
        while not sending.done():
            started = time.perf_counter()
            assert (await client.http.get("/health")).status_code == 200
            health.append(time.perf_counter() - started)
            peak = max(peak, server.memory_info().rss)
            await asyncio.sleep(0.05)
        start = await sending
        said = outputs(client, start)
        assert any("bomb.docx" in o and "more than the 100 MB limit" in o for o in said), said
        assert max(health) < 1.0, health
        assert peak - rss_before < 200 * 1024 * 1024  # nothing was inflated in the server
        assert any("empty.txt" in o and "is empty (0 bytes)" in o for o in said)
        assert any("prompt tokens" in o for o in said)  # the readable files were answered

        thread_id = client.thread_id()
        thread = next(t for t in await threads_of(client) if t["id"] == thread_id)
        stored = {e["name"]: e for e in thread["elements"]}
        for name, data, _ in uploads[2:]:
            element = stored[name]  # the name is kept as the user gave it, as text
            response = await client.http.get(element["url"])
            assert response.status_code == 200 and response.content == data
            key = element["objectKey"]
            assert ".." not in key.split("/") and not key.startswith("/") and "\\" not in key
            path = (guarded.data_dir / "files" / key).resolve()
            assert path.is_relative_to(guarded.data_dir.resolve()) and path.read_bytes() == data
        for sneaky in ("..%2F..%2Fchainlit_auth_secret", "%2e%2e/%2e%2e/pagechat.db",
                       "unknown/..%2F..%2F..%2Fchainlit_auth_secret"):
            response = await client.http.get("/pagechat/files/" + sneaky)
            assert response.status_code == 404, sneaky
    finally:
        await client.close()
    outside_after = files_under(guarded.root) - files_under(guarded.data_dir)
    assert {p for p in outside_after - outside_before if not p.name.startswith("server-")} == set()
    assert not any(p.name.startswith("escape") for p in Path("/etc/cron.d").glob("*"))


async def test_html_in_messages_is_kept_as_text(guarded):
    client = await alice(guarded.server)
    try:
        settings = (await client.http.get("/project/settings", params={"language": "en-US"})).json()
        assert settings["features"]["unsafe_allow_html"] is False  # the page renders no HTML
        start = await client.send(HOSTILE)
        assert any("prompt tokens" in o for o in outputs(client, start))
        thread = next(t for t in await threads_of(client) if t["id"] == client.thread_id())
        user = [s for s in thread["steps"] if s["type"] == "user_message"]
        assert user[-1]["output"] == HOSTILE  # stored verbatim: neither run nor stripped
    finally:
        await client.close()


# ---- logs ---------------------------------------------------------------------------------------


async def test_log_holds_no_key_password_secret_or_document_text(guarded):
    server = guarded.server
    response = httpx.post(
        server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": str(guarded.checkpoint), "max_tokens": 4,
              "messages": [{"role": "user", "content": MARKER}]}, timeout=60)
    assert response.status_code == 200
    client = await alice(server)
    try:
        good = await client.upload("memo.txt", MARKER.encode())
        broken = await client.upload("broken.pdf", b"%PDF-1.4 " + MARKER.encode(), "application/pdf")
        start = await client.send("What is the combination?", (good, broken))
        assert any("broken.pdf" in o for o in outputs(client, start))
        assert any("prompt tokens" in o for o in outputs(client, start))
    finally:
        await client.close()
    await asyncio.sleep(0.5)
    log = server.output()
    assert "INFO" in log and "POST /v1/chat/completions" in log  # info logging was on
    secret = (guarded.data_dir / "chainlit_auth_secret").read_text().strip()
    for needle in [API_KEY, *USERS.values(), secret, "Quillfeather", "31-41-59"]:
        assert needle not in log, f"{needle!r} found in the server log"


# ---- crash ----------------------------------------------------------------------------------------


async def test_crash_mid_answer_loses_no_finished_chat(guarded):
    """Kept last: it kills the module's server (SIGKILL, mid-stream) and starts another."""
    server = guarded.server
    first = await alice(server)
    memo = await first.upload("memo.txt", b"The meeting moved to Thursday.")
    await first.send("When is the meeting?", (memo,))
    start = await first.send("And where?")
    before = prompt_tokens(outputs(first, start))
    finished_thread = first.thread_id()
    await first.close()

    bob = ChatClient(server.url)
    await bob.login("bob", USERS["bob"])
    await bob.connect()
    await bob.wait_event("chat_settings")
    await bob.settings({"max_tokens": 6})
    await bob.send("Hello from bob")
    bob_thread = bob.thread_id()
    await bob.close()

    streaming = await alice(server, max_tokens=1500)
    await streaming.settings({"max_tokens": 1500, "temperature": 1.0})
    start = await streaming.send("Write a very long story.", wait=False)
    deadline = time.monotonic() + 30
    while len(streaming.tokens(start)) < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert streaming.tokens(start)
    crashed_thread = streaming.thread_id()
    server = guarded.crash_and_restart()  # mid-answer
    await streaming.http.aclose()

    db = sqlite3.connect(guarded.data_dir / "pagechat.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    status = httpx.get(server.url + "/pagechat/status", headers=server.ops_auth()).json()
    assert status["running"] == 0 and status["kv_blocks_used"] == 0

    client = await alice(server)
    try:
        threads = {t["id"]: t for t in await threads_of(client)}
        assert finished_thread in threads and crashed_thread in threads
        assert bob_thread not in threads  # bob's chat is his alone
        steps = threads[finished_thread]["steps"]
        assert [s["type"] for s in steps].count("user_message") == 2
        assert sum("prompt tokens" in (s.get("output") or "") for s in steps) == 2
        memo_element = next(e for e in threads[finished_thread]["elements"] if e["name"] == "memo.txt")
        assert (await client.http.get(memo_element["url"])).content == b"The meeting moved to Thursday."
        crashed = [s for s in threads[crashed_thread]["steps"] if s["type"] == "user_message"]
        assert [s["output"] for s in crashed] == ["Write a very long story."]  # the question stays
    finally:
        await client.close()

    resumed = ChatClient(server.url)
    await resumed.login("alice", USERS["alice"])
    await resumed.connect(thread_id=finished_thread)
    await resumed.wait_event("resume_thread")
    await resumed.wait_event("chat_settings")
    await resumed.settings({"max_tokens": 8, "temperature": 0.0})
    start = await resumed.send("Thanks!")
    said = outputs(resumed, start)
    await resumed.close()
    assert not any("could not be restored" in o for o in said)  # the token history came back
    assert prompt_tokens(said) > before + 8  # both turns, the memo and the answers are in it

    bob = ChatClient(server.url)
    await bob.login("bob", USERS["bob"])
    assert bob_thread in {t["id"] for t in await threads_of(bob)}
    await bob.http.aclose()

    # Started without PAGECHAT_CORS_ALLOW_ORIGINS: closed to every other origin.
    for origin in (ALLOWED_ORIGIN, FOREIGN_ORIGIN):
        response = httpx.get(server.url + "/auth/config", headers={"Origin": origin})
        assert "access-control-allow-origin" not in response.headers
    handshake = server.url + "/ws/socket.io/?EIO=4&transport=polling"
    assert httpx.get(handshake, headers={"Origin": ALLOWED_ORIGIN}).status_code == 400


async def test_api_bodies_over_the_request_limit_get_413_in_openai_shape():
    """/v1 JSON bodies are capped (PAGECHAT_MAX_REQUEST_MB): by Content-Length at once, and
    counted as they arrive when sent without one; other routes are not touched."""
    from app.api.body_limit import ApiBodyLimit

    app = BodyReadingApp(b"answered")
    guard = ApiBodyLimit(app, max_bytes=1024 * 1024)
    limit = 1024 * 1024
    path = "/v1/chat/completions"
    for declared in (True, False):
        app.read.clear()
        assert await post_through(guard, limit, path, declared, 256 * 1024) == (200, b"answered")
        app.read.clear()
        status, body = await post_through(guard, limit + 1, path, declared, 256 * 1024)
        assert status == 413
        error = json.loads(body)["error"]
        assert error["code"] == "request_too_large" and "1 MB" in error["message"]
        assert sum(app.read) <= limit  # never read past the limit
    assert await post_through(guard, 4 * limit, "/project/file", True) == (200, b"answered")


def test_live_server_refuses_an_oversized_api_body(guarded):
    url = f"{guarded.server.url}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    huge = {"model": "x", "messages": [{"role": "user", "content": "z" * (2 * 1024 * 1024)}]}
    response = httpx.post(url, json=huge, headers=headers, timeout=30)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    models = httpx.get(f"{guarded.server.url}/v1/models", headers=headers, timeout=30).json()
    fine = {"model": models["data"][0]["id"], "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2}
    answer = httpx.post(url, json=fine, headers=headers, timeout=60)
    assert answer.status_code == 200, answer.text
