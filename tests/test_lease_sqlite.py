"""Session leases and fencing in a SQLite file shared by processes of one machine
(``duplex serve --workers N``): what is specific to SQLite. The lease tests common to both
backends are in tests/test_lease.py (they take its `pair` fixture)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from duplex.protocol import Message
from server.lease import LeaseManager
from server.state.base import FencedWrite
from server.state.sqlite import SqliteStore
from tests.test_lease import FAST, expire, sqlite_stores


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[tuple[SqliteStore, SqliteStore]]:
    """Two processes' stores on the same file."""
    async with sqlite_stores(tmp_path / "duplex.db") as both:
        yield both


async def test_a_takeover_waits_for_a_fenced_write_in_flight(
    stores: tuple[SqliteStore, SqliteStore],
) -> None:
    """The token check and the write are one IMMEDIATE transaction: an acquisition by
    another process cannot come between them (it waits for the write to commit)."""
    a, b = stores
    await LeaseManager(a, "replica-a", FAST).acquire("s1")
    expire(a.path, "s1")
    checked = asyncio.Event()
    go = asyncio.Event()
    loop = asyncio.get_running_loop()
    order: list[str] = []

    def write(db: sqlite3.Connection) -> None:
        loop.call_soon_threadsafe(checked.set)
        asyncio.run_coroutine_threadsafe(go.wait(), loop).result(timeout=10)
        db.execute(
            "INSERT INTO messages (session_id, id, role, content, created_at, metadata) "
            "VALUES ('s1', 'm1', 'assistant', 'in flight', 0, '{}')"
        )
        order.append("write")

    writing = asyncio.ensure_future(a._run(write, fence="s1"))
    await checked.wait()
    taking = asyncio.ensure_future(LeaseManager(b, "replica-b", FAST).acquire("s1"))
    await asyncio.sleep(0.3)
    assert not taking.done()  # the takeover waits for the write's transaction
    go.set()
    await writing
    await taking
    order.append("taken")
    assert order == ["write", "taken"]
    with pytest.raises(FencedWrite):
        await a.append_messages("s1", [Message(role="assistant", content="stale")])
