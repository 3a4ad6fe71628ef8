"""One owner per live session across replicas: a lease with a fencing token, in Redis
(replicas anywhere) or in the SQLite file (processes of one machine sharing it:
``duplex serve --workers N``; `SqliteStore` holds the table and the transactions, the
handover request is seen at the owner's next renewal, there is no channel).

A replica that runs a session holds ``lease:{id}`` (value ``replica:token``, expiring
after ``ttl_ms`` unless renewed) and the session's *fencing token*, ``fence:{id}``, a
counter raised by every acquisition. Each store write of the session is checked
against the token atomically (``RedisStore`` watches ``fence:{id}``), so a replica that
lost its lease (paused, partitioned, presumed dead) can never write over the new
owner's: its writes fail with ``FencedWrite``.

Another replica takes a session over once its lease has expired (the owner died) or
was released (the owner drained it); until then it waits, at most ``wait_ms``. The
time a dead owner's sessions stay unreachable is therefore at most ``ttl_ms`` plus the
client's reconnect delay.

A live owner is asked to hand a session over when another replica wants it (a client's
resume landed there): the waiting replica publishes the session id on the owner's
channel ``handover-to:{replica}`` (heard at once) and sets ``handover:{id}`` (seen at the
owner's next renewal, should the message be lost); the owner ends the session there and
releases the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # the redis package is optional (pip install duplex[redis])
    from server.state.redis import RedisStore
    from server.state.sqlite import SqliteStore

log = logging.getLogger(__name__)

#: KEYS: lease, fence, handover. ARGV: replica, ttl_ms, fence_ttl_s.
#: Free, or held by this replica: a new token (the fence goes up; a pending request for
#: a handover is void) -> {1, token}.
#: Held by another replica -> {0, remaining ms, its value}.
_ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder and string.sub(holder, 1, #ARGV[1] + 1) ~= ARGV[1] .. ':' then
  return {0, redis.call('PTTL', KEYS[1]), holder}
end
local token = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. token, 'PX', ARGV[2])
redis.call('DEL', KEYS[3])
return {1, token}
"""

#: KEYS: lease, fence, handover. ARGV: replica, token, ttl_ms, fence_ttl_s. 1 if still the
#: owner (the lease is set again even if it had expired meanwhile, as long as nobody took
#: the session: the fence is unchanged), 2 if so and another replica asks for the session
#: (the request is consumed), else 0.
_RENEW = """
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. ARGV[2], 'PX', ARGV[3])
-- Refreshed only when half spent: touching the fence fires the WATCH of a write in
-- flight (RedisStore then tries it again).
if redis.call('TTL', KEYS[2]) < tonumber(ARGV[4]) / 2 then
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
if redis.call('DEL', KEYS[3]) == 1 then return 2 end
return 1
"""

#: KEYS: lease. ARGV: replica:token. Deleted only if still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LeaseBusy(Exception):
    """Another replica runs the session and its lease did not end within the wait."""

    def __init__(self, session_id: str, remaining_ms: int) -> None:
        super().__init__(f"session {session_id} is live on another replica")
        self.remaining_ms = remaining_ms


@dataclass(frozen=True)
class LeaseSettings:
    #: A lease not renewed for this long is free: the failover time after a crash.
    ttl_ms: int = 2000
    #: Renewed this often (a few renewals may fail before the lease expires).
    renew_ms: int = 500
    #: How long a connect waits for another replica's lease to expire or be released.
    wait_ms: int = 3000
    #: Fencing counters outlive any lease; they expire with the session's data.
    fence_ttl_s: int = 86400


@dataclass
class Lease:
    """This replica's ownership of one session; ``lost`` is set when it is gone."""

    session_id: str
    token: int
    value: str
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    released: bool = False


class LeaseStore(Protocol):
    """Where leases live: the few atomic steps `LeaseManager` is built on."""

    #: Session id -> this process's fencing token (the store checks it on every write).
    fences: dict[str, int]

    async def acquire(
        self, session_id: str, replica: str, s: LeaseSettings
    ) -> tuple[bool, int, str | None]:
        """(True, new token, None), or (False, ms left, the holder's ``replica:token``)."""
        ...

    async def renew(self, session_id: str, replica: str, token: int, s: LeaseSettings) -> int:
        """0: taken over; 1: renewed; 2: renewed, and another replica asks for it."""
        ...

    async def release(self, session_id: str, replica: str, token: int) -> None: ...

    async def ask_handover(self, session_id: str, holder: str, asker: str, ttl_ms: int) -> None:
        """Ask ``holder`` (``replica:token``) to hand the session over; best effort."""
        ...

    async def listen(self, replica: str, asked: Callable[[str], None]) -> None:
        """Call ``asked(session_id)`` for requests as they come, until cancelled (a store
        without a channel returns at once: requests are seen at the next renewal)."""
        ...


