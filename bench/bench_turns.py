"""End-of-turn overhead: last audio message of a turn -> ``turn.ended``, over loopback.

Run: ``python -m bench.bench_turns`` (``--quick`` for fewer turns). Prints markdown.

Audio: espeak-ng conversations from tests/speech.py (pink noise at 20 dB SNR), cut into
20 ms binary messages (640 bytes, PCM16 16 kHz mono, the default input format).

Which message ends a turn is found offline first: the same messages go through
``server.modes.audio_ingest.AudioIngest`` with the default session settings, and the
index of the message during which ``TurnEnd`` fires is the trigger (the message that
completes ``stop_ms`` of silence). The server then gets the same messages, paced at
``--speed`` x real time (default 10: one message every 2 ms, so the server is idle
between messages and the figure is the per-turn overhead, not queueing); the client
time-stamps the send of each trigger and the arrival of each ``turn.ended``. Every
``turn.ended`` is checked against the offline ``audio_end_ms`` (a mismatch would mean
lost or reordered audio).

Baseline in the same run: the same client, messages and pacing against a bare
``websockets`` echo server; the round trip of the echo of each trigger message. The
server is ``python -m server.cli serve`` with ``DUPLEX_ECHO_PACE=0`` (the echo reply
streams right after ``turn.ended``, then the session is quiet until the next turn).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import webrtcvad

from bench.bench_ws import (
    ServerProc,
    header,
    machine_line,
    md_table,
    open_ws,
    pct,
    pin_self,
    start_bare,
    start_duplex,
)
from duplex.protocol import InputAudioConfig, TurnDetectionConfig
from server.modes.audio_ingest import VAD_RATE, AudioIngest
from server.modes.echo_guard import EchoGuard
from tests.speech import Conversation, make_conversation
from vad import turns as vt

MSG_BYTES = 640  # 20 ms of PCM16 at 16 kHz
MSG_MS = 20
SEED_BASE = 200_000  # disjoint from the unit tests and bench_vad
CACHE = Path(tempfile.gettempdir()) / "duplex-bench-speech"


@dataclass
class Plan:
    """One conversation as messages, with the offline ingest's verdicts."""

    messages: list[bytes]
    #: (message index, start_ms, end_ms) of every TurnEnd, in order
    turns: list[tuple[int, float, float]] = field(default_factory=list)
    #: (message index, start_ms) of every SpeechStart
    starts: list[tuple[int, float]] = field(default_factory=list)
    #: CPU seconds of each offline push (thread time)
    push_s: list[float] = field(default_factory=list)

    @property
    def duration_s(self) -> float:
        return len(self.messages) * MSG_MS / 1000


def plan_for(audio: np.ndarray, turns: TurnDetectionConfig | None = None) -> Plan:
    """Split into 20 ms messages and find, offline, the message that ends each turn."""
    data = audio.astype("<i2").tobytes()
    messages = [data[i : i + MSG_BYTES] for i in range(0, len(data) - MSG_BYTES + 1, MSG_BYTES)]
    ingest = AudioIngest(InputAudioConfig(), turns or TurnDetectionConfig())
    plan = Plan(messages)
    for i, msg in enumerate(messages):
        t = time.thread_time()
        events = ingest.push(msg).events
        plan.push_s.append(time.thread_time() - t)
        for event in events:
            if isinstance(event, vt.TurnEnd):
                plan.turns.append((i, event.start_ms, event.end_ms))
            elif isinstance(event, vt.SpeechStart):
                plan.starts.append((i, event.start_ms))
    return plan


