"""Replicas behind nginx, for real: redis-server, three ``duplex serve`` processes and
nginx configured from deploy/nginx.conf, all on loopback. The client is the Python SDK
with its automatic reconnect and resume (``last_seq``), as users run it.

- kill -9 of the replica that runs a session, in the middle of an answer: the SDK
  reconnects through nginx, another replica takes the session over once the lease has
  expired and resumes it from the store's outbox; the cut answer ends as interrupted
  (once), finished turns are in history once, later turns are answered.
- SIGTERM of that replica: readiness 503 and new sessions refused at once, the client is
  told to reconnect, the answer in flight finishes and is stored, then close 1012; the
  SDK resumes on another replica.
- A dropped socket: the SDK resumes through nginx; and a resume sent to another replica
  than the owner: the owner hands the session over, the other replica replays it.

Every test checks what the caller was handed: each ``seq`` at most once, in order, and
no gap that the server did not report (error 410).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import signal
import struct
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from duplex import Client
from duplex.sdk import Reconnect, Session
from tests.cluster import TOKEN, Cluster

RATE = 16000
#: Within the server's resume grace; the failover itself takes about the lease TTL.
RECONNECT = Reconnect(initial_delay_s=0.1, max_delay_s=1.0, max_wait_s=30.0)


def tone(seconds: float) -> bytes:
    """PCM s16le mono at 16 kHz: the echo provider plays it back at real time."""
    n = int(RATE * seconds)
    return struct.pack(
        f"<{n}h", *(int(8000 * math.sin(2 * math.pi * 440 * i / RATE)) for i in range(n))
    )


class Seen:
    """Every event the SDK hands to the caller (its ``on_event``), and waits on them."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._changed = asyncio.Event()

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self._changed.set()

    async def until(
        self, match: Callable[[dict[str, Any]], bool], timeout: float = 30, start: int = 0
    ) -> dict[str, Any]:
        """The first event from index ``start`` on that matches, waiting for it."""
        async with asyncio.timeout(timeout):
            while True:
                for event in self.events[start:]:
                    if match(event):
                        return event
                self._changed.clear()
                await self._changed.wait()

    def of(self, kind: str, response_id: str | None = None) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e["type"] == kind and (response_id is None or e.get("response_id") == response_id)
        ]

    def check_sequence(self) -> None:
        """Each ``seq`` at most once and increasing; a gap only where the server said so."""
        seqs = [e["seq"] for e in self.events if e.get("seq")]
        assert seqs == sorted(set(seqs)), "a seq handed over twice or out of order"
        told = any(e["type"] == "error" and e["code"] == 410 for e in self.events)
        gaps = [(a, b) for a, b in itertools.pairwise(seqs) if b != a + 1]
        assert not gaps or told, f"gaps nobody reported: {gaps}"
        for kind in ("response.started", "response.done"):
            ids = [e["response_id"] for e in self.events if e["type"] == kind]
            assert len(ids) == len(set(ids)), f"a {kind} handed over twice"


async def open_session(cluster: Cluster, seen: Seen, **kwargs: Any) -> tuple[Client, Session]:
    client = Client(cluster.ws_url, TOKEN)
    session = await client.connect(
        on_event=seen, reconnect=kwargs.pop("reconnect", RECONNECT), **kwargs
    )
    await session.update(turn_detection={"type": "manual"})
    return client, session


async def audio_turn(session: Session, seconds: float) -> None:
    await session.send_audio(tone(seconds))
    await session.commit()


async def answer(seen: Seen, session: Session, text: str) -> dict[str, Any]:
    start = len(seen.events)
    await session.send_text(text)
    return await seen.until(lambda e: e["type"] == "response.done", start=start)


async def history(cluster: Cluster, session_id: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=cluster.base, timeout=10) as http:
        reply = await http.get(
            f"/v1/sessions/{session_id}/messages", headers={"Authorization": f"Bearer {TOKEN}"}
        )
    reply.raise_for_status()
    return reply.json()


def by_response(messages: list[dict[str, Any]], response_id: str) -> list[dict[str, Any]]:
    return [m for m in messages if m["metadata"].get("response_id") == response_id]


