"""Redis store: conversations shared by every replica behind a load balancer.

Keys (all under ``prefix``, all with a sliding TTL):
``session:{id}`` (JSON record), ``messages:{id}`` (list of JSON messages, trimmed to the
newest ``max_messages``), ``responses:{id}`` (set of response ids with stream events),
``events:{id}:{response_id}`` (list of JSON events) and ``outbox:{id}`` (sorted set of sent
messages scored by ``seq``, each member ``"{at} {json}"``; it expires ``outbox_max_age_s`` after
its last write); ``revoked:{key}`` (the deny list of client tokens) expires at its entry's
time instead.

Writes of a session this process holds a lease on (``fences``, kept by
``server.lease``) are fenced: each checks, atomically with the write (WATCH), that
``fence:{id}`` still holds this process's token, else raises ``FencedWrite``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.exceptions import WatchError

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

#: KEYS: per session its outbox key, then its fence key. ARGV: ttl, then per session: the
#: fencing token this process holds ("" when it holds no lease), entry count, keep_from
#: ("" for none), and (seq, member) per entry. A session whose fence moved on (another
#: replica took it over) is skipped, atomically: its index (1-based) is returned. All
#: keys in one call: a single Redis, not a cluster.
_APPEND_OUTBOX = """
local ttl = ARGV[1]
local i = 2
local fenced = {}
for k = 1, #KEYS, 2 do
  local token = ARGV[i]
  local n = tonumber(ARGV[i + 1])
  local keep = ARGV[i + 2]
  i = i + 3
  if token ~= '' and redis.call('GET', KEYS[k + 1]) ~= token then
    table.insert(fenced, (k + 1) / 2)
    i = i + 2 * n
  else
    for _ = 1, n do
      redis.call('ZADD', KEYS[k], ARGV[i], ARGV[i + 1])
      i = i + 2
    end
    if keep ~= '' then
      redis.call('ZREMRANGEBYSCORE', KEYS[k], '-inf', '(' .. keep)
    end
    redis.call('EXPIRE', KEYS[k], ttl)
  end