class RedisLeases:
    """Leases in the store's Redis (Lua scripts above), requests also on a channel."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.fences = store.fences
        redis = store.redis
        self._acquire = redis.register_script(_ACQUIRE)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    def _keys(self, session_id: str) -> list[str]:
        return [
            self.store.key("lease", session_id),
            self.store.fence_key(session_id),
            self.store.key("handover", session_id),
        ]

    def channel(self, replica: str) -> str:
        return self.store.key("handover-to", replica)

    async def acquire(
        self, session_id: str, replica: str, s: LeaseSettings
    ) -> tuple[bool, int, str | None]:
        ok, value, *holder = await self._acquire(
            keys=self._keys(session_id), args=[replica, s.ttl_ms, s.fence_ttl_s]
        )
        return bool(ok), int(value), holder[0] if holder else None

    async def renew(self, session_id: str, replica: str, token: int, s: LeaseSettings) -> int:
        keys = self._keys(session_id)
        return int(await self._renew(keys=keys, args=[replica, token, s.ttl_ms, s.fence_ttl_s]))

    async def release(self, session_id: str, replica: str, token: int) -> None:
        await self._release(keys=[self.store.key("lease", session_id)], args=[f"{replica}:{token}"])

    async def ask_handover(self, session_id: str, holder: str, asker: str, ttl_ms: int) -> None:
        owner = holder.rsplit(":", 1)[0]
        with contextlib.suppress(*self.store.driver_errors, OSError):
            redis = self.store.redis
            await redis.set(self.store.key("handover", session_id), asker, px=ttl_ms)
            await redis.publish(self.channel(owner), session_id)

    async def listen(self, replica: str, asked: Callable[[str], None]) -> None:
        """Reconnects after a Redis fault."""
        while True:
            try:
                async with self.store.redis.pubsub() as pubsub:
                    await pubsub.subscribe(self.channel(replica))
                    while True:
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=1.0
                        )
                        if message is not None:
                            asked(str(message["data"]))
            except (*self.store.driver_errors, OSError) as exc:
                log.warning("handover channel: %s; listening again in 1 s", exc)
                await asyncio.sleep(1.0)


class SqliteLeases:
    """Leases in the SQLite file (`SqliteStore`'s ``leases`` table, IMMEDIATE
    transactions); the processes share one machine, so one wall clock."""

    def __init__(self, store: SqliteStore) -> None:
        self.store = store
        self.fences = store.fences

    async def acquire(
        self, session_id: str, replica: str, s: LeaseSettings
    ) -> tuple[bool, int, str | None]:
        return await self.store.lease_acquire(session_id, replica, s.ttl_ms)

    async def renew(self, session_id: str, replica: str, token: int, s: LeaseSettings) -> int:
        return await self.store.lease_renew(session_id, replica, token, s.ttl_ms)

    async def release(self, session_id: str, replica: str, token: int) -> None:
        await self.store.lease_release(session_id, replica, token)

    async def ask_handover(self, session_id: str, holder: str, asker: str, ttl_ms: int) -> None:
        with contextlib.suppress(*self.store.transient_errors):
            await self.store.lease_ask_handover(session_id, asker)

    async def listen(self, replica: str, asked: Callable[[str], None]) -> None:
        return


def lease_store(store: RedisStore | SqliteStore) -> LeaseStore:
    redis = hasattr(store, "redis")  # not isinstance: that would import the redis package
    return RedisLeases(store) if redis else SqliteLeases(store)  # type: ignore[arg-type]


class LeaseManager:
    """Acquires, renews and releases session leases in a shared store (Redis, SQLite)."""

    def __init__(
        self, store: RedisStore | SqliteStore, replica: str, settings: LeaseSettings
    ) -> None:
        self.store = store
        self.replica = replica
        self.settings = settings
        self.backend = lease_store(store)
        #: Session id -> what to do when another replica asks for it (`keep`).
        self._handovers: dict[str, Callable[[], None]] = {}

    def _channel(self, replica: str) -> str:
        assert isinstance(self.backend, RedisLeases)
        return self.backend.channel(replica)

    async def listen(self) -> None:
        """Hear handover requests for the sessions this replica keeps (until cancelled)."""
        await self.backend.listen(self.replica, self._asked)

    def _asked(self, session_id: str) -> None:
        entry = self._handovers.get(session_id)
        if entry is not None:
            log.info("[%s] another replica asks for the session", session_id)
            entry()

    async def acquire(self, session_id: str, *, handover: bool = False) -> Lease:
        """Own ``session_id`` (a new fencing token); waits up to ``wait_ms`` for another
        replica's lease to end (``handover``: asking that replica to hand the session
        over), then raises `LeaseBusy`. The store's driver errors propagate."""
        s = self.settings
        deadline = time.monotonic() + s.wait_ms / 1000
        asked = False
        while True:
            ok, value, holder = await self.backend.acquire(session_id, self.replica, s)
            if ok:
                token = value
                self.backend.fences[session_id] = token
                log.debug("[%s] lease acquired (token %d)", session_id, token)
                return Lease(session_id, token, f"{self.replica}:{token}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise LeaseBusy(session_id, int(value))
            if handover and not asked and holder:
                asked = True
                await self.backend.ask_handover(
                    session_id, holder, self.replica, max(1, int(left * 1000))
                )
            # Poll: the holder's lease ends when it expires or is released (soon, once
            # asked to hand over: then poll more often).
            step = 20 if asked else min(value, 100)
            await asyncio.sleep(min(left, max(0.02, step / 1000)))

    async def renew(self, lease: Lease) -> bool:
        """False if the session was taken over (the fence moved on)."""
        return await self._renew_asked(lease) > 0

    async def _renew_asked(self, lease: Lease) -> int:
        """0: taken over; 1: renewed; 2: renewed, and another replica asks for it."""
        return await self.backend.renew(lease.session_id, self.replica, lease.token, self.settings)

    async def keep(
        self,
        lease: Lease,
        on_lost: Callable[[], None],
        on_handover: Callable[[], None] | None = None,
    ) -> None:
        """Renew ``lease`` until cancelled; when the session is taken over, mark it lost
        and call ``on_lost``; when another replica asks for it, call ``on_handover``
        (which ends the session here; renewal goes on until then)."""
        asked = False

        def ask_once() -> None:
            nonlocal asked
            if not asked and on_handover is not None:
                asked = True
                on_handover()

        if on_handover is not None:
            self._handovers[lease.session_id] = ask_once
        try:
            await self._keep(lease, on_lost, ask_once)
        finally:
            if self._handovers.get(lease.session_id) is ask_once:
                del self._handovers[lease.session_id]

    async def _keep(
        self, lease: Lease, on_lost: Callable[[], None], on_handover: Callable[[], None]
    ) -> None:
        s = self.settings
        while True:
            await asyncio.sleep(s.renew_ms / 1000)
            if lease.released:  # given up (handed over): renewing would take it back
                return
            try:
                async with asyncio.timeout(max(s.renew_ms, s.ttl_ms / 2) / 1000):
                    ok = await self._renew_asked(lease)
            except (
                OSError, TimeoutError, *self.store.driver_errors, *self.store.transient_errors
            ) as exc:  # fmt: skip
                # The store is away: keep going, and renew once it is back (the fence
                # then says whether another replica took the session meanwhile).
                log.warning("[%s] lease renewal failed: %s", lease.session_id, exc)
                continue
            if not ok:
                log.warning("[%s] lease lost: another replica took the session", lease.session_id)
                self._forget(lease)
                lease.lost.set()
                on_lost()
                return
            if ok == 2:
                log.info("[%s] another replica asks for the session", lease.session_id)
                on_handover()

    async def release(self, lease: Lease) -> None:
        """Give the session up at once (drained or closed): the next replica need not wait."""
        if lease.released:
            return
        self._forget(lease)
        with contextlib.suppress(
            OSError, TimeoutError, *self.store.driver_errors, *self.store.transient_errors
        ):
            async with asyncio.timeout(self.settings.ttl_ms / 1000):
                await self.backend.release(lease.session_id, self.replica, lease.token)

    def _forget(self, lease: Lease) -> None:
        lease.released = True
        if self.backend.fences.get(lease.session_id) == lease.token:
            del self.backend.fences[lease.session_id]
