"""Edits of a stored history after the fact (the Realtime door's ``conversation.item.delete``
and ``truncate``) are atomic in every store: a crash mid-edit, a concurrent reader and a
turn stored meanwhile never see or cause half a rewrite."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis

from duplex.protocol import Message
from server.realtime_door import history
from server.state.base import SessionRecord, StateStore
from server.state.open import open_store
from tests.conftest import store_url

SID = "sess_edit"


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(request, tmp_path):
    s = open_store(
        store_url(request.param, tmp_path, request), ttl_s=60, max_sessions=100, max_messages=50
    )
    if request.param == "redis":
        await s._redis.flushdb()
    await s.create_session(SessionRecord(id=SID, tenant="t"))
    await s.append_messages(SID, conversation())
    yield s
    await s.close()


def conversation() -> list[Message]:
    messages = []
    for n in range(3):
        messages.append(Message(id=f"u{n}", role="user", content=f"q{n}", metadata={"turn_id": n}))
        messages.append(
            Message(
                id=f"a{n}",
                role="assistant",
                content=f"answer number {n} is long",
                metadata={"response_id": f"r{n}", "audio_ms": 1000.0},
            )
        )
    return messages


def ids(messages: list[Message]) -> list[str]:
    return [m.id for m in messages]


def second_turn(m: Message) -> bool:
    return m.metadata.get("turn_id") == 1 or m.metadata.get("response_id") == "r1"


class CrashOnSecondWrite:
    """The store as seen by a process that dies after its first write of the edit."""

    WRITES = frozenset({"clear_messages", "append_messages", "edit_messages"})

    def __init__(self, inner: StateStore) -> None:
        self.inner = inner
        self.writes = 0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)
        if name not in self.WRITES:
            return method

        async def write(*args: Any, **kwargs: Any) -> Any:
            self.writes += 1
            if self.writes > 1:
                raise ConnectionError("the process died here")
            return await method(*args, **kwargs)

        return write


@pytest.mark.parametrize("edit", ["delete", "truncate"])
async def test_a_crash_mid_edit_leaves_the_old_or_the_new_history(store, edit):
    crashing = CrashOnSecondWrite(store)
    try:
        if edit == "delete":
            await history.delete_messages(crashing, SID, second_turn)  # type: ignore[arg-type]
        else:
            await history.truncate_answer(crashing, SID, "r1", 500.0)  # type: ignore[arg-type]
    except ConnectionError:
        pass
    after = await store.load_messages(SID)
    before = ids(conversation())
    edited = [i for i in before if i not in ("u1", "a1")] if edit == "delete" else before
    assert ids(after) in (before, edited), "half a rewrite was left in the store"
    if edit == "truncate" and after[3].metadata.get("played_ms") is not None:
        assert after[3].content == history.cut_text("answer number 1 is long", 500, 1000)


async def test_readers_never_see_half_an_edit(store):
    seen: list[list[str]] = []
    done = asyncio.Event()

    async def read() -> None:
        while not done.is_set():
            seen.append(ids(await store.load_messages(SID)))
            await asyncio.sleep(0)

    reader = asyncio.create_task(read())
    try:
        for n in range(3):
            await asyncio.sleep(0)
            assert await history.truncate_answer(store, SID, f"r{n}", 500.0)
        await asyncio.sleep(0)
        assert await history.delete_messages(store, SID, second_turn)
        await asyncio.sleep(0)
    finally:
        done.set()
        await reader
    whole = ids(conversation())
    allowed = (whole, [i for i in whole if i not in ("u1", "a1")])
    assert seen and all(s in allowed for s in seen), [s for s in seen if s not in allowed][:3]


class AppendAfterRead:
    """A turn is stored just after the edit has read the history."""

    def __init__(self, inner: StateStore) -> None:
        self.inner = inner
        self.appended = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def load_messages(self, session_id: str) -> list[Message]:
        messages = await self.inner.load_messages(session_id)
        if not self.appended:
            self.appended = True
            await self.inner.append_messages(session_id, [Message(id="late", role="user")])
        return messages


async def test_a_turn_stored_during_an_edit_is_kept(store):
    racing = AppendAfterRead(store)
    assert await history.delete_messages(racing, SID, second_turn)  # type: ignore[arg-type]
    after = ids(await store.load_messages(SID))
    assert after == ["u0", "a0", "u2", "a2", "late"]


async def test_redis_edit_runs_again_when_the_list_changes_underneath(redis_url):
    store = open_store(redis_url, ttl_s=60, max_sessions=100, max_messages=50)
    await store._redis.flushdb()
    await store.create_session(SessionRecord(id=SID, tenant="t"))
    await store.append_messages(SID, conversation())
    other = redis.Redis.from_url(redis_url)  # another replica appending, mid-edit
    calls = []

    def drop_second_turn(messages: list[Message]) -> list[Message]:
        calls.append(ids(messages))
        if len(calls) == 1:
            other.rpush(
                store.key("messages", SID), Message(id="late", role="user").model_dump_json()
            )
        return [m for m in messages if not second_turn(m)]

    try:
        edited = await store.edit_messages(SID, drop_second_turn)
        assert len(calls) == 2 and calls[1][-1] == "late"
        assert ids(edited or []) == ids(await store.load_messages(SID))
        assert ids(await store.load_messages(SID)) == ["u0", "a0", "u2", "a2", "late"]
    finally:
        other.close()
        await store.close()
