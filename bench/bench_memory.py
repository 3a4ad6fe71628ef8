"""Server memory: RSS per idle session, per live VAD session, and memory returned at close.

Run: ``python -m bench.bench_memory`` (``--live 100,500`` for more live points, ``--quick``
for 3 rounds of 50; ``--parts rounds`` for one part; ``--server-env NAME=VALUE`` passes a
setting to the server). Prints markdown.

The server is ``python -m server.cli serve`` on 127.0.0.1, default settings (VAD mode,
the echo provider replying with the user's audio at real time, resampled to 24 kHz),
started by this script and restarted for each part. RSS is the server process's
``VmRSS`` from /proc; the client (this process) is not counted. Audio: one espeak-ng
conversation (pink noise, 20 dB SNR) as 20 ms binary messages of PCM16 16 kHz mono, each
session paced at real time from its own start, starts spread over ``--stagger`` seconds.

1. Idle: RSS of the server with N sessions connected that send nothing, minus RSS before
   they connected, divided by N.
2. Live: N sessions stream the conversation in a loop (turns, echo replies, barge-in as
   it comes) and read everything. After ``--warm`` seconds (70: past the outbox's 60 s
   window, which fills until then), RSS is sampled every second for ``--measure``
   seconds; per session = (median - RSS of the warmed-up server with no session) / N.
   ``--account`` runs the server under ``bench.memory_probe`` and adds, per session,
   the median bytes of each thing a session holds (audio history, turn audio, outbox)
   and the number of reply resamplers, read in the server at each sample. ``--trace``
   runs it under tracemalloc (slower: use fewer sessions) and lists the lines of code
   that hold the memory sessions add. ``--playback``: the clients report ``playback``
   every 250 ms as a client playing the replies at real time does (the browser demo);
   the outbox lets go of what they heard. Without it they never report. With
   ``--account --server-env DUPLEX_PROBE_TRIM=1`` each account also trims the heap and
   reports what that gave back: the allocator's free memory (it lowers the RSS samples
   that follow: accounting only).
3. Images: ``--images`` sessions (8) send the same 36-megapixel PNG at once (a small
   file); the server's peak RSS while they decode, with the default decode budget and
   with a budget large enough to bound nothing (``DUPLEX_MAX_DECODE_PIXELS``).
4. Rounds: ``--rounds`` rounds of ``--round-size`` sessions; each session connects,
   streams one turn and a second of silence at real time, reads until its reply is done,
   and closes (close 1000: the server ends the session at once and drops its outbox).
   RSS two seconds after each round. Target: after 10 rounds within 10 % of RSS after
   the first. ``--leave drop``: each drops its connection instead (no close frame, as a
   network drop); such a session is kept for the resume grace (30 s) and its outbox for
   60 s more, so rounds hold up to ~90 s of closed sessions. RSS is measured again
   ``--settle`` seconds after the last round. ``--round-settle S``
   measures each round once those windows are over instead (S seconds, one session in
   and out, one heap trim period): with short windows set explicitly
   (``--server-env DUPLEX_RESUME_GRACE_S=2``, ``DUPLEX_OUTBOX_MAX_AGE_S=5``,
   ``DUPLEX_MALLOC_TRIM_S=5``, ``--round-settle 8``), what should have been returned.

Everything is bounded in time: every wait has a timeout, and a session that gets no
reply within 30 s counts as failed (shown in the table) rather than hanging the run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.bench_turns import MSG_BYTES, conversations
from bench.bench_ws import (
    TOKEN,
    ServerProc,
    _spawn,
    free_port,
    header,
    machine_line,
    md_table,
    open_ws,
    start_duplex,
)

PERIOD = 0.02
TRIM_S = 30.0  # the server's default DUPLEX_MALLOC_TRIM_S
POST_CLOSE_TRIM_S = 1.0  # its default DUPLEX_MALLOC_TRIM_AFTER_CLOSE_S
SILENCE_1S = bytes(32000)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def messages_of(pcm: bytes) -> list[bytes]:
    return [pcm[i : i + MSG_BYTES] for i in range(0, len(pcm) - MSG_BYTES + 1, MSG_BYTES)]


async def _drain(ws, done: asyncio.Event | None = None, replies: list[int] | None = None) -> None:
    with contextlib.suppress(Exception):
        async for raw in ws:
            if isinstance(raw, str) and '"response.done"' in raw:
                if replies is not None:
                    replies[0] += 1
                if done is not None:
                    done.set()


#: How a rounds session leaves (``--leave``), as the table says it.
LEAVE = {"close": "close (1000)", "drop": "drop the connection (no close frame)"}
REPORT_EVERY_S = 0.25  # the browser demo's playback report interval (server/static/app.js)


async def _player(ws, replies: list[int], done: asyncio.Event | None = None) -> None:
    """Read everything like `_drain`, and report ``playback`` as a client that plays each
    response's audio at real time from its first chunk does (every 250 ms, as the
    browser demo; the played position never passes what was received)."""
    received: dict[str, float] = {}  # ms of audio received, per response
    started: dict[str, float] = {}
    reported: dict[str, float] = {}

    async def report() -> None:
        while True:
            await asyncio.sleep(REPORT_EVERY_S)
            now = time.monotonic()
            for rid, got in list(received.items()):
                played = round(min(got, (now - started[rid]) * 1000))
                if played != reported.get(rid):
                    reported[rid] = played
                    msg = {"type": "playback", "response_id": rid, "played_ms": played}
                    await ws.send(json.dumps(msg))
                if played >= got and len(received) > 1:
                    del received[rid], started[rid], reported[rid]  # an older one, all heard

    reporter = asyncio.ensure_future(report())
    try:
        with contextlib.suppress(Exception):
            async for raw in ws:
                if not isinstance(raw, str):
                    continue
                if '"media"' in raw:
                    event = json.loads(raw)
                    media = event["media"]
                    rid = event["response_id"]
                    if rid not in received:
                        received[rid], started[rid] = 0.0, time.monotonic()
                    received[rid] += (
                        len(base64.b64decode(media["data"])) / 2 / media["sample_rate"] * 1000
                    )
                elif '"response.done"' in raw:
                    replies[0] += 1
                    if done is not None:
                        done.set()
    finally:
        reporter.cancel()


async def _paced(ws, messages: list[bytes], start: float, until: float | None = None) -> None:
    """Send ``messages`` at real time from ``start`` (in a loop while ``until`` is set)."""
    i = 0
    while True:
        if until is None and i == len(messages):
            return
        due = start + i * PERIOD
        if until is not None and due >= until:
            return
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await ws.send(messages[i % len(messages)])
        i += 1


# ---- parts ------------------------------------------------------------------------------


async def idle_part(server: ServerProc, n: int) -> tuple[float, float]:
    before = rss_mb(server.pid)
    sockets = await asyncio.gather(*(open_ws(server, True) for _ in range(n)))
    await asyncio.sleep(2)
    during = rss_mb(server.pid)
    await asyncio.gather(*(ws.close() for ws in sockets))
    return before, during


def start_probed(env: dict[str, str], out: str) -> ServerProc:
    """``duplex serve`` under `bench.memory_probe` (an account on SIGUSR1, into ``out``)."""
    port = free_port()
    argv = ["-m", "bench.memory_probe", out, "serve", "--port", str(port)]
    argv += ["--token", f"{TOKEN}:bench", "--log-level", "warning"]
    return _spawn(argv, port, env, None)


async def live_part(
    server: ServerProc,
    n: int,
    messages: list[bytes],
    stagger: float,
    warm: float,
    measure: float,
    account: bool = False,
    playback: bool = False,
    trace: bool = False,
) -> dict[str, float]:
    # Past the heap trim that follows the warm-up's closes (1 s after the last one,
    # DUPLEX_MALLOC_TRIM_AFTER_CLOSE_S): sampled 1 s after them, the base RSS could fall
    # before or after that trim (~2 MB here), moving the figure per session by ~20 KB.
    await asyncio.sleep(POST_CLOSE_TRIM_S + 2)
    base = rss_mb(server.pid)
    if account:
        os.kill(server.pid, signal.SIGUSR1)  # the account with no session: the heap's base
        await asyncio.sleep(1)
    if trace:
        os.kill(server.pid, signal.SIGUSR2)  # the snapshot with no session
        await asyncio.sleep(2)
    sockets = []
    for _ in range(n):
        sockets.append(await asyncio.wait_for(open_ws(server, True), 30))
    replies = [0]
    t0 = time.monotonic()
    until = t0 + stagger + warm + measure
    reader = _player if playback else (lambda ws, replies: _drain(ws, replies=replies))
    tasks = [asyncio.ensure_future(reader(ws, replies)) for ws in sockets]
    senders = [
        asyncio.ensure_future(_paced(ws, messages, t0 + stagger * k / n, until))
        for k, ws in enumerate(sockets)
    ]
    await asyncio.sleep(stagger + warm)
    samples = []
    end = time.monotonic() + measure
    while time.monotonic() < end:
        samples.append(rss_mb(server.pid))
        if account:
            os.kill(server.pid, signal.SIGUSR1)
            if trace and len(samples) == 1:
                os.kill(server.pid, signal.SIGUSR2)  # the snapshot at steady state
        await asyncio.sleep(1)
    await asyncio.wait_for(asyncio.gather(*senders), 30)
    lag = time.monotonic() - until
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    for task in tasks:
        task.cancel()
    live = statistics.median(samples)
    return {
        "base": base,
        "live": live,
        "max": max(samples),
        "per_kb": (live - base) * 1024 / n,
        "replies": replies[0],
        "lag": lag,
    }


async def _one_session(
    server: ServerProc,
    messages: list[bytes],
    start: float,
    playback: bool = False,
    leave: str = "close",
) -> bool:
    await asyncio.sleep(max(0.0, start - time.monotonic()))
    try:
        ws = await asyncio.wait_for(open_ws(server, True), 30)
    except Exception:
        return False
    done = asyncio.Event()
    reader = asyncio.ensure_future(_player(ws, [0], done) if playback else _drain(ws, done))
    try:
        await _paced(ws, messages, time.monotonic())
        await asyncio.wait_for(done.wait(), 30)
        return True
    except Exception:
        return False
    finally:
        if leave == "drop":
            ws.transport.abort()  # no close frame, as a network drop
        else:
            await ws.close()  # 1000: done with the session
        reader.cancel()


async def rounds_part(
    server: ServerProc,
    rounds: int,
    size: int,
    messages: list[bytes],
    stagger: float,
    settle: float | None = None,
    trim_s: float = TRIM_S,
    playback: bool = False,
    leave: str = "close",
) -> tuple[float, list[tuple[int, float, int, float]]]:
    """RSS 2 s after each round, or with ``settle``: once that round's resume windows
    are over (`settled_rss`)."""
    await asyncio.sleep(1)
    base = rss_mb(server.pid)
    rows = []
    for r in range(1, rounds + 1):
        t0 = time.monotonic()
        ok = await asyncio.gather(
            *(
                _one_session(server, messages, t0 + stagger * k / size, playback, leave)
                for k in range(size)
            )
        )
        took = time.monotonic() - t0
        if settle is None:
            await asyncio.sleep(2)
            rss = rss_mb(server.pid)
        else:
            rss = await settled_rss(server, settle, trim_s)
        rows.append((r, rss, size - sum(ok), took))
    return base, rows


async def settled_rss(server: ServerProc, settle: float, trim_s: float = TRIM_S) -> float:
    """RSS once the resume windows are over: ``settle`` seconds, then one session
    connects and leaves (the in-memory store expires outboxes when called), then one
    period of the server's heap trim (``DUPLEX_MALLOC_TRIM_S``, 30 s) and 2 s more."""
    await asyncio.sleep(settle)
    ws = await asyncio.wait_for(open_ws(server, True), 30)
    await ws.close()
    await asyncio.sleep(trim_s + 2)
    return rss_mb(server.pid)


