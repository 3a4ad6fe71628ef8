"""Replicas behind nginx, for real: redis-server, three ``duplex serve`` processes and
nginx configured from deploy/nginx.conf, all on loopback.

- kill -9 of the replica that runs a session, in the middle of an answer: the client
  reconnects through nginx with its ``session_id``, another replica takes the session
  over once the lease has expired; the cut answer is ended and stored as interrupted
  (once), finished turns are in history once, later turns are answered.
- SIGTERM of that replica: readiness 503 and new sessions refused at once, the client is
  told to reconnect, the answer in flight finishes and is stored, then close 1012; the
  client continues on another replica.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import signal
import struct
from typing import Any

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.cluster import TOKEN, Cluster
from tests.wsutil import Conn

RATE = 16000


def tone(seconds: float) -> bytes:
    """PCM s16le mono at 16 kHz: the echo provider plays it back at real time."""
    n = int(RATE * seconds)
    return struct.pack(
        f"<{n}h", *(int(8000 * math.sin(2 * math.pi * 440 * i / RATE)) for i in range(n))
    )


async def connect(url: str, session_id: str | None = None) -> Any:
    query = f"?token={TOKEN}" + (f"&session_id={session_id}" if session_id else "")
    return await websockets.connect(url + query, max_size=None, open_timeout=20)


async def audio_turn(conn: Conn, seconds: float) -> None:
    """One turn of ``seconds`` of audio, ended by a commit (manual turn detection)."""
    audio = base64.b64encode(tone(seconds)).decode()
    await conn.send({"type": "input.audio", "audio": audio})
    await conn.send({"type": "input.commit"})


async def open_session(url: str) -> tuple[Any, Conn, str]:
    ws = await connect(url)
    conn = Conn(ws)
    created = await conn.recv()
    await conn.send({"type": "session.update", "config": {"turn_detection": {"type": "manual"}}})
    await conn.until("session.updated")
    return ws, conn, created["session"]["id"]


async def history(cluster: Cluster, session_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=cluster.base, timeout=10) as http:
        reply = await http.get(
            f"/v1/sessions/{session_id}/messages", headers={"Authorization": f"Bearer {TOKEN}"}
        )
    reply.raise_for_status()
    return reply.json()


def by_response(messages: list[dict[str, Any]], response_id: str) -> list[dict[str, Any]]:
    return [m for m in messages if m["metadata"].get("response_id") == response_id]


async def reconnect(cluster: Cluster, session_id: str, timeout: float = 20) -> tuple[Any, Conn]:
    """Reconnect through nginx until a replica takes the session (503s are retried)."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                ws = await connect(cluster.ws_url, session_id)
            except (InvalidStatus, OSError):
                await asyncio.sleep(0.2)
                continue
            conn = Conn(ws)
            first = await conn.recv()
            assert first["type"] == "session.created", first
            assert first["session"]["id"] == session_id
            return ws, conn


@pytest.fixture(scope="module")
def cluster() -> Any:
    with Cluster(3, env={"DUPLEX_ECHO_PACE": "1", "DUPLEX_DRAIN_TIMEOUT_S": "20"}) as running:
        yield running


async def test_kill_9_of_the_owner_mid_answer(cluster: Cluster) -> None:
    ws, conn, sid = await open_session(cluster.ws_url)
    await audio_turn(conn, 0.3)
    first = await conn.until("response.done", timeout=20)
    assert first[-1]["finish_reason"] == "stop"
    await audio_turn(conn, 6.0)
    started = await conn.until("response.started", timeout=20)
    cut_id = started[-1]["response_id"]
    # Text first, then audio at real time: wait for some audio, then kill the owner.
    while not (e := await conn.recv(timeout=20)).get("media"):
        assert e["type"] != "response.done", e
    owner = cluster.owner(sid)
    assert owner is not None
    cluster.signal(owner, signal.SIGKILL)
    cluster.wait_exit(owner, timeout=10)
    with pytest.raises(ConnectionClosed):
        while True:
            await conn.recv(timeout=10)
    await ws.close()
    try:
        ws2, conn2 = await reconnect(cluster, sid)
        assert cluster.owner(sid) not in (None, owner)
        # The answer the crash cut ends, interrupted, exactly once.
        tail = await conn2.until("response.done", timeout=10)
        assert [e["type"] for e in tail] == ["chunk", "response.done"]
        assert tail[0]["response_id"] == cut_id and tail[0]["interrupted"] is True
        assert tail[1]["response_id"] == cut_id and tail[1]["finish_reason"] == "interrupted"
        stored = await history(cluster, sid)
        assert stored["in_progress"] == []
        cut = by_response(stored["messages"], cut_id)
        assert len(cut) == 1 and cut[0]["metadata"]["finish_reason"] == "interrupted"
        assert cut[0]["content"].startswith("Heard 6.00 s of audio")
        done = by_response(stored["messages"], first[-1]["response_id"])
        assert len(done) == 1 and done[0]["metadata"]["finish_reason"] == "stop"
        # Later turns are answered, on the new owner.
        await conn2.send({"type": "input.text", "text": "still there?", "final": True})
        later = await conn2.until("response.done", timeout=20)
        assert later[-1]["finish_reason"] == "stop"
        await ws2.close()
        stored = await history(cluster, sid)
        assert len(by_response(stored["messages"], later[-1]["response_id"])) == 1
        assert len(by_response(stored["messages"], cut_id)) == 1
    finally:
        cluster.start_replica(owner)


async def test_sigterm_drains_the_owner(cluster: Cluster) -> None:
    _ws, conn, sid = await open_session(cluster.ws_url)
    await audio_turn(conn, 3.0)
    started = await conn.until("response.started", timeout=20)
    response_id = started[-1]["response_id"]
    while not (await conn.recv(timeout=20)).get("media"):
        pass
    owner = cluster.owner(sid)
    assert owner is not None
    replica = cluster.replicas[owner]
    cluster.signal(owner, signal.SIGTERM)
    try:
        # At once: readiness off, new sessions refused (an HTTP 503 to the handshake).
        async with asyncio.timeout(5), httpx.AsyncClient(timeout=2) as http:
            while (await http.get(replica.base + "/readyz")).status_code != 503:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        with pytest.raises(InvalidStatus) as refused:
            await connect(replica.base.replace("http", "ws") + "/v1/duplex")
        assert refused.value.response.status_code == 503
        # ... while new sessions through nginx go to the other replicas.
        other = await connect(cluster.ws_url)
        assert json.loads(await other.recv())["type"] == "session.created"
        await other.close()
        # The client is told to reconnect; the answer in flight finishes; then 1012.
        rest = await conn.until("response.done", timeout=20)
        notices = [e for e in rest if e["type"] == "session.reconnect"]
        assert len(notices) == 1 and notices[0]["reason"] == "draining"
        assert notices[0]["retry_after_ms"] >= 0
        assert rest[-1]["response_id"] == response_id and rest[-1]["finish_reason"] == "stop"
        with pytest.raises(ConnectionClosed) as closed:
            await conn.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
        cluster.wait_exit(owner, timeout=30)
        # The client continues on another replica: the drained answer is stored once.
        ws2, conn2 = await reconnect(cluster, sid)
        assert cluster.owner(sid) not in (None, owner)
        stored = await history(cluster, sid)
        kept = by_response(stored["messages"], response_id)
        assert len(kept) == 1 and kept[0]["metadata"]["finish_reason"] == "stop"
        assert stored["in_progress"] == []
        reply = await conn2.ask("and now?")
        assert reply[-1]["finish_reason"] == "stop"
        await ws2.close()
    finally:
        cluster.start_replica(owner)
