"""Store faults and durability, over real sessions on loopback.

A close right after ``response.done`` loses nothing and does not hang, on every store;
a Redis outage does not end live sessions and everything lands once Redis is back;
a server killed with SIGKILL mid-answer keeps the user's question.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import websockets

from server.state.open import open_store
from tests.conftest import TOKEN
from tests.wsutil import Conn, connect, reply_text

ROOT = Path(__file__).resolve().parent.parent
#: Safety bound for a session's close, well above the store write timeout used here.
CLOSE_BOUND_S = 15.0


def _free_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.05)


class RedisProcess:
    """A redis-server the test can kill and restart on the same port, keeping its data
    (append-only file, fsync on every write)."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self.binary = binary
        self.workdir = workdir
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_port(self.port, self.proc, "redis-server")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def own_redis(tmp_path):
    redis = RedisProcess(tmp_path)
    redis.start()
    yield redis
    redis.stop()


async def _history(url: str, session_id: str) -> tuple[list[Any], list[Any]]:
    store = open_store(url, ttl_s=600, max_sessions=100, max_messages=1000)
    try:
        return await store.load_messages(session_id), await store.load_events(session_id)
    finally:
        await store.close()


def _live(server: Any, session_id: str) -> Any:
    return server.app.state.duplex.registry.get("tenant-a", session_id)


async def _wait_closed(sessions: list[Any]) -> list[str]:
    """The ids of sessions still not closed after the bound."""
    deadline = time.monotonic() + CLOSE_BOUND_S
    while time.monotonic() < deadline:
        if all(s.done.is_set() for s in sessions):
            return []
        await asyncio.sleep(0.05)
    return [s.id for s in sessions if not s.done.is_set()]


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis"])
async def test_close_right_after_response_done_keeps_every_turn(
    kind, server_factory, tmp_path, request
):
    """A client that hangs up as soon as it has ``response.done``: the finished turn is in
    history exactly once, and the session finishes closing within a bound."""
    if kind == "redis":
        url = request.getfixturevalue("redis_url")
    else:
        url = "memory://" if kind == "memory" else f"sqlite:///{tmp_path}/close.db"
    # Every delta is persisted as it goes: the store is busy when the client hangs up.
    # A hung-up session waits resume_grace_s for a resume, then closes: keep that short.
    server = server_factory(
        store_url=url, store_timeout_s=2.0, persist_min_chars=1, resume_grace_s=0.2
    )
    words = " ".join(f"w{n}" for n in range(60))

    async def one(i: int) -> tuple[str, Any]:
        async with connect(server, TOKEN) as c:
            session_id = (await c.recv())["session"]["id"]
            live = _live(server, session_id)
            events = await c.ask(f"question number {i} {words}")
            assert events[-1]["finish_reason"] == "stop"
            c.ws.transport.abort()  # hang up at once, without a close handshake
        return session_id, live

    done = await asyncio.gather(*(one(i) for i in range(20)))
    hung = await _wait_closed([live for _, live in done])
    if hung:  # where a stuck session waits, for the failure report
        live = next(s for _, s in done if not s.done.is_set())
        for task in list(live._tasks):
            task.print_stack(limit=12)
    assert not hung, f"{len(hung)} of {len(done)} sessions never finished closing"

    async with httpx.AsyncClient(base_url=server.base, timeout=10) as http:
        for i, (session_id, _) in enumerate(done):
            body = (
                await http.get(
                    f"/v1/sessions/{session_id}/messages",
                    headers={"Authorization": f"Bearer {TOKEN}"},
                )
            ).json()
            got = [(m["role"], m["content"]) for m in body["messages"]]
            assert got == [
                ("user", f"question number {i} {words}"),
                ("assistant", f"You said: \u201cquestion number {i} {words}\u201d"),
            ], f"session {i}: {got} (in progress: {body['in_progress']})"
            assert body["in_progress"] == []


async def _ask(c: Conn, text: str, timeout: float = 20) -> list[dict[str, Any]]:
    await c.send({"type": "input.text", "text": text, "final": True})
    return await c.until("response.done", timeout=timeout)