end
return fenced
"""

#: The record if it exists and (when ARGV[1] is not empty) belongs to tenant ARGV[1];
#: only then the TTLs slide. One round trip either way: a foreign id is answered like an
#: unknown one, and another tenant's keys are never written.
_GET_SESSION = """
local raw = redis.call('GET', KEYS[1])
if not raw then return false end
if ARGV[1] ~= '' then
  local ok, record = pcall(cjson.decode, raw)
  if not ok or type(record) ~= 'table' or record['tenant'] ~= ARGV[1] then return false end
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return raw
"""

#: Tries of a message edit that concurrent writes keep invalidating (WATCH).
EDIT_TRIES = 8

#: Socket timeouts: a dead or unreachable Redis fails a call instead of stalling it.
SOCKET_TIMEOUT_S = 5.0
#: Connections to Redis per process (redis-py's default pool size).
POOL_CONNECTIONS = 100


class RedisStore(StateStore):
    transient_errors = (
        redis.exceptions.ConnectionError,
        redis.exceptions.TimeoutError,
        redis.exceptions.BusyLoadingError,
    )
    driver_errors = (redis.exceptions.RedisError,)
    shared = True

    def __init__(
        self,
        url: str,
        *,
        ttl_s: float = 86400,
        max_messages: int = 1000,
        prefix: str = "duplex:",
    ) -> None:
        # A blocking pool: with more commands in flight than connections (hundreds of live
        # sessions writing at once), a command waits for a connection (at most the socket
        # timeout) instead of failing with MaxConnectionsError, which looks like an outage.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=POOL_CONNECTIONS,
            timeout=SOCKET_TIMEOUT_S,
            decode_responses=True,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=SOCKET_TIMEOUT_S,
        )
        self._redis = aioredis.Redis.from_pool(pool)  # closed with the client
        self._ttl = max(1, int(ttl_s))
        self._max_messages = max_messages
        self._p = prefix
        self._get_session = self._redis.register_script(_GET_SESSION)
        self._append_outbox = self._redis.register_script(_APPEND_OUTBOX)
        #: Session id -> this process's fencing token, for sessions it holds a lease on.
        self.fences: dict[str, int] = {}

    @property
    def redis(self) -> aioredis.Redis:
        return self._redis

    def _k(self, kind: str, *parts: str) -> str:
        return self._p + kind + ":" + ":".join(parts)

    key = _k

    def fence_key(self, session_id: str) -> str:
        return self._k("fence", session_id)

    @asynccontextmanager
    async def _tx(self, session_id: str) -> AsyncIterator[Any]:
        """A transaction pipeline for writes of ``session_id``; fenced when this process
        holds its lease: WATCH the fence, check the token, and the EXEC fails if another
        replica takes the session in between."""
        token = self.fences.get(session_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            if token is not None:
                key = self.fence_key(session_id)
                await pipe.watch(key)
                if await pipe.get(key) != str(token):
                    raise FencedWrite(session_id)
                pipe.multi()
            try:
                yield pipe
            except WatchError:
                raise FencedWrite(session_id) from None

    async def _write(self, session_id: str, fill: Callable[[Any], object]) -> None:
        """Run ``fill(pipe)``'s commands as one fenced transaction. The WATCH also fires
        when the fence is only touched (its TTL refreshed by a lease renewal) while the
        token is still ours: then the write is tried again (at most twice more)."""
        for attempt in range(3):
            try:
                async with self._tx(session_id) as pipe:
                    fill(pipe)
                    await pipe.execute()
                return
            except FencedWrite:
                token = self.fences.get(session_id)
                if attempt == 2 or token is None:
                    raise
                if await self._redis.get(self.fence_key(session_id)) != str(token):
                    raise  # taken over: never retried

    # ---- sessions -----------------------------------------------------------------------

    async def create_session(self, record: SessionRecord) -> None:
        raw = json.dumps(dataclasses.asdict(record))
        await self._write(
            record.id, lambda pipe: pipe.set(self._k("session", record.id), raw, ex=self._ttl)
        )

    async def update_session(self, record: SessionRecord) -> None:
        await self.create_session(record)

    async def get_session(self, session_id: str, tenant: str | None = None) -> SessionRecord | None:
        raw = await self._get_session(
            keys=[self._k("session", session_id), self._k("messages", session_id)],
            args=[tenant or "", self._ttl],
        )
        if raw is None:
            return None
        return SessionRecord.from_dict(json.loads(raw))

    async def delete_session(self, session_id: str) -> None:
        responses = await self._redis.smembers(self._k("responses", session_id))
        keys = [
            self._k("session", session_id),
            self._k("messages", session_id),
            self._k("responses", session_id),
            self._k("outbox", session_id),
            *(self._k("events", session_id, r) for r in responses),
        ]
        await self._write(session_id, lambda pipe: pipe.delete(*keys))

    # ---- messages -----------------------------------------------------------------------

    async def load_messages(self, session_id: str) -> list[Message]:
        rows = await self._redis.lrange(self._k("messages", session_id), 0, -1)
        return [Message.model_validate_json(row) for row in rows]

    async def append_messages(self, session_id: str, messages: list[Message]) -> None:
        if not messages:
            return
        key = self._k("messages", session_id)
        rows = [m.model_dump_json() for m in messages]

        def fill(pipe: Any) -> None:
            pipe.rpush(key, *rows)
            pipe.ltrim(key, -self._max_messages, -1)
            pipe.expire(key, self._ttl)

        await self._write(session_id, fill)

    async def clear_messages(self, session_id: str) -> None:
        responses = await self._redis.smembers(self._k("responses", session_id))
        keys = [
            self._k("messages", session_id),
            self._k("responses", session_id),
            *(self._k("events", session_id, r) for r in responses),
        ]
        await self._write(session_id, lambda pipe: pipe.delete(*keys))

    async def edit_messages(self, session_id: str, edit: MessageEdit) -> list[Message] | None:
        """WATCH the list (and the fence), read it, rewrite it in one MULTI/EXEC: readers
        see the old list or the new one; an append in between makes the EXEC fail, and
        the edit runs again on the newer list."""
        key = self._k("messages", session_id)
        fence = self.fence_key(session_id)
        for _ in range(EDIT_TRIES):
            token = self.fences.get(session_id)
            async with self._redis.pipeline(transaction=True) as pipe:
                await pipe.watch(key, *([fence] if token is not None else []))
                if token is not None and await pipe.get(fence) != str(token):
                    raise FencedWrite(session_id)
                rows = await pipe.lrange(key, 0, -1)
                edited = edit([Message.model_validate_json(row) for row in rows])
                if edited is None:
                    return None
                pipe.multi()
                pipe.delete(key)
                if edited:
                    pipe.rpush(key, *(m.model_dump_json() for m in edited))
                    pipe.expire(key, self._ttl)
                try:
                    await pipe.execute()
                    return edited
                except WatchError:
                    continue  # a concurrent write (or a lease renewal): read again
        raise redis.exceptions.TimeoutError(
            f"session {session_id}: messages kept changing during {EDIT_TRIES} edits"
        )

    # ---- stream events ------------------------------------------------------------------

    async def append_events(self, session_id: str, events: list[StreamEvent]) -> None:
        def fill(pipe: Any) -> None:
            for event in events:
                key = self._k("events", session_id, event.response_id)
                pipe.sadd(self._k("responses", session_id), event.response_id)
                pipe.rpush(key, json.dumps(dataclasses.asdict(event)))
                pipe.expire(key, self._ttl)
            pipe.expire(self._k("responses", session_id), self._ttl)

        await self._write(session_id, fill)

    async def load_events(self, session_id: str) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        for response_id in await self._redis.smembers(self._k("responses", session_id)):
            rows = await self._redis.lrange(self._k("events", session_id, response_id), 0, -1)
            events.extend(StreamEvent(**json.loads(row)) for row in rows)
        return sorted(events, key=lambda e: e.created_at)

    async def drop_events(self, session_id: str, response_id: str) -> None:
        def fill(pipe: Any) -> None:
            pipe.delete(self._k("events", session_id, response_id))
            pipe.srem(self._k("responses", session_id), response_id)

        await self._write(session_id, fill)

    # ---- outbox -------------------------------------------------------------------------

    async def append_outbox(self, batches: list[OutboxBatch], *, max_age_s: float) -> None:
        """All sessions' batches in one script call: a pipeline of ZADD and EXPIRE per
        session cost 2.3 ms of client CPU for 50 sessions (redis-py packs and parses
        each command), the script call a fraction of that.

        Fenced like every other write of a session this process holds a lease on: the
        script checks each session's fence; the batches of sessions another replica has
        taken over are not written (the others are), and `FencedWrite` names the first."""
        if not batches:
            return
        keys: list[str] = []
        args: list[str | int | float] = [max(1, int(max_age_s + 1))]
        for batch in batches:
            sid = batch.session_id
            keys += (self._k("outbox", sid), self.fence_key(sid))
            token = self.fences.get(sid)
            args += (
                "" if token is None else str(token),
                len(batch.entries),
                "" if batch.keep_from is None else batch.keep_from,
            )
            for e in batch.entries:
                args += (e.seq, f"{e.at!r} {e.text}")
        fenced = await self._append_outbox(keys=keys, args=args)
        if fenced:
            raise FencedWrite(batches[int(fenced[0]) - 1].session_id)

    async def load_outbox(self, session_id: str, *, max_age_s: float) -> list[OutboxEntry]:
        rows = await self._redis.zrange(self._k("outbox", session_id), 0, -1, withscores=True)
        oldest = time.time() - max_age_s
        entries = []
        for member, score in rows:
            at, _, text = member.partition(" ")
            if float(at) >= oldest:
                entries.append(OutboxEntry(int(score), text, float(at)))
        return entries

    # ---- deny list ----------------------------------------------------------------------

    async def revoke(self, key: str, until: float) -> None:
        await self._redis.set(self._k("revoked", key), "1", exat=max(1, math.ceil(until)))

    async def is_revoked(self, key: str) -> bool:
        return bool(await self._redis.exists(self._k("revoked", key)))

    async def close(self) -> None:
        await self._redis.aclose()
