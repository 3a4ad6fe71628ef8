"""Resume after reconnect, over real servers: a dropped socket loses nothing, twice nothing."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
import websockets

from duplex.protocol import RESUME_GAP, parse_server_message
from duplex.sdk import Client, ConnectionLost, NotFoundError, Reconnect
from server.limits import SessionLimits
from server.outbox import Outbox, OutboxWriter
from server.state.base import OutboxBatch, OutboxEntry, SessionRecord
from server.state.memory import MemoryStore
from server.state.open import open_store
from tests.conftest import OTHER_TOKEN, TOKEN, store_url

RATE = 16000
AUDIO_S = 3.0  # the echo plays it back at real time (echo_pace=1): the answer takes 3 s


def tone(seconds: float = AUDIO_S) -> bytes:
    t = np.arange(int(RATE * seconds)) / RATE
    return (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes()


class Reader:
    """Reads one socket; every numbered message is checked and collected."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.got: list[dict] = []

    async def recv(self, timeout: float = 15) -> dict:
        async with asyncio.timeout(timeout):
            raw = await self.ws.recv()
        parse_server_message(raw)
        event = json.loads(raw)
        self.got.append(event)
        return event

    async def until(self, test, timeout: float = 20) -> dict:
        async with asyncio.timeout(timeout):
            while not test(event := await self.recv()):
                pass
        return event


def ws_url(server, **query) -> str:
    q = "&".join(f"{k}={v}" for k, v in query.items())
    return server.ws_url + (f"?{q}" if q else "")


async def open_ws(server, token=TOKEN, **query):
    return await websockets.connect(
        ws_url(server, **query),
        additional_headers={"Authorization": f"Bearer {token}"},
        max_size=None,
    )


async def start_answer(server) -> tuple[Reader, str]:
    """A session whose 3 s audio answer is under way (a few chunks received)."""
    r = Reader(await open_ws(server))
    session_id = (await r.recv())["session"]["id"]
    await r.ws.send(
        json.dumps({"type": "session.update", "config": {"turn_detection": {"type": "manual"}}})
    )
    await r.until(lambda e: e["type"] == "session.updated")
    audio = tone()
    for pos in range(0, len(audio), 640 * 50):
        await r.ws.send(audio[pos : pos + 640 * 50])
    await r.ws.send(json.dumps({"type": "input.commit"}))
    chunks = 0
    while chunks < 5:
        event = await r.recv()
        chunks += event["type"] == "chunk" and "media" in event
    return r, session_id


def drop(ws) -> None:
    """Close the TCP connection under the WebSocket: no close handshake."""
    ws.transport.close()


def audio_seconds(events: list[dict]) -> float:
    total = 0.0
    for e in events:
        media = e.get("media")
        if e["type"] == "chunk" and media and media["mime_type"].startswith("audio/"):
            import base64

            total += len(base64.b64decode(media["data"])) / 2 / media["sample_rate"]
    return total


def check_sequence(events: list[dict]) -> None:
    seqs = [e["seq"] for e in events if e["seq"]]
    assert seqs == sorted(set(seqs)), "a seq twice or out of order"
    assert seqs == list(range(1, len(seqs) + 1)), "a gap in seq"


async def test_resume_after_dropped_socket_replays_the_rest_of_the_answer(server_factory):
    server = server_factory(echo_pace=1.0)
    first, session_id = await start_answer(server)
    last_seq = first.got[-1]["seq"]
    drop(first.ws)
    await asyncio.sleep(2)  # the answer goes on into the outbox meanwhile
    second = Reader(await open_ws(server, session_id=session_id, last_seq=last_seq))
    resumed = await second.recv()
    assert resumed["type"] == "session.resumed" and resumed["seq"] == 0
    assert resumed["session"]["id"] == session_id
    assert resumed["last_seq"] == last_seq and resumed["first_seq"] == last_seq + 1
    await second.until(lambda e: e["type"] == "response.done")
    assert second.got[-1]["finish_reason"] == "stop"
    everything = first.got + second.got[1:]
    check_sequence(everything)
    assert audio_seconds(everything) == pytest.approx(AUDIO_S, abs=0.01)
    # ... and the session goes on live, numbering on
    await second.ws.send(json.dumps({"type": "input.text", "text": "and now", "final": True}))
    await second.until(lambda e: e["type"] == "response.done")
    check_sequence(first.got + second.got[1:])
    await second.ws.close()


