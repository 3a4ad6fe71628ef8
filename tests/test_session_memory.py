"""What a live session holds besides audio (docs/limits.md "What a session holds, by
cause"): no container sized for the worst case kept for the session's life, and no
message kept once it is written."""

from __future__ import annotations

import asyncio
import collections
import gc
import sys
import tracemalloc
import types
from typing import Any

import pytest

from duplex.protocol import Message, SessionCreated
from server.fifo import Fifo
from server.state.base import SessionRecord
from server.state.memory import MemoryStore
from server.ws_protocol import MAX_ACK_PINGS, DuplexWebSocketProtocol
from tests.conftest import TOKEN
from tests.wsutil import connect


def held_bytes(obj: Any, depth: int = 3) -> int:
    """``getsizeof`` of ``obj``, its ``__dict__`` or slots, and the containers, events and
    futures those hold (not the items a queue holds: it is empty here), ``depth`` deep."""
    seen: set[int] = set()

    def walk(o: Any, d: int) -> int:
        if id(o) in seen or d < 0:
            return 0
        seen.add(id(o))
        size = sys.getsizeof(o)
        parts: list[Any] = []
        if hasattr(o, "__dict__"):
            size += sys.getsizeof(o.__dict__)
            parts += list(vars(o).values())
        for cls in type(o).__mro__:
            for name in getattr(cls, "__slots__", ()):
                if hasattr(o, name):
                    parts.append(getattr(o, name))
        if isinstance(o, list | collections.deque | tuple):
            parts += list(o)
        for part in parts:
            if isinstance(part, list | collections.deque | dict | set | asyncio.Event):
                size += walk(part, d - 1)
        return size

    return walk(obj, depth)


async def test_a_sessions_output_queue_is_small(live_server):
    """asyncio.Queue made three deques and an Event (a fourth) up front: ~2.5 KB, each
    deque's first block sized for 64 items, kept for the session's life."""
    assert held_bytes(asyncio.Queue(256)) > 2000  # what it was, measured the same way
    async with connect(live_server, TOKEN) as c:
        session_id = (await c.recv())["session"]["id"]
        session = live_server.app.state.duplex.registry.get("tenant-a", session_id)
        assert held_bytes(session._out) < 400


async def test_fifo_orders_bounds_and_waits_like_asyncio_queue():
    fifo: Fifo[int] = Fifo(2)
    assert fifo.empty() and not fifo.full() and fifo.maxsize == 2
    fifo.put_nowait(1)
    fifo.put_nowait(2)
    assert fifo.full() and fifo.qsize() == 2
    with pytest.raises(asyncio.QueueFull):
        fifo.put_nowait(3)
    putter = asyncio.ensure_future(fifo.put(3))  # waits for room
    await asyncio.sleep(0)
    assert not putter.done()
    assert fifo.get_nowait() == 1
    await asyncio.wait_for(putter, 5)
    assert [await fifo.get(), await fifo.get()] == [2, 3]
    with pytest.raises(asyncio.QueueEmpty):
        fifo.get_nowait()
    # Getters wait, in order; a cancelled one passes its wake-up on.
    first = asyncio.ensure_future(fifo.get())
    second = asyncio.ensure_future(fifo.get())
    await asyncio.sleep(0)
    fifo.put_nowait(10)
    first.cancel()  # woken, then cancelled before it ran: the item goes to `second`
    assert await asyncio.wait_for(second, 5) == 10
    assert first.cancelled() and fifo.empty()
    assert fifo._getters == [] and fifo._putters == []
    # A cancelled putter leaves no waiter behind.
    fifo.put_nowait(1)
    fifo.put_nowait(2)
    blocked = asyncio.ensure_future(fifo.put(3))
    await asyncio.sleep(0)
    blocked.cancel()
    with pytest.raises(asyncio.CancelledError):
        await blocked
    assert fifo._putters == [] and fifo.qsize() == 2
    unbounded: Fifo[int] = Fifo()
    for i in range(1000):
        unbounded.put_nowait(i)
    assert not unbounded.full() and [unbounded.get_nowait() for _ in range(3)] == [0, 1, 2]


