"""SQLite store: one node keeps conversations across restarts (and crashes).

The stdlib driver blocks, so every call runs on one dedicated thread that owns
the connection; WAL journaling keeps writes cheap and readers unblocked.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from duplex.protocol import Message
from server.state.base import (
    MessageEdit,
    OutboxBatch,
    OutboxEntry,
    SessionRecord,
    StateStore,
    StreamEvent,
)

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, name TEXT NOT NULL DEFAULT '',
    variables TEXT NOT NULL, config TEXT NOT NULL, parent_id TEXT,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, input_received INTEGER
);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT NOT NULL, id TEXT NOT NULL,
    role TEXT NOT NULL, content TEXT NOT NULL, created_at REAL NOT NULL, metadata TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_session ON messages (session_id, seq);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT NOT NULL, response_id TEXT NOT NULL,
    kind TEXT NOT NULL, data TEXT NOT NULL, created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_session ON events (session_id, seq);
CREATE TABLE IF NOT EXISTS outbox (
    session_id TEXT NOT NULL, seq INTEGER NOT NULL, text TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (session_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS outbox_by_time ON outbox (at);

CREATE TABLE IF NOT EXISTS revoked (key TEXT PRIMARY KEY, until REAL NOT NULL);
"""


class SqliteStore(StateStore):
    """``max_messages``: the most recent messages a session loads (all are kept on disk)."""

    transient_errors = (sqlite3.OperationalError,)  # locked, disk I/O, disk full

    def __init__(self, path: str, *, max_messages: int = 1000) -> None:
        self.path = path
        self.max_messages = max_messages
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="duplex-sqlite")
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            if self.path not in ("", ":memory:"):
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path or ":memory:", check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(sessions)")}
            if "input_received" not in columns:  # a file made before the column
                db.execute("ALTER TABLE sessions ADD COLUMN input_received INTEGER")
            self._db = db
        return self._db

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            db = self._conn()
            with db:  # one transaction per call
                result = fn(db)
            if isinstance(result, sqlite3.Cursor):
                # A cursor must not be freed on another thread: its finalizer resets its
                # statement while this thread runs the next one (SQLITE_MISUSE).
                result.close()
                return None  # type: ignore[return-value]
            return result

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    # ---- sessions -----------------------------------------------------------------------

    async def create_session(self, record: SessionRecord) -> None:
        await self._run(lambda db: _put_session(db, record, replace=False))

    async def update_session(self, record: SessionRecord) -> None:
        record.updated_at = time.time()
        await self._run(lambda db: _put_session(db, record, replace=True))

    async def get_session(self, session_id: str, tenant: str | None = None) -> SessionRecord | None:
        row = await self._run(
            lambda db: db.execute(
                "SELECT id, tenant, name, variables, config, parent_id, created_at, updated_at, "
                "input_received FROM sessions WHERE id = ? AND (? IS NULL OR tenant = ?)",
                (session_id, tenant, tenant),
            ).fetchone()
        )
        if row is None:
            return None
        return SessionRecord(
            id=row[0],
            tenant=row[1],
            name=row[2],
            variables=json.loads(row[3]),
            config=json.loads(row[4]),
            parent_id=row[5],
            created_at=row[6],
            updated_at=row[7],
            input_received=row[8],
        )

    async def delete_session(self, session_id: str) -> None:
        def delete(db: sqlite3.Connection) -> None:
            for table, column in (
                ("events", "session_id"),
                ("messages", "session_id"),
                ("outbox", "session_id"),
            ):
                db.execute(f"DELETE FROM {table} WHERE {column} = ?", (session_id,))
            db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))

        await self._run(delete)

    # ---- messages -----------------------------------------------------------------------

    async def load_messages(self, session_id: str) -> list[Message]:
        rows = await self._run(
            lambda db: db.execute(
                "SELECT id, role, content, created_at, metadata FROM ("
                " SELECT * FROM messages WHERE session_id = ? ORDER BY seq DESC LIMIT ?"
                ") ORDER BY seq",
                (session_id, self.max_messages),
            ).fetchall()
        )
        return [
            Message(id=r[0], role=r[1], content=r[2], created_at=r[3], metadata=json.loads(r[4]))
            for r in rows
        ]

    async def append_messages(self, session_id: str, messages: list[Message]) -> None:
        rows = [
            (session_id, m.id, m.role, m.content, m.created_at, json.dumps(m.metadata))
            for m in messages
        ]
        await self._run(
            lambda db: db.executemany(
                "INSERT INTO messages (session_id, id, role, content, created_at, metadata) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                rows,
            )
        )

    async def clear_messages(self, session_id: str) -> None:
        def clear(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM messages WHERE session_id = ?", (session_id,))
            db.execute("DELETE FROM events WHERE session_id = ?", (session_id,))

        await self._run(clear)

    async def edit_messages(self, session_id: str, edit: MessageEdit) -> list[Message] | None:
        def rewrite(db: sqlite3.Connection) -> list[Message] | None:
            # One transaction, taken before the read: another process's writes wait.
            db.execute("BEGIN IMMEDIATE")
            rows = db.execute(
                "SELECT seq, id, role, content, created_at, metadata FROM messages "
                "WHERE session_id = ? ORDER BY seq DESC LIMIT ?",
                (session_id, self.max_messages),
            ).fetchall()
            rows.reverse()
            messages = [
                Message(
                    id=r[1], role=r[2], content=r[3], created_at=r[4], metadata=json.loads(r[5])
                )
                for r in rows
            ]
            edited = edit(messages)
            if edited is None:
                return None
            if rows:  # the window the session loads is replaced; older rows stay
                db.execute(
                    "DELETE FROM messages WHERE session_id = ? AND seq >= ?",
                    (session_id, rows[0][0]),
                )
            db.executemany(
                "INSERT INTO messages (session_id, id, role, content, created_at, metadata) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [
                    (session_id, m.id, m.role, m.content, m.created_at, json.dumps(m.metadata))
                    for m in edited
                ],
            )
            return edited

        return await self._run(rewrite)

    # ---- stream events ------------------------------------------------------------------

    async def append_events(self, session_id: str, events: list[StreamEvent]) -> None:
        rows = [
            (session_id, e.response_id, e.kind, json.dumps(e.data), e.created_at) for e in events
        ]
        await self._run(
            lambda db: db.executemany(
                "INSERT INTO events (session_id, response_id, kind, data, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                rows,
            )
        )

    async def load_events(self, session_id: str) -> list[StreamEvent]:
        rows = await self._run(
            lambda db: db.execute(
                "SELECT response_id, kind, data, created_at FROM events "
                "WHERE session_id = ? ORDER BY seq",
                (session_id,),
            ).fetchall()
        )
        return [StreamEvent(r[0], r[1], json.loads(r[2]), r[3]) for r in rows]

    async def drop_events(self, session_id: str, response_id: str) -> None:
        await self._run(
            lambda db: db.execute(
                "DELETE FROM events WHERE session_id = ? AND response_id = ?",
                (session_id, response_id),
            )
        )

    # ---- outbox -------------------------------------------------------------------------

    async def append_outbox(self, batches: list[OutboxBatch], *, max_age_s: float) -> None:
        rows = [(b.session_id, e.seq, e.text, e.at) for b in batches for e in b.entries]
        trims = [(b.session_id, b.keep_from) for b in batches if b.keep_from is not None]

        def append(db: sqlite3.Connection) -> None:
            db.executemany(
                "INSERT OR REPLACE INTO outbox (session_id, seq, text, at) VALUES (?, ?, ?, ?)",
                rows,
            )
            db.executemany("DELETE FROM outbox WHERE session_id = ? AND seq < ?", trims)
            # Every session's expired entries (closed sessions' too): the index makes it cheap.
            db.execute("DELETE FROM outbox WHERE at < ?", (time.time() - max_age_s,))

        await self._run(append)

    async def load_outbox(self, session_id: str, *, max_age_s: float) -> list[OutboxEntry]:
        oldest = time.time() - max_age_s
        rows = await self._run(
            lambda db: db.execute(
                "SELECT seq, text, at FROM outbox WHERE session_id = ? AND at >= ? ORDER BY seq",
                (session_id, oldest),
            ).fetchall()
        )
        return [OutboxEntry(r[0], r[1], r[2]) for r in rows]

    async def revoke(self, key: str, until: float) -> None:
        def put(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM revoked WHERE until <= ?", (time.time(),))
            db.execute("INSERT OR REPLACE INTO revoked (key, until) VALUES (?, ?)", (key, until))

        await self._run(put)

    async def is_revoked(self, key: str) -> bool:
        def get(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT until FROM revoked WHERE key = ?", (key,)).fetchone()
            return row is not None and row[0] > time.time()

        return await self._run(get)

    async def close(self) -> None:
        def close_db() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await asyncio.get_running_loop().run_in_executor(self._pool, close_db)
        self._pool.shutdown(wait=True)


def _put_session(db: sqlite3.Connection, r: SessionRecord, *, replace: bool) -> Any:
    verb = "INSERT OR REPLACE" if replace else "INSERT"
    return db.execute(
        f"{verb} INTO sessions (id, tenant, name, variables, config, parent_id, created_at, "
        "updated_at, input_received) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            r.id,
            r.tenant,
            r.name,
            json.dumps(r.variables),
            json.dumps(r.config),
            r.parent_id,
            r.created_at,
            r.updated_at,
            r.input_received,
        ),
    )
