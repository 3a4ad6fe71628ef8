"""Client -> server loss-free resume, over a real server: input the drop swallowed is sent
again exactly once (``session.resumed`` ``input_received``, docs/protocol.md "Resending
input"), or the caller is told (``input.lost``).

The drop is made by a TCP proxy in the test: it holds what the client writes after a
point (so those frames never reach the server, like frames in a dying socket's buffers),
then aborts both connections and forgets what it held.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import sqlite3
from typing import Any

import numpy as np
import websockets

from duplex.sdk import INPUT_LOST, Client, Reconnect, Session
from server.state.base import SessionRecord
from server.state.sqlite import SqliteStore
from tests.conftest import TOKEN

RATE = 16000
FRAME_MS = 100
FRAME_BYTES = RATE * FRAME_MS // 1000 * 2
#: A masked client frame of FRAME_BYTES: 2 header bytes, 2 of length, 4 of mask.
WIRE_BYTES = FRAME_BYTES + 8


def frames(count: int) -> list[bytes]:
    """Distinct 100 ms frames (each its own tone), so order and repeats show in the echo."""
    t = np.arange(RATE * FRAME_MS // 1000) / RATE
    return [
        (np.sin(2 * np.pi * (200 + 20 * i) * t) * 6000).astype("<i2").tobytes()
        for i in range(count)
    ]


class DropProxy:
    """A loopback TCP proxy; ``hold()`` keeps client bytes from the server, ``drop()``
    aborts every connection and forgets the held bytes (they are lost)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.holding = False
        self.held = 0
        self._transports: list[asyncio.WriteTransport] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._transports += [writer.transport, up_writer.transport]  # type: ignore[list-item]
        await asyncio.gather(
            self._pump(reader, up_writer, client_side=True),
            self._pump(up_reader, writer, client_side=False),
            return_exceptions=True,
        )

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, client_side: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if client_side and self.holding:
                    self.held += len(data)  # never forwarded
                    continue
                writer.write(data)
                await writer.drain()
        finally:
            writer.transport.abort()

    def hold(self) -> None:
        self.holding = True
        self.held = 0

    def drop(self) -> None:
        for transport in self._transports:
            transport.abort()
        self._transports.clear()
        self.holding = False

    async def aclose(self) -> None:
        self.drop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class Seen:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.changed = asyncio.Event()

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self.changed.set()

    async def until(self, match, start: int = 0, timeout: float = 30) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                for event in self.events[start:]:
                    if match(event):
                        return event
                self.changed.clear()
                await self.changed.wait()


async def open_through(proxy: DropProxy, seen: Seen, policy: Reconnect) -> tuple[Client, Session]:
    client = Client(f"ws://127.0.0.1:{proxy.port}/v1/duplex", TOKEN)
    session = await client.connect(on_event=seen, reconnect=policy)
    await session.update(turn_detection={"type": "manual"}, output_audio={"sample_rate": RATE})
    return client, session


async def everything_arrived(session: Session, seen: Seen) -> None:
    """A ping's pong: all sent before it has reached the server (the proxy forwarded it)."""
    start = len(seen.events)
    await session.send({"type": "ping", "id": "sync"})
    await seen.until(lambda e: e["type"] == "pong", start)


async def stream_with_a_drop(
    session: Session, seen: Seen, proxy: DropProxy, audio: list[bytes], lost: range
) -> dict[str, Any]:
    """Stream ``audio`` paced; the frames ``lost`` are swallowed by a dropped connection
    mid-turn; the stream goes on (each send waits for the resume) and the turn is
    committed. Returns the turn's ``response.done``."""
    for frame in audio[: lost.start]:
        await session.send_audio(frame)
        await asyncio.sleep(0.005)
    await everything_arrived(session, seen)
    proxy.hold()
    for frame in audio[lost.start : lost.stop]:
        await session.send_audio(frame)
    async with asyncio.timeout(10):
        while proxy.held < len(lost) * WIRE_BYTES:  # noqa: ASYNC110 - polled counter
            await asyncio.sleep(0.01)
    proxy.drop()  # the held frames are gone; the server sees the socket die (1006)
    for frame in audio[lost.stop :]:
        await session.send_audio(frame)
        await asyncio.sleep(0.005)
    start = len(seen.events)
    await session.commit()
    return await seen.until(lambda e: e["type"] == "response.done", start)


