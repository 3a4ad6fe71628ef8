"""``duplex serve --workers N`` and one owner per live session across servers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis as sync_redis
import websockets
from websockets.exceptions import InvalidStatus

from tests.cluster import ROOT, free_port
from tests.conftest import TOKEN
from tests.wsutil import Conn, connect


def serve(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--token", TOKEN, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "DUPLEX_ECHO_PACE": "0", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, port


async def stored(base: str, session_id: str, count: int) -> None:
    """Wait (bounded) until the session's history holds ``count`` messages."""
    async with asyncio.timeout(20), httpx.AsyncClient(base_url=base) as http:
        while True:
            reply = await http.get(
                f"/v1/sessions/{session_id}/messages",
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            messages = reply.json()["messages"]
            if len(messages) >= count:
                assert [m["role"] for m in messages] == ["user", "assistant"] * (count // 2)
                return
            await asyncio.sleep(0.05)


async def take_over(old: Conn, url: str, sid: str, headers: dict[str, str]) -> None:
    """Continue ``sid`` on another server at ``url``: it greets with the same session, the
    old connection is closed with 4001, and the new one answers."""
    async with websockets.connect(url, additional_headers=headers) as ws:
        conn = Conn(ws)
        assert (await conn.recv())["session"]["id"] == sid
        with pytest.raises(websockets.ConnectionClosed) as replaced:
            while True:
                await old.recv()
        assert replaced.value.rcvd is not None and replaced.value.rcvd.code == 4001
        await conn.ask("still me")


def sqlite_url(folder: Path) -> str:
    return f"sqlite:///{folder / 'duplex.db'}"


async def ready(proc: subprocess.Popen[str], port: int) -> str:
    """Wait (bounded) until the server answers /readyz; its replica id."""
    async with asyncio.timeout(60), httpx.AsyncClient() as http:
        while True:
            assert proc.poll() is None, proc.communicate()
            with contextlib.suppress(httpx.TransportError):
                reply = await http.get(f"http://127.0.0.1:{port}/readyz")
                if reply.status_code == 200:
                    return str(reply.json()["replica"])
            await asyncio.sleep(0.1)


def test_workers_refuse_the_in_memory_store() -> None:
    proc, _ = serve("--workers", "2")
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--workers 2 needs a shared store" in lines[0], err


@pytest.mark.parametrize("store", ["redis", "sqlite"])
async def test_two_workers_share_the_port_and_the_store(
    store: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = request.getfixturevalue("redis_url") if store == "redis" else sqlite_url(tmp_path)
    # One configured replica id: each worker still gets its own (leases tell them apart).
    proc, port = serve("--workers", "2", "--store", url, env={"DUPLEX_REPLICA_ID": "box"})
    base = f"http://127.0.0.1:{port}"
    try:
        replicas: set[str] = set()
        async with asyncio.timeout(60):
            while len(replicas) < 2:
                assert proc.poll() is None, proc.communicate()
                try:
                    # A new connection each time: the kernel spreads them over the workers.
                    async with httpx.AsyncClient(base_url=base) as http:
                        reply = await http.get("/readyz")
                    if reply.status_code == 200:
                        replicas.add(reply.json()["replica"])
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
        # A conversation continues whichever worker a reconnect lands on.
        server = type("S", (), {"ws_url": base.replace("http", "ws") + "/v1/duplex"})()
        async with connect(server, TOKEN) as c:
            sid = (await c.recv())["session"]["id"]
            await c.ask("one")
            await stored(base, sid, 2)
        for turn in range(2, 6):
            async with connect(server, TOKEN, query=f"session_id={sid}") as c:
                await c.recv()
                await c.ask("again")
                await stored(base, sid, 2 * turn)
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]


async def test_a_session_runs_on_one_server_at_a_time(server_factory, redis_url: str) -> None:
    """Two servers on one Redis: a connect to the second for a session live on the first
    asks the first to hand it over; the first lets it go (its socket closes with 4001)
    and the second continues it with its history. A holder that does not answer (a lease
    of a replica that is gone, not yet expired) gets HTTP 503 after ``lease_wait_ms``."""
    first = server_factory(store_url=redis_url)
    second = server_factory(store_url=redis_url, lease_wait_ms=300)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with connect(first, TOKEN) as c:
        sid = (await c.recv())["session"]["id"]
        await c.ask("hello")
        url = f"{second.ws_url}?session_id={sid}"
        await take_over(c, url, sid, headers)
        async with httpx.AsyncClient(base_url=second.base, headers=headers) as http:
            history = await http.get(f"/v1/sessions/{sid}/messages")
        contents = [m["content"] for m in history.json()["messages"] if m["role"] == "user"]
        assert contents == ["hello", "still me"]
    # A lease nobody renews or releases (its replica vanished): refused after the wait.
    with sync_redis.Redis.from_url(redis_url) as r:
        r.set(f"duplex:lease:{sid}", "ghost:999", px=60_000)
    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(url, additional_headers=headers)
    assert refused.value.response.status_code == 503
    assert b"live on another replica" in refused.value.response.body


async def test_one_sqlite_file_one_owner_per_session(tmp_path: Path) -> None:
    """Two server processes on one SQLite file (as `--workers 2` runs them, but each on
    its own port so that the test picks the process): a connect to the second for a
    session live on the first asks the first to hand it over (seen at its next lease
    renewal); the first lets it go (its socket closes with 4001) and the second
    continues it with its history, so the session never runs in two processes. A lease
    nobody renews (a process that is gone, its lease not yet expired) gets HTTP 503
    after ``lease_wait_ms``."""
    url = sqlite_url(tmp_path)
    first, first_port = serve("--store", url)
    second, second_port = serve("--store", url, env={"DUPLEX_LEASE_WAIT_MS": "1000"})
    headers = {"Authorization": f"Bearer {TOKEN}"}
    try:
        ids = {await ready(first, first_port), await ready(second, second_port)}
        assert len(ids) == 2
        a = type("S", (), {"ws_url": f"ws://127.0.0.1:{first_port}/v1/duplex"})()
        async with connect(a, TOKEN) as c:
            sid = (await c.recv())["session"]["id"]
            await c.ask("hello")
            await stored(f"http://127.0.0.1:{first_port}", sid, 2)
            url_b = f"ws://127.0.0.1:{second_port}/v1/duplex?session_id={sid}"
            await take_over(c, url_b, sid, headers)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{first_port}") as http:
            await stored(f"http://127.0.0.1:{first_port}", sid, 4)
            history = await http.get(f"/v1/sessions/{sid}/messages", headers=headers)
        contents = [m["content"] for m in history.json()["messages"] if m["role"] == "user"]
        assert contents == ["hello", "still me"]
        # A lease nobody renews or releases (a process took the session, then vanished):
        # refused after the wait.
        with sqlite3.connect(tmp_path / "duplex.db") as db:
            db.execute(
                "UPDATE leases SET owner = 'ghost', token = token + 1, expires = ? "
                "WHERE session_id = ?",
                (time.time() + 60, sid),
            )
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(url_b, additional_headers=headers)
        assert refused.value.response.status_code == 503
        assert b"live on another replica" in refused.value.response.body
    finally:
        for proc in (first, second):
            proc.send_signal(signal.SIGTERM)
        for proc in (first, second):
            _out, err = proc.communicate(timeout=60)
            assert proc.returncode in (0, -signal.SIGTERM), err[-2000:]
