"""The drain of one session (`Replica.drain`), in process: what counts as an answer in
flight, and what happens to one the drain timeout cuts."""

from __future__ import annotations

import asyncio
import json
import math
import struct
from typing import Any

import pytest
import websockets

from duplex.protocol import TextChunk
from server.config import Settings
from server.limits import SessionLimits
from server.modes.catalog import builtin_modes
from server.providers.catalog import ProviderCatalog
from server.replica import Replica
from server.session import DuplexSession, SessionServices
from server.state.memory import MemoryStore
from tests.conftest import TOKEN


def make(drain_timeout_s: float, pace: float) -> tuple[Replica, SessionServices]:
    settings = Settings(drain_timeout_s=drain_timeout_s, echo_pace=pace)
    store = MemoryStore()
    services = SessionServices(
        store=store,
        providers=ProviderCatalog.from_settings(settings),
        limits=SessionLimits(),
        modes=builtin_modes(),
    )
    return Replica(settings, store), services


async def read_all(session: DuplexSession) -> list[Any]:
    """Every message the session sends until it closes (as a connection would)."""
    out = []
    async with asyncio.timeout(20):
        async for message in session.response():
            out.append(message)
    return out


def tone(seconds: float) -> bytes:
    n = int(16000 * seconds)
    return struct.pack(
        f"<{n}h", *(int(8000 * math.sin(2 * math.pi * 440 * i / 16000)) for i in range(n))
    )


async def test_a_turn_ended_but_not_queued_yet_counts_as_busy() -> None:
    """Between its end (``turn.ended``) and its place in the queue a turn may wait (video
    frames being decoded, a full output queue): a drain then must still wait for it."""
    replica, services = make(drain_timeout_s=10, pace=0)
    session = await replica.open(services, tenant="t", session_id=None)
    reader = asyncio.create_task(read_all(session))
    frames = session._mode._frames  # type: ignore[attr-defined]
    release = asyncio.Event()
    polled = asyncio.Event()
    poll = frames.poll

    async def slow_poll(**kwargs: Any) -> Any:
        polled.set()
        await release.wait()
        return await poll(**kwargs)

    frames.poll = slow_poll
    turn = asyncio.create_task(session.send_text(TextChunk("hello", final=True)))
    await polled.wait()
    assert session.busy
    drain = asyncio.create_task(replica.drain())
    await asyncio.sleep(0.2)
    assert not drain.done()  # the drain waits for the turn's answer
    release.set()
    await turn
    await asyncio.wait_for(drain, 15)
    out = await reader
    done = [m for m in out if m.type == "response.done"]
    assert len(done) == 1 and done[0].finish_reason == "stop"
    assert [m.type for m in out].index("session.reconnect") < [m.type for m in out].index(
        "response.done"
    )
    assert session.close_code == 1012


async def test_the_drain_timeout_cuts_the_answer_as_interrupted() -> None:
    """Past the drain timeout the answer in flight ends like a barge-in: the interrupted
    chunk and ``response.done`` (interrupted) are sent before the close, and the answer
    is stored as interrupted."""
    replica, services = make(drain_timeout_s=0.5, pace=1.0)
    session = await replica.open(services, tenant="t", session_id=None)
    await session.update({"turn_detection": {"type": "manual"}})
    reader = asyncio.create_task(read_all(session))
    await session.send_audio(tone(4.0))
    await session.commit()
    async with asyncio.timeout(10):
        while not session.responding:  # noqa: ASYNC110 - test poll
            await asyncio.sleep(0.02)
    await asyncio.wait_for(replica.drain(), 15)
    out = await reader
    types = [m.type for m in out]
    done = [m for m in out if m.type == "response.done"]
    assert len(done) == 1 and done[0].finish_reason == "interrupted", types
    cut = [m for m in out if m.type == "chunk" and m.interrupted]
    assert len(cut) == 1 and types.index("chunk", types.index("session.reconnect")) >= 0
    assert session.close_code == 1012
    stored = [m for m in await session.messages() if m.role == "assistant"]
    assert len(stored) == 1 and stored[0].metadata["finish_reason"] == "interrupted"
    assert stored[0].content.startswith("Heard 4.00 s of audio")


async def test_a_draining_server_refuses_and_drains_realtime_sessions(server_factory) -> None:
    """The Realtime door's sessions are the replica's too: refused with 503 while the
    server drains, and a live one is drained (closed) like a /v1/duplex session."""
    server = server_factory(drain_timeout_s=5)
    replica = server.app.state.duplex.replica
    url = server.base.replace("http", "ws", 1) + "/v1/realtime?model=duplex-echo"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with websockets.connect(url, additional_headers=headers) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        live = list(replica._live)
        assert len(live) == 1  # the door's session is the replica's
        loop = next(iter(live[0]._tasks)).get_loop()  # the server's, in its own thread
        drained = asyncio.run_coroutine_threadsafe(replica.drain(), loop)
        async with asyncio.timeout(10):
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    await ws.recv()
        await asyncio.wrap_future(drained)
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(url, additional_headers=headers)
    assert refused.value.response.status_code == 503