def reply_audio(seen: Seen, response_id: str) -> bytes:
    return b"".join(
        base64.b64decode(e["media"]["data"])
        for e in seen.events
        if e["type"] == "chunk" and e.get("response_id") == response_id and e.get("media")
    )


def turn_ms(seen: Seen) -> float:
    (turn,) = [e for e in seen.events if e["type"] == "turn.ended"]
    return turn["audio_end_ms"] - (turn.get("audio_start_ms") or 0)


async def test_audio_lost_in_a_drop_is_resent_once_and_the_turn_is_whole(server_factory):
    server = server_factory()
    proxy = DropProxy(int(server.base.rsplit(":", 1)[1]))
    await proxy.start()
    seen = Seen()
    audio = frames(30)
    client, session = await open_through(proxy, seen, Reconnect(initial_delay_s=0.05))
    try:
        done = await stream_with_a_drop(session, seen, proxy, audio, range(10, 15))
        assert session.resumes == 1
        (resumed,) = [e for e in seen.events if e["type"] == "session.resumed"]
        # update + 10 frames + ping reached the server; the 5 held frames did not
        assert resumed["input_received"] == 12
        # the held frames, and any sent into the dead socket before the SDK saw it die
        assert session.resent >= 5 and session.input_lost == 0
        assert not [e for e in seen.events if e["type"] == INPUT_LOST]
        assert done["finish_reason"] == "stop"
        # the turn is the whole stream, each frame once and in order
        assert turn_ms(seen) == len(audio) * FRAME_MS
        assert reply_audio(seen, done["response_id"]) == b"".join(audio)
        # the count goes on: a later resume resends nothing
        assert session.sent == 1 + 30 + 1 + 1
    finally:
        await session.close()
        await client.aclose()
        await proxy.aclose()


async def test_a_resend_buffer_too_small_tells_the_caller(server_factory):
    server = server_factory()
    proxy = DropProxy(int(server.base.rsplit(":", 1)[1]))
    await proxy.start()
    seen = Seen()
    audio = frames(20)
    policy = Reconnect(initial_delay_s=0.05, resend_max_messages=3)
    client, session = await open_through(proxy, seen, policy)
    try:
        done = await stream_with_a_drop(session, seen, proxy, audio, range(8, 13))
        (notice,) = [e for e in seen.events if e["type"] == INPUT_LOST]
        assert notice["reason"] == "not_held" and notice["seq"] == 0
        # update + 8 frames + ping arrived; the 5 held frames (and any sent into the dead
        # socket before the SDK saw it die) did not, and the buffer holds only 3
        lost = notice["lost"]
        assert notice["input_received"] == 10 and lost == notice["sent"] - 10 and lost >= 5
        assert session.input_lost == lost and session.resent == 0
        kinds = [e["type"] for e in seen.events]
        assert kinds.index("session.resumed") < kinds.index(INPUT_LOST)
        # nothing is resent (no hole inside what the server has); the session goes on
        assert turn_ms(seen) == (len(audio) - lost) * FRAME_MS
        kept = audio[:8] + audio[8 + lost :]
        assert reply_audio(seen, done["response_id"]) == b"".join(kept)
    finally:
        await session.close()
        await client.aclose()
        await proxy.aclose()


async def open_raw(server, **query) -> websockets.ClientConnection:
    q = "&".join(f"{k}={v}" for k, v in {"token": TOKEN, **query}.items())
    return await websockets.connect(f"{server.ws_url}?{q}", max_size=None)


async def next_of(ws, kind: str) -> dict[str, Any]:
    async with asyncio.timeout(15):
        while (event := json.loads(await ws.recv()))["type"] != kind:
            pass
    return event