def _writer_locals(task: asyncio.Task[Any]) -> list[Any]:
    """The locals of every frame the task's coroutine chain is suspended in."""
    values: list[Any] = []
    coro: Any = task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
        if frame is not None:
            values += list(frame.f_locals.values())
        coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
        if isinstance(coro, types.GeneratorType):  # asend()/yield-from wrappers
            coro = getattr(coro, "gi_yieldfrom", None)
    return values


async def test_a_written_message_is_not_held_while_the_next_is_awaited(live_server):
    """The greeting (``session.created``, with the whole config) went through the output
    queue; later messages take the direct path, so the writer may wait a long time, or
    forever, for the next queued one: neither the message nor its frame stays referenced
    meanwhile."""
    registry = live_server.app.state.duplex.registry
    async with connect(live_server, TOKEN) as c:
        created = await c.recv()
        session_id = created["session"]["id"]
        await c.send({"type": "ping", "id": "p1"})
        await c.until("pong")
        session = registry.get("tenant-a", session_id)
        writer = session.connection.writer
        gc.collect()
        alive = [
            o for o in gc.get_objects() if type(o) is SessionCreated and o.session.id == session_id
        ]
        assert alive == []
        texts = [v for v in _writer_locals(writer) if isinstance(v, str) and session_id in v]
        assert texts == []


async def test_a_connection_keeps_no_deque_for_its_receive_queue_and_ping_record(live_server):
    """uvicorn's queue of received events (empty while the app keeps up) is a `Fifo`, and
    the delivery pings in flight (at most 4) a list, not deques with 64-slot blocks."""
    async with connect(live_server, TOKEN) as c:
        await c.recv()
        protocols = [o for o in gc.get_objects() if type(o) is DuplexWebSocketProtocol]
        assert protocols
        for proto in protocols:
            if proto.transport is None or proto.transport.is_closing():
                continue
            assert held_bytes(proto.queue) < 400
            assert sys.getsizeof(proto._ack_pings) <= sys.getsizeof([0] * MAX_ACK_PINGS)


async def test_the_memory_store_keeps_a_message_in_little_more_than_its_text():
    """The in-memory store held a pydantic copy of each message (its ``__dict__`` and a
    fields-set: ~600 bytes besides the text); it keeps the values, and gives back equal
    messages (tracemalloc counts what storing adds; the text is shared either way)."""
    store = MemoryStore()
    await store.create_session(SessionRecord(id="sess_mem", tenant="t"))
    messages = [
        Message(role="user" if i % 2 else "assistant", content=f"message number {i}")
        for i in range(200)
    ]
    messages.append(Message(role="tool", content="{}", metadata={"call_id": "c1"}))
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        await store.append_messages("sess_mem", messages)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    added = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert added / len(messages) < 200
    loaded = await store.load_messages("sess_mem")
    assert loaded == messages
    assert loaded[-1].metadata == {"call_id": "c1"} and loaded[0].metadata == {}
    loaded[0].metadata["x"] = 1  # a caller's change does not reach the store
    loaded[-1].metadata["x"] = 1
    again = await store.load_messages("sess_mem")
    assert again[0].metadata == {} and again[-1].metadata == {"call_id": "c1"}


async def test_the_memory_store_keeps_every_field_of_a_message():
    """The in-memory store keeps a message as a tuple of its fields' values: a field
    added to `Message` must be added there too, or it would be lost."""
    store = MemoryStore(ttl_s=60, max_sessions=10, max_messages=10)
    await store.create_session(SessionRecord(id="s", tenant="t"))
    sent = Message(role="user", content="hi", metadata={"k": [1]})
    await store.append_messages("s", [sent])
    (got,) = await store.load_messages("s")
    assert got.model_dump() == sent.model_dump()
    assert set(Message.model_fields) == {"id", "role", "content", "created_at", "metadata"}
