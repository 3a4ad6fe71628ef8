"""Sessions per core through the OpenAI Realtime door: ``bench_capacity --door``.

Run: ``python -m bench.bench_capacity --door both`` (``--n``, ``--duration`` ... as usual).

Same criteria, conversations and pacing as bench_capacity, but the audio goes at 24 kHz
PCM16 (what OpenAI clients send; ``audio/pcm`` is 24 kHz only), in 20 ms messages, to:

* ``realtime``: ``/v1/realtime?model=duplex-echo`` as base64 ``input_audio_buffer.append``
  text frames, ``server_vad`` set to Duplex's defaults (``silence_duration_ms`` 800,
  ``threshold`` 0.75 = aggressiveness 3, ``prefix_padding_ms`` 300). End of turn:
  the trigger message -> ``input_audio_buffer.committed`` (the door's ``turn.ended``);
  integrity: each ``input_audio_buffer.speech_stopped`` carries the offline ``audio_end_ms``.
* ``duplex24``: ``/v1/duplex`` with ``input_audio.sample_rate`` 24000, binary frames: the
  baseline with the same audio, so the two differ only by the door.

``--door both`` runs both at each N, back to back on the same machine (the order
alternates from one N to the next). The generator is bench_capacity's (frames built and
masked ahead of time, written to the transport); its reader skips audio deltas without
parsing them.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.frames import Frame, Opcode

from bench.bench_capacity import (
    CURVE,
    POINT_COLUMNS,
    QUICK_CURVE,
    SessionStats,
    WorkerResult,
    _masked_binary,
    _reader,
    _transport_writer,
    client_cpu,
    drive,
    load_plans,
    measure,
    point_cells,
    summarize_profile,
    worker_result,
)
from bench.bench_turns import MSG_MS, Plan, conversations
from bench.bench_ws import header, machine_line, md_table, open_ws, pin_self
from duplex.protocol import InputAudioConfig, TurnDetectionConfig
from server.modes.audio_ingest import AudioIngest
from tests.speech import resample
from vad import turns as vt

RATE = 24000
MSG_BYTES = RATE * 2 * MSG_MS // 1000
DOORS = ("duplex24", "realtime")
REALTIME_SESSION = {
    "type": "realtime",
    "audio": {
        "input": {
            "format": {"type": "audio/pcm", "rate": RATE},
            "turn_detection": {
                "type": "server_vad",
                "threshold": 0.75,
                "silence_duration_ms": 800,
                "prefix_padding_ms": 300,
            },
        }
    },
}
_DELTA = '{"type":"response.output_audio.delta"'


def door_plans(args: argparse.Namespace) -> list[Plan]:
    """bench_capacity's conversations at 24 kHz, each turn's end found offline at 24 kHz
    with the turn detection both doors are given (Duplex's defaults)."""
    plans = []
    for c in conversations(args.conversations, args.turns):
        data = resample(c.audio, 16000, RATE).astype("<i2").tobytes()
        messages = [data[i : i + MSG_BYTES] for i in range(0, len(data) - MSG_BYTES + 1, MSG_BYTES)]
        ingest = AudioIngest(InputAudioConfig(sample_rate=RATE), TurnDetectionConfig())
        plan = Plan(messages)
        for i, msg in enumerate(messages):
            for event in ingest.push(msg).events:
                if isinstance(event, vt.TurnEnd):
                    plan.turns.append((i, event.start_ms, event.end_ms))
        plans.append(plan)
    return plans


def _append_frame(pcm: bytes) -> bytes:
    """One client text frame (FIN, masked) holding a base64 ``input_audio_buffer.append``."""
    text = '{"type":"input_audio_buffer.append","audio":"' + base64.b64encode(pcm).decode() + '"}'
    return Frame(Opcode.TEXT, text.encode()).serialize(mask=True, extensions=[])


async def _realtime_reader(ws: ClientConnection, s: SessionStats) -> None:
    """The door's events, cheaply: audio deltas by their length, only the rare events
    parsed. ``turns`` gets (arrival of ``committed``, the last ``speech_stopped``'s end)."""
    end_ms: float | None = None
    try:
        async for raw in ws:
            now = time.perf_counter()
            if not isinstance(raw, str):
                continue
            if raw.startswith(_DELTA):
                i = raw.rfind('"delta":"')
                ms = (len(raw) - i - 11) * 3 / 4 / 2 / 24.0  # base64 PCM16 24 kHz -> ms
                if s.reply_first is None:
                    s.reply_first, s.reply_ms = now, 0.0
                s.chunk_lateness.append(max(0.0, now - s.reply_first - s.reply_ms / 1000))
                s.reply_ms += ms
                continue
            kind = raw[9 : raw.find('"', 9)]
            if kind == "input_audio_buffer.committed":
                s.turns.append((now, end_ms))
            elif kind == "input_audio_buffer.speech_stopped":
                end_ms = float(json.loads(raw)["audio_end_ms"])
            elif kind == "input_audio_buffer.speech_started":
                s.starts += 1
            elif kind == "response.created":
                s.reply_first = None
            elif kind == "error":
                error = json.loads(raw).get("error") or {}
                s.errors.append(f"{error.get('code')}: {error.get('message')}")
    except Exception as exc:  # a dropped connection is a finding, not a crash
        s.errors.append(f"connection: {type(exc).__name__}: {exc}")


async def _configure(ws: ClientConnection, door: str) -> None:
    if door == "realtime":
        update: dict[str, Any] = {"type": "session.update", "session": REALTIME_SESSION}
    else:
        update = {"type": "session.update", "config": {"input_audio": {"sample_rate": RATE}}}
    await ws.send(json.dumps(update))
    async with asyncio.timeout(30):
        while json.loads(await ws.recv())["type"] not in ("session.updated", "error"):
            pass


async def run_door_worker(
    port: int, door: str, n: int, duration: float, stagger: float, plans: list[Plan]
) -> WorkerResult:
    """bench_capacity's `run_worker` for 24 kHz audio through either door."""
    path = "/v1/realtime?model=duplex-echo" if door == "realtime" else "/v1/duplex"
    url = f"ws://127.0.0.1:{port}{path}"
    sem = asyncio.Semaphore(32)

    async def one() -> ClientConnection:
        async with sem:
            ws = await open_ws(url, True)
            await _configure(ws, door)
            return ws

    t_conn = time.perf_counter()
    sockets = list(await asyncio.gather(*(one() for _ in range(n))))
    connect_s = time.perf_counter() - t_conn
    stats = [SessionStats(plan=k % len(plans), start=0.0) for k in range(n)]
    make = _append_frame if door == "realtime" else _masked_binary
    wire = [[make(m) for m in p.messages] for p in plans]
    read = _realtime_reader if door == "realtime" else _reader
    readers = [asyncio.create_task(read(ws, s)) for ws, s in zip(sockets, stats, strict=True)]
    writers = [_transport_writer(ws) for ws in sockets]
    sent = await drive(stats, plans, wire, writers, duration, stagger)
    for task in readers:
        task.cancel()
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    # The door's audio_end_ms is whole milliseconds.
    return worker_result(connect_s, stats, plans, sent, whole_ms=door == "realtime")


def worker_main(args: argparse.Namespace) -> None:
    plans = door_plans(args)
    result = asyncio.run(
        run_door_worker(args.port, args.door, args.worker, args.duration, args.stagger, plans)
    )
    print("RESULT " + json.dumps(asdict(result)), flush=True)


def run_doors(args: argparse.Namespace, store: str) -> None:
    """Both doors (or one) at each N, back to back; one table."""
    doors = DOORS if args.door == "both" else (args.door,)
    curve = args.n or (QUICK_CURVE if args.quick else CURVE)
    pin_self(client_cpu(args.workers))
    warm = load_plans(args)  # bench_capacity's warm-up session (16 kHz, /v1/duplex)
    rows = []
    best = dict.fromkeys(doors, 0)
    fails = dict.fromkeys(doors, 0)
    per_message: dict[int, dict[str, float]] = {}
    profiles: dict[str, str] = {}
    for index, n in enumerate(curve):
        order = doors if index % 2 == 0 else doors[::-1]
        for door in order:
            if fails[door] >= 2 and not args.all:
                continue
            point_args = argparse.Namespace(**{**vars(args), "door": door})
            point = measure(point_args, n, warm)
            print(f"N={n} {door}: {point.verdict}", file=sys.stderr, flush=True)
            raw = Path(tempfile.gettempdir()) / f"duplex-capacity-{n}.txt"
            if args.profile == n and raw.exists():
                profiles[door] = summarize_profile(raw)
                raw.replace(raw.with_name(f"duplex-capacity-{n}-{door}.txt"))  # kept: py-spy raw
            fails[door] = fails[door] + 1 if point.verdict.startswith("FAIL") else 0
            if point.verdict.startswith("pass"):
                best[door] = max(best[door], n)
            per_message.setdefault(n, {})[door] = point.us_per_message
            r = point.result
            rows.append(
                [
                    n,
                    door,
                    *point_cells(point),
                    point.us_per_message,
                    r["send_lag_p99"] * 1000,
                    f"{r['gen_cpu'] * 100:.0f}% / {r['gen_wait'] * 100:.0f}%",
                    point.verdict,
                ]
            )
    print(
        header(
            "Sessions per core by door (bench/capacity_door.py)",
            ["bench.bench_capacity", *sys.argv[1:]],
        )
    )
    print(machine_line())
    print(
        f"\nServer: {args.workers} worker(s), store {store}. Each session: {args.duration:g} s "
        f"of 20 ms PCM16 24 kHz messages at real time (duplex24: binary frames to /v1/duplex; "
        f"realtime: base64 input_audio_buffer.append to /v1/realtime), starts spread over "
        f"{args.stagger:g} s; {args.conversations} conversations of {args.turns} turns; echo "
        "replies at real time; the doors back to back at each N.\n"
    )
    print(
        md_table(
            [
                "N",
                "door",
                *POINT_COLUMNS,
                "server µs per client message (whole run)",
                "send lag p99 ms",
                "gen CPU / wait",
                "verdict",
            ],
            rows,
        )
    )
    ratios = [
        f"N={n}: {m['realtime'] / m['duplex24']:.2f}x"
        for n, m in per_message.items()
        if m.get("duplex24") and m.get("realtime")
    ]
    if ratios:
        print("\nServer CPU per client message, realtime / duplex24: " + "; ".join(ratios) + ".")
    print(
        "\nLargest N with EOT p99 < 50 ms and no audio lost or late: "
        + ", ".join(f"{door} **{best[door]}**" for door in doors)
        + "."
    )
    for door, text in profiles.items():
        print(f"\n### Server profile at N={args.profile}, {door}\n\n{text}")
