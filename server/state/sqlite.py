"""SQLite store: one node keeps conversations across restarts (and crashes).

The stdlib driver blocks, so every call runs on one dedicated thread that owns
the connection; WAL journaling keeps writes cheap and readers unblocked.

Several processes of one machine may share the file (``duplex serve --workers N``):
a session is run by one of them at a time, which holds its lease (``leases`` table,
kept by ``server.lease``): an owner, a fencing token raised by every acquisition and
an expiry, each change taken in an IMMEDIATE transaction. Writes of a session this
process holds a lease on (``fences``) check the token in the same IMMEDIATE
transaction as the write, so a process that lost the session can never write over
the new owner's: its writes raise ``FencedWrite``.
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
    FencedWrite,
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
    created_at REAL NOT NULL, updated_at REAL NOT NULL, input_received INTEGER,
    endpoint TEXT NOT NULL DEFAULT '/v1/duplex'
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
CREATE TABLE IF NOT EXISTS leases (
    session_id TEXT PRIMARY KEY, owner TEXT, token INTEGER NOT NULL, expires REAL NOT NULL,
    handover TEXT
) WITHOUT ROWID;
"""


class SqliteStore(StateStore):
    """``max_messages``: the most recent messages a session loads (all are kept on disk)."""

    shared = True

    transient_errors = (sqlite3.OperationalError,)  # locked, disk I/O, disk full

    def __init__(self, path: str, *, max_messages: int = 1000) -> None:
        self.path = path
        self.max_messages = max_messages
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="duplex-sqlite")
        self._db: sqlite3.Connection | None = None
        #: Session id -> this process's fencing token, for sessions it holds a lease on.
        self.fences: dict[str, int] = {}

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
            if "endpoint" not in columns:  # a file made before the column: /v1/duplex's
                db.execute(
                    "ALTER TABLE sessions ADD COLUMN endpoint TEXT NOT NULL DEFAULT '/v1/duplex'"
                )
            self._db = db
        return self._db

    async def _run(self, fn: Callable[[sqlite3.Connection], T], *, fence: str = "") -> T:
        """``fn(db)`` in one transaction on the store's thread; ``fence``: a write of that
        session, refused (`FencedWrite`) if this process's lease on it was taken over."""

        def call() -> T:
            db = self._conn()
            with db:  # one transaction per call
                if fence:
                    self._check_fence(db, fence)
                result = fn(db)
            if isinstance(result, sqlite3.Cursor):
                # A cursor must not be freed on another thread: its finalizer resets its
                # statement while this thread runs the next one (SQLITE_MISUSE).
                result.close()
                return None  # type: ignore[return-value]
            return result

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    def _check_fence(self, db: sqlite3.Connection, session_id: str) -> None:
        if not self._fenced_ok(db, session_id):
            raise FencedWrite(session_id)

    def _fenced_ok(self, db: sqlite3.Connection, session_id: str) -> bool:
        """True unless this process holds a lease on the session and its token is no longer
        the session's; the check starts an IMMEDIATE transaction (other processes' writes
        wait until it ends), so the write that follows is under the same token."""
        token = self.fences.get(session_id)
        if token is None:
            return True
        if not db.in_transaction:
            db.execute("BEGIN IMMEDIATE")
        row = db.execute("SELECT token FROM leases WHERE session_id = ?", (session_id,)).fetchone()
        return row is not None and row[0] == token

    # ---- leases (server.lease) -----------------------------------------------------------

    async def lease_acquire(
        self, session_id: str, owner: str, ttl_ms: int
    ) -> tuple[bool, int, str | None]:
        """Own the session if its lease is free, expired or already ours: (True, new
        token, None); else (False, ms until it expires, ``owner:token`` of the holder)."""

        def acquire(db: sqlite3.Connection) -> tuple[bool, int, str | None]:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(
                "SELECT owner, token, expires FROM leases WHERE session_id = ?", (session_id,)
            ).fetchone()
            now = time.time()
            if row is not None and row[0] is not None and row[0] != owner and row[2] > now:
                return False, max(1, int((row[2] - now) * 1000)), f"{row[0]}:{row[1]}"
            token = (row[1] if row is not None else 0) + 1
            db.execute(
                "INSERT INTO leases (session_id, owner, token, expires, handover) "
                "VALUES (?, ?, ?, ?, NULL) ON CONFLICT (session_id) DO UPDATE SET "
                "owner = excluded.owner, token = excluded.token, expires = excluded.expires, "
                "handover = NULL",
                (session_id, owner, token, now + ttl_ms / 1000),
            )
            return True, token, None

        return await self._run(acquire)

    async def lease_renew(self, session_id: str, owner: str, token: int, ttl_ms: int) -> int:
        """0: the token moved on (taken over); 1: renewed; 2: renewed, and another process
        asks for the session (the request is consumed)."""

        def renew(db: sqlite3.Connection) -> int:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(
                "SELECT token, handover FROM leases WHERE session_id = ?", (session_id,)
            ).fetchone()
            if row is None or row[0] != token:
                return 0
            db.execute(
                "UPDATE leases SET owner = ?, expires = ?, handover = NULL WHERE session_id = ?",
                (owner, time.time() + ttl_ms / 1000, session_id),
            )
            return 2 if row[1] is not None else 1

        return await self._run(renew)

    async def lease_release(self, session_id: str, owner: str, token: int) -> None:
        """Free the lease at once, if it is still this owner's (the token is kept: the
        next owner's is higher)."""
        await self._run(
            lambda db: db.execute(
                "UPDATE leases SET owner = NULL, expires = 0, handover = NULL "
                "WHERE session_id = ? AND owner = ? AND token = ?",
                (session_id, owner, token),
            )
        )

    async def lease_ask_handover(self, session_id: str, asker: str) -> None:
        """Ask the holder to hand the session over (seen at its next renewal)."""
        await self._run(
            lambda db: db.execute(
                "UPDATE leases SET handover = ? WHERE session_id = ? AND owner IS NOT NULL",
                (asker, session_id),
            )
        )

    # ---- sessions -----------------------------------------------------------------------

    async def create_session(self, record: SessionRecord) -> None:
        await self._run(lambda db: _put_session(db, record, replace=False), fence=record.id)

    async def update_session(self, record: SessionRecord) -> None:
        record.updated_at = time.time()
        await self._run(lambda db: _put_session(db, record, replace=True), fence=record.id)

    async def get_session(self, session_id: str, tenant: str | None = None) -> SessionRecord | None:
        row = await self._run(
            lambda db: db.execute(
                "SELECT id, tenant, name, variables, config, parent_id, created_at, updated_at, "
                "input_received, endpoint FROM sessions WHERE id = ? AND (? IS NULL OR tenant = ?)",
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
            endpoint=row[9],
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
            db.execute("DELETE FROM leases WHERE session_id = ?", (session_id,))

        await self._run(delete, fence=session_id)

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
            ),
            fence=session_id,
        )

    async def clear_messages(self, session_id: str) -> None:
        def clear(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM messages WHERE session_id = ?", (session_id,))
            db.execute("DELETE FROM events WHERE session_id = ?", (session_id,))

        await self._run(clear, fence=session_id)

    async def edit_messages(self, session_id: str, edit: MessageEdit) -> list[Message] | None:
        def rewrite(db: sqlite3.Connection) -> list[Message] | None:
            # One transaction, taken before the read: another process's writes wait
            # (already begun by the fence check when this process holds the lease).
            if not db.in_transaction:
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

        return await self._run(rewrite, fence=session_id)

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
            ),
            fence=session_id,
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
            ),
            fence=session_id,
        )

    # ---- outbox -------------------------------------------------------------------------

    async def append_outbox(self, batches: list[OutboxBatch], *, max_age_s: float) -> None:
        """Every session's batch in one transaction; fenced like every other write of a
        session this process holds a lease on: the batches of sessions another process
        has taken over are not written (the others are), and `FencedWrite` names the
        first."""

        def append(db: sqlite3.Connection) -> str:
            fenced = [b.session_id for b in batches if not self._fenced_ok(db, b.session_id)]
            kept = [b for b in batches if b.session_id not in fenced]
            rows = [(b.session_id, e.seq, e.text, e.at) for b in kept for e in b.entries]
            trims = [(b.session_id, b.keep_from) for b in kept if b.keep_from is not None]
            db.executemany(
                "INSERT OR REPLACE INTO outbox (session_id, seq, text, at) VALUES (?, ?, ?, ?)",
                rows,
            )
            db.executemany("DELETE FROM outbox WHERE session_id = ? AND seq < ?", trims)
            # Every session's expired entries (closed sessions' too): the index makes it cheap.
            db.execute("DELETE FROM outbox WHERE at < ?", (time.time() - max_age_s,))
            return fenced[0] if fenced else ""

        fenced = await self._run(append)
        if fenced:
            raise FencedWrite(fenced)

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
        "updated_at, input_received, endpoint) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
            r.endpoint,
        ),
    )
