"""Failover after kill -9: how long a client waits for another replica to take its session.

Run: ``python -m bench.bench_failover [--trials 20]``. Prints markdown.

Set-up: tests/cluster.py (redis-server, three ``duplex serve`` replicas, nginx from
deploy/nginx.conf, loopback), default lease settings (``DUPLEX_LEASE_TTL_MS=2000``,
renewed every 500 ms). Each trial opens a session through nginx, starts a 3 s audio
answer (echo provider at real time), and on its first audio chunk kills the owner
with SIGKILL. The client then reconnects through nginx with its ``session_id`` at once
and every 100 ms after a refusal (the client's own reconnect delay is not counted
beyond that). Measured: from the kill to ``response.done`` (``interrupted``) of the
cut answer on the new owner, i.e. the session taken over and the client told. The
killed replica is restarted before the next trial.

What sets it: the lease TTL (the lease must expire; it was renewed between 0 and
``renew`` ms before the kill, so the wait is TTL - that), plus the new owner's poll
(<= 100 ms), plus nginx's failed connect to the dead replica (immediate: refused).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import signal
import statistics
import time

import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.cluster import TOKEN, Cluster
from tests.test_replicas import tone


async def trial(cluster: Cluster) -> float:
    ws = await websockets.connect(f"{cluster.ws_url}?token={TOKEN}", max_size=None)
    sid = json.loads(await ws.recv())["session"]["id"]
    await ws.send(
        json.dumps({"type": "session.update", "config": {"turn_detection": {"type": "manual"}}})
    )
    audio = base64.b64encode(tone(3.0)).decode()
    await ws.send(json.dumps({"type": "input.audio", "audio": audio}))
    await ws.send(json.dumps({"type": "input.commit"}))
    while "media" not in json.loads(await ws.recv()):
        pass
    owner = cluster.owner(sid)
    assert owner is not None
    cluster.signal(owner, signal.SIGKILL)
    killed = time.perf_counter()
    cluster.wait_exit(owner, timeout=10)
    try:
        while True:
            await ws.recv()
    except ConnectionClosed:
        pass
    async with asyncio.timeout(30):
        while True:
            try:
                new = await websockets.connect(
                    f"{cluster.ws_url}?token={TOKEN}&session_id={sid}", max_size=None
                )
                break
            except (InvalidStatus, OSError):
                await asyncio.sleep(0.1)
        while True:
            event = json.loads(await new.recv())
            if event["type"] == "response.done":
                assert event["finish_reason"] == "interrupted", event
                break
    elapsed = time.perf_counter() - killed
    await new.close()
    cluster.start_replica(owner)
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()
    with Cluster(3, env={"DUPLEX_ECHO_PACE": "1"}) as cluster:
        times = [await trial(cluster) for _ in range(args.trials)]
    times.sort()
    p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
    print(
        f"| trials | p50 | p99 | max |\n|---|---|---|---|\n| {len(times)} "
        f"| {statistics.median(times):.2f} s | {p99:.2f} s | {times[-1]:.2f} s |"
    )


if __name__ == "__main__":
    asyncio.run(main())
