"""Resume latency and the cost of the outbox, against real server processes on loopback.

Run: ``python -m bench.bench_resume`` (``--quick`` for fewer trials). Prints markdown.

Resume latency, one replica: a session gets a 2 s audio turn (manual turn detection, one
binary message and ``input.commit``); the echo provider plays it back at real time
(``DUPLEX_ECHO_PACE=1``, 100 ms chunks). After 3 reply chunks the client drops its TCP
connection (no close handshake), waits 200 ms (the answer goes on into the outbox), then
reconnects with ``?session_id=…&last_seq=…``. Measured: from the start of the new
connection (TCP connect, WebSocket handshake with the token) to the arrival of the first
replayed message. Stores: memory and Redis (a redis-server started on loopback),
interleaved trial by trial.

Outbox cost: ``--sessions`` sessions at once each get a 10 s audio turn played back at
real time; the server's CPU time (schedstat) is read over a window in the middle of the
playback and divided by sessions x seconds. Runs alternate outbox on / off
(``DUPLEX_OUTBOX_MAX_MESSAGES=0``) on the same store (Redis by default), ``--rounds`` times
each, because the machine is shared: the ranges are reported, not one number.
``--python PATH`` adds a third variant, outbox on with the server run by another
interpreter (a venv with ``hiredis``, which redis-py then uses to pack commands and parse
replies), in the same rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Any

import numpy as np
from websockets.asyncio.client import connect

from bench.bench_ws import ServerProc, auth_headers, start_duplex

RATE = 16000


def tone(seconds: float) -> bytes:
    t = np.arange(int(RATE * seconds)) / RATE
    return (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes()


@contextmanager
def redis_server():
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    workdir = tempfile.mkdtemp(prefix="bench-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", workdir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


async def _open(url: str) -> Any:
    return await connect(
        url, additional_headers=auth_headers(), max_size=None, ping_interval=None, compression=None
    )


async def _start_turn(server: ServerProc, seconds: float) -> tuple[Any, str]:
    ws = await _open(server.ws_url)
    created = json.loads(await ws.recv())
    update = {"type": "session.update", "config": {"turn_detection": {"type": "manual"}}}
    await ws.send(json.dumps(update))
    while json.loads(await ws.recv())["type"] != "session.updated":
        pass
    await ws.send(tone(seconds))
    await ws.send(json.dumps({"type": "input.commit"}))
    return ws, created["session"]["id"]


async def resume_trial(server: ServerProc) -> float:
    ws, session_id = await _start_turn(server, 2.0)
    chunks, last_seq = 0, 0
    while chunks < 3:
        event = json.loads(await ws.recv())
        last_seq = event["seq"]
        chunks += event["type"] == "chunk" and "media" in event
    ws.transport.abort()
    await asyncio.sleep(0.2)
    started = time.perf_counter()
    again = await _open(f"{server.ws_url}?session_id={session_id}&last_seq={last_seq}")
    resumed = json.loads(await again.recv())
    assert resumed["type"] == "session.resumed", resumed
    first = json.loads(await again.recv())
    elapsed = time.perf_counter() - started
    assert first["seq"] == last_seq + 1, (first, last_seq)
    await again.close()
    return elapsed


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def outbox_run(server: ServerProc, sessions: int, seconds: float) -> float:
    """CPU seconds of the server per session-second of playback."""
    conns = await asyncio.gather(*(_start_turn(server, seconds) for _ in range(sessions)))

    async def drain(ws: Any) -> None:
        async for raw in ws:
            if '"response.done"' in raw:
                return

    readers = [asyncio.ensure_future(drain(ws)) for ws, _ in conns]
    await asyncio.sleep(1.0)  # inputs handled, playback steady
    window = seconds - 3.0
    cpu0, t0 = server.cpu_seconds(), time.perf_counter()
    await asyncio.sleep(window)
    cpu1, t1 = server.cpu_seconds(), time.perf_counter()
    await asyncio.gather(*readers)
    for ws, _ in conns:
        await ws.close()
    return (cpu1 - cpu0) / (sessions * (t1 - t0))


async def main_async(args: argparse.Namespace) -> None:
    with redis_server() as redis_url:
        stores = {"memory": "memory://", "redis": redis_url}
        print(f"## Resume latency, one replica ({args.trials} trials per store, interleaved)\n")
        servers = {
            name: start_duplex({"DUPLEX_STORE_URL": url, "DUPLEX_ECHO_PACE": "1"})
            for name, url in stores.items()
        }
        try:
            results: dict[str, list[float]] = {name: [] for name in stores}
            for _ in range(args.trials):
                for name, server in servers.items():
                    results[name].append(await resume_trial(server))
        finally:
            for server in servers.values():
                server.stop()
        print("| store | p50 ms | p99 ms | max ms |\n|---|---|---|---|")
        for name, values in results.items():
            ms = [v * 1000 for v in values]
            print(f"| {name} | {statistics.median(ms):.1f} | {pct(ms, 99):.1f} | {max(ms):.1f} |")

        store = stores[args.store]
        print(
            f"\n## Outbox cost ({args.sessions} sessions, {args.seconds:g} s playback, "
            f"store {args.store}, {args.rounds} interleaved rounds)\n"
        )
        variants = [("off", {"DUPLEX_OUTBOX_MAX_MESSAGES": "0"}, sys.executable)]
        variants.append(("on", {}, sys.executable))
        if args.python:
            variants.append((f"on ({args.python})", {}, args.python))
        costs: dict[str, list[float]] = {label: [] for label, _, _ in variants}
        for round_ in range(args.rounds):
            for label, env, python in variants if round_ % 2 else variants[::-1]:  # alternate
                server = start_duplex(
                    {"DUPLEX_STORE_URL": store, "DUPLEX_ECHO_PACE": "1", **env}, python=python
                )
                try:
                    costs[label].append(await outbox_run(server, args.sessions, args.seconds))
                finally:
                    server.stop()
        print("| outbox | CPU ms per session-second, each round | median |\n|---|---|---|")
        for label, values in costs.items():
            each = ", ".join(f"{v * 1000:.2f}" for v in values)
            print(f"| {label} | {each} | {statistics.median(values) * 1000:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=None, dest="rounds_given")
    parser.add_argument("--store", choices=["memory", "redis"], default="redis")
    parser.add_argument("--python", help="also run 'outbox on' with this interpreter")
    args = parser.parse_args()
    args.rounds = 4
    if args.quick:
        args.trials, args.rounds, args.seconds = 10, 2, 6.0
    if args.rounds_given is not None:
        args.rounds = args.rounds_given
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