def ingest_cost(audio: np.ndarray, repeats: int = 7) -> list[tuple[str, float, float]]:
    """Offline CPU per 20 ms of audio: AudioIngest by message size, and bare webrtcvad.

    Returns (path, best µs per 20 ms, median of the per-run ratios to bare webrtcvad).
    Each run times bare webrtcvad and then every message size, so that a machine whose
    speed drifts (it is shared) moves both sides of a ratio alike. `AudioIngest.push`
    is what the ASM mode calls per message; VAD mode calls `AudioIngest.events` (the same
    work, without the result object), timed at 20 ms as well, and with echo-aware
    barge-in on (its default for telephony codecs and clients without echo
    cancellation): with no reply playing, and with one playing all along (the same
    audio reversed, as if the client played it back to the microphone).
    """
    data = audio.astype("<i2").tobytes()
    reply = audio[::-1].astype(np.int16).tobytes()
    frames = len(data) // MSG_BYTES
    sizes = (20, 100, 1000)
    vad = webrtcvad.Vad(3)

    def bare() -> float:
        t = time.process_time()
        for i in range(0, frames * MSG_BYTES, MSG_BYTES):
            vad.is_speech(data[i : i + MSG_BYTES], 16000)
        return time.process_time() - t

    def ingest(ms: int, events: bool = False, echo: str | None = None) -> float:
        size = MSG_BYTES * ms // MSG_MS
        ingest = AudioIngest(InputAudioConfig(), TurnDetectionConfig())
        push = ingest.events if events else ingest.push
        if echo is not None:
            guard = EchoGuard(VAD_RATE, MSG_MS)
            ingest.filter = guard.filter
            if echo == "reply":
                guard.reply_started()
                guard.reply_audio(reply, VAD_RATE)
        t = time.process_time()
        for i in range(0, frames * MSG_BYTES, size):
            push(data[i : i + size])
        return time.process_time() - t

    runs = []
    for _ in range(repeats):
        base = bare()
        runs.append(
            [base]
            + [ingest(ms) for ms in sizes]
            + [ingest(MSG_MS, events=True, echo=echo) for echo in (None, "idle", "reply")]
        )
    names = [
        f"AudioIngest.push, {ms} ms messages (framing + SpeechDetector + turns)" for ms in sizes
    ] + [
        f"AudioIngest.events, {MSG_MS} ms messages (VAD mode's call)",
        "... with echo-aware barge-in on, no reply playing",
        "... with echo-aware barge-in on, a reply playing",
        "bare webrtcvad.Vad.is_speech, 20 ms frames",
    ]
    order = [*range(1, len(sizes) + 4), 0]
    return [
        (
            names[k],
            min(r[col] for r in runs) / frames * 1e6,
            statistics.median(r[col] / r[0] for r in runs),
        )
        for k, col in enumerate(order)
    ]


def conversations(count: int, n_turns: int, seed: int = SEED_BASE) -> list[Conversation]:
    return [
        make_conversation(seed + k, n_turns, noise="pink", snr_db=20.0, cache_dir=CACHE)
        for k in range(count)
    ]


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)  # seconds, trigger send -> event
    expected: int = 0
    mismatched: int = 0  # turn.ended whose audio_end_ms differs from the offline one
    missing: int = 0
    server_cpu: float = 0.0
    messages: int = 0


async def stream_duplex(server: ServerProc, plan: Plan, speed: float, result: Result) -> None:
    """Paced stream of one conversation into one session; collect turn.ended latencies."""
    ws = await open_ws(server, True)
    triggers = {idx: k for k, (idx, _, _) in enumerate(plan.turns)}
    sent_at: dict[int, float] = {}
    got: list[tuple[float, dict]] = []
    done = asyncio.Event()

    async def reader() -> None:
        async for raw in ws:
            if isinstance(raw, str) and '"type":"turn.ended"' in raw:
                got.append((time.perf_counter(), json.loads(raw)))
                if len(got) == len(plan.turns):
                    done.set()

    task = asyncio.create_task(reader())
    interval = MSG_MS / 1000 / speed
    cpu0 = server.cpu_seconds()
    t0 = time.perf_counter()
    for i, msg in enumerate(plan.messages):
        delay = t0 + i * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if i in triggers:
            sent_at[triggers[i]] = time.perf_counter()
        await ws.send(msg)
    try:
        await asyncio.wait_for(done.wait(), 5)
    except TimeoutError:
        pass
    result.server_cpu += server.cpu_seconds() - cpu0
    result.messages += len(plan.messages)
    task.cancel()
    await ws.close()
    result.expected += len(plan.turns)
    result.missing += max(0, len(plan.turns) - len(got))
    for k, (arrived, event) in enumerate(got[: len(plan.turns)]):
        if event.get("audio_end_ms") != plan.turns[k][2]:
            result.mismatched += 1
        result.latencies.append(arrived - sent_at[k])


async def stream_bare(server: ServerProc, plan: Plan, speed: float, result: Result) -> None:
    """The same messages and pacing against the bare echo; RTT of each trigger's echo."""
    ws = await open_ws(server, False)
    triggers = {idx for idx, _, _ in plan.turns}
    sent_at: dict[int, float] = {}
    count = len(plan.messages)
    done = asyncio.Event()

    async def reader() -> None:
        n = 0
        async for _ in ws:
            if n in triggers:
                result.latencies.append(time.perf_counter() - sent_at[n])
            n += 1
            if n == count:
                done.set()

    task = asyncio.create_task(reader())
    interval = MSG_MS / 1000 / speed
    t0 = time.perf_counter()
    for i, msg in enumerate(plan.messages):
        delay = t0 + i * interval - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sent_at[i] = time.perf_counter()
        await ws.send(msg)
    await asyncio.wait_for(done.wait(), 10)
    task.cancel()
    await ws.close()
    result.expected += len(triggers)