def big_png(width: int, height: int) -> bytes:
    """A PNG that inflates to ``width*height`` RGB pixels from a small file."""
    import av
    import numpy as np

    ctx = av.CodecContext.create("png", "w")
    ctx.width, ctx.height, ctx.pix_fmt = width, height, "rgb24"
    plane = np.zeros((height, width, 3), np.uint8)
    plane[::64, :, 0] = 255  # some structure, still tiny once compressed
    frame = av.VideoFrame.from_ndarray(plane, format="rgb24")
    return b"".join(bytes(p) for p in ctx.encode(frame) + ctx.encode(None))


async def images_part(server: ServerProc, n: int, png: bytes) -> tuple[float, float, float, int]:
    """``n`` sessions each send the same large PNG at once; peak RSS while they decode."""
    message = json.dumps(
        {"type": "input.image", "data": base64.b64encode(png).decode(), "mime_type": "image/png"}
    )
    sockets = await asyncio.gather(*(open_ws(server, True) for _ in range(n)))
    await asyncio.sleep(1)
    before = rss_mb(server.pid)
    peak = before
    errors = 0

    async def one(ws) -> None:
        nonlocal errors
        await ws.send(message)
        await ws.send('{"type":"ping","id":"after"}')
        async with asyncio.timeout(120):
            while True:
                reply = json.loads(await ws.recv())
                errors += reply["type"] == "error"
                if reply["type"] == "pong":
                    return

    t0 = time.monotonic()
    sends = asyncio.ensure_future(asyncio.gather(*(one(ws) for ws in sockets)))
    while not sends.done():
        peak = max(peak, rss_mb(server.pid))
        await asyncio.sleep(0.02)
    await sends
    took = time.monotonic() - t0
    await asyncio.gather(*(ws.close() for ws in sockets))
    return before, peak, took, errors


