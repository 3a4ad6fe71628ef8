"""Metrics overhead on the session path, in-process: the same work with DUPLEX_METRICS off and on.

Run: ``python -m bench.bench_metrics`` (``--rounds``, ``--sessions``). Prints markdown.

Each run builds the app's session services with ``create_app`` (so the metrics wiring is
the server's own: the session tap, the timed store) and pushes the bench_capacity
conversations through ``--sessions`` concurrent ``DuplexSession``s as the WebSocket door
does (input budget check, then ``send_audio_nowait``), as fast as possible, with echo
replies (audio and text) consumed and encoded as the door would; with metrics on, the
registry is also rendered once per 15 s of audio (of one session: the sessions stand for
concurrent real-time ones), as Prometheus' default scrape interval would. Only the session work is
timed (``time.process_time``), and runs alternate off/on, so both see the same machine.
There are no sockets: the figure is the metrics' share of the session work itself,
which is where they add anything (bench_capacity runs whole servers).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

from bench.bench_capacity import load_plans
from bench.bench_turns import Plan
from bench.bench_ws import header, machine_line, md_table
from duplex.protocol import encode_server_message
from server.app import create_app
from server.config import Settings
from server.rate import InputBudget, audio_bytes_per_second
from server.session import DuplexSession

SCRAPE_EVERY_MSGS = 750  # one scrape per 15 s of one session's audio (Prometheus' default
#: interval; sessions run side by side in real time, so that is once per 15 s of wall time)


async def session_run(services: object, plan: Plan, scrape: object | None) -> int:
    """One conversation; after each turn's last message, wait for its reply to finish (a
    user waits for the answer), so every run does exactly the same work."""
    session = await DuplexSession.open(services, tenant="bench")  # type: ignore[arg-type]
    budget = InputBudget.of(0, 60, 0, 400)  # unlimited: counting only
    if session.tap is not None:
        session.tap.input = budget
    sent = 0
    done = 0
    replied = asyncio.Event()

    async def consume() -> None:
        nonlocal sent, done
        async for message in session.response():
            encode_server_message(message)
            sent += 1
            if message.type == "response.done":  # type: ignore[attr-defined]
                done += 1
                replied.set()

    reader = asyncio.ensure_future(consume())
    bps = audio_bytes_per_second(session.config.input_audio)
    triggers = [index for index, _, _ in plan.turns]
    for k, data in enumerate(plan.messages):
        budget.try_audio(len(data), bps)
        if not session.send_audio_nowait(data):
            await session.send_audio(data)
        if scrape is not None and k % SCRAPE_EVERY_MSGS == 0:
            scrape()  # type: ignore[operator]
        if k in triggers:
            await session.settle()
            async with asyncio.timeout(30):
                while done < triggers.index(k) + 1:
                    replied.clear()
                    await replied.wait()
    await session.close()
    await reader
    return sent


async def one_run(metrics: bool, plans: list[Plan], sessions: int) -> tuple[float, int]:
    extra = {"metrics": "on", "metrics_token": "x"} if metrics else {}
    app = create_app(Settings(api_tokens="t:bench", echo_pace=0, **extra))
    state = app.state.duplex
    scrape = state.metrics.exposition if state.metrics is not None else None
    started = time.process_time()
    counts = await asyncio.gather(
        *(
            session_run(state.services, plans[i % len(plans)], scrape if i == 0 else None)
            for i in range(sessions)
        )
    )
    return time.process_time() - started, sum(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="off/on pairs")
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--turns", type=int, default=10)
    args = parser.parse_args()
    plans = load_plans(args)
    messages = sum(len(plans[i % len(plans)].messages) for i in range(args.sessions))
    asyncio.run(one_run(False, plans, 2))  # warm-up: imports, numba, caches
    times: dict[bool, list[float]] = {False: [], True: []}
    outputs: dict[bool, int] = {}
    for r in range(args.rounds):
        for metrics in (False, True) if r % 2 == 0 else (True, False):
            cpu, out = asyncio.run(one_run(metrics, plans, args.sessions))
            times[metrics].append(cpu)
            outputs[metrics] = out
            print(f"round {r}: metrics {'on' if metrics else 'off'} {cpu:.3f} s", file=sys.stderr)
    print(header("Metrics overhead, in-process (bench/bench_metrics.py)", sys.argv[1:]))
    print(machine_line())
    print(
        f"\n{args.sessions} sessions, {messages} audio messages in, {outputs[False]} / "
        f"{outputs[True]} server messages out (off / on), {args.rounds} interleaved rounds.\n"
    )
    rows = []
    for metrics in (False, True):
        t = times[metrics]
        rows.append(
            [
                "on" if metrics else "off",
                min(t),
                statistics.median(t),
                max(t),
                min(t) * 1e6 / messages,
            ]
        )
    print(md_table(["metrics", "CPU s min", "median", "max", "µs per audio message (min)"], rows))
    lo = min(times[True]) / min(times[False]) - 1
    med = statistics.median(times[True]) / statistics.median(times[False]) - 1
    # Each round's two runs ran back to back, under about the same load: their ratio.
    paired = sorted(on / off - 1 for on, off in zip(times[True], times[False], strict=True))
    q1, q2, q3 = statistics.quantiles(paired, n=4) if len(paired) > 1 else paired * 3
    print(
        f"\nMetrics on vs off: {lo * 100:+.1f}% (min), {med * 100:+.1f}% (median) CPU; "
        f"per round (back-to-back pairs): median {q2 * 100:+.1f}%, quartiles "
        f"{q1 * 100:+.1f}% .. {q3 * 100:+.1f}%."
    )


if __name__ == "__main__":
    main()
