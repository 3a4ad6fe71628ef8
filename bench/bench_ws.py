"""Endpoint overhead: /v1/duplex against a bare ``websockets`` server, same client, same sizes.

Run: ``python -m bench.bench_ws`` (``--quick`` for a short run). Prints markdown.

Both servers run as subprocesses of this script (``python -m server.cli serve`` with
``DUPLEX_ECHO_PACE=0``, and ``python -m bench.bench_ws --serve-bare PORT``), each on the
default asyncio loop, per-message deflate off. With ``--pin`` the server is pinned to
CPU 0 and this client to CPU 1 (off by default: on a shared 2-core machine a pinned
process cannot move away from someone else's load).

0. Connect time of the first sessions on a fresh server.
1. Ping round trip: one connection, one ``ping`` in flight; Duplex answers ``pong``
   through uvicorn + FastAPI + the session's output queue + pydantic serialisation, the
   bare server echoes the frame. Then C connections in a closed loop (each sends its
   next ping when its pong arrives) for the saturated rate and the server's CPU time per
   round trip (from /proc/PID/task/*/schedstat, so other load on the machine does not count).
2. Output: Duplex streams a long audio turn back (manual turn of ``--turn-s`` seconds,
   ``input.commit``; the echo provider answers with 100 ms audio chunks resampled to
   24 kHz, as fast as the socket takes them). A second run asks for 16 kHz output, so
   the reply needs no resampling (as from a provider that speaks at the output rate).
   After each, the bare server pushes as many pre-built frames of the same mean size.
   Chunks/s and MB/s from the trigger to the last frame.

The Duplex and bare runs are interleaved (``--repeats``) and the ratios are of medians
of the same run. Other benchmarks import the process helpers from here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve

TOKEN = "bench-token"
ROOT = Path(__file__).resolve().parent.parent


# ---- process helpers (shared by the other server benchmarks) ------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def schedstat(pid: int | str = "self") -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one), summed over threads."""
    run = wait = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            fields = (task / "schedstat").read_text().split()
            run += int(fields[0])
            wait += int(fields[1])
    return run / 1e9, wait / 1e9


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (``duplex serve --workers N``: the workers)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            with contextlib.suppress(OSError):
                kids = [int(k) for k in (task / "children").read_text().split()]
                found += kids
                todo += kids
    return found


def tree_schedstat(pid: int) -> tuple[float, float]:
    """`schedstat` summed over ``pid`` and its descendants."""
    run = wait = 0.0
    for one in [pid, *descendants(pid)]:
        with contextlib.suppress(OSError):
            r, w = schedstat(one)
            run, wait = run + r, wait + w
    return run, wait


def pin_self(cpu: int | None) -> None:
    """Pin this (client) process; a no-op when the CPU does not exist."""
    if cpu is not None and cpu < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {cpu})


@dataclass
class ServerProc:
    """A server subprocess on 127.0.0.1; CPU time read from /proc, not from wall time."""

    proc: subprocess.Popen[bytes]
    port: int
    path: str = "/v1/duplex"
    log: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{self.path}"

    def cpu_seconds(self) -> float:
        """CPU time of the server process, all threads (schedstat: ns, not 10 ms ticks)."""
        return schedstat(self.pid)[0]

    def wait_seconds(self) -> float:
        """Time the server was runnable but waiting for a CPU (others' load, not its own)."""
        return schedstat(self.pid)[1]

    def stop(self) -> None:
        children = descendants(self.pid) if self.proc.poll() is None else []
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for child in children:  # workers left behind by a killed supervisor
            with contextlib.suppress(OSError):
                os.kill(child, signal.SIGKILL)
                self.proc.wait(5)


def _spawn(
    argv: Sequence[str],
    port: int,
    env: dict[str, str],
    cpu: int | set[int] | None,
    python: str = sys.executable,
) -> ServerProc:
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    ncpu = os.cpu_count() or 1
    cpus = {cpu} if isinstance(cpu, int) else (cpu or set())

    def pin() -> None:
        if cpus and all(c < ncpu for c in cpus):
            os.sched_setaffinity(0, cpus)

    proc = subprocess.Popen(
        [python, *argv],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=pin,
    )
    server = ServerProc(proc, port)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"server exited with {proc.returncode}: {err[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            break
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError("server did not start in 30 s")
        time.sleep(0.05)
    # Drain stderr in the background so a chatty server never blocks on a full pipe.
    import threading

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            server.log.append(line.decode(errors="replace").rstrip())
            del server.log[:-200]

    threading.Thread(target=drain, daemon=True).start()
    return server


