"""Session leases and fencing: one owner, and a stale owner cannot write after a takeover.

The tests taking `pair` run on both shared backends: a real redis-server (replicas) and a
SQLite file shared by the processes of one machine (``duplex serve --workers N``); the
others are Redis-specific (tests/test_lease_sqlite.py holds the SQLite-specific ones)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

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
from server.state.redis import RedisStore
from server.state.sqlite import SqliteStore

FAST = LeaseSettings(ttl_ms=300, renew_ms=60, wait_ms=0)
S = TypeVar("S", RedisStore, SqliteStore)


@asynccontextmanager
async def two(a: S, b: S) -> AsyncIterator[tuple[S, S]]:
    """Two processes' stores on the same backend (each has its own connection), with a
    session "s1"; both closed at the end."""
    try:
        await a.create_session(SessionRecord(id="s1", tenant="t"))
        yield a, b
    finally:
        await a.close()
        await b.close()


@asynccontextmanager
async def redis_stores(redis_url: str) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    """Two replicas' stores on the same Redis."""
    a = RedisStore(redis_url, ttl_s=60, prefix="lease-test:")
    b = RedisStore(redis_url, ttl_s=60, prefix="lease-test:")
    await a.redis.flushdb()
    async with two(a, b) as both:
        yield both


def sqlite_stores(path: Path) -> AbstractAsyncContextManager[tuple[SqliteStore, SqliteStore]]:
    """Two processes' stores on the same file."""
    return two(SqliteStore(str(path)), SqliteStore(str(path)))


def expire(path: str, session_id: str) -> None:
    """As if the SQLite lease's holder had stopped renewing a while ago."""
    with sqlite3.connect(path) as db:
        db.execute("UPDATE leases SET expires = 0 WHERE session_id = ?", (session_id,))


class Pair(NamedTuple):
    """Two processes' stores of one backend, and how to expire a session's lease in it."""

    a: RedisStore | SqliteStore
    b: RedisStore | SqliteStore
    expire: Callable[[str], Awaitable[object]]


@pytest.fixture(params=["redis", "sqlite"])
async def pair(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Pair]:
    if request.param == "redis":
        async with redis_stores(request.getfixturevalue("redis_url")) as (ra, rb):
            # As if the lease had expired.
            yield Pair(ra, rb, lambda sid: ra.redis.delete(ra.key("lease", sid)))
    else:
        async with sqlite_stores(tmp_path / "duplex.db") as (sa, sb):

            async def expire_lease(sid: str) -> None:
                expire(sa.path, sid)

            yield Pair(sa, sb, expire_lease)


@pytest.fixture
async def stores(redis_url: str) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    async with redis_stores(redis_url) as both:
        yield both


async def test_one_owner_at_a_time(pair: Pair) -> None:
    a, b, _ = pair
    owner = LeaseManager(a, "replica-a", FAST)
    other = LeaseManager(b, "replica-b", FAST)
    lease = await owner.acquire("s1")
    with pytest.raises(LeaseBusy) as busy:
        await other.acquire("s1")
    assert 0 < busy.value.remaining_ms <= FAST.ttl_ms
    # The owner may acquire again (a reconnect to the same process): a newer token.
    again = await owner.acquire("s1")
    assert again.token > lease.token


async def test_takeover_after_expiry_fences_the_old_owner(pair: Pair) -> None:
    a, b, _ = pair
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


async def test_a_stale_owner_cannot_write_the_outbox(pair: Pair) -> None:
    """Outbox writes are batched across sessions in one call (a Redis script, a SQLite
    transaction): the fenced session's entries are refused (FencedWrite), the others in the
    same call are written."""
    a, b, expire_lease = pair
    await a.create_session(SessionRecord(id="s2", tenant="t"))
    owner = LeaseManager(a, "replica-a", FAST)
    await owner.acquire("s1")
    await owner.acquire("s2")
    await a.append_outbox([OutboxBatch("s1", [OutboxEntry(1, "one", 1e12)])], max_age_s=60)
    await expire_lease("s1")
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