# ---- main -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--idle", type=int, default=200, help="idle sessions")
    ap.add_argument("--live", default="100", help="live session counts, comma separated")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--round-size", type=int, default=200)
    ap.add_argument("--stagger", type=float, default=2.0, help="seconds over which starts spread")
    ap.add_argument("--warm", type=float, default=70.0)
    ap.add_argument("--measure", type=float, default=10.0)
    ap.add_argument("--quick", action="store_true", help="3 rounds of 50, live 50, short")
    ap.add_argument("--parts", default="idle,live,images,rounds", help="which parts to run")
    ap.add_argument("--images", type=int, default=8, help="concurrent large images")
    ap.add_argument("--account", action="store_true", help="what live sessions hold, in-server")
    ap.add_argument(
        "--trace",
        action="store_true",
        help="run the live server under tracemalloc (slower) and list where the memory a "
        "session adds is allocated, by file:line",
    )
    ap.add_argument(
        "--trace-frames",
        type=int,
        default=1,
        help="with --trace: frames of each allocation's traceback kept and listed (more "
        "frames tell which caller holds it; slower)",
    )
    ap.add_argument(
        "--keep-account",
        default="",
        metavar="PATH",
        help="with --account: keep the probe's raw accounts (JSON lines) in PATH; with "
        "--server-env DUPLEX_PROBE_CENSUS=1 they hold a census of objects by type",
    )
    ap.add_argument(
        "--playback",
        action="store_true",
        help="live clients report playback every 250 ms as a playing client does (the "
        "browser demo): the outbox lets go of what they heard",
    )
    ap.add_argument(
        "--leave",
        choices=("close", "drop"),
        default="close",
        help="how each rounds session leaves: close (close 1000: done, the server ends the "
        "session at once) or drop (the TCP connection without a close frame, as a network "
        "drop: the session waits out the resume grace)",
    )
    ap.add_argument(
        "--settle",
        type=float,
        default=95.0,
        help="after the rounds, wait this long (resume grace 30 s + outbox age 60 s) and "
        "measure again; 0: not",
    )
    ap.add_argument(
        "--round-settle",
        type=float,
        default=0.0,
        help="measure each round once its closed sessions' resume windows are over: wait "
        "this long (at least resume grace + outbox age), one session in and out, one heap "
        "trim period; use with short windows, e.g. --server-env DUPLEX_RESUME_GRACE_S=2 "
        "--server-env DUPLEX_OUTBOX_MAX_AGE_S=5 --server-env DUPLEX_MALLOC_TRIM_S=5 "
        "--round-settle 8; 0: RSS 2 s after each round",
    )
    ap.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for the server (repeatable), e.g. a DUPLEX_* setting",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.idle, args.live, args.rounds, args.round_size = 50, "50", 3, 50
        args.warm, args.measure, args.settle = 8.0, 4.0, 0.0
    conv = conversations(1, 2)[0]
    pcm = conv.audio.astype("<i2").tobytes()
    loop_messages = messages_of(pcm + SILENCE_1S)
    first_end = int(conv.turns[0][1] * 32) // MSG_BYTES * MSG_BYTES  # byte offset
    turn_messages = messages_of(pcm[: first_end + 32000] + SILENCE_1S)
    return asyncio.run(_run(args, loop_messages, turn_messages))


