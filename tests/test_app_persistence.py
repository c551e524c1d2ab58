"""The schema matches what Chainlit writes; token histories persist and are deleted.

Every test runs twice: on SQLite (the default) and on a real PostgreSQL server
(`postgres_server` in conftest.py), each table read back by that database's own client
(sqlite3, psql) rather than through the code under test.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from app.storage.data_layer import PagechatDataLayer, expected_columns, prepare_database


@dataclass
class Database:
    """An empty database: its SQLAlchemy URL and an independent way to run SQL on it."""

    kind: str
    url: str
    execute: Callable[[str], None]
    columns: Callable[[str], set[str]]


@pytest.fixture(params=["sqlite", "postgres"])
def database(request, tmp_path) -> Database:
    if request.param == "sqlite":
        db = tmp_path / "chat.db"

        def execute(sql: str) -> None:
            con = sqlite3.connect(db)
            con.execute(sql)
            con.commit()
            con.close()

        def columns(table: str) -> set[str]:
            return {row[1] for row in sqlite3.connect(db).execute(f"PRAGMA table_info({table})")}

        return Database("sqlite", f"sqlite+aiosqlite:///{db}", execute, columns)
    server = request.getfixturevalue("postgres_server")
    url = server.new_database()
    name = url.rsplit("/", 1)[1]

    def pg_columns(table: str) -> set[str]:
        out = server.psql(
            name, f"SELECT column_name FROM information_schema.columns WHERE table_name = '{table}'"
        )
        return set(out.split())

    return Database("postgres", url, lambda sql: server.psql(name, sql) and None, pg_columns)


async def test_fresh_schema_has_every_column_chainlit_writes(database):
    added = await prepare_database(database.url)
    assert added == []  # the DDL already has them all
    for table, columns in expected_columns().items():
        assert set(columns) <= database.columns(table), table
    # the fields of Chainlit 2.12 that older published schemas lack
    assert {"autoCollapse", "defaultOpen", "modes", "command"} <= database.columns("steps")
    assert {"autoPlay", "playerConfig"} <= database.columns("elements")
    if database.kind == "sqlite":
        db = database.url.split("///", 1)[1]
        assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert await prepare_database(database.url) == []  # a second start changes nothing


async def test_old_schema_gets_missing_columns(database):
    database.execute(
        'CREATE TABLE steps ("id" UUID PRIMARY KEY, "name" TEXT NOT NULL, "type" TEXT NOT NULL, '
        '"threadId" UUID NOT NULL, "streaming" BOOLEAN NOT NULL, "output" TEXT)'
    )
    added = await prepare_database(database.url)
    assert "steps.autoCollapse" in added and "steps.defaultOpen" in added
    assert {"autoCollapse", "defaultOpen", "generation"} <= database.columns("steps")
    assert await prepare_database(database.url) == []


async def test_steps_round_trip_through_chainlit_layer_and_history_table(database):
    """A Chainlit Step (with autoCollapse) is stored, read back, and deleted with its history."""
    from chainlit.context import init_http_context
    from chainlit.user import User

    url = database.url
    await prepare_database(url)
    layer = PagechatDataLayer(url)
    init_http_context()
    try:
        user = await layer.create_user(User(identifier="local"))
        thread_id = str(uuid.uuid4())
        await layer.update_thread(thread_id, name="first", user_id=user.id)
        step = {
            "id": str(uuid.uuid4()),
            "threadId": thread_id,
            "name": "pagechat",
            "type": "assistant_message",
            "streaming": False,
            "output": "hello",
            "createdAt": "2026-01-01T00:00:00Z",
            "autoCollapse": False,
            "defaultOpen": False,
            "metadata": {},
            "isError": False,
        }
        await layer.create_step(step)
        thread = await layer.get_thread(thread_id)
        assert thread["name"] == "first"
        assert [s["output"] for s in thread["steps"]] == ["hello"]

        history = {"conversation": {"version": 1, "turns": [{"answer_ids": [1, 2, 151645]}]}}
        await layer.save_history(thread_id, history)
        assert await layer.load_history(thread_id) == history
        history["conversation"]["turns"].append({"answer_ids": [3]})
        await layer.save_history(thread_id, history)  # upsert
        assert (await layer.load_history(thread_id))["conversation"]["turns"][-1] == {
            "answer_ids": [3]
        }

        await layer.delete_thread(thread_id)
        assert await layer.get_thread(thread_id) is None
        assert await layer.load_history(thread_id) is None
    finally:
        await layer.close()
