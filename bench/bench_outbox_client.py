"""Client CPU of the Redis outbox flush: what redis-py (with or without ``hiredis``) costs
the server per flush, apart from everything else the server does.

Run: ``python -m bench.bench_outbox_client`` with the interpreter to measure (a venv with
``hiredis`` installed against one without). Prints one markdown row.

A redis-server is started on loopback. Each flush is `RedisStore.append_outbox` with
``--sessions`` sessions' batches of what 150 ms of an echo answer puts in each outbox
(1.5 messages of ~6.4 KB of JSON on average: 100 ms audio chunks at 24 kHz, base64),
as the server's outbox flusher sends them; the process's CPU time (user + system) per
flush is the median of ``--rounds`` rounds of ``--flushes`` flushes.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import time

import redis

from bench.bench_resume import redis_server
from server.state.base import OutboxBatch, OutboxEntry
from server.state.redis import RedisStore


def chunk_text(seq: int) -> str:
    audio = base64.b64encode(os.urandom(4800)).decode()  # 100 ms PCM16 at 24 kHz
    return json.dumps({"seq": seq, "type": "chunk", "response_id": "resp_1", "data": audio})


async def run(url: str, sessions: int, flushes: int, rounds: int) -> list[float]:
    store = RedisStore(url, ttl_s=60)
    texts = [chunk_text(i) for i in range(64)]
    seq = [0] * sessions
    per_round: list[float] = []
    try:
        for _ in range(rounds):
            t0 = time.process_time()
            for f in range(flushes):
                batches = []
                for s in range(sessions):
                    count = 1 + (f + s) % 2  # 1.5 messages a flush on average
                    entries = []
                    for _ in range(count):
                        seq[s] += 1
                        entries.append(OutboxEntry(seq[s], texts[seq[s] % 64], time.time()))
                    batches.append(OutboxBatch(f"s{s}", entries, keep_from=max(1, seq[s] - 300)))
                await store.append_outbox(batches, max_age_s=60)
            per_round.append((time.process_time() - t0) / flushes)
    finally:
        await store.close()
    return per_round


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--flushes", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    try:
        import hiredis

        parser_name = f"hiredis {hiredis.__version__}"
    except ImportError:
        parser_name = "pure Python (no hiredis)"
    with redis_server() as url:
        per_round = asyncio.run(run(url, args.sessions, args.flushes, args.rounds))
    each = ", ".join(f"{v * 1000:.3f}" for v in per_round)
    print(
        f"| redis {redis.__version__}, {parser_name} | {args.sessions} | {each} | "
        f"{statistics.median(per_round) * 1000:.3f} |"
    )


if __name__ == "__main__":
    main()