async def run(args: argparse.Namespace, plans: list[Plan]) -> tuple[Result, Result]:
    duplex = start_duplex({"DUPLEX_ECHO_PACE": "0"})
    bare = start_bare()
    dup, base = Result(), Result()
    try:
        # Warm-up: the first session imports the mode modules (PyAV...), about a second.
        await stream_duplex(duplex, plans[0], 50.0, Result())
        for plan in plans:  # interleaved, so background load hits both alike
            await stream_bare(bare, plan, args.speed, base)
            await stream_duplex(duplex, plan, args.speed, dup)
    finally:
        duplex.stop()
        bare.stop()
    return dup, base


def report(args: argparse.Namespace, plans: list[Plan], dup: Result, base: Result) -> str:
    ms = 1000.0
    d50, d99, dmax = (pct(dup.latencies, q) * ms for q in (50, 99, 100))
    b50, b99, bmax = (pct(base.latencies, q) * ms for q in (50, 99, 100))
    audio_s = sum(p.duration_s for p in plans)
    rows = [
        [
            "bare websockets echo of the trigger message",
            len(base.latencies),
            b50,
            b99,
            bmax,
            1.0,
            1.0,
        ],
        [
            "Duplex: trigger message -> turn.ended",
            len(dup.latencies),
            d50,
            d99,
            dmax,
            d50 / b50,
            d99 / b99,
        ],
    ]
    lines = [
        f"{len(plans)} conversations, {audio_s:.0f} s of audio, {dup.expected} turns, "
        f"20 ms messages paced at {args.speed:g}x real time.\n",
        md_table(["path", "turns", "p50 ms", "p99 ms", "max ms", "x bare p50", "x bare p99"], rows),
        "",
        f"- p99 end-of-turn overhead {d99:.2f} ms vs target <= 5 ms: "
        f"{'met' if d99 <= 5 else 'NOT met'}; Duplex minus bare at p50: {d50 - b50:.2f} ms.",
        f"- turn.ended checked against the offline AudioIngest: {dup.mismatched} with a "
        f"different audio_end_ms, {dup.missing} missing (of {dup.expected}).",
        f"- server CPU per 20 ms message, echo replies included: "
        f"{dup.server_cpu / max(1, dup.messages) * 1e6:.0f} µs "
        f"({dup.server_cpu / audio_s * 100:.2f}% of a core per real-time stream).",
    ]
    trig = [p.push_s[i] * 1e6 for p in plans for i, _, _ in p.turns]
    rest = [p.push_s[i] * 1e6 for p in plans for i in range(len(p.messages))]
    lines += [
        f"- offline AudioIngest.push CPU: the trigger message p50 {pct(trig, 50):.0f} µs, "
        f"p99 {pct(trig, 99):.0f} µs; all messages p50 {pct(rest, 50):.0f} µs, "
        f"p99 {pct(rest, 99):.0f} µs (the turn's end is decided and its audio copied "
        "out while the trigger message is handled).",
    ]
    cost = ingest_cost(np.frombuffer(b"".join(plans[0].messages), "<i2"))
    lines += [
        "",
        f"Offline, same audio (conversation 1, {plans[0].duration_s:.0f} s), CPU per 20 ms "
        "of audio: best of 7 runs; ratios the median of the per-run ratios (each run times "
        "bare webrtcvad and then each message size):",
        "",
        md_table(
            ["path", "µs per 20 ms", "x bare webrtcvad"],
            [[name, us, ratio] for name, us, ratio in cost],
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="about 25 turns")
    parser.add_argument("--conversations", type=int, default=9)
    parser.add_argument("--turns", type=int, default=8, help="turns per conversation")
    parser.add_argument("--speed", type=float, default=10.0, help="x real time (1 = paced)")
    parser.add_argument("--client-cpu", type=int, help="pin this client to a CPU")
    args = parser.parse_args()
    if args.quick:
        args.conversations, args.turns = 4, 6
    pin_self(args.client_cpu)
    plans = [plan_for(c.audio) for c in conversations(args.conversations, args.turns)]
    dup, base = asyncio.run(run(args, plans))
    print(
        header("End-of-turn overhead (bench/bench_turns.py)", ["bench.bench_turns", *sys.argv[1:]])
    )
    print(machine_line() + " Server: a subprocess, not pinned.\n")
    print(report(args, plans, dup, base))


if __name__ == "__main__":
    main()