async def test_resume_by_first_message(server_factory):
    server = server_factory(echo_pace=1.0)
    first, session_id = await start_answer(server)
    last_seq = first.got[-1]["seq"]
    drop(first.ws)
    second = Reader(await open_ws(server))
    fresh = await second.recv()  # a new session, given way to the resumed one
    assert fresh["type"] == "session.created" and fresh["session"]["id"] != session_id
    await second.ws.send(
        json.dumps({"type": "session.resume", "session_id": session_id, "last_seq": last_seq})
    )
    resumed = await second.recv()
    assert resumed["type"] == "session.resumed" and resumed["session"]["id"] == session_id
    await second.until(lambda e: e["type"] == "response.done")
    everything = first.got + second.got[2:]
    check_sequence(everything)
    assert audio_seconds(everything) == pytest.approx(AUDIO_S, abs=0.01)
    # not the first message: refused, not fatal
    await second.ws.send(
        json.dumps({"type": "session.resume", "session_id": session_id, "last_seq": 1})
    )
    error = await second.until(lambda e: e["type"] == "error")
    assert error["code"] == 400 and not error["fatal"]
    await second.ws.close()
    registry = server.app.state.duplex.registry
    assert registry.get("tenant-a", fresh["session"]["id"]) is None


async def test_gap_the_outbox_cannot_fill_is_a_non_fatal_error(server_factory):
    server = server_factory(outbox_max_messages=4)
    r = Reader(await open_ws(server))
    session_id = (await r.recv())["session"]["id"]
    await r.ws.send(json.dumps({"type": "input.text", "text": " ".join("w" * 30), "final": True}))
    await r.until(lambda e: e["type"] == "response.done")
    last = r.got[-1]["seq"]
    assert last > 6
    drop(r.ws)
    again = Reader(await open_ws(server, session_id=session_id, last_seq=1))
    resumed = await again.recv()
    assert resumed["type"] == "session.resumed" and resumed["first_seq"] == last - 3
    gap = await again.recv()
    assert gap["type"] == "error" and gap["code"] == RESUME_GAP and not gap["fatal"]
    assert f"2..{last - 4}" in gap["message"]
    replayed = [await again.recv() for _ in range(4)]
    assert [e["seq"] for e in replayed] == list(range(last - 3, last + 1))
    await again.ws.send(json.dumps({"type": "input.text", "text": "still here", "final": True}))
    done = await again.until(lambda e: e["type"] == "response.done")
    assert done["seq"] > last
    await again.ws.close()


@pytest.mark.parametrize("by", ["query", "message"])
async def test_other_tenants_session_is_404(server_factory, by):
    server = server_factory()
    r = Reader(await open_ws(server))
    session_id = (await r.recv())["session"]["id"]
    drop(r.ws)  # detached, live: still not theirs
    if by == "query":
        other = Reader(await open_ws(server, OTHER_TOKEN, session_id=session_id, last_seq=1))
    else:
        other = Reader(await open_ws(server, OTHER_TOKEN))
        await other.recv()
        await other.ws.send(
            json.dumps({"type": "session.resume", "session_id": session_id, "last_seq": 1})
        )
    error = await other.until(lambda e: e["type"] == "error")
    assert (
        error["code"] == 404 and error["fatal"] and error["message"].startswith("unknown session")
    )
    with pytest.raises(websockets.ConnectionClosed) as info:
        await other.ws.recv()
    assert info.value.rcvd.code == 1008