async def mid_answer(seen: Seen, session: Session, seconds: float) -> str:
    """Start an audio turn and return its response id once some of its audio arrived."""
    start = len(seen.events)
    await audio_turn(session, seconds)
    started = await seen.until(lambda e: e["type"] == "response.started", start=start)
    rid = started["response_id"]
    await seen.until(lambda e: e.get("response_id") == rid and bool(e.get("media")), start=start)
    return rid


@pytest.fixture(scope="module")
def cluster() -> Any:
    with Cluster(3, env={"DUPLEX_ECHO_PACE": "1", "DUPLEX_DRAIN_TIMEOUT_S": "20"}) as running:
        yield running


async def test_kill_9_of_the_owner_mid_answer(cluster: Cluster) -> None:
    seen = Seen()
    client, session = await open_session(cluster, seen)
    owner = None
    try:
        await audio_turn(session, 0.3)
        first = await seen.until(lambda e: e["type"] == "response.done")
        assert first["finish_reason"] == "stop"
        cut_id = await mid_answer(seen, session, 6.0)
        owner = cluster.owner(session.id)
        assert owner is not None
        cluster.signal(owner, signal.SIGKILL)
        await asyncio.to_thread(cluster.wait_exit, owner, 10)  # the SDK reads meanwhile
        # The SDK reconnects through nginx and resumes on another replica by itself.
        done = await seen.until(
            lambda e: e["type"] == "response.done" and e["response_id"] == cut_id, timeout=30
        )
        assert session.resumes >= 1
        assert cluster.owner(session.id) not in (None, owner)
        assert done["finish_reason"] == "interrupted"
        # The dead owner's input count died with it: nothing is resent, the caller is told.
        assert "input_received" not in seen.of("session.resumed")[0]
        (lost,) = seen.of("input.lost")
        assert lost["reason"] == "unknown" and lost["sent"] == 5 and lost["lost"] is None
        assert session.resent == 0
        cut_chunks = [e for e in seen.of("chunk", cut_id) if e.get("interrupted")]
        assert len(cut_chunks) == 1
        stored = await history(cluster, session.id)
        assert stored["in_progress"] == []
        cut = by_response(stored["messages"], cut_id)
        assert len(cut) == 1 and cut[0]["metadata"]["finish_reason"] == "interrupted"
        assert cut[0]["content"].startswith("Heard 6.00 s of audio")
        done_first = by_response(stored["messages"], first["response_id"])
        assert len(done_first) == 1 and done_first[0]["metadata"]["finish_reason"] == "stop"
        # Later turns are answered, on the new owner.
        later = await answer(seen, session, "still there?")
        assert later["finish_reason"] == "stop"
        stored = await history(cluster, session.id)
        assert len(by_response(stored["messages"], later["response_id"])) == 1
        assert len(by_response(stored["messages"], cut_id)) == 1
        seen.check_sequence()
    finally:
        await session.close()
        await client.aclose()
        if owner is not None:
            cluster.start_replica(owner)


async def test_sigterm_drains_the_owner(cluster: Cluster) -> None:
    seen = Seen()
    client, session = await open_session(cluster, seen)
    owner = None
    try:
        response_id = await mid_answer(seen, session, 3.0)
        owner = cluster.owner(session.id)
        assert owner is not None
        replica = cluster.replicas[owner]
        cluster.signal(owner, signal.SIGTERM)
        # At once: readiness off, new sessions refused (an HTTP 503 to the handshake).
        async with asyncio.timeout(5), httpx.AsyncClient(timeout=2) as http:
            while (await http.get(replica.base + "/readyz")).status_code != 503:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(
                replica.base.replace("http", "ws") + f"/v1/duplex?token={TOKEN}"
            )
        assert refused.value.response.status_code == 503
        # ... while new sessions through nginx go to the other replicas.
        other = await websockets.connect(cluster.ws_url + f"?token={TOKEN}", open_timeout=20)
        assert json.loads(await other.recv())["type"] == "session.created"
        await other.close()
        # The client is told to reconnect; the answer in flight finishes (no cut: it ends
        # well within the drain timeout); then 1012, and the SDK resumes elsewhere.
        done = await seen.until(
            lambda e: e["type"] == "response.done" and e["response_id"] == response_id
        )
        assert done["finish_reason"] == "stop"
        notices = seen.of("session.reconnect")
        assert len(notices) == 1 and notices[0]["reason"] == "draining"
        assert seen.events.index(notices[0]) < seen.events.index(done)
        await asyncio.to_thread(cluster.wait_exit, owner, 30)  # the SDK reads meanwhile
        later = await answer(seen, session, "and now?")
        assert later["finish_reason"] == "stop"
        assert session.resumes >= 1
        # The drained owner kept its exact input count: all 3 messages had arrived.
        assert seen.of("session.resumed")[0]["input_received"] == 3
        assert seen.of("input.lost") == [] and session.resent == 0
        assert cluster.owner(session.id) not in (None, owner)
        stored = await history(cluster, session.id)
        kept = by_response(stored["messages"], response_id)
        assert len(kept) == 1 and kept[0]["metadata"]["finish_reason"] == "stop"
        assert stored["in_progress"] == []
        assert len(by_response(stored["messages"], later["response_id"])) == 1
        seen.check_sequence()
    finally:
        await session.close()
        await client.aclose()
        if owner is not None:
            cluster.start_replica(owner)