def start_duplex(
    env: dict[str, str] | None = None,
    cpu: int | set[int] | None = None,
    extra: Sequence[str] = (),
    python: str = sys.executable,
) -> ServerProc:
    """``python -m server.cli serve`` with DUPLEX_* settings from ``env`` (and ``extra``
    arguments, e.g. ``--workers 2``), pinned to ``cpu`` (one, or a set); ``python``: another
    interpreter (a venv with other packages)."""
    port = free_port()
    argv = ["-m", "server.cli", "serve", "--port", str(port), "--token", f"{TOKEN}:bench"]
    argv += ["--log-level", "warning", *extra]
    return _spawn(argv, port, env or {}, cpu, python)


def start_bare(cpu: int | None = None) -> ServerProc:
    """The baseline: a bare ``websockets`` server (this module, ``--serve-bare``)."""
    port = free_port()
    server = _spawn(["-m", "bench.bench_ws", "--serve-bare", str(port)], port, {}, cpu)
    server.path = "/"
    return server


def auth_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


async def open_ws(server: ServerProc | str, duplex: bool) -> ClientConnection:
    """Same client settings for both servers; reads Duplex's ``session.created``."""
    ws = await connect(
        server if isinstance(server, str) else server.ws_url,
        additional_headers=auth_headers() if duplex else None,
        compression=None,
        max_size=None,
        ping_interval=None,
        open_timeout=30,
    )
    if duplex:
        first = json.loads(await ws.recv())
        assert first["type"] == "session.created", first
    return ws


# ---- reporting helpers ----------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else float("nan")


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            if v != v:
                return "n/a"
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |"]
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|")
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine_line() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import uvicorn
    import websockets

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"Machine: {platform.machine()} {cpu}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, uvicorn {uvicorn.__version__} (uvloop, httptools; "
        f"Duplex: its WebSocket protocol class), websockets {websockets.__version__}; "
        "load average at the end: "
        f"{load} (other work shares this machine)."
    )


def header(title: str, argv: Sequence[str]) -> str:
    today = datetime.date.today().isoformat()
    return f"## {title}\n\nReproduce: `python -m {' '.join(argv)}` ({today})\n"


# ---- the bare baseline server ---------------------------------------------------------------


async def _bare_handler(ws: ServerConnection) -> None:
    """Echo every frame; ``{"type":"push","n":N,"size":S}`` pushes N frames of S bytes."""
    async for message in ws:
        if isinstance(message, str) and message.startswith('{"type":"push"'):
            req = json.loads(message)
            frame = '{"type":"chunk","data":"' + "A" * (int(req["size"]) - 27) + '"}'
            for _ in range(int(req["n"])):
                await ws.send(frame)
            await ws.send('{"type":"response.done"}')
        else:
            await ws.send(message)


async def serve_bare(port: int) -> None:
    async with serve(
        _bare_handler, "127.0.0.1", port, compression=None, max_size=None, ping_interval=None
    ) as server:
        await server.serve_forever()


# ---- 1. ping round trips ----------------------------------------------------------------------


async def ping_loop(
    ws: ClientConnection, n: int, tag: str, until: float | None = None
) -> list[float]:
    """Sequential ping -> reply round trips (seconds); the reply is matched by its id."""
    rtts: list[float] = []
    for i in range(n):
        if until is not None and time.perf_counter() > until:
            break
        mid = f"{tag}{i:08d}"
        t0 = time.perf_counter()
        await ws.send(f'{{"type":"ping","id":"{mid}"}}')
        while True:
            reply = json.loads(await ws.recv())
            if reply.get("id") == mid:
                break
        rtts.append(time.perf_counter() - t0)
    return rtts


async def ping_single(server: ServerProc, duplex: bool, n: int) -> list[float]:
    ws = await open_ws(server, duplex)
    try:
        await ping_loop(ws, 200, "w")
        return await ping_loop(ws, n, "p")
    finally:
        await ws.close()


async def ping_many(
    server: ServerProc, duplex: bool, conns: int, seconds: float
) -> tuple[list[float], float, float]:
    """C connections in a closed loop; returns (rtts, wall seconds, server CPU seconds)."""
    sockets = await asyncio.gather(*(open_ws(server, duplex) for _ in range(conns)))
    try:
        await asyncio.gather(*(ping_loop(ws, 20, f"w{i}-") for i, ws in enumerate(sockets)))
        cpu0, t0 = server.cpu_seconds(), time.perf_counter()
        until = t0 + seconds
        results = await asyncio.gather(
            *(ping_loop(ws, 10**9, f"c{i}-", until) for i, ws in enumerate(sockets))
        )
        wall, cpu = time.perf_counter() - t0, server.cpu_seconds() - cpu0
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    return [r for rs in results for r in rs], wall, cpu