async def test_grace_expiry_closes_the_session_and_a_late_resume_reopens_it(server_factory):
    server = server_factory(resume_grace_s=0.5)
    registry = server.app.state.duplex.registry
    r = Reader(await open_ws(server))
    session_id = (await r.recv())["session"]["id"]
    await r.ws.send(json.dumps({"type": "input.text", "text": "remember me", "final": True}))
    await r.until(lambda e: e["type"] == "response.done")
    last = r.got[-1]["seq"]
    drop(r.ws)
    async with asyncio.timeout(10):
        while registry.get("tenant-a", session_id) is None:  # noqa: ASYNC110 - polled state
            await asyncio.sleep(0.02)  # until the server has seen the drop
        while registry.get("tenant-a", session_id) is not None:  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # ... and the grace period is over
    late = Reader(await open_ws(server, session_id=session_id, last_seq=last))
    resumed = await late.recv()
    assert resumed["type"] == "session.resumed" and resumed["first_seq"] == last + 1
    await late.ws.send(json.dumps({"type": "input.text", "text": "again", "final": True}))
    done = await late.until(lambda e: e["type"] == "response.done")
    assert done["seq"] > last
    await late.ws.close()


async def test_resume_while_the_old_socket_lives_takes_it_over(server_factory):
    server = server_factory()
    old = Reader(await open_ws(server))
    session_id = (await old.recv())["session"]["id"]
    new = Reader(await open_ws(server, session_id=session_id, last_seq=1))
    assert (await new.recv())["type"] == "session.resumed"
    with pytest.raises(websockets.ConnectionClosed) as info:
        while True:
            await old.recv()
    assert info.value.rcvd.code == 4001
    await new.ws.send(json.dumps({"type": "input.text", "text": "mine now", "final": True}))
    await new.until(lambda e: e["type"] == "response.done")
    await new.ws.close()


@pytest.mark.parametrize("store", ["memory", "sqlite", "redis"])
async def test_resume_from_the_store_outbox_after_the_session_closed(
    server_factory, store, tmp_path, request
):
    """With no grace the session closes at the drop; its outbox is in the store."""
    url = store_url(store, tmp_path, request)
    server = server_factory(store_url=url, resume_grace_s=0)
    registry = server.app.state.duplex.registry
    r = Reader(await open_ws(server))
    session_id = (await r.recv())["session"]["id"]
    await r.ws.send(json.dumps({"type": "input.text", "text": "kept for later", "final": True}))
    await r.until(lambda e: e["type"] == "response.done")
    drop(r.ws)  # a close 1000 would drop the outbox too (tests/test_clean_close.py)
    async with asyncio.timeout(10):
        while registry.get("tenant-a", session_id) is not None:  # noqa: ASYNC110
            await asyncio.sleep(0.02)  # closed, its outbox in the store
    again = Reader(await open_ws(server, session_id=session_id, last_seq=2))
    assert (await again.recv())["first_seq"] == 3
    replayed = [await again.recv() for _ in range(len(r.got) - 2)]
    assert replayed == r.got[2:]


async def test_sdk_reconnects_and_hands_over_each_message_once(server_factory):
    server = server_factory(echo_pace=1.0)
    async with Client(server.ws_url, TOKEN) as client:
        session = await client.connect(
            reconnect=Reconnect(initial_delay_s=0.05), turn_detection={"type": "manual"}
        )
        got: list[dict] = []

        async def collect() -> None:
            async for event in session.events():
                got.append(event)
                if event["type"] == "response.done":
                    return

        collector = asyncio.ensure_future(collect())
        await asyncio.sleep(0)
        await session.send_audio(tone())
        await session.commit()
        async with asyncio.timeout(15):
            while sum(1 for e in got if "media" in e) < 5:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        drop(session.ws)
        async with asyncio.timeout(20):
            await collector
        assert session.resumes == 1
        numbered = [e for e in got if e["seq"]]
        seqs = [e["seq"] for e in numbered]
        assert seqs == list(range(seqs[0], seqs[-1] + 1)), "each message once, in order"
        assert audio_seconds(numbered) == pytest.approx(AUDIO_S, abs=0.01)
        assert [e["type"] for e in got if not e["seq"]] == ["session.resumed"]
        # sending works on the new socket
        reply = await session.ask("after the drop", stream=False)
        assert "after the drop" in reply.content
        await session.close()


