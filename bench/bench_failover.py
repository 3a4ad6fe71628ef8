"""Failover and resume across replicas, behind nginx: how long a client waits.

Run: ``python -m bench.bench_failover [--trials 20] [--only failover|resume]``. Prints
markdown.

Set-up: tests/cluster.py (redis-server, three ``duplex serve`` replicas, nginx from
deploy/nginx.conf, loopback), default lease settings (``DUPLEX_LEASE_TTL_MS=2000``,
renewed every 500 ms). Each trial opens a session through nginx and starts a 3 s audio
answer (echo provider at real time, manual turn detection).

- **failover**: the client is the Python SDK with its default automatic reconnect
  (``Reconnect()``: backoff from 100 ms, jitter). On the answer's first audio chunk the
  owner is killed with SIGKILL. Measured: from the kill to the SDK handing the caller
  ``response.done`` (``interrupted``) of the cut answer, which the new owner sends after
  the replay: the session resumed on another replica and the client told. The killed
  replica is restarted before the next trial.
- **resume**: on the answer's third chunk the client drops its TCP connection (no close
  handshake), then resumes with ``?session_id=…&last_seq=…`` (a) straight at the owner,
  (b) straight at another replica, which asks the owner to hand the session over and
  reopens it from the store, and (c) through nginx, whose consistent hashing on the
  session id picks the replica (the owner one time in three on a session's first
  resume: the session's first replica was picked before its id existed). Measured: from
  the start of the new connection to the first replayed message (the one after
  ``session.resumed``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import time
from typing import Any

import websockets

from duplex import Client
from tests.cluster import TOKEN, Cluster
from tests.test_replicas import Seen, tone


async def _answer_started(cluster: Cluster, seen: Seen, client: Client, **kwargs: Any) -> Any:
    session = await client.connect(on_event=seen, **kwargs)
    await session.update(turn_detection={"type": "manual"})
    await session.send_audio(tone(3.0))
    await session.commit()
    return session


async def failover_trial(cluster: Cluster) -> float:
    seen = Seen()
    async with Client(cluster.ws_url, TOKEN) as client:
        session = await _answer_started(cluster, seen, client)
        started = await seen.until(lambda e: e["type"] == "response.started")
        rid = started["response_id"]
        await seen.until(lambda e: e.get("response_id") == rid and bool(e.get("media")))
        owner = cluster.owner(session.id)
        assert owner is not None
        cluster.signal(owner, signal.SIGKILL)
        killed = time.perf_counter()
        done = await seen.until(
            lambda e: e["type"] == "response.done" and e["response_id"] == rid, timeout=30
        )
        elapsed = time.perf_counter() - killed
        assert done["finish_reason"] == "interrupted", done
        assert session.resumes == 1
        seen.check_sequence()
        await session.close()
    await asyncio.to_thread(cluster.wait_exit, owner, 10)
    cluster.start_replica(owner)
    return elapsed


async def resume_trial(cluster: Cluster, target: str) -> float:
    seen = Seen()
    async with Client(cluster.ws_url, TOKEN) as client:
        session = await _answer_started(cluster, seen, client, reconnect=None)
        started = await seen.until(lambda e: e["type"] == "response.started")
        rid = started["response_id"]
        chunks = 0
        while chunks < 3:
            await seen.until(lambda e: e.get("response_id") == rid and e["type"] == "chunk")
            chunks = sum(e.get("response_id") == rid and e["type"] == "chunk" for e in seen.events)
            await asyncio.sleep(0.01)
        owner = cluster.owner(session.id)
        assert owner is not None
        last_seq = session.last_seq
        session.ws.transport.abort()
        await asyncio.sleep(0.2)  # the answer goes on into the outbox meanwhile
        if target == "nginx":
            url = cluster.ws_url
        else:
            index = owner if target == "owner" else (owner + 1) % len(cluster.replicas)
            url = cluster.replicas[index].base.replace("http", "ws") + "/v1/duplex"
        query = f"?token={TOKEN}&session_id={session.id}&last_seq={last_seq}"
        begin = time.perf_counter()
        async with websockets.connect(url + query, max_size=None, open_timeout=20) as ws:
            resumed = json.loads(await ws.recv())
            assert resumed["type"] == "session.resumed", resumed
            first = json.loads(await ws.recv())
            elapsed = time.perf_counter() - begin
            assert first["seq"] == last_seq + 1, (first["seq"], last_seq)
            if target == "other":
                assert cluster.owner(session.id) != owner
        await session.close()
    return elapsed


def _row(name: str, times: list[float], unit_ms: bool) -> str:
    times = sorted(times)
    p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
    scale, unit = (1000, "ms") if unit_ms else (1, "s")
    fmt = "{:.0f}" if unit_ms else "{:.2f}"
    cells = [fmt.format(v * scale) + f" {unit}" for v in (statistics.median(times), p99, times[-1])]
    return f"| {name} | {len(times)} | " + " | ".join(cells) + " |"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--only", choices=["failover", "resume"])
    args = parser.parse_args()
    rows = ["| measure | trials | p50 | p99 | max |", "|---|---|---|---|---|"]
    with Cluster(3, env={"DUPLEX_ECHO_PACE": "1"}) as cluster:
        if args.only in (None, "failover"):
            times = [await failover_trial(cluster) for _ in range(args.trials)]
            rows.append(_row("failover after kill -9, SDK auto-resume", times, False))
        if args.only in (None, "resume"):
            names = {
                "owner": "resume at the owner (same replica)",
                "other": "resume at another replica (handover)",
                "nginx": "resume through nginx (1 in 3 reaches the owner)",
            }
            times: dict[str, list[float]] = {t: [] for t in names}
            for _ in range(args.trials):  # interleaved: the machine is shared
                for target in names:
                    times[target].append(await resume_trial(cluster, target))
            rows += [_row(names[t], times[t], True) for t in names]
    print("\n".join(rows))


if __name__ == "__main__":
    asyncio.run(main())