async def _run(args: argparse.Namespace, loop_messages: list[bytes], turn_messages: list[bytes]):
    out = [header("Memory", ["bench.bench_memory", *sys.argv[1:]]), machine_line()]
    env = dict(item.split("=", 1) for item in args.server_env)
    if env:
        out.append(f"Server environment: {', '.join(f'`{k}={v}`' for k, v in env.items())}.")
    parts = set(args.parts.split(","))
    targets = []

    if "idle" in parts:
        server = start_duplex(env)
        try:
            await _warm_up(server, turn_messages)
            before, during = await idle_part(server, args.idle)
        finally:
            server.stop()
        idle_kb = (during - before) * 1024 / args.idle
        out += ["", "**Idle sessions** (connected, nothing sent):", ""]
        out.append(
            md_table(
                ["sessions", "RSS before (MB)", "RSS connected (MB)", "per session (KB)"],
                [(args.idle, before, during, idle_kb)],
            )
        )

    if "live" in parts:
        live_rows = []
        account_rows = []
        heap_rows = []
        trace_lines: list[str] = []
        for n in (int(x) for x in args.live.split(",")):
            probed = args.account or args.trace
            probe_out = _probe_file() if probed else ""
            frames = str(args.trace_frames)
            probe_env = {**env, "DUPLEX_PROBE_TRACE": frames} if args.trace else env
            server = start_probed(probe_env, probe_out) if probed else start_duplex(env)
            try:
                await _warm_up(server, turn_messages)
                r = await live_part(
                    server,
                    n,
                    loop_messages,
                    args.stagger,
                    args.warm,
                    args.measure,
                    args.account or args.trace,
                    args.playback,
                    args.trace,
                )
            finally:
                server.stop()
            live_rows.append(
                (n, r["base"], r["live"], r["max"], r["per_kb"], int(r["replies"]), r["lag"])
            )
            if args.trace:
                trace_lines += _trace_top(probe_out, n, frames=args.trace_frames)
            if probed and args.keep_account:
                shutil.copyfile(probe_out, args.keep_account)
            if probed:
                heap_rows.append((n, *_heap_split(probe_out, n)))
                account_rows.append((n, *_account(probe_out, n)))
        out += ["", "**Live VAD sessions** (paced audio, echo replies at real time):", ""]
        headers = ["sessions", "RSS no session (MB)", "RSS live, median (MB)", "max (MB)"]
        headers += ["per session (KB)", "replies", "sender lag at end (s)"]
        out.append(md_table(headers, live_rows))
        if account_rows:
            out += ["", "**What they hold** (median over the samples, per live session):", ""]
            headers = ["sessions", "audio history (KB)", "turn audio (KB)", "outbox (KB)"]
            headers += ["reply resamplers (count, app-wide)", "heap trim gave back (KB)"]
            headers += ["output queued (messages)", "socket write buffers (KB)"]
            headers += ["frames being received (KB)", "stored messages", "heap trim took (ms)"]
            out.append(md_table(headers, account_rows))
        if heap_rows:
            out += ["", "**Where their RSS is** (KB per live session, median minus no session):"]
            out.append("")
            headers = ["sessions", "RSS", "glibc heap in use", "glibc heap free"]
            headers += ["glibc mmapped", "pymalloc blocks in use", "pymalloc arenas' rest"]
            out.append(md_table([*headers, "outside both"], heap_rows))
        if trace_lines:
            out += ["", "**Where they allocate** (tracemalloc, steady state minus no session):"]
            out += ["", *trace_lines]
        targets += [
            f"per live session <= 256 KB at N={row[0]}: {row[4]:.0f} KB "
            f"({'met' if row[4] <= 256 else 'NOT met'})"
            for row in live_rows
        ]

    if "images" in parts:
        width = height = 6000
        png = big_png(width, height)
        rows_i = []
        for budget in (None, 40_000_000 * 8):
            extra = {} if budget is None else {"DUPLEX_MAX_DECODE_PIXELS": str(budget)}
            server = start_duplex({**env, **extra})
            try:
                before, peak, took, errors = await images_part(server, args.images, png)
            finally:
                server.stop()
            label = "default (40 Mpx)" if budget is None else f"{budget / 1e6:.0f} Mpx (no bound)"
            rows_i.append((label, before, peak, peak - before, took, errors))
        out += [
            "",
            f"**Image decodes** ({args.images} sessions send a {width}x{height} PNG of "
            f"{len(png) / 1000:.0f} kB at once; peak RSS sampled every 20 ms):",
            "",
        ]
        headers = ["decode budget", "RSS before (MB)", "peak (MB)", "growth (MB)"]
        out.append(md_table([*headers, "all decoded in (s)", "errors"], rows_i))

    if "rounds" in parts:
        server = start_duplex(env)
        try:
            await _warm_up(server, turn_messages)
            trim_s = float(env.get("DUPLEX_MALLOC_TRIM_S", TRIM_S))
            each = args.round_settle if args.round_settle > 0 else None
            base, rows = await rounds_part(
                server,
                args.rounds,
                args.round_size,
                turn_messages,
                args.stagger,
                each,
                trim_s,
                args.playback,
                args.leave,
            )
            settled = (
                await settled_rss(server, args.settle, trim_s)
                if args.settle > 0 and each is None
                else None
            )
        finally:
            server.stop()
        first, last = rows[0][1], rows[-1][1]
        when = (
            "RSS 2 s after each round"
            if each is None
            else f"RSS after each round's resume windows: {each:.0f} s, one session in and "
            f"out, one heap trim period ({trim_s:.0f} s) and 2 s"
        )
        out += [
            "",
            f"**Close and return** ({args.round_size} sessions a round: connect, one turn at "
            f"real time, reply, {LEAVE[args.leave]}; {when}; before the first: {base:.1f} MB):",
            "",
        ]
        out.append(
            md_table(
                ["round", "RSS (MB)", "vs round 1", "failed sessions", "round took (s)"],
                [
                    (r, rss, f"{(rss / first - 1) * 100:+.1f} %", fail, took)
                    for r, rss, fail, took in rows
                ],
            )
        )
        if settled is not None:
            out += [
                "",
                f"After the resume windows ({args.settle:.0f} s after the last round, then one "
                f"session in and out, and one heap trim period): RSS {settled:.1f} MB, "
                f"{(settled / first - 1) * 100:+.1f} % vs round 1, "
                f"{settled - base:+.1f} MB vs before the first round.",
            ]
        targets.append(
            f"after round {len(rows)} within 10 % of round 1: {(last / first - 1) * 100:+.1f} % "
            f"({'met' if last <= first * 1.1 else 'NOT met'})"
        )
    out += ["", "Targets: " + "; ".join(targets) + "."]
    print("\n".join(out))
    return 0


