"""Every StateStore behaves the same: the memory store and the SQLite store."""

from __future__ import annotations

import asyncio
import time

import pytest

from duplex.protocol import Message
from server.state.base import SessionRecord, StreamEvent
from server.state.memory import MemoryStore
from server.state.open import open_store
from tests.conftest import store_url


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(request, tmp_path):
    s = open_store(
        store_url(request.param, tmp_path, request), ttl_s=60, max_sessions=100, max_messages=50
    )
    if request.param == "redis":
        await s._redis.flushdb()
    yield s
    await s.close()


async def test_sessions_messages_events_and_fork(store):
    rec = SessionRecord(id="s1", tenant="t", name="n", variables={"a": "1"})
    await store.create_session(rec)
    got = await store.get_session("s1")
    assert got.tenant == "t" and got.variables == {"a": "1"}
    got.variables["b"] = "2"
    assert (await store.get_session("s1")).variables == {"a": "1"}, "copies, not shared state"
    await store.update_session(got)
    assert (await store.get_session("s1")).variables == {"a": "1", "b": "2"}
    await store.append_messages(
        "s1",
        [
            Message(role="user", content="hi"),
            Message(role="assistant", content="yo", metadata={"k": 1}),
        ],
    )
    msgs = await store.load_messages("s1")
    assert [(m.role, m.content) for m in msgs] == [("user", "hi"), ("assistant", "yo")]
    assert msgs[1].metadata == {"k": 1}
    await store.append_events(
        "s1",
        [StreamEvent("r1", "delta", {"text": "par"}), StreamEvent("r1", "delta", {"text": "tial"})],
    )
    assert [e.data["text"] for e in await store.load_events("s1")] == ["par", "tial"]
    await store.fork("s1", SessionRecord(id="s2", tenant="t", parent_id="s1"))
    await store.append_messages("s2", [Message(role="user", content="fork only")])
    assert len(await store.load_messages("s1")) == 2 and len(await store.load_messages("s2")) == 3
    await store.drop_events("s1", "r1")
    assert await store.load_events("s1") == []
    await store.clear_messages("s1")
    assert await store.load_messages("s1") == []
    await store.delete_session("s2")
    assert await store.get_session("s2") is None
    assert await store.get_session("missing") is None


async def test_message_cap_keeps_the_newest(store):
    await store.create_session(SessionRecord(id="s", tenant="t"))
    for i in range(60):
        await store.append_messages("s", [Message(role="user", content=str(i))])
    msgs = await store.load_messages("s")
    assert len(msgs) == 50 and msgs[0].content == "10" and msgs[-1].content == "59"


async def test_memory_store_ttl_and_lru():
    store = MemoryStore(ttl_s=0.2, max_sessions=3)
    for i in range(4):
        await store.create_session(SessionRecord(id=f"s{i}", tenant="t"))
    assert await store.get_session("s0") is None, "least recently used goes past the cap"
    assert await store.get_session("s1") is not None
    await asyncio.sleep(0.1)
    await store.get_session("s1")  # sliding: touching renews
    await asyncio.sleep(0.15)
    assert await store.get_session("s1") is not None
    assert await store.get_session("s2") is None, "expired after its TTL"


async def test_sqlite_survives_reopen(tmp_path):
    url = f"sqlite:///{tmp_path}/keep.db"
    first = open_store(url, ttl_s=1, max_sessions=1, max_messages=10)
    await first.create_session(SessionRecord(id="s", tenant="t", created_at=time.time()))
    await first.append_messages("s", [Message(role="user", content="persist me")])
    await first.close()
    second = open_store(url, ttl_s=1, max_sessions=1, max_messages=10)
    assert (await second.load_messages("s"))[0].content == "persist me"
    await second.close()


def test_unknown_store_url():
    with pytest.raises(ValueError, match="unsupported store URL"):
        open_store("mongo://x", ttl_s=1, max_sessions=1, max_messages=1)


async def test_two_replicas_share_a_conversation_through_redis(server_factory, redis_url):
    """Scale-out: a session started on one server continues on another."""
    from tests.conftest import TOKEN
    from tests.wsutil import connect, reply_text

    first = server_factory(store_url=redis_url)
    second = server_factory(store_url=redis_url)
    async with connect(first, TOKEN) as c:
        session_id = (await c.recv())["session"]["id"]
        await c.ask("said on the first replica")
    async with connect(second, TOKEN, query=f"session_id={session_id}") as c:
        assert (await c.recv())["session"]["id"] == session_id
        assert "second" in reply_text(await c.ask("and the second"))
    store = open_store(redis_url, ttl_s=60, max_sessions=1, max_messages=50)
    contents = [m.content for m in await store.load_messages(session_id)]
    await store.close()
    assert contents[0] == "said on the first replica" and contents[2] == "and the second"


async def test_a_foreign_lookup_answers_like_an_unknown_one(store):
    await store.create_session(SessionRecord(id="s1", tenant="t"))
    assert await store.get_session("s1", "other") is None
    assert await store.get_session("missing", "other") is None
    assert (await store.get_session("s1", "t")).tenant == "t"
    assert (await store.get_session("s1")).tenant == "t", "no tenant: any (internal use)"
