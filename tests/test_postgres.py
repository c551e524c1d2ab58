"""The real server (`python -m app`, tiny checkpoint) on a real PostgreSQL server through
`PAGECHAT_DATABASE_URL`: the schema is created on first start, and a restart keeps every chat,
its uploaded file and its token history. What was stored is also read with psql, and the log
must hold none of the SQL errors Chainlit's data layer turns into warnings.
"""

from __future__ import annotations

import json

import pytest

from tests.app_client import ChatClient, Server

MEMO = b"The launch moved to Thursday at the north pier."


def prompt_tokens(said: list[str]) -> int:
    """The prompt size from an answer's stats line ("*N prompt tokens · ...*")."""
    stats = next(o for o in said if " prompt tokens · " in o)
    return int(stats.rsplit("*", 2)[-2].split(" prompt tokens")[0].replace(",", ""))


def outputs(client: ChatClient, start: int) -> list[str]:
    return [m.get("output") or "" for m in client.messages(start).values()]


def assert_no_sql_errors(server: Server) -> None:
    log = server.output()
    for needle in ("An error occurred", "An unexpected error occurred", "Traceback"):
        assert needle not in log, log[-4000:]


async def local_client(server: Server) -> ChatClient:
    client = ChatClient(server.url)
    await client.login()  # the one local user (no login form)
    return client


@pytest.mark.timeout(480)
async def test_chats_files_and_token_histories_survive_a_restart_on_postgres(
    tiny_checkpoint, postgres_server, tmp_path
):
    url = postgres_server.new_database()
    database = url.rsplit("/", 1)[1]
    assert (
        postgres_server.psql(database, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        == "0\n"
    )
    data_dir = tmp_path / "data"
    server = Server(tiny_checkpoint, data_dir, log_level="info", PAGECHAT_DATABASE_URL=url)
    try:
        server.wait_ready(timeout=180)  # a loaded CI machine can take over a minute
        tables = postgres_server.psql(
            database, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        )
        assert {"users", "threads", "steps", "elements", "feedbacks", "pagechat_histories"} <= set(
            tables.split()
        )
        assert not (data_dir / "pagechat.db").exists()  # nothing went to SQLite

        client = await local_client(server)
        await client.connect()
        await client.wait_event("chat_settings")
        await client.settings({"max_tokens": 8, "temperature": 0.0})
        memo = await client.upload("memo.txt", MEMO)
        await client.send("When is the launch?", (memo,))
        start = await client.send("And where?")
        before = prompt_tokens(outputs(client, start))
        thread_id = client.thread_id()
        assert thread_id
        await client.close()
    finally:
        server.stop()
    assert server.proc.returncode == 0
    assert_no_sql_errors(server)

    # Read back with psql, not through the app.
    rows = postgres_server.psql(
        database,
        f'SELECT type, output FROM steps WHERE "threadId" = \'{thread_id}\' ORDER BY "createdAt"',
    )
    assert rows.count("user_message|") == 2 and "When is the launch?" in rows
    stored = postgres_server.psql(
        database, f"SELECT data FROM pagechat_histories WHERE \"threadId\" = '{thread_id}'"
    )
    turns = json.loads(stored)["conversation"]["turns"]
    assert len(turns) == 2 and all(t["answer_ids"] for t in turns)
    element = postgres_server.psql(
        database, f"SELECT name, mime FROM elements WHERE \"threadId\" = '{thread_id}'"
    )
    assert element.startswith("memo.txt|")

    server = Server(tiny_checkpoint, data_dir, log_level="info", PAGECHAT_DATABASE_URL=url)
    try:
        server.wait_ready(timeout=180)  # a loaded CI machine can take over a minute
        client = await local_client(server)
        response = await client.http.post(
            "/project/threads", json={"pagination": {"first": 20, "cursor": None}, "filter": {}}
        )
        response.raise_for_status()
        threads = {t["id"]: t for t in response.json()["data"]}
        assert thread_id in threads
        thread = (await client.http.get(f"/project/thread/{thread_id}")).json()
        assert [s["type"] for s in thread["steps"]].count("user_message") == 2
        memo_element = next(e for e in thread["elements"] if e["name"] == "memo.txt")
        assert (await client.http.get(memo_element["url"])).content == MEMO

        await client.connect(thread_id=thread_id)
        await client.wait_event("resume_thread")
        await client.wait_event("chat_settings")
        await client.settings({"max_tokens": 8, "temperature": 0.0})
        start = await client.send("Thanks!")
        said = outputs(client, start)
        assert not any("could not be restored" in o for o in said)  # the token history came back
        assert prompt_tokens(said) > before + 8  # both turns, the memo and the answers
        await client.close()
    finally:
        server.stop()
    assert server.proc.returncode == 0
    assert_no_sql_errors(server)