async def test_sdk_gives_up_when_the_session_is_gone(server_factory):
    server = server_factory(resume_grace_s=0)
    async with Client(server.ws_url, TOKEN) as client:
        session = await client.connect(reconnect=Reconnect(initial_delay_s=0.05))
        # the memory store's calls touch no loop: safe to make from the test's thread
        await server.app.state.duplex.services.store.delete_session(session.id)
        drop(session.ws)
        with pytest.raises((NotFoundError, ConnectionLost)):
            async with asyncio.timeout(20):
                await session.ask("anyone?", stream=False)


async def test_sdk_close_while_reconnecting_stops_trying(server_factory):
    server = server_factory()
    async with Client(server.ws_url, TOKEN) as client:
        session = await client.connect(reconnect=Reconnect(initial_delay_s=5))
        drop(session.ws)
        async with asyncio.timeout(5):
            while session._connected.is_set():  # noqa: ASYNC110 - until it sees the drop
                await asyncio.sleep(0.01)
            await session.close()  # does not wait out the backoff
        assert session.resumes == 0
        with pytest.raises(ConnectionLost):
            await session.send_text("anyone?")


# ---- the outbox and the stores -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis"])
async def test_store_outbox_methods(kind, tmp_path, request):
    url = store_url(kind, tmp_path, request)
    store = open_store(url, ttl_s=3600, max_sessions=100, max_messages=100)
    try:
        for sid in ("s1", "s2"):
            await store.create_session(SessionRecord(id=sid, tenant="t"))
        now = time.time()
        entries = [OutboxEntry(i, f'{{"seq":{i}}}', now) for i in range(1, 6)]
        await store.append_outbox(
            [OutboxBatch("s1", entries[:3]), OutboxBatch("s2", entries[:1])], max_age_s=60
        )
        await store.append_outbox([OutboxBatch("s1", entries[3:], keep_from=3)], max_age_s=60)
        got = await store.load_outbox("s1", max_age_s=60)
        assert [(e.seq, e.text) for e in got] == [(i, f'{{"seq":{i}}}') for i in range(3, 6)]
        assert [e.seq for e in await store.load_outbox("s2", max_age_s=60)] == [1]
        old = OutboxEntry(6, '{"seq":6}', now - 120)
        await store.append_outbox([OutboxBatch("s1", [old])], max_age_s=60)
        assert [e.seq for e in await store.load_outbox("s1", max_age_s=60)] == [3, 4, 5]
        assert await store.load_outbox("other", max_age_s=60) == []
        await store.delete_session("s1")
        assert await store.load_outbox("s1", max_age_s=60) == []
    finally:
        await store.close()


class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[dict[str, list[int]]] = []

    async def append_outbox(self, batches, *, max_age_s):
        self.writes.append({b.session_id: [e.seq for e in b.entries] for b in batches})
        await super().append_outbox(batches, max_age_s=max_age_s)


async def test_outbox_bounds_and_one_store_write_for_all_sessions():
    store = CountingStore()
    limits = SessionLimits(outbox_max_messages=5, outbox_max_bytes=40, outbox_flush_ms=50)
    writer = OutboxWriter(store, limits)
    outboxes = {}
    for sid in ("a", "b"):
        await store.create_session(SessionRecord(id=sid, tenant="t"))
        outboxes[sid] = Outbox(sid, writer, limits)
    a, b = outboxes["a"], outboxes["b"]
    for seq in range(1, 9):
        a.append(seq, "x" * 6)  # 6 chars each: the 40-char bound holds 6, the count 5
    b.append(1, "b")
    assert [e.seq for e in a.after(0)] == [4, 5, 6, 7, 8]
    assert [e.seq for e in a.after(6)] == [7, 8]
    a.append(9, "y" * 30)  # over the char bound: older ones go
    assert [e.seq for e in a.after(0)] == [8, 9]
    assert store.writes == []  # nothing written on the hot path
    await asyncio.sleep(0.2)
    # one write for both sessions, without what was trimmed meanwhile
    assert store.writes == [{"a": [8, 9], "b": [1]}]
    a.append(10, "z")
    await a.close()  # a closing session's pending entries are written at once
    assert store.writes[-1] == {"a": [10]}
    assert [e.seq for e in await store.load_outbox("a", max_age_s=60)] == [8, 9, 10]
    await writer.aclose()