# ---- 2. output throughput ---------------------------------------------------------------------


@dataclass
class Burst:
    frames: int
    audio_frames: int
    bytes: int
    seconds: float
    server_cpu: float


async def duplex_burst(server: ServerProc, turn_s: int, out_rate: int = 24000) -> Burst:
    """Upload ``turn_s`` s of audio in a manual turn, commit, read the echoed audio back.

    The echo provider replies with the turn's 16 kHz audio: at ``out_rate`` 24000 every
    chunk is resampled; at 16000 none is (as from a provider that speaks at the output
    rate).
    """
    ws = await open_ws(server, True)
    try:
        config = {
            "turn_detection": {"type": "manual", "max_turn_ms": turn_s * 1000 + 1000},
            "output_audio": {"sample_rate": out_rate},
        }
        await ws.send(json.dumps({"type": "session.update", "config": config}))
        assert json.loads(await ws.recv())["type"] == "session.updated"
        rng = np.random.default_rng(1)
        second = (rng.standard_normal(16000) * 3000).astype("<i2").tobytes()
        for _ in range(turn_s):
            await ws.send(second)
        await ping_loop(ws, 1, "sync")  # every audio message has been ingested
        cpu0, t0 = server.cpu_seconds(), time.perf_counter()
        await ws.send('{"type":"input.commit"}')
        frames = audio = size = 0
        while True:
            msg = await ws.recv()
            assert isinstance(msg, str)
            frames += 1
            size += len(msg)
            if msg.endswith('"type":"chunk"}'):
                audio += '"media":' in msg[:80]
            elif '"type":"response.done"' in msg:
                break
        return Burst(frames, audio, size, time.perf_counter() - t0, server.cpu_seconds() - cpu0)
    finally:
        await ws.close()


async def bare_burst(server: ServerProc, frames: int, size: int) -> Burst:
    ws = await open_ws(server, False)
    try:
        cpu0, t0 = server.cpu_seconds(), time.perf_counter()
        await ws.send(f'{{"type":"push","n":{frames},"size":{size}}}')
        got = total = 0
        while True:
            msg = await ws.recv()
            assert isinstance(msg, str)
            got += 1
            total += len(msg)
            if msg == '{"type":"response.done"}':
                break
        return Burst(got, got - 1, total, time.perf_counter() - t0, server.cpu_seconds() - cpu0)
    finally:
        await ws.close()


# ---- main -------------------------------------------------------------------------------------


def _ms(x: float) -> float:
    return x * 1000.0