def _probe_file() -> str:
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as f:
        return f.name


def _account(path: str, n: int) -> tuple[float, ...]:
    """Median KB per session of each held thing, the median number of resamplers,
    (with ``DUPLEX_PROBE_TRIM=1``) the median KB per session a heap trim gave back, and
    per session: messages in the output queue, KB in socket write buffers and in frames
    being received, messages in the store (the conversation so far); the longest heap
    trim (ms, with ``DUPLEX_PROBE_TRIM=1``)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    Path(path).unlink()
    rows = [row for row in rows if row["sessions"]]  # the no-session one: `_heap_split`
    if not rows:
        return (float("nan"),) * 10

    def median_kb(key: str) -> float:
        return statistics.median(row[key] for row in rows) / 1024 / n

    resamplers = statistics.median(row["resamplers"] for row in rows)
    trimmed = statistics.median(row.get("trimmed_kb", 0) for row in rows) / n
    return (
        median_kb("history"),
        median_kb("turn_audio"),
        median_kb("outbox"),
        resamplers,
        trimmed,
        statistics.median(row.get("queued", 0) for row in rows) / n,
        median_kb("write_buffers") if "write_buffers" in rows[0] else 0.0,
        median_kb("partial_frames") if "partial_frames" in rows[0] else 0.0,
        statistics.median(row.get("stored_messages", 0) for row in rows) / n,
        max(row.get("trim_ms", 0) for row in rows),
    )


HEAP_KEYS = ("glibc_in_use", "glibc_free", "glibc_mmap", "pymalloc_used", "pymalloc_free")


def _heap_split(path: str, n: int) -> tuple[float, ...]:
    """Per session (KB), median over the samples minus the account with no session:
    RSS, then where it is (`bench.memory_probe.heap`): glibc's heap in use, free in it,
    its mmapped blocks, pymalloc's blocks in use, the rest of its arenas; and RSS minus
    all those (memory outside both allocators: native libraries' own, thread stacks)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    base = next((row for row in rows if not row["sessions"]), None)
    live = [row for row in rows if row["sessions"]]
    if base is None or not live or "glibc_in_use" not in base:
        return (float("nan"),) * 7

    def per(key: str) -> float:
        return (statistics.median(row[key] for row in live) - base[key]) / n

    rss = per("rss_kb")
    parts = [per(key) / 1024 for key in HEAP_KEYS]
    return (rss, *parts, rss - sum(parts))


def _short(filename: str) -> str:
    """A traced file's name relative to the repository or to site-packages."""
    for root in (os.getcwd() + "/", "site-packages/", "/lib/python3."):
        if root in filename:
            return filename.split(root, 1)[-1]
    return filename


def _trace_top(path: str, n: int, top: int = 30, frames: int = 1) -> list[str]:
    """The lines of code holding the most more memory at steady state than with no
    session (tracemalloc), per session; with ``frames`` > 1, by traceback (the
    callers, innermost first). The snapshots are removed."""
    import tracemalloc

    paths = [Path(f"{path}.{k}.trace") for k in (1, 2)]
    if not all(p.exists() for p in paths):
        return ["(no tracemalloc snapshots)"]
    before, after = (tracemalloc.Snapshot.load(str(p)) for p in paths)
    for p in paths:
        p.unlink()
    stats = after.compare_to(before, "lineno" if frames <= 1 else "traceback")
    total = sum(s.size_diff for s in stats)
    lines = [f"- all Python allocations: {total / 1024 / n:+.1f} KB per session"]
    for stat in stats[:top]:
        where = " < ".join(f"`{_short(f.filename)}:{f.lineno}`" for f in reversed(stat.traceback))
        lines.append(
            f"- {stat.size_diff / 1024 / n:+.1f} KB, {stat.count_diff / n:+.1f} blocks: {where}"
        )
    return lines


async def _warm_up(server: ServerProc, messages: list[bytes]) -> None:
    """A few sessions through a whole turn first: code paths and caches loaded once."""
    t0 = time.monotonic()
    await asyncio.gather(*(_one_session(server, messages, t0 + k * 0.1) for k in range(5)))


if __name__ == "__main__":
    sys.exit(main())