async def test_redis_outage_mid_session(own_redis, server_factory):
    """Redis killed mid-session: the session goes on (the client gets a ``warning``),
    new sessions and /readyz answer 503, and every turn is written once Redis is back."""
    server = server_factory(store_url=own_redis.url, store_timeout_s=1.0)
    async with httpx.AsyncClient(base_url=server.base, timeout=10) as http:
        assert (await http.get("/readyz")).status_code == 200
        async with connect(server, TOKEN) as c:
            session_id = (await c.recv())["session"]["id"]
            await c.ask("before the outage")

            own_redis.kill()
            events = await _ask(c, "during the outage")
            assert "during the outage" in reply_text(events)
            assert not [e for e in c.seen if e["type"] == "error"]
            warnings = [e["code"] for e in c.seen if e["type"] == "warning"]
            assert warnings == ["store_unavailable"]

            ready = await http.get("/readyz")
            assert ready.status_code == 503
            assert "store" in ready.json()["reason"]
            created = await http.post(
                "/v1/sessions", json={}, headers={"Authorization": f"Bearer {TOKEN}"}
            )
            assert created.status_code == 503 and "store" in created.json()["detail"]
            async with connect(server, TOKEN) as other:
                refused = await other.recv()
                assert refused["type"] == "error" and refused["code"] == 503
                assert refused["fatal"] and "store" in refused["message"]
            answered = await http.post(
                f"/v1/sessions/{session_id}/completions",
                json={"question": "by the chat door", "stream": False},
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            assert answered.status_code == 503, answered.text
            chat_url = server.base.replace("http", "ws", 1) + f"/v1/ws/chat?token={TOKEN}"
            async with websockets.connect(chat_url) as chat:
                await chat.send(json.dumps({"type": "chat", "question": "hi", "stream": False}))
                envelope = json.loads(await asyncio.wait_for(chat.recv(), 10))
                assert envelope["code"] == 503 and "store" in envelope["message"]

            events = await _ask(c, "still during the outage")
            assert "still during" in reply_text(events)

            own_redis.start()
            deadline = time.monotonic() + 20
            while (await http.get("/readyz")).status_code != 200:
                assert time.monotonic() < deadline, "readyz never came back"
                await asyncio.sleep(0.1)
            events = await c.ask("after the outage")
            assert "after the outage" in reply_text(events)
            warnings = [e["code"] for e in c.seen if e["type"] == "warning"]
            assert warnings == ["store_unavailable", "store_restored"]

    messages, in_progress = await _history(own_redis.url, session_id)
    users = [m.content for m in messages if m.role == "user"]
    assert users == [
        "before the outage",
        "during the outage",
        "still during the outage",
        "after the outage",
    ]
    assert len([m for m in messages if m.role == "assistant"]) == 4
    assert in_progress == []


def _pcm(seconds: float, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return (np.sin(2 * np.pi * 220 * t) * 8000).astype("<i2").tobytes()


def _serve(port: int, db: Path, cwd: Path) -> subprocess.Popen[bytes]:
    """``duplex serve`` on a loopback port with a SQLite store, as its own process."""
    # The kill test commits 3 s of audio in which the VAD finds no turn: a VAD session
    # keeps that much between turns only when configured to (docs/limits.md).
    env = dict(
        os.environ, PYTHONPATH=str(ROOT), DUPLEX_ECHO_PACE="1.0", DUPLEX_VAD_IDLE_HISTORY_MS="5000"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server.cli",  # what the `duplex` command runs
            "serve",
            "--port",
            str(port),
            "--token",
            f"{TOKEN}:tenant-a",
            "--store",
            f"sqlite:///{db}",
            "--log-level",
            "warning",
        ],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_port(port, proc, "duplex serve")
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


async def test_kill_9_mid_answer_keeps_the_question(tmp_path):
    """A server killed with SIGKILL while it answers: the user's turn is in history, the
    cut answer is stored and ended as interrupted (never dropped silently), and the
    client's retry with the same ``request_id`` on a new server stores it only once."""
    db = tmp_path / "kill.db"
    port = _free_port()
    url = f"ws://127.0.0.1:{port}/v1/duplex"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    proc = await asyncio.to_thread(_serve, port, db, tmp_path)
    try:
        async with websockets.connect(url, additional_headers=headers) as ws:
            c = Conn(ws)
            session_id = (await c.recv())["session"]["id"]
            await c.send({"type": "input.text", "text": "what did I ask?", "final": False})
            await c.send(_pcm(3.0))
            await c.send({"type": "input.commit", "request_id": "q1"})
            while True:  # the answer is streaming (3 s of paced audio)
                event = await c.recv()
                if event["type"] == "chunk" and event.get("media"):
                    break
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
    finally:
        _stop(proc)
    messages, _ = await _history(f"sqlite:///{db}", session_id)
    users = [m for m in messages if m.role == "user"]
    assert [m.content for m in users] == ["what did I ask?"], messages
    assert users[0].metadata.get("audio_ms") == pytest.approx(3000, abs=50)
    assert users[0].metadata.get("request_id") == "q1"

    proc = await asyncio.to_thread(_serve, port, db, tmp_path)
    try:
        async with websockets.connect(
            f"{url}?session_id={session_id}", additional_headers=headers
        ) as ws:
            c = Conn(ws)
            await c.recv()
            await c.send(
                {"type": "input.text", "text": "what did I ask?", "final": True, "request_id": "q1"}
            )
            # The answer the killed server was streaming ends first, interrupted (the
            # SQLite file holds the session's lease: the new server takes the session
            # over once the dead one's lease expires, as a Redis replica would).
            cut = await c.until("response.done", timeout=20)
            assert [e["type"] for e in cut] == ["chunk", "response.done"]
            assert cut[0]["interrupted"] and cut[-1]["finish_reason"] == "interrupted"
            events = await c.until("response.done", timeout=20)
            assert events[-1]["finish_reason"] == "stop"
    finally:
        _stop(proc)
    messages, _ = await _history(f"sqlite:///{db}", session_id)
    assert [(m.role, m.metadata.get("request_id")) for m in messages] == [
        ("user", "q1"),
        ("assistant", None),
        ("assistant", "q1"),
    ]
    assert messages[1].metadata["finish_reason"] == "interrupted"
    assert messages[1].metadata["interrupted"] == "replica_lost"
    assert messages[1].metadata["response_id"] == cut[-1]["response_id"]


async def test_backlog_is_bounded_and_written_when_redis_is_back(own_redis, caplog):
    """Writes during an outage wait in a bounded backlog (the oldest go first, with a
    warning) and land, once each, when Redis is back."""
    from duplex.protocol import Message
    from server.state.base import SessionRecord, StoreUnavailable
    from server.state.resilient import ResilientStore

    store = ResilientStore(
        open_store(own_redis.url, ttl_s=600, max_sessions=10, max_messages=100),
        timeout_s=1.0,
        backlog_max_writes=3,
    )
    try:
        await store.create_session(SessionRecord(id="s1", tenant="t"))
        own_redis.kill()
        for n in range(5):
            await store.append_messages("s1", [Message(role="user", content=f"m{n}")])
        assert store.unavailable() is not None
        assert "backlog full" in caplog.text
        with pytest.raises(StoreUnavailable):
            await store.create_session(SessionRecord(id="s2", tenant="t"))
        own_redis.start()
        deadline = time.monotonic() + 20
        while store.unavailable() is not None:
            assert time.monotonic() < deadline, "the backlog was never written"
            await asyncio.sleep(0.05)
        assert [m.content for m in await store.load_messages("s1")] == ["m2", "m3", "m4"]
    finally:
        await store.close()


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_close_right_after_an_interrupted_response(kind, server_factory, tmp_path, request):
    """An interrupted answer is stored after ``response.done`` (cut to what was played):
    a client that hangs up at once still finds it in history, once, and the close ends."""
    from tests.speech import synth

    url = request.getfixturevalue("redis_url") if kind == "redis" else f"sqlite:///{tmp_path}/i.db"
    # A short resume grace: the session closes soon after the hang-up (see above).
    server = server_factory(store_url=url, store_timeout_s=2.0, echo_pace=1.0, resume_grace_s=0.2)
    speech = synth("Could you tell me about the weather tomorrow please", "en", 150)
    pcm = np.concatenate([speech, np.zeros(16000, dtype=np.int16)]).astype("<i2").tobytes()
    async with connect(server, TOKEN) as c:
        session_id = (await c.recv())["session"]["id"]
        live = _live(server, session_id)
        for pos in range(0, len(pcm), 640):
            await c.send(pcm[pos : pos + 640])
        response_id = (await c.until("response.started", timeout=20))[-1]["response_id"]
        audio_chunks = 0
        while audio_chunks < 3:
            event = await c.recv()
            audio_chunks += event["type"] == "chunk" and "media" in event
        await c.send({"type": "playback", "response_id": response_id, "played_ms": 200})
        talk = speech[:16000].astype("<i2").tobytes()
        for pos in range(0, len(talk), 640):
            await c.send(talk[pos : pos + 640])
        events = await c.until("response.done", timeout=10)
        assert events[-1]["finish_reason"] == "interrupted"
        c.ws.transport.abort()
    assert not await _wait_closed([live])
    async with httpx.AsyncClient(base_url=server.base, timeout=10) as http:
        messages = (
            await http.get(
                f"/v1/sessions/{session_id}/messages", headers={"Authorization": f"Bearer {TOKEN}"}
            )
        ).json()["messages"]
    answers = [m for m in messages if m["metadata"].get("response_id") == response_id]
    assert len(answers) == 1 and answers[0]["metadata"]["finish_reason"] == "interrupted"
    assert answers[0]["metadata"]["played_ms"] == 200
    assert [m["role"] for m in messages] == ["user", "assistant"]
