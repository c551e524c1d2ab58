"""Chats on disk: Chainlit's SQLAlchemy data layer, its schema, and our token histories.

Chainlit ships no schema for this layer and turns SQL errors into warnings, so a column it
writes but the table lacks loses data silently. `prepare_database` creates the tables, then
compares them with the fields Chainlit writes (StepDict, ElementDict) and adds what is missing.
SQLite runs in WAL mode with a busy timeout: Chainlit writes from fire-and-forget tasks.

The history each chat keeps for its engine (app.chat.history: {"conversation": token ids} for
the in-process engine, {"transcript": messages} for a remote one, and {"options": settings})
lives in a table of our own, `pagechat_histories`, keyed by thread id, as JSON: resuming a chat
restores the exact prompt ids. Rows written before 2026-12 hold both keys; each kind reads its own.
"""

from __future__ import annotations

import json
import logging
import typing
from datetime import UTC, datetime
from typing import Any

from chainlit.data.sql_alchemy import SQLAlchemyDataLayer
from chainlit.data.storage_clients.base import BaseStorageClient
from chainlit.element import ElementDict
from chainlit.step import StepDict
from sqlalchemy import event, inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from app.storage.ownership import OwnerChecks

logger = logging.getLogger(__name__)

# The schema Chainlit 2.12's SQLAlchemyDataLayer writes (docs schema + autoCollapse + the
# element fields autoPlay/playerConfig). UUID/JSONB/TEXT[] work in SQLite by type affinity.
SCHEMA = [
    """CREATE TABLE IF NOT EXISTS users (
        "id" UUID PRIMARY KEY, "identifier" TEXT NOT NULL UNIQUE, "metadata" JSONB NOT NULL,
        "createdAt" TEXT)""",
    """CREATE TABLE IF NOT EXISTS threads (
        "id" UUID PRIMARY KEY, "createdAt" TEXT, "name" TEXT, "userId" UUID,
        "userIdentifier" TEXT, "tags" TEXT[], "metadata" JSONB,
        FOREIGN KEY ("userId") REFERENCES users("id") ON DELETE CASCADE)""",
    """CREATE TABLE IF NOT EXISTS steps (
        "id" UUID PRIMARY KEY, "name" TEXT NOT NULL, "type" TEXT NOT NULL,
        "threadId" UUID NOT NULL, "parentId" UUID, "streaming" BOOLEAN NOT NULL,
        "waitForAnswer" BOOLEAN, "isError" BOOLEAN, "metadata" JSONB, "tags" TEXT[],
        "input" TEXT, "output" TEXT, "createdAt" TEXT, "command" TEXT, "start" TEXT,
        "end" TEXT, "generation" JSONB, "showInput" TEXT, "language" TEXT, "indent" INT,
        "defaultOpen" BOOLEAN, "autoCollapse" BOOLEAN, "modes" JSONB,
        FOREIGN KEY ("threadId") REFERENCES threads("id") ON DELETE CASCADE)""",
    """CREATE TABLE IF NOT EXISTS elements (
        "id" UUID PRIMARY KEY, "threadId" UUID, "type" TEXT, "url" TEXT, "chainlitKey" TEXT,
        "name" TEXT NOT NULL, "display" TEXT, "objectKey" TEXT, "size" TEXT, "page" INT,
        "language" TEXT, "forId" UUID, "mime" TEXT, "props" JSONB, "autoPlay" BOOLEAN,
        "playerConfig" JSONB,
        FOREIGN KEY ("threadId") REFERENCES threads("id") ON DELETE CASCADE)""",
    """CREATE TABLE IF NOT EXISTS feedbacks (
        "id" UUID PRIMARY KEY, "forId" UUID NOT NULL, "threadId" UUID NOT NULL,
        "value" INT NOT NULL, "comment" TEXT,
        FOREIGN KEY ("threadId") REFERENCES threads("id") ON DELETE CASCADE)""",
    """CREATE TABLE IF NOT EXISTS pagechat_histories (
        "threadId" TEXT PRIMARY KEY, "data" TEXT NOT NULL, "updatedAt" TEXT)""",
]

# Columns Chainlit reads or writes with fixed SQL.
FIXED_COLUMNS = {
    "users": {"id", "identifier", "metadata", "createdAt"},
    "threads": {"id", "createdAt", "name", "userId", "userIdentifier", "tags", "metadata"},
    "feedbacks": {"id", "forId", "threadId", "value", "comment"},
    "pagechat_histories": {"threadId", "data", "updatedAt"},
}
# Dict keys that never become columns (moved into metadata, or never sent to the data layer).
NOT_COLUMNS = {"steps": {"feedback", "icon"}, "elements": {"path"}}
TYPE_OVERRIDES = {"showInput": "TEXT"}  # typed bool | str; the data layer stores it as text


