"""Session leases and fencing in a SQLite file shared by processes of one machine
(``duplex serve --workers N``): one owner, and a stale owner cannot write after a
takeover. Each `SqliteStore` has its own connection, as each process does."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from duplex.protocol import Message
from server.lease import LeaseBusy, LeaseManager, LeaseSettings
from server.state.base import (
    FencedWrite,
    OutboxBatch,
    OutboxEntry,
    SessionRecord,
    StreamEvent,
)
from server.state.sqlite import SqliteStore

FAST = LeaseSettings(ttl_ms=300, renew_ms=60, wait_ms=0)


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[tuple[SqliteStore, SqliteStore]]:
    """Two processes' stores on the same file."""
    path = str(tmp_path / "duplex.db")
    a, b = SqliteStore(path), SqliteStore(path)
    await a.create_session(SessionRecord(id="s1", tenant="t"))
    yield a, b
    await a.close()
    await b.close()


def expire(path: str, session_id: str) -> None:
    """As if the holder had stopped renewing a while ago."""
    with sqlite3.connect(path) as db:
        db.execute("UPDATE leases SET expires = 0 WHERE session_id = ?", (session_id,))


async def test_one_owner_at_a_time(stores: tuple[SqliteStore, SqliteStore]) -> None:
    a, b = stores
    owner = LeaseManager(a, "replica-a", FAST)
    other = LeaseManager(b, "replica-b", FAST)
    lease = await owner.acquire("s1")
    with pytest.raises(LeaseBusy) as busy:
        await other.acquire("s1")
    assert 0 < busy.value.remaining_ms <= FAST.ttl_ms
    # The owner may acquire again (a reconnect to the same process): a newer token.
    again = await owner.acquire("s1")
    assert again.token > lease.token


async def test_takeover_after_expiry_fences_the_old_owner(
    stores: tuple[SqliteStore, SqliteStore],
) -> None:
    a, b = stores
    owner = LeaseManager(a, "replica-a", FAST)
    waiting = LeaseManager(b, "replica-b", LeaseSettings(ttl_ms=300, renew_ms=60, wait_ms=3000))
    old = await owner.acquire("s1")
    await a.append_messages("s1", [Message(role="user", content="before")])
    new = await waiting.acquire("s1")  # waits until the unrenewed lease expires
    assert new.token > old.token
    for write in (
        a.append_messages("s1", [Message(role="assistant", content="stale")]),
        a.append_events("s1", [StreamEvent("r1", "delta", {"text": "stale"})]),
        a.update_session(SessionRecord(id="s1", tenant="t", name="stale")),
        a.clear_messages("s1"),
        a.drop_events("s1", "r1"),
        a.edit_messages("s1", lambda messages: messages[:0]),
        a.delete_session("s1"),
    ):
        with pytest.raises(FencedWrite):
            await write
    await b.append_messages("s1", [Message(role="assistant", content="new owner")])
    assert [m.content for m in await b.load_messages("s1")] == ["before", "new owner"]
    assert await b.load_events("s1") == []
    assert (await b.get_session("s1")).name == ""  # type: ignore[union-attr]


async def test_a_stale_owner_cannot_write_the_outbox(
    stores: tuple[SqliteStore, SqliteStore],
) -> None:
    """Outbox writes are batched across sessions in one transaction: the fenced session's
    entries are refused (FencedWrite), the others in the same call are written."""
    a, b = stores
    await a.create_session(SessionRecord(id="s2", tenant="t"))
    owner = LeaseManager(a, "replica-a", FAST)
    await owner.acquire("s1")
    await owner.acquire("s2")
    await a.append_outbox([OutboxBatch("s1", [OutboxEntry(1, "one", 1e12)])], max_age_s=60)
    expire(a.path, "s1")
    await LeaseManager(b, "replica-b", FAST).acquire("s1")
    await b.append_outbox([OutboxBatch("s1", [OutboxEntry(2, "new", 1e12)])], max_age_s=60)
    with pytest.raises(FencedWrite) as fenced:
        await a.append_outbox(
            [
                OutboxBatch("s1", [OutboxEntry(2, "stale", 1e12)], keep_from=2),
                OutboxBatch("s2", [OutboxEntry(1, "s2 fine", 1e12)]),
            ],
            max_age_s=60,
        )
    assert fenced.value.session_id == "s1"
    assert [e.text for e in await b.load_outbox("s1", max_age_s=60)] == ["one", "new"]
    assert [e.text for e in await b.load_outbox("s2", max_age_s=60)] == ["s2 fine"]


async def test_renewal_keeps_the_lease_and_sees_a_takeover(
    stores: tuple[SqliteStore, SqliteStore],
) -> None:
    a, b = stores
    owner = LeaseManager(a, "replica-a", FAST)
    other = LeaseManager(b, "replica-b", FAST)
    lease = await owner.acquire("s1")
    lost = asyncio.Event()
    keeper = asyncio.create_task(owner.keep(lease, lost.set))
    try:
        await asyncio.sleep(FAST.ttl_ms * 3 / 1000)  # well past one TTL: still renewed
        with pytest.raises(LeaseBusy):
            await other.acquire("s1")
        # A takeover (e.g. after this process was paused past its TTL) is noticed.
        expire(a.path, "s1")
        await other.acquire("s1")
        async with asyncio.timeout(5):
            await lost.wait()
        assert lease.lost.is_set()
        assert "s1" not in a.fences  # nothing is written as the owner any more
    finally:
        keeper.cancel()


async def test_release_lets_another_process_in_at_once(
    stores: tuple[SqliteStore, SqliteStore],
) -> None:
    a, b = stores
    slow = LeaseSettings(ttl_ms=60_000, renew_ms=1000, wait_ms=0)
    owner = LeaseManager(a, "replica-a", slow)
    lease = await owner.acquire("s1")
    await owner.release(lease)
    new = await LeaseManager(b, "replica-b", slow).acquire("s1")
    assert new.token == lease.token + 1
    # A stale release (the old owner's) does not free the new owner's lease.
    lease.released = False
    await owner.release(lease)
    with pytest.raises(LeaseBusy):
        await LeaseManager(a, "replica-c", slow).acquire("s1")


async def test_a_live_owner_hands_the_session_over_when_asked(
    stores: tuple[SqliteStore, SqliteStore],
) -> None:
    """A process that wants a session (a client resumed there) asks its owner, which sees
    the request at its next renewal and releases: the wait is a renewal, not a TTL."""
    a, b = stores
    slow = LeaseSettings(ttl_ms=60_000, renew_ms=50, wait_ms=5000)
    owner = LeaseManager(a, "replica-a", slow)
    lease = await owner.acquire("s1")
    asked = asyncio.Event()
    releases: list[asyncio.Task[None]] = []

    def hand_over() -> None:
        asked.set()
        releases.append(asyncio.ensure_future(owner.release(lease)))

    keeper = asyncio.create_task(owner.keep(lease, lambda: None, hand_over))
    try:
        with pytest.raises(LeaseBusy):  # without asking, the owner keeps it
            await LeaseManager(b, "replica-b", LeaseSettings(wait_ms=200)).acquire("s1")
        assert not asked.is_set()
        new = await LeaseManager(b, "replica-b", slow).acquire("s1", handover=True)
        assert asked.is_set() and new.token == lease.token + 1
        # The request is spent: the new owner is not asked to hand over in turn.
        assert await LeaseManager(b, "replica-b", slow)._renew_asked(new) == 1
    finally:
        keeper.cancel()


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
