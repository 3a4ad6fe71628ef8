"""Memory is bounded per session and returned at close (no cycles left for a rare full GC)."""

from __future__ import annotations

import asyncio
import gc
import weakref

import numpy as np
import pytest

from tests.conftest import TOKEN
from tests.speech import make_conversation
from tests.wsutil import connect

SILENCE_1S = np.zeros(16000, dtype=np.int16)


@pytest.fixture(scope="module")
def speech() -> bytes:
    conv = make_conversation(seed=11, n_turns=1, voices=["en"], speeds=[160])
    return np.concatenate([conv.audio, SILENCE_1S]).astype("<i2").tobytes()


async def _until_removed(registry, tenant: str, session_id: str) -> None:
    for _ in range(1000):  # at most 10 s
        if registry.get(tenant, session_id) is None:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the session was not removed after its connection closed")


async def test_closed_session_is_freed_by_reference_counting(live_server, speech):
    """A session that streamed audio, got a spoken reply and closed leaves nothing alive,
    with the cyclic GC off: the server freezes the heap and runs full collections
    rarely, so anything left in a cycle would wait there, native buffers included."""
    registry = live_server.app.state.duplex.registry
    gc.collect()
    gc.disable()
    try:
        async with connect(live_server, TOKEN) as c:
            session_id = (await c.recv())["session"]["id"]
            session = registry.get("tenant-a", session_id)
            refs = [weakref.ref(session), weakref.ref(session._mode)]
            refs.append(weakref.ref(session._mode._frames))
            del session
            for i in range(0, len(speech) - 640, 640):
                await c.send(speech[i : i + 640])
            await c.until("response.done", timeout=30)
        await _until_removed(registry, "tenant-a", session_id)
        for _ in range(50):  # the close finishes in tasks of its own: give them turns
            if all(ref() is None for ref in refs):
                break
            await asyncio.sleep(0.02)
        alive = [type(ref()).__name__ for ref in refs if ref() is not None]
        assert alive == []
    finally:
        gc.enable()


async def test_session_ended_by_an_error_is_freed_too(live_server):
    """The fatal path (``fail`` closes in a task of its own) leaves no cycle either."""
    registry = live_server.app.state.duplex.registry
    gc.collect()
    gc.disable()
    try:
        async with connect(live_server, TOKEN) as c:
            session_id = (await c.recv())["session"]["id"]
            session = registry.get("tenant-a", session_id)
            refs = [weakref.ref(session), weakref.ref(session._mode)]
            loop = next(iter(session._tasks)).get_loop()  # the server's, in its own thread
            asyncio.run_coroutine_threadsafe(session.fail(500, "test: fatal"), loop).result(5)
            del session, loop
            event = await c.recv()
            assert event["type"] == "error" and event["fatal"]
        await _until_removed(registry, "tenant-a", session_id)
        for _ in range(50):
            if all(ref() is None for ref in refs):
                break
            await asyncio.sleep(0.02)
        assert [type(ref()).__name__ for ref in refs if ref() is not None] == []
    finally:
        gc.enable()