async def connect_times(server: ServerProc, n: int) -> list[float]:
    """Seconds from connect to ``session.created``, one connection after another."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        ws = await open_ws(server, True)
        times.append(time.perf_counter() - t0)
        await ws.close()
    return times


async def run(args: argparse.Namespace, duplex: ServerProc, bare: ServerProc) -> str:
    out: list[str] = []
    # 0. the first connections to a fresh server (nothing has connected to it yet)
    first = await connect_times(duplex, 21)
    out.append(
        f"Connect -> `session.created` on a fresh server: first connection "
        f"{first[0] * 1000:.1f} ms, the next 20 p50 {pct(first[1:], 50) * 1000:.1f} ms "
        f"(the first session imports the mode modules: the event loop is blocked that long "
        f"for every session).\n"
    )
    # 1a. single connection RTT, interleaved blocks
    rtt: dict[str, list[float]] = {"duplex": [], "bare": []}
    block = max(1, args.pings // args.repeats)
    for _ in range(args.repeats):
        rtt["bare"] += await ping_single(bare, False, block)
        rtt["duplex"] += await ping_single(duplex, True, block)
    b50, b99 = pct(rtt["bare"], 50), pct(rtt["bare"], 99)
    d50, d99 = pct(rtt["duplex"], 50), pct(rtt["duplex"], 99)
    out.append(
        f"### Ping round trip, 1 connection, 1 in flight ({len(rtt['duplex'])} pings each)\n"
    )
    out.append(
        md_table(
            ["server", "p50 ms", "p99 ms", "x bare p50", "x bare p99", "Duplex minus bare p50 µs"],
            [
                ["bare websockets echo", _ms(b50), _ms(b99), 1.0, 1.0, 0.0],
                ["Duplex /v1/duplex", _ms(d50), _ms(d99), d50 / b50, d99 / b99, (d50 - b50) * 1e6],
            ],
        )
    )
    # 1b. closed loop with many connections
    rows = []
    many: dict[str, tuple[list[float], float, float]] = {}
    for name, server, is_duplex in (("bare", bare, False), ("duplex", duplex, True)):
        many[name] = await ping_many(server, is_duplex, args.conns, args.seconds)
    base_rate = len(many["bare"][0]) / many["bare"][1]
    base_cpu = many["bare"][2] / len(many["bare"][0])
    for name, label in (("bare", "bare websockets echo"), ("duplex", "Duplex /v1/duplex")):
        rtts, wall, cpu = many[name]
        rate = len(rtts) / wall
        per = cpu / len(rtts)
        rows.append(
            [
                label,
                f"{rate:,.0f}",
                _ms(pct(rtts, 50)),
                _ms(pct(rtts, 99)),
                f"{cpu / wall * 100:.0f}%",
                per * 1e6,
                per / base_cpu,
                rate / base_rate,
            ]
        )
    out.append(f"\n### Ping closed loop, {args.conns} connections, {args.seconds:.0f} s each\n")
    out.append(
        md_table(
            [
                "server",
                "round trips/s",
                "p50 ms",
                "p99 ms",
                "server CPU",
                "server CPU µs / round trip",
                "x bare CPU",
                "x bare rate",
            ],
            rows,
        )
    )
    # 2. output throughput: resampled to 24 kHz, and sent as it comes (16 kHz out);
    # each against the bare server pushing frames of its mean size
    runs: dict[int, tuple[list[Burst], list[Burst]]] = {24000: ([], []), 16000: ([], [])}
    for _ in range(args.repeats):
        for out_rate, (dup, bar) in runs.items():
            d = await duplex_burst(duplex, args.turn_s, out_rate)
            dup.append(d)
            bar.append(await bare_burst(bare, d.frames - 1, d.bytes // d.frames))

    def medians(bursts: list[Burst]) -> tuple[float, float, float]:
        return (
            float(np.median([b.audio_frames / b.seconds for b in bursts])),
            float(np.median([b.bytes / b.seconds / 1e6 for b in bursts])),
            float(np.median([b.server_cpu / b.frames * 1e6 for b in bursts])),
        )

    rows: list[list[Any]] = []
    for out_rate, label in ((24000, "16 kHz -> 24 kHz"), (16000, "16 kHz, not resampled")):
        dup, bar = runs[out_rate]
        size = dup[0].bytes // dup[0].frames
        b_cps, b_mbs, b_cpu = medians(bar)
        cps, mbs, cpu = medians(dup)
        rows.append([f"bare websockets push, {size:,} B frames", b_cps, b_mbs, b_cpu, 1.0, 1.0])
        rows.append([f"Duplex echo reply, {label}", cps, mbs, cpu, cps / b_cps, cpu / b_cpu])
    dup = runs[24000][0]
    size = dup[0].bytes // dup[0].frames
    out.append(
        f"\n### Output stream: {dup[0].audio_frames} audio chunks of ~{size:,} bytes "
        f"({args.turn_s} s echoed, 100 ms chunks at 24 kHz; then at 16 kHz, not "
        f"resampled), median of {args.repeats}\n"
    )
    out.append(
        md_table(
            [
                "server",
                "chunks/s",
                "MB/s",
                "server CPU µs / frame",
                "x bare chunks/s",
                "x bare CPU",
            ],
            rows,
        )
    )
    realtime = medians(dup)[0] / 10  # 10 chunks per second of audio per real-time stream
    out.append(
        f"\nOne Duplex session streams reply audio at {realtime:,.0f}x real time "
        f"(chunk rate / 10 chunks per audio second)."
    )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--pings", type=int, default=5000, help="single-connection pings")
    parser.add_argument("--conns", type=int, default=64, help="closed-loop connections")
    parser.add_argument("--seconds", type=float, default=8.0, help="closed-loop duration")
    parser.add_argument("--turn-s", type=int, default=120, help="seconds of audio echoed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--pin", action="store_true", help="pin the server to CPU 0 and this client to CPU 1"
    )
    parser.add_argument("--serve-bare", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare:
        asyncio.run(serve_bare(args.serve_bare))
        return
    if args.quick:
        args.pings, args.seconds, args.turn_s, args.repeats = 1000, 3.0, 60, 2
    server_cpu, client_cpu = (0, 1) if args.pin else (None, None)
    pin_self(client_cpu)
    duplex = start_duplex({"DUPLEX_ECHO_PACE": "0"}, server_cpu)
    bare = start_bare(server_cpu)
    try:
        body = asyncio.run(run(args, duplex, bare))
    finally:
        duplex.stop()
        bare.stop()
    pin = "server pinned to CPU 0, client to CPU 1" if args.pin else "not pinned"
    print(header("Endpoint overhead (bench/bench_ws.py)", ["bench.bench_ws", *sys.argv[1:]]))
    print(machine_line() + f" Both servers are subprocesses; {pin}.\n")
    print(body)


if __name__ == "__main__":
    main()