def expected_columns() -> dict[str, dict[str, str]]:
    """Every column Chainlit may write, with an SQL type for adding it when missing."""
    out: dict[str, dict[str, str]] = {t: dict.fromkeys(cols, "TEXT") for t, cols in FIXED_COLUMNS.items()}
    for table, typed in (("steps", StepDict), ("elements", ElementDict)):
        hints = typing.get_type_hints(typed)
        out[table] = {
            key: TYPE_OVERRIDES.get(key) or _sql_type(hint)
            for key, hint in hints.items()
            if key not in NOT_COLUMNS[table]
        }
    return out


def _sql_type(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    base = typing.get_origin(args[0]) or args[0]
    if base is bool:
        return "BOOLEAN"
    if base is int:
        return "INT"
    if base in (dict, typing.Dict):  # noqa: UP006
        return "JSONB"
    if base in (list, typing.List):  # noqa: UP006
        return "TEXT[]"
    return "TEXT"


def _is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def _sqlite_pragmas(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()


async def prepare_database(url: str) -> list[str]:
    """Create the schema, add columns Chainlit needs but the tables lack; returns what was added.

    Raises RuntimeError when the database cannot be brought in line (data would be lost).
    """
    engine = create_async_engine(url, **_engine_kwargs(url))
    if _is_sqlite(url):
        _sqlite_pragmas(engine)
    added: list[str] = []
    try:
        async with engine.begin() as conn:
            for ddl in SCHEMA:
                await conn.execute(text(ddl))
            existing = await conn.run_sync(
                lambda sync: {t: {c["name"] for c in inspect(sync).get_columns(t)} for t in expected_columns()}
            )
            for table, columns in expected_columns().items():
                for column, sql_type in columns.items():
                    if column in existing[table]:
                        continue
                    await conn.execute(text(f'ALTER TABLE {table} ADD COLUMN "{column}" {sql_type}'))
                    added.append(f"{table}.{column}")
        if added:
            logger.warning("database schema was missing columns Chainlit writes; added %s", added)
        async with engine.connect() as conn:
            existing = await conn.run_sync(
                lambda sync: {t: {c["name"] for c in inspect(sync).get_columns(t)} for t in expected_columns()}
            )
        missing = [
            f"{t}.{c}" for t, cols in expected_columns().items() for c in cols if c not in existing[t]
        ]
        if missing:
            raise RuntimeError(f"database schema lacks columns Chainlit writes: {missing}")
    finally:
        await engine.dispose()
    return added


def _engine_kwargs(url: str) -> dict:
    return {"connect_args": {"timeout": 30}} if _is_sqlite(url) else {}


class PagechatDataLayer(OwnerChecks, SQLAlchemyDataLayer):
    """Chainlit's SQLAlchemy layer plus our token histories, deleted along with their thread;
    writes by id are checked against the thread's owner (app/storage/ownership.py)."""

    def __init__(self, url: str, storage_provider: BaseStorageClient | None = None) -> None:
        kwargs = _engine_kwargs(url)
        super().__init__(
            url, connect_args=kwargs.get("connect_args"), storage_provider=storage_provider,
            user_thread_limit=500,
        )
        if _is_sqlite(url):
            _sqlite_pragmas(self.engine)

    async def save_history(self, thread_id: str, data: dict) -> None:
        payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
        now = datetime.now(UTC).isoformat()
        async with self.engine.begin() as conn:
            await conn.execute(
                text(
                    'INSERT INTO pagechat_histories ("threadId", "data", "updatedAt") '
                    "VALUES (:id, :data, :now) "
                    'ON CONFLICT ("threadId") DO UPDATE SET "data" = :data, "updatedAt" = :now'
                ),
                {"id": thread_id, "data": payload, "now": now},
            )

    async def load_history(self, thread_id: str) -> dict | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    text('SELECT "data" FROM pagechat_histories WHERE "threadId" = :id'),
                    {"id": thread_id},
                )
            ).first()
        return json.loads(row[0]) if row else None

    async def element_owner(self, object_key: str) -> str | None:
        """The identifier of the user whose thread holds the stored file `object_key`."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    text(
                        'SELECT t."userIdentifier" FROM elements e JOIN threads t ON t."id" = e."threadId" '
                        'WHERE e."objectKey" = :key'
                    ),
                    {"key": object_key},
                )
            ).first()
        return row[0] if row else None

    async def delete_thread(self, thread_id: str) -> None:
        await super().delete_thread(thread_id)
        async with self.engine.begin() as conn:
            await conn.execute(
                text('DELETE FROM pagechat_histories WHERE "threadId" = :id'), {"id": thread_id}
            )