async def test_a_takeover_between_check_and_write_is_fenced(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    """The token check and the write are one transaction: a takeover after the check
    (and before EXEC) still makes the write fail."""
    a, b = stores
    owner = LeaseManager(a, "replica-a", FAST)
    await owner.acquire("s1")
    await a.redis.delete(a.key("lease", "s1"))  # as if it had expired
    with pytest.raises(FencedWrite):
        async with a._tx("s1") as pipe:
            await LeaseManager(b, "replica-b", FAST).acquire("s1")
            pipe.rpush(a.key("messages", "s1"), "stale")
            await pipe.execute()
    assert await a.load_messages("s1") == []


class Renewals:
    """A gate on ``manager``'s renewals, to pause them as a stalled process would."""

    def __init__(self, manager: LeaseManager) -> None:
        self.open = asyncio.Event()
        self.open.set()
        self.idle = asyncio.Event()
        self.idle.set()
        real = manager.backend.renew

        async def renew(*args: Any, **kwargs: Any) -> int:
            await self.open.wait()
            self.idle.clear()
            try:
                return await real(*args, **kwargs)
            finally:
                self.idle.set()

        manager.backend.renew = renew  # type: ignore[method-assign]

    async def pause(self) -> None:
        """Hold the next renewals and wait out the one in flight, if any."""
        self.open.clear()
        async with asyncio.timeout(5):
            await self.idle.wait()

    def resume(self) -> None:
        self.open.set()


async def test_renewal_keeps_the_lease_and_sees_a_takeover(pair: Pair) -> None:
    a, b, expire_lease = pair
    # Renewed every 60 ms, a TTL of 1 s: a loaded machine that stalls this event loop
    # for a few hundred ms must not let the lease lapse (a 300 ms TTL did, under CI load).
    settings = LeaseSettings(ttl_ms=1000, renew_ms=60, wait_ms=0)
    owner = LeaseManager(a, "replica-a", settings)
    other = LeaseManager(b, "replica-b", settings)
    renewals = Renewals(owner)
    lease = await owner.acquire("s1")
    lost = asyncio.Event()
    keeper = asyncio.create_task(owner.keep(lease, lost.set))
    try:
        await asyncio.sleep(settings.ttl_ms * 1.5 / 1000)  # past one TTL: still renewed
        with pytest.raises(LeaseBusy):
            await other.acquire("s1")
        # A takeover after this process was paused past its TTL is noticed. The pause is
        # real: no renewal runs (nor is one in flight) while the lease expires and the
        # other replica takes it, or that renewal could extend the lease first.
        await renewals.pause()
        await expire_lease("s1")
        await other.acquire("s1")
        renewals.resume()
        async with asyncio.timeout(5):
            await lost.wait()
        assert lease.lost.is_set()
        assert "s1" not in a.fences  # nothing is written as the owner any more
    finally:
        keeper.cancel()


async def test_release_lets_another_process_in_at_once(pair: Pair) -> None:
    a, b, _ = pair
    slow = LeaseSettings(ttl_ms=60_000, renew_ms=1000, wait_ms=0)
    owner = LeaseManager(a, "replica-a", slow)
    lease = await owner.acquire("s1")
    await owner.release(lease)
    new = await LeaseManager(b, "replica-b", slow).acquire("s1")
    assert new.token == lease.token + 1
    # A stale release (the old owner's) does not free the new owner's lease.
    await owner.release(lease)
    lease.released = False
    await owner.release(lease)
    with pytest.raises(LeaseBusy):
        await LeaseManager(a, "replica-c", slow).acquire("s1")


async def test_a_live_owner_hands_the_session_over_when_asked(pair: Pair) -> None:
    """A process that wants a session (a client resumed there) asks its owner, which sees
    the request at its next renewal and releases: the wait is a renewal, not a TTL."""
    a, b, _ = pair
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


async def test_a_touched_fence_does_not_fail_the_owners_write(
    stores: tuple[RedisStore, RedisStore], redis_url: str
) -> None:
    """Refreshing the fence's TTL (a lease renewal) modifies the key, which fires the WATCH
    of a write in flight; the owner's write must still succeed (it failed with
    FencedWrite: a session ended with a fatal 500 on a single replica)."""
    import redis as sync_redis

    a, _ = stores
    owner = LeaseManager(a, "replica-a", FAST)
    await owner.acquire("s1")
    touches = 0

    def fill(pipe: object) -> None:
        nonlocal touches
        if touches == 0:  # between the token check and EXEC, like a renewal would
            touches += 1
            with sync_redis.Redis.from_url(redis_url) as other:
                other.expire(a.fence_key("s1"), 86400)
        pipe.rpush(a.key("messages", "s1"), "kept")  # type: ignore[attr-defined]

    await a._write("s1", fill)
    assert touches == 1
    assert await a.redis.lrange(a.key("messages", "s1"), 0, -1) == ["kept"]


async def test_a_handover_request_is_heard_at_once(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    """The request is also published on the owner's channel: an owner that renews only
    every 30 s (past the other replica's 3 s wait) still hands the session over."""
    a, b = stores
    owner = LeaseManager(a, "replica-a", LeaseSettings(ttl_ms=60_000, renew_ms=30_000))
    lease = await owner.acquire("s1")
    releases: list[asyncio.Task[None]] = []
    listener = asyncio.create_task(owner.listen())
    keeper = asyncio.create_task(
        owner.keep(
            lease,
            lambda: None,
            lambda: releases.append(asyncio.ensure_future(owner.release(lease))),
        )
    )
    try:
        async with asyncio.timeout(10):  # until the owner listens
            while (await a.redis.pubsub_numsub(owner._channel("replica-a")))[0][1] == 0:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        waiting = LeaseManager(b, "replica-b", LeaseSettings(ttl_ms=2000, wait_ms=3000))
        new = await waiting.acquire("s1", handover=True)
        assert new.token == lease.token + 1 and len(releases) == 1
    finally:
        keeper.cancel()
        listener.cancel()


async def test_many_sessions_writing_at_once_wait_for_a_connection(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    """More fenced writes in flight than the client's connection pool holds (hundreds of
    live sessions on one process): each waits (bounded) for a connection. redis-py's
    default pool raised MaxConnectionsError past 100, which the server took for an
    outage (new sessions refused, live ones warned)."""
    a, _ = stores
    owner = LeaseManager(a, "replica-a", LeaseSettings(ttl_ms=60_000))
    ids = [f"many-{i}" for i in range(300)]
    for sid in ids:
        await a.create_session(SessionRecord(id=sid, tenant="t"))
        await owner.acquire(sid)
    await asyncio.gather(
        *(a.append_messages(sid, [Message(role="user", content=sid)]) for sid in ids)
    )
    assert [m.content for m in await a.load_messages("many-299")] == ["many-299"]


async def test_a_lease_the_store_cannot_give_is_a_503(
    stores: tuple[RedisStore, RedisStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store fault while taking a session's lease refuses the connect with 503 (the
    client retries), not an internal error (the handshake answered HTTP 500)."""
    from redis.exceptions import MaxConnectionsError

    from duplex.protocol import UNAVAILABLE, ProtocolError
    from server.replica import Replica
    from tests.conftest import make_settings

    a, _ = stores
    replica = Replica(make_settings(store_url="redis://unused"), a)
    assert replica.leases is not None

    async def fault(*args: object, **kwargs: object) -> None:
        raise MaxConnectionsError("Too many connections")

    monkeypatch.setattr(replica.leases.backend, "acquire", fault)
    with pytest.raises(ProtocolError) as refused:
        await replica._claim("s1")
    assert refused.value.code == UNAVAILABLE and refused.value.fatal
