"""Redis store: conversations shared by every replica behind a load balancer.

Keys (all under ``prefix``, all with a sliding TTL):
``session:{id}`` (JSON record), ``messages:{id}`` (list of JSON messages, trimmed to the
newest ``max_messages``), ``responses:{id}`` (set of response ids with stream events)
and ``events:{id}:{response_id}`` (list of JSON events).
"""

from __future__ import annotations

import dataclasses
import json

import redis.asyncio as aioredis

from duplex.protocol import Message
from server.state.base import SessionRecord, StateStore, StreamEvent


class RedisStore(StateStore):
    def __init__(
        self,
        url: str,
        *,
        ttl_s: float = 86400,
        max_messages: int = 1000,
        prefix: str = "duplex:",
    ) -> None:
        self._redis = aioredis.from_url(url, decode_responses=True)
        self._ttl = max(1, int(ttl_s))
        self._max_messages = max_messages
        self._p = prefix

    def _k(self, kind: str, *parts: str) -> str:
        return self._p + kind + ":" + ":".join(parts)

    async def _touch(self, session_id: str) -> None:
        """Slide the TTL of everything the session owns."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in (self._k("session", session_id), self._k("messages", session_id)):
                pipe.expire(key, self._ttl)
            await pipe.execute()

    # ---- sessions -----------------------------------------------------------------------

    async def create_session(self, record: SessionRecord) -> None:
        await self._redis.set(
            self._k("session", record.id), json.dumps(dataclasses.asdict(record)), ex=self._ttl
        )

    async def update_session(self, record: SessionRecord) -> None:
        await self.create_session(record)

    async def get_session(self, session_id: str) -> SessionRecord | None:
        raw = await self._redis.get(self._k("session", session_id))
        if raw is None:
            return None
        await self._touch(session_id)
        return SessionRecord(**json.loads(raw))

    async def delete_session(self, session_id: str) -> None:
        responses = await self._redis.smembers(self._k("responses", session_id))
        await self._redis.delete(
            self._k("session", session_id),
            self._k("messages", session_id),
            self._k("responses", session_id),
            *(self._k("events", session_id, r) for r in responses),
        )

    # ---- messages -----------------------------------------------------------------------

    async def load_messages(self, session_id: str) -> list[Message]:
        rows = await self._redis.lrange(self._k("messages", session_id), 0, -1)
        return [Message.model_validate_json(row) for row in rows]

    async def append_messages(self, session_id: str, messages: list[Message]) -> None:
        if not messages:
            return
        key = self._k("messages", session_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.rpush(key, *(m.model_dump_json() for m in messages))
            pipe.ltrim(key, -self._max_messages, -1)
            pipe.expire(key, self._ttl)
            await pipe.execute()

    async def clear_messages(self, session_id: str) -> None:
        responses = await self._redis.smembers(self._k("responses", session_id))
        await self._redis.delete(
            self._k("messages", session_id),
            self._k("responses", session_id),
            *(self._k("events", session_id, r) for r in responses),
        )

    # ---- stream events ------------------------------------------------------------------

    async def append_events(self, session_id: str, events: list[StreamEvent]) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            for event in events:
                key = self._k("events", session_id, event.response_id)
                pipe.sadd(self._k("responses", session_id), event.response_id)
                pipe.rpush(key, json.dumps(dataclasses.asdict(event)))
                pipe.expire(key, self._ttl)
            pipe.expire(self._k("responses", session_id), self._ttl)
            await pipe.execute()

    async def load_events(self, session_id: str) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        for response_id in await self._redis.smembers(self._k("responses", session_id)):
            rows = await self._redis.lrange(self._k("events", session_id, response_id), 0, -1)
            events.extend(StreamEvent(**json.loads(row)) for row in rows)
        return sorted(events, key=lambda e: e.created_at)

    async def drop_events(self, session_id: str, response_id: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._k("events", session_id, response_id))
            pipe.srem(self._k("responses", session_id), response_id)
            await pipe.execute()

    async def close(self) -> None:
        await self._redis.aclose()
