"""The SQLite schema matches what Chainlit writes; token histories persist and are deleted."""

from __future__ import annotations

import sqlite3
import uuid

from app.storage.data_layer import PagechatDataLayer, expected_columns, prepare_database


def _columns(db, table):
    return {row[1] for row in sqlite3.connect(db).execute(f"PRAGMA table_info({table})")}


async def test_fresh_schema_has_every_column_chainlit_writes(tmp_path):
    db = tmp_path / "chat.db"
    added = await prepare_database(f"sqlite+aiosqlite:///{db}")
    assert added == []  # the DDL already has them all
    for table, columns in expected_columns().items():
        assert set(columns) <= _columns(db, table), table
    # the fields of Chainlit 2.12 that older published schemas lack
    assert {"autoCollapse", "defaultOpen", "modes", "command"} <= _columns(db, "steps")
    assert {"autoPlay", "playerConfig"} <= _columns(db, "elements")
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_old_schema_gets_missing_columns(tmp_path):
    db = tmp_path / "old.db"
    con = sqlite3.connect(db)
    con.execute(
        'CREATE TABLE steps ("id" UUID PRIMARY KEY, "name" TEXT NOT NULL, "type" TEXT NOT NULL, '
        '"threadId" UUID NOT NULL, "streaming" BOOLEAN NOT NULL, "output" TEXT)'
    )
    con.commit()
    con.close()
    added = await prepare_database(f"sqlite+aiosqlite:///{db}")
    assert "steps.autoCollapse" in added and "steps.defaultOpen" in added
    assert {"autoCollapse", "defaultOpen", "generation"} <= _columns(db, "steps")
    assert await prepare_database(f"sqlite+aiosqlite:///{db}") == []


async def test_steps_round_trip_through_chainlit_layer_and_history_table(tmp_path):
    """A Chainlit Step (with autoCollapse) is stored, read back, and deleted with its history."""
    from chainlit.context import init_http_context
    from chainlit.user import User

    url = f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}"
    await prepare_database(url)
    layer = PagechatDataLayer(url)
    init_http_context()
    try:
        user = await layer.create_user(User(identifier="local"))
        thread_id = str(uuid.uuid4())
        await layer.update_thread(thread_id, name="first", user_id=user.id)
        step = {
            "id": str(uuid.uuid4()), "threadId": thread_id, "name": "pagechat",
            "type": "assistant_message", "streaming": False, "output": "hello",
            "createdAt": "2026-01-01T00:00:00Z", "autoCollapse": False, "defaultOpen": False,
            "metadata": {}, "isError": False,
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
        assert (await layer.load_history(thread_id))["conversation"]["turns"][-1] == {"answer_ids": [3]}

        await layer.delete_thread(thread_id)
        assert await layer.get_thread(thread_id) is None
        assert await layer.load_history(thread_id) is None
    finally:
        await layer.close()
