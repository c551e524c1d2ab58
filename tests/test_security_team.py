"""A server shared by a team (issue 19), attacked the way the issue found it open: the real
server (`python -m app`, tiny checkpoint) on 127.0.0.1 with two password users, an API key, a
metrics token and small upload quotas.

Each test reproduces one hole and checks it is closed: password guessing (throttled per account
and per address, 429 + Retry-After, others unaffected), login from another site, tokens that
outlive logout, a password change or a removed user, Secure cookies behind a TLS proxy, the
page's CSP and framing headers, /metrics and /pagechat/status for key holders only, /docs off,
no server path in /v1/models, Chainlit's session files served as active HTML, feedback and
message-id upserts into another user's chat, thread sharing while it is off, upload quotas and
the 10-file limit on the server, file modes at rest, a 150-emoji file name and a right-to-left
override in a name.

The login tests send X-Forwarded-For (the server trusts 127.0.0.1 as its proxy, uvicorn's
default), so each one is its own client address and the throttle of one does not bleed into
the others.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sqlite3
import stat
import time
import uuid
from pathlib import Path

import httpx
import jwt
import pytest
import socketio

from tests.app_client import ChatClient, Server

USERS = {"alice": "correct horse battery", "bob": "hunter2-but-longer"}
API_KEY = "sk-team-3b8e51"
METRICS_TOKEN = "metrics-9c2f0a"
_addresses = itertools.count(1)


def new_address() -> str:
    """A client address of its own (sent as X-Forwarded-For through the trusted loopback proxy)."""
    return f"203.0.113.{next(_addresses)}"


def users_env(users: dict[str, str]) -> str:
    return ",".join(f"{u}:{p}" for u, p in users.items())


@pytest.fixture(scope="module")
def team(tiny_checkpoint, tmp_path_factory):
    srv = Server(
        tiny_checkpoint,
        tmp_path_factory.mktemp("team") / "data",
        PAGECHAT_AUTH_USERS=users_env(USERS),
        PAGECHAT_API_KEYS=API_KEY,
        PAGECHAT_METRICS_TOKEN=METRICS_TOKEN,
        PAGECHAT_UPLOAD_FILES_PER_CHAT="12",
        PAGECHAT_UPLOAD_MB_PER_CHAT="1",
        PAGECHAT_UPLOAD_FILES_PER_DAY="16",
    )
    try:
        srv.wait_ready(timeout=180)  # one start took over 60 s on a loaded 2-core machine
        yield srv
    finally:
        srv.stop()


def login(
    server: Server, user: str, password: str, address: str | None = None, **headers: str
) -> httpx.Response:
    return httpx.post(
        server.url + "/login",
        data={"username": user, "password": password},
        headers={"X-Forwarded-For": address or new_address(), **headers},
    )


def token_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.cookies["access_token"]


def me(server: Server, token: str) -> int:
    return httpx.get(server.url + "/user", cookies={"access_token": token}).status_code


async def chat_as(server: Server, user: str) -> ChatClient:
    client = ChatClient(server.url)
    await client.login(user, USERS[user])
    await client.connect()
    await client.wait_event("chat_settings")
    await client.settings({"max_tokens": 4, "temperature": 0.0})
    return client


def db(server: Server) -> sqlite3.Connection:
    return sqlite3.connect(Path(server.env["PAGECHAT_DATA_DIR"]) / "pagechat.db")


# ---- 3. sign-in and sessions --------------------------------------------------------------------


def guess_until_locked(server: Server, accounts, address: str, lock_s: int = 4) -> list[int]:
    """Wrong passwords from `address` until a lock of at least `lock_s` seconds; the codes seen.

    A lock shorter than that is waited out (each failure after the free ones doubles the next
    lock: 1, 2, 4 s), so what the test checks next happens while the lock surely holds.
    """
    codes: list[int] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        response = login(server, next(accounts), "wrong password", address)
        codes.append(response.status_code)
        if response.status_code == 429:
            wait = int(response.headers["Retry-After"])
            if wait >= lock_s:
                return codes
            time.sleep(wait)
    raise AssertionError(f"never locked: {codes}")


def test_password_guessing_is_throttled_per_account(team):
    address = new_address()
    codes = guess_until_locked(team, itertools.repeat("alice"), address)
    assert codes[:6] == [401] * 6  # a few typos cost nothing; the 6th locks for 1 s
    assert codes.count(401) == 8  # then each failure doubles the lock: 1, 2, 4 s
    locked = login(team, "alice", USERS["alice"], address)
    assert locked.status_code == 429 and "failed sign-ins" in locked.json()["detail"]
    assert 1 <= int(locked.headers["Retry-After"]) <= 4
    # The right password from elsewhere is refused too: the account itself is locked ...
    assert login(team, "alice", USERS["alice"]).status_code == 429
    # ... and no one else is: bob signs in, from the same address too.
    assert login(team, "bob", USERS["bob"], address).status_code == 200
    # Once the lock has passed, the right password is accepted (and the count starts over).
    time.sleep(int(locked.headers["Retry-After"]) + 0.5)
    assert login(team, "alice", USERS["alice"], address).status_code == 200


def test_one_address_trying_many_accounts_is_throttled(team):
    address = new_address()
    codes = guess_until_locked(team, (f"user{i}" for i in itertools.count()), address)
    assert codes[:21] == [401] * 21 and codes.count(401) == 23  # 20 free, then 1, 2, 4 s
    assert login(team, "bob", USERS["bob"], address).status_code == 429  # this client waits
    assert login(team, "bob", USERS["bob"]).status_code == 200  # other clients do not


def test_login_from_another_site_is_refused(team):
    own = team.url
    for headers in (
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Referer": "http://evil.example/autosubmit.html"},
        {"Sec-Fetch-Site": "cross-site"},
    ):
        refused = login(team, "bob", USERS["bob"], **headers)
        assert refused.status_code == 403, headers
        assert "access_token" not in refused.cookies
    assert login(team, "bob", USERS["bob"], Origin=own).status_code == 200  # the login page
    assert login(team, "bob", USERS["bob"], Referer=own + "/login").status_code == 200
    assert login(team, "bob", USERS["bob"]).status_code == 200  # not a browser: no CSRF


def test_logout_revokes_the_token_at_once(team):
    token = token_of(login(team, "alice", USERS["alice"]))
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 24 * 3600  # one day by default, not 15
    other = token_of(login(team, "alice", USERS["alice"]))  # a second browser
    assert me(team, token) == 200
    out = httpx.post(team.url + "/logout", cookies={"access_token": token})
    assert out.status_code == 200
    # The copied token is dead everywhere: HTTP, the API-style bearer header, the websocket.
    assert me(team, token) == 401
    assert (
        httpx.get(team.url + "/user", headers={"Authorization": f"Bearer {token}"}).status_code
        == 401
    )
    assert (
        httpx.post(team.url + "/auth/jwt", headers={"Authorization": f"Bearer {token}"}).status_code
        == 401
    )

    async def connect() -> None:
        sio = socketio.AsyncClient(reconnection=False)
        try:
            await sio.connect(
                team.url,
                socketio_path="/ws/socket.io",
                transports=["websocket"],
                headers={"Cookie": f"access_token={token}"},
                auth={
                    "clientType": "webapp",
                    "sessionId": str(uuid.uuid4()),
                    "threadId": "",
                    "userEnv": "{}",
                    "chatProfile": "",
                },
            )
        finally:
            await sio.disconnect()

    with pytest.raises(socketio.exceptions.ConnectionError):
        asyncio.run(connect())
    assert me(team, other) == 200  # the other session lives on


def test_secure_cookies_behind_a_tls_proxy(team):
    plain = login(team, "bob", USERS["bob"])
    assert "secure" not in plain.headers["set-cookie"].lower()
    proxied = login(team, "bob", USERS["bob"], **{"X-Forwarded-Proto": "https"})
    cookie = proxied.headers["set-cookie"].lower()
    assert "; secure" in cookie and "httponly" in cookie and "max-age=86400" in cookie


def test_password_change_and_removed_user_revoke_their_tokens(tiny_checkpoint, tmp_path):
    data = tmp_path / "data"
    first = Server(tiny_checkpoint, data, PAGECHAT_AUTH_USERS=users_env(USERS))
    try:
        first.wait_ready(timeout=180)
        alice, bob = (token_of(login(first, u, USERS[u])) for u in ("alice", "bob"))
        gone = token_of(login(first, "alice", USERS["alice"]))
        assert httpx.post(first.url + "/logout", cookies={"access_token": gone}).status_code == 200
    finally:
        first.stop()
    # alice changed her password, bob was removed; Secure cookies forced on.
    second = Server(
        tiny_checkpoint,
        data,
        PAGECHAT_AUTH_USERS="alice:a brand new passphrase",
        PAGECHAT_COOKIE_SECURE="true",
        PAGECHAT_SESSION_HOURS="2",
    )
    try:
        second.wait_ready(timeout=180)
        assert me(second, alice) == 401 and me(second, bob) == 401
        assert me(second, gone) == 401  # a logout survives the restart
        assert login(second, "alice", USERS["alice"]).status_code == 401
        fresh = login(second, "alice", "a brand new passphrase")
        assert me(second, token_of(fresh)) == 200
        assert "; secure" in fresh.headers["set-cookie"].lower()  # PAGECHAT_COOKIE_SECURE
        claims = jwt.decode(token_of(fresh), options={"verify_signature": False})
        assert claims["exp"] - claims["iat"] == 2 * 3600  # PAGECHAT_SESSION_HOURS
        revoked = data / "revoked_sessions.json"
        assert stat.S_IMODE(revoked.stat().st_mode) == 0o600
    finally:
        second.stop()


# ---- 5. headers and endpoints ---------------------------------------------------------------


def test_the_page_has_a_csp_and_cannot_be_framed(team):
    page = httpx.get(team.url + "/")
    csp = page.headers["content-security-policy"]
    directives = {d.split()[0]: d.split()[1:] for d in csp.split("; ")}
    assert directives["img-src"] == ["'self'", "data:", "blob:"]  # no beacons to other hosts
    assert directives["frame-ancestors"] == ["'none'"]
    assert directives["connect-src"] == ["'self'"] and directives["object-src"] == ["'none'"]
    assert "'unsafe-inline'" not in directives["script-src"]  # the page's inline scripts by hash
    assert any(s.startswith("'sha256-") for s in directives["script-src"])
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["referrer-policy"] == "same-origin"
    assert page.headers["x-content-type-options"] == "nosniff"
    api = httpx.get(team.url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    assert (
        api.headers["x-frame-options"] == "DENY"
        and "frame-ancestors 'none'" in api.headers["content-security-policy"]
    )


@pytest.mark.parametrize("path", ["/metrics", "/pagechat/status"])
def test_ops_endpoints_need_a_key_or_a_login(team, path):
    url = team.url + path
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200
    assert httpx.get(url, headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).status_code == 200
    token = token_of(login(team, "bob", USERS["bob"]))
    assert httpx.get(url, cookies={"access_token": token}).status_code == 200
    assert httpx.get(team.url + "/health").status_code == 200  # stays open: loaded or not


def test_docs_are_off_and_answers_show_no_server_path(team, tiny_checkpoint):
    for path in ("/openapi.json", "/docs", "/redoc"):
        response = httpx.get(team.url + path)
        assert "openapi" not in response.text.lower() and "swagger" not in response.text.lower()
    auth = {"Authorization": f"Bearer {API_KEY}"}
    models = httpx.get(team.url + "/v1/models", headers=auth)
    assert models.json()["data"][0]["id"] == Path(tiny_checkpoint).name
    assert str(Path(tiny_checkpoint).parent) not in models.text
    wrong = httpx.post(
        team.url + "/v1/completions",
        headers=auth,
        json={"model": "nope", "prompt": "hi", "max_tokens": 1},
    )
    assert wrong.status_code == 404 and str(Path(tiny_checkpoint).parent) not in wrong.text
    # The path still works as the model's name (scripts written before keep working).
    done = httpx.post(
        team.url + "/v1/completions",
        headers=auth,
        json={"model": str(tiny_checkpoint), "prompt": "hi", "max_tokens": 1},
    )
    assert done.status_code == 200 and done.json()["model"] == Path(tiny_checkpoint).name


# ---- 4. Chainlit's own routes ---------------------------------------------------------------


async def test_session_files_are_served_as_inert_attachments(team):
    alice = await chat_as(team, "alice")
    try:
        page = b"<html><script>fetch('/project/threads')</script></html>"
        file_id = await alice.upload("notes.html", page, "text/html")
        got = await alice.http.get(
            f"/project/file/{file_id}", params={"session_id": alice.session_id}
        )
        assert got.status_code == 200 and got.content == page
        assert got.headers["content-type"] == "application/octet-stream"
        assert got.headers["content-disposition"].startswith("attachment")
        assert got.headers["x-content-type-options"] == "nosniff"
        assert got.headers["content-security-policy"] == "sandbox"
    finally:
        await alice.close()


async def test_no_writes_into_another_users_chat(team):
    alice, bob = await chat_as(team, "alice"), await chat_as(team, "bob")
    try:
        await alice.send("Alice's private question")
        thread, message = alice.thread_id(), alice.sent_ids[-1]
        put = await alice.http.put(
            "/feedback",
            json={
                "sessionId": alice.session_id,
                "feedback": {"forId": message, "threadId": thread, "value": 1},
            },
        )
        assert put.status_code == 200
        feedback_id = put.json()["feedbackId"]

        # bob writes, rewrites and deletes feedback in alice's chat: all refused
        for body in (
            {"forId": message, "threadId": thread, "value": 0, "comment": "bob was here"},
            {"forId": message, "value": 0, "id": feedback_id, "comment": "bob was here"},
        ):
            bad = await bob.http.put(
                "/feedback", json={"sessionId": bob.session_id, "feedback": body}
            )
            assert bad.status_code == 404, bad.text
        bad = await bob.http.request("DELETE", "/feedback", json={"feedbackId": feedback_id})
        assert bad.status_code == 404

        # bob's socket message reusing alice's message id: refused, her message stays hers
        await bob.send("hijack")  # his own chat exists
        start = len(bob.events)
        bob._task_end.clear()
        await bob.sio.emit(
            "client_message",
            {
                "message": {
                    "id": message,
                    "threadId": "",
                    "name": "User",
                    "type": "user_message",
                    "output": "moved into bob's chat",
                    "createdAt": "2026-01-01T00:00:00Z",
                },
                "fileReferences": [],
            },
        )
        await bob.wait_task_end()
        said = " ".join(str(m.get("output")) for m in bob.messages(start).values())
        assert "belongs to another chat" in said
        await asyncio.sleep(0.5)  # Chainlit writes steps from background tasks
        with db(team) as conn:
            rows = conn.execute(
                'SELECT "threadId", "output" FROM steps WHERE "id" = ?', (message,)
            ).fetchall()
            feedback = conn.execute('SELECT "value", "comment" FROM feedbacks').fetchall()
        assert rows == [(thread, "Alice's private question")]
        assert feedback == [(1, None)]
    finally:
        await alice.close()
        await bob.close()


async def test_thread_sharing_off_means_off(team):
    alice = await chat_as(team, "alice")
    try:
        await alice.send("Something to share")
        thread = alice.thread_id()
        shared = await alice.http.put(
            "/project/thread/share", json={"threadId": thread, "isShared": True}
        )
        assert shared.status_code == 404
        assert (await alice.http.get(f"/project/share/{thread}")).status_code == 404
        async with httpx.AsyncClient(base_url=team.url) as anonymous:
            assert (await anonymous.get(f"/project/share/{thread}")).status_code in (401, 404)
        with db(team) as conn:
            (metadata,) = conn.execute(
                'SELECT "metadata" FROM threads WHERE "id" = ?', (thread,)
            ).fetchone()
        assert "is_shared" not in (metadata or "")
    finally:
        await alice.close()


# ---- 2. upload quotas -------------------------------------------------------------------------


async def test_upload_quotas_and_the_ten_file_limit_are_enforced_by_the_server(team):
    # Module limits: 12 files and 1 MB per chat, 16 files per user per day; 10 per message.
    bob = await chat_as(team, "bob")
    try:
        ids = [await bob.upload(f"part{i}.txt", b"x" * 100) for i in range(10)]
        eleventh = await bob.http.post(
            "/project/file",
            params={"session_id": bob.session_id},
            files={"file": ("part10.txt", b"x", "text/plain")},
        )
        assert eleventh.status_code == 413 and "At most 10 files" in eleventh.json()["detail"]
        start = await bob.send("ten files", tuple(ids))
        assert bob.assistant_messages(start)  # answered
        await bob.upload("big.txt", b"y" * 700_000)  # 11 files in this chat, 0.7 MB
        over = await bob.http.post(
            "/project/file",
            params={"session_id": bob.session_id},
            files={"file": ("more.txt", b"z" * 400_000, "text/plain")},
        )
        assert over.status_code == 413 and "1 MB (the limit per chat)" in over.json()["detail"]
        twelfth = await bob.upload("small.txt", b"z")  # 12 files
        over = await bob.http.post(
            "/project/file",
            params={"session_id": bob.session_id},
            files={"file": ("13.txt", b"z", "text/plain")},
        )
        assert over.status_code == 413 and "limit per chat" in over.json()["detail"]
        # a message may not carry more than 10 files, whatever the browser does
        start = await bob.send("too many", tuple(ids) + (twelfth,))
        said = " ".join(str(m.get("output")) for m in bob.messages(start).values())
        assert "At most 10 files" in said
    finally:
        await bob.close()
    # a new chat: the day's limit (16 per user) remains, with a Retry-After
    bob = await chat_as(team, "bob")
    try:
        for i in range(4):
            await bob.upload(f"day{i}.txt", b"d")
        daily = await bob.http.post(
            "/project/file",
            params={"session_id": bob.session_id},
            files={"file": ("day4.txt", b"d", "text/plain")},
        )
        assert daily.status_code == 429 and "Daily upload limit" in daily.json()["detail"]
        assert int(daily.headers["Retry-After"]) > 3600
    finally:
        await bob.close()
    alice = await chat_as(team, "alice")  # her quota is her own
    try:
        await alice.upload("hers.txt", b"a")
    finally:
        await alice.close()


# ---- 6. at rest -----------------------------------------------------------------------------


async def test_files_at_rest_are_private_and_names_survive(team):
    alice = await chat_as(team, "alice")
    try:
        emoji = "😀" * 150 + ".txt"  # 604 bytes: more than any file system takes
        spoof = "invoice\u202efdp.txt"  # a .txt file that shows as "invoicetxt.pdf"
        ids = (await alice.upload(emoji, b"emoji file"), await alice.upload(spoof, b"spoof"))
        await alice.send("two files", ids)
        await asyncio.sleep(1.0)  # elements are stored by background tasks
        with db(alice_server := team) as conn:
            names = [
                r[0]
                for r in conn.execute(
                    'SELECT e."name" FROM elements e JOIN threads t ON t."id" = e."threadId" '
                    'WHERE t."id" = ?',
                    (alice.thread_id(),),
                )
            ]
    finally:
        await alice.close()
    kept = next(n for n in names if n.startswith("😀"))
    assert kept.endswith(".txt") and len(kept.encode()) <= 255 and len(kept) > 60
    assert "invoicefdp.txt" in names  # the override is gone, the real extension shows
    data = Path(alice_server.env["PAGECHAT_DATA_DIR"])
    stored = [p for p in (data / "files").rglob("*") if p.is_file()]
    assert any(p.name == kept for p in stored)  # the attachment did not silently vanish
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    everything = [p for p in data.rglob("*") if p.is_file()]
    expected = {data / "pagechat.db", data / "pagechat.db-wal", data / "chainlit_auth_secret"}
    assert expected <= set(everything)
    for path in everything:  # the database, its WAL, the secret, the lock, uploads, ...
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for folder in [p for p in data.rglob("*") if p.is_dir()]:
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder


def test_a_data_dir_from_before_is_made_private(tmp_path):
    from app.serving.datadir import make_private

    data = tmp_path / "data"
    (data / "files" / "u").mkdir(parents=True)
    (data / "pagechat.db").write_bytes(b"")
    (data / "files" / "u" / "a.txt").write_bytes(b"a")
    for path in (data, data / "files", data / "files" / "u"):
        path.chmod(0o755)
    (data / "pagechat.db").chmod(0o644)
    umask = os.umask(0o022)
    try:
        make_private(data)
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        assert stat.S_IMODE((data / "files" / "u").stat().st_mode) == 0o700
        assert stat.S_IMODE((data / "pagechat.db").stat().st_mode) == 0o600
        assert stat.S_IMODE((data / "files" / "u" / "a.txt").stat().st_mode) == 0o600
        assert os.umask(0o077) == 0o077  # new files are private too
    finally:
        os.umask(umask)