async def test_a_dropped_socket_resumes_through_nginx(cluster: Cluster) -> None:
    seen = Seen()
    client, session = await open_session(cluster, seen)
    try:
        response_id = await mid_answer(seen, session, 3.0)
        owner = cluster.owner(session.id)
        dropped = len(seen.events)
        session.ws.transport.abort()  # the network drops: no close frame (1006)
        done = await seen.until(
            lambda e: e["type"] == "response.done" and e["response_id"] == response_id
        )
        assert session.resumes == 1
        if cluster.owner(session.id) == owner:  # nginx sent the resume to the owner
            assert done["finish_reason"] == "stop"
            rest = [e for e in seen.events[dropped:] if e.get("response_id") == response_id]
            assert any(e.get("media") for e in rest)  # the rest of the answer arrived
        else:
            assert done["finish_reason"] == "interrupted"
        later = await answer(seen, session, "after the drop")
        assert later["finish_reason"] == "stop"
        stored = await history(cluster, session.id)
        assert len(by_response(stored["messages"], response_id)) == 1
        seen.check_sequence()
    finally:
        await session.close()
        await client.aclose()


async def test_a_resume_on_another_replica_takes_the_session_over(cluster: Cluster) -> None:
    """The owner lives, but the resume reaches another replica: that one asks the owner
    for the session (a Redis message; the owner cuts its answer and lets go), reopens it
    from the store and replays what the client missed."""
    seen = Seen()
    client, session = await open_session(cluster, seen, reconnect=None)
    try:
        response_id = await mid_answer(seen, session, 3.0)
        owner = cluster.owner(session.id)
        assert owner is not None
        last_seq = session.last_seq
        session.ws.transport.abort()
        other = cluster.replicas[(owner + 1) % len(cluster.replicas)]
        url = other.base.replace("http", "ws") + "/v1/duplex"
        query = f"?token={TOKEN}&session_id={session.id}&last_seq={last_seq}"
        async with websockets.connect(url + query, open_timeout=20) as ws:
            resumed = json.loads(await ws.recv())
            assert resumed["type"] == "session.resumed", resumed
            assert resumed["last_seq"] == last_seq
            # counted by the owner, kept at its close, read here: update, audio, commit
            assert resumed["input_received"] == session.sent == 3
            assert cluster.owner(session.id) == other.index
            after = Seen()
            async with asyncio.timeout(20):
                while True:
                    event = json.loads(await ws.recv())
                    after(event)
                    if event["type"] == "response.done" and event["response_id"] == response_id:
                        break
            seqs = [e["seq"] for e in after.events if e.get("seq")]
            assert seqs[0] == resumed["first_seq"] == last_seq + 1
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # no gap, no repeat
            assert after.events[-1]["finish_reason"] == "interrupted"  # cut at the handover
            await ws.send(json.dumps({"type": "input.text", "text": "here now", "final": True}))
            async with asyncio.timeout(20):
                while (event := json.loads(await ws.recv()))["type"] != "response.done":
                    pass
            assert event["finish_reason"] == "stop" and event["seq"] > seqs[-1]
        stored = await history(cluster, session.id)
        assert len(by_response(stored["messages"], response_id)) == 1
        assert stored["in_progress"] == []
    finally:
        await session.close()
        await client.aclose()