async def feed(ws) -> tuple[int, int]:
    """Send 7 messages of every kind the count covers (binary, JSON, a refused one, a
    ping); returns (messages sent, the last ``seq`` seen) once all have arrived."""
    await ws.send(json.dumps({"type": "session.update", "config": {"mode": "vad"}}))
    for frame in frames(3):
        await ws.send(frame)
    await ws.send(json.dumps({"type": "input.text", "text": "half", "final": False}))
    await ws.send(json.dumps({"type": "no.such.type"}))  # refused (error 400): still counted
    await ws.send(json.dumps({"type": "ping", "id": "p"}))
    pong = await next_of(ws, "pong")
    return 7, pong["seq"]


async def test_the_server_counts_every_message_across_resumes(server_factory):
    server = server_factory()
    ws = await open_raw(server)
    session_id = json.loads(await ws.recv())["session"]["id"]
    sent, last = await feed(ws)
    ws.transport.abort()
    # resumed while live (detached)
    ws = await open_raw(server, session_id=session_id, last_seq=last)
    resumed = json.loads(await ws.recv())
    assert resumed["input_received"] == sent
    more, last = await feed(ws)
    # resumed while the old socket still lives: taken over, the count is final
    new = await open_raw(server, session_id=session_id, last_seq=last)
    assert json.loads(await new.recv())["input_received"] == sent + more
    await ws.close()
    await new.close()


async def test_the_count_outlives_the_session_and_is_unknown_after_a_crash(server_factory):
    """No grace: the session closes at the drop and keeps its count in the store; a
    reopen takes it (once). A session whose owner died left none: the field is absent."""
    server = server_factory(resume_grace_s=0)
    store = server.app.state.duplex.services.store
    ws = await open_raw(server)
    session_id = json.loads(await ws.recv())["session"]["id"]
    sent, last = await feed(ws)
    ws.transport.abort()
    registry = server.app.state.duplex.registry
    async with asyncio.timeout(10):
        while registry.get("tenant-a", session_id) is not None:  # noqa: ASYNC110
            await asyncio.sleep(0.02)  # closed, its count stored
    # the memory store's calls touch no loop: safe from the test's thread
    assert (await store.get_session(session_id)).input_received == sent
    ws = await open_raw(server, session_id=session_id, last_seq=last)
    assert json.loads(await ws.recv())["input_received"] == sent
    assert (await store.get_session(session_id)).input_received is None  # live again
    ws.transport.abort()
    async with asyncio.timeout(10):
        while registry.get("tenant-a", session_id) is not None:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    assert (await store.get_session(session_id)).input_received == sent  # nothing since
    # as a replica killed mid-session leaves it: no count
    record = await store.get_session(session_id)
    await store.update_session(dataclasses.replace(record, input_received=None))
    ws = await open_raw(server, session_id=session_id, last_seq=last)
    resumed = json.loads(await ws.recv())
    assert resumed["type"] == "session.resumed" and "input_received" not in resumed
    # counting starts again at 0 from here
    await ws.send(json.dumps({"type": "ping", "id": "p"}))
    pong = await next_of(ws, "pong")
    ws.transport.abort()
    async with asyncio.timeout(10):
        while registry.get("tenant-a", session_id) is not None:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    ws = await open_raw(server, session_id=session_id, last_seq=pong["seq"])
    assert json.loads(await ws.recv())["input_received"] == 1
    await ws.close()


async def test_sqlite_files_made_before_the_count_get_its_column(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE sessions (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, name TEXT NOT NULL "
        "DEFAULT '', variables TEXT NOT NULL, config TEXT NOT NULL, parent_id TEXT, "
        "created_at REAL NOT NULL, updated_at REAL NOT NULL)"
    )
    db.execute("INSERT INTO sessions VALUES ('s1', 't', '', '{}', '{}', NULL, 1.0, 1.0)")
    db.commit()
    db.close()
    store = SqliteStore(str(path))
    try:
        record = await store.get_session("s1")
        assert record is not None and record.input_received is None
        await store.update_session(dataclasses.replace(record, input_received=42))
        assert (await store.get_session("s1")).input_received == 42
        await store.create_session(SessionRecord(id="s2", tenant="t"))
        assert (await store.get_session("s2")).input_received is None
    finally:
        await store.close()
