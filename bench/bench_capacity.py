"""Sessions per core: N real-time audio sessions against one server process on one core.

Run: ``python -m bench.bench_capacity`` (``--quick`` for a short curve). Prints markdown.

Set-up (2-core machine): the server (``python -m server.cli serve``, default settings, so
``DUPLEX_ECHO_PACE=1``: the echo provider replies with the user's audio at real time) is
pinned to CPU 0 and restarted for every N. The load generator is another process
(``--worker``), pinned to CPU 1: one event loop holding all N connections. It must cost
far less than the server, or on a 2-core machine it takes the cores the server needs
(``--workers 2``): by default each connection is a raw asyncio transport on uvloop
(``RawClient``: the RFC 6455 handshake, pre-masked frames written as they fall due,
replies scanned in place, only the few events the criteria use JSON-parsed);
``--client websockets`` runs the earlier generator (the websockets library on asyncio)
with the same schedule and criteria. Its CPU per session-second (and the kernel's share
of it: loopback TCP does the receiving side's work in the sender's system calls) is
reported with every point. Each
session streams one of a few espeak-ng conversations (pink noise, 20 dB SNR) as 20 ms
binary messages at real time; the session starts are spread over ``--stagger`` seconds,
so sends are spread over the 20 ms period and turns do not end together.

Per session and turn, as in bench_turns: the message that ends each turn is known
offline (``AudioIngest``), and the end-of-turn overhead is its send time to the arrival
of ``turn.ended``. Audio integrity: every ``turn.ended`` must carry the offline
``audio_end_ms`` (the server's input clock is exact, so a dropped or duplicated message
shows up as a mismatch) and every turn whose last message was sent must arrive.

The generator checks itself, so the server is never blamed for the client's lag:
send lag (actual send time minus the real-time schedule), the lag of its own event loop
(a 5 ms sleeper's oversleep: it delays the time-stamps of arrivals by as much), and its
CPU use and CPU wait. Both processes' CPU wait (schedstat run delay: runnable, but
another process held the core) shows how much of the machine other work took.

Verdicts: **pass** when the end-of-turn p99 is < 50 ms, no turn is missing or
mismatched, no error arrives and the audio went out on time (send lag p99 < 20 ms);
**FAIL** when the server is the cause: a turn is missing or mismatched, or the p99 stays
>= 50 ms after subtracting the generator's loop lag p99, or the sends were held back
while the generator's own loop was on time (the server stopped reading: backpressure);
**inconclusive** otherwise (the generator was late). The curve stops after two
consecutive FAILs (``--all`` runs every point). A point that does not pass while the
server waited over 10% of the window for its core is run once more, and the run in
which it waited less is reported.

``--metrics on`` (or ``port``) runs the server with Prometheus metrics on
(``DUPLEX_METRICS``) and scrapes them every ``--scrape-every`` seconds during the run, as
Prometheus would; compare with ``--metrics off`` (the default) for their cost.

``--workers N`` runs the server as ``duplex serve --workers N`` (N processes on one
port) on CPUs 0..N-1, with a shared store: a redis-server started by the bench on
loopback (``--store sqlite`` for a SQLite file instead); the generator gets CPU N if the
machine has it, else it shares the cores (say so when comparing). Server CPU is summed
over the supervisor and its workers (Redis's own CPU is not counted). For 2 workers vs
1, compare ``--workers 2`` with ``--workers 1 --store redis`` (same store).

``--door both`` (or ``realtime`` / ``duplex24``) sends 24 kHz audio, as OpenAI clients
do, through the OpenAI Realtime door (base64 appends) and/or /v1/duplex, same criteria,
both doors at each N (bench/capacity_door.py).

``--profile N`` samples the server with py-spy (``pip install py-spy``) during the
steady part of the run at N sessions and prints where its time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import hashlib
import heapq
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvloop
from websockets.asyncio.client import ClientConnection
from websockets.frames import Frame, Opcode

from bench.bench_resume import redis_server
from bench.bench_turns import MSG_MS, Plan, conversations, plan_for
from bench.bench_ws import (
    ROOT,
    ServerProc,
    auth_headers,
    free_port,
    header,
    machine_line,
    md_table,
    open_ws,
    pct,
    pin_self,
    schedstat,
    start_duplex,
    tree_schedstat,
)

SERVER_CPU, CLIENT_CPU = 0, 1
PERIOD = MSG_MS / 1000
CURVE = (25, 50, 75, 100, 150, 200, 300, 400, 500)
QUICK_CURVE = (25, 50, 100, 200)


# ---- the load generator (runs in the worker process) ----------------------------------------


@dataclass
class SessionStats:
    """What one simulated client sent and saw; kept minimal, the generator must be cheap."""

    plan: int
    start: float
    sent: int = 0
    sent_at: dict[int, float] = field(default_factory=dict)  # trigger index -> send time
    turns: list[tuple[float, float | None]] = field(default_factory=list)  # (arrival, end_ms)
    starts: int = 0
    errors: list[str] = field(default_factory=list)
    chunk_lateness: list[float] = field(default_factory=list)
    reply_first: float | None = None
    reply_ms: float = 0.0

    def reply_audio(self, now: float, b64_chars: int) -> None:
        """A reply audio chunk (``b64_chars`` of base64 PCM16 at 24 kHz) arrived at ``now``:
        how late it is against real time since the reply's first chunk."""
        ms = b64_chars * 3 / 4 / 2 / 24.0
        if self.reply_first is None:
            self.reply_first, self.reply_ms = now, 0.0
        self.chunk_lateness.append(max(0.0, now - self.reply_first - self.reply_ms / 1000))
        self.reply_ms += ms

    def event(self, event: dict, now: float) -> str | None:
        """Any other server message; returns its type."""
        kind = event.get("type")
        if kind == "turn.ended":
            self.turns.append((now, event.get("audio_end_ms")))
        elif kind == "speech.started":
            self.starts += 1
        elif kind == "response.started":
            self.reply_first = None
        elif kind == "error":
            self.errors.append(f"{event.get('code')}: {event.get('message')}")
        return kind


@dataclass
class WorkerResult:
    """One point of the curve, as the worker reports it (JSON on its stdout)."""

    n: int
    connect_s: float
    wall_s: float
    expected: int
    received: int
    mismatched: int
    missing: int
    errors: int
    eot: list[float]
    send_lag_p50: float
    send_lag_p99: float
    send_lag_max: float
    loop_lag_p99: float
    loop_lag_max: float
    gen_cpu: float  # fraction of its core the generator used
    gen_wait: float  # fraction of the time it was runnable but waiting for the core
    reply_lag_p99: float
    sends: int
    gen_cpu_s: float = float("nan")  # the generator's CPU s while it sent (not connecting)
    gen_sys_share: float = float("nan")  # of which in the kernel (loopback TCP's delivery)


def _masked_binary(data: bytes) -> bytes:
    """One client binary frame (FIN, masked), as websockets would send it."""
    return Frame(Opcode.BINARY, data).serialize(mask=True, extensions=[])


_CLOSE_1000 = Frame(Opcode.CLOSE, (1000).to_bytes(2, "big")).serialize(mask=True, extensions=[])
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_CHUNK_TAIL = b'"type":"chunk"}'
_DATA_KEY = b'"data":"'


class RawClient(asyncio.Protocol):
    """One generator session on a raw asyncio transport: the cheapest client that keeps the
    protocol. It does the RFC 6455 handshake itself, writes pre-masked frames (a client may
    use any masking key) and scans the server's unmasked frames in place: an audio chunk is
    never copied, decoded or JSON-parsed (its length is read off the buffer); only the few
    events the criteria need are. Pings are answered; a close frame is echoed."""

    def __init__(self, s: SessionStats, host: str, path: str) -> None:
        self.s = s
        self.key = base64.b64encode(os.urandom(16))
        self.request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {self.key.decode()}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in auth_headers().items())
            + "\r\n"
        ).encode()
        self.buf = bytearray()
        self.fragments = bytearray()
        self.fragment_op = 0
        self.upgraded = False
        self.closing = False  # the end of the connection is expected from here on
        self.sent_close = False
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.created: asyncio.Future[None] = loop.create_future()  # session.created seen
        self.lost: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closing:
            self.s.errors.append(f"connection: lost ({exc!r})")
        for fut in (self.created, self.lost):
            if not fut.done():
                fut.set_result(None)

    def _fail(self, why: str) -> None:
        self.s.errors.append(f"connection: {why}")
        if not self.created.done():
            self.created.set_exception(ConnectionError(why))
        assert self.transport is not None
        self.transport.abort()

    def _handshake(self) -> bool:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(self.buf[:end]).decode("latin-1")
        del self.buf[: end + 4]
        accept = base64.b64encode(hashlib.sha1(self.key + _WS_GUID).digest()).decode()
        if not head.startswith("HTTP/1.1 101") or accept not in head:
            self._fail(f"handshake refused: {head.splitlines()[0] if head else head!r}")
            return False
        self.upgraded = True
        return True

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        buf = self.buf
        buf += data
        if not self.upgraded and not self._handshake():
            return
        pos, size = 0, len(buf)
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length, head = b1 & 0x7F, 2
            if length == 126:
                if size - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if b1 & 0x80:
                self._fail("masked server frame")
                return
            start = pos + head
            end = start + length
            if end > size:
                break
            self._frame(b0, buf, start, end, now)
            pos = end
        del buf[:pos]

    def _frame(self, b0: int, buf: bytearray, start: int, end: int, now: float) -> None:
        op, fin = b0 & 0x0F, b0 & 0x80
        if op == 0x9:  # ping: answer with a pong carrying the same payload
            assert self.transport is not None
            self.transport.write(
                Frame(Opcode.PONG, bytes(buf[start:end])).serialize(mask=True, extensions=[])
            )
            return
        if op == 0x8:
            code = int.from_bytes(buf[start : start + 2], "big") if end - start >= 2 else 1005
            if not self.closing and code not in (1000, 1001):
                self.s.errors.append(f"connection: closed by the server with {code}")
            self.closing = True
            if not self.sent_close:
                self.sent_close = True
                assert self.transport is not None
                self.transport.write(_CLOSE_1000)
            return
        if op == 0xA:
            return
        if op == 0 or not fin:  # a fragmented message (the server does not fragment today)
            if op:
                self.fragment_op = op
            self.fragments += buf[start:end]
            if not fin:
                return
            op, data = self.fragment_op, bytes(self.fragments)
            self.fragments.clear()
            if op == 0x1:
                self._text(bytearray(data), 0, len(data), now)
            return
        if op == 0x1:
            self._text(buf, start, end, now)

    def _text(self, buf: bytearray, start: int, end: int, now: float) -> None:
        s = self.s
        if buf.endswith(_CHUNK_TAIL, start, end):
            i = buf.find(_DATA_KEY, start, min(end, start + 120))
            if i < 0:
                return
            s.reply_audio(now, buf.index(b'"', i + 8, end) - i - 8)
            return
        kind = s.event(json.loads(bytes(buf[start:end])), now)
        if kind == "session.created" and not self.created.done():
            self.created.set_result(None)

    def write(self, frame: bytes) -> None:
        assert self.transport is not None
        if self.transport.is_closing() or self.closing:
            raise ConnectionError("closed")
        self.transport.write(frame)

    async def close(self) -> None:
        """Send a close frame and wait (bounded) for the server to end the connection."""
        if self.transport is None:
            return
        self.closing = True
        if not self.sent_close and not self.transport.is_closing():
            self.sent_close = True
            self.transport.write(_CLOSE_1000)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.lost), 5)
        self.transport.close()


async def open_raw(port: int, s: SessionStats) -> RawClient:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(
        lambda: RawClient(s, f"127.0.0.1:{port}", "/v1/duplex"), "127.0.0.1", port
    )
    await asyncio.wait_for(client.created, 30)
    return client


async def _reader(ws: ClientConnection, s: SessionStats) -> None:
    """The websockets client's reader (``--client websockets``): audio chunks are never
    JSON-parsed, but every frame goes through the library's parser and a queue."""
    try:
        async for raw in ws:
            now = time.perf_counter()
            if not isinstance(raw, str):
                continue
            if raw.endswith('"type":"chunk"}'):
                i = raw.find('"data":"', 0, 120)
                if i < 0:
                    continue
                s.reply_audio(now, raw.index('"', i + 8) - i - 8)
                continue
            s.event(json.loads(raw), now)
    except Exception as exc:  # a dropped connection is a finding, not a crash
        s.errors.append(f"connection: {type(exc).__name__}: {exc}")


async def _loop_probe(lags: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(0.005)
        lags.append(time.perf_counter() - t - 0.005)


def _mark(word: str) -> None:
    """Tell the orchestrator where the run is (it samples the server's CPU in between)."""
    print(word, flush=True)


async def run_worker(
    url_port: int, n: int, duration: float, stagger: float, plans: list[Plan], client: str
) -> WorkerResult:
    url = f"ws://127.0.0.1:{url_port}/v1/duplex"
    t_conn = time.perf_counter()
    stats = [SessionStats(plan=k % len(plans), start=0.0) for k in range(n)]
    sem = asyncio.Semaphore(32)
    readers: list[asyncio.Task[None]] = []
    raws: list[RawClient] = []
    sockets: list[ClientConnection] = []

    if client == "raw":

        async def one_raw(s: SessionStats) -> RawClient:
            async with sem:
                return await open_raw(url_port, s)

        raws = list(await asyncio.gather(*(one_raw(s) for s in stats)))
    else:

        async def one() -> ClientConnection:
            async with sem:
                return await open_ws(url, True)

        sockets = list(await asyncio.gather(*(one() for _ in range(n))))
        pairs = zip(sockets, stats, strict=True)
        readers = [asyncio.create_task(_reader(ws, s)) for ws, s in pairs]
    connect_s = time.perf_counter() - t_conn
    # The generator must stay cheap at hundreds of sessions: each message is framed and
    # masked once, ahead of time, and written straight to the socket's transport (data
    # frames need no protocol state).
    wire = [[_masked_binary(m) for m in p.messages] for p in plans]
    writers = [r.write for r in raws] or [_transport_writer(ws) for ws in sockets]
    sent = await drive(stats, plans, wire, writers, duration, stagger)
    for r in raws:
        r.closing = True  # from here on, the end of a connection is expected
    for task in readers:
        task.cancel()
    await asyncio.gather(*(r.close() for r in raws), return_exceptions=True)
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    return worker_result(connect_s, stats, plans, sent)


@dataclass
class Sent:
    """How a worker's sending went: its wall time and the generator's own figures."""

    wall: float
    send_lags: list[float]
    loop_lags: list[float]
    cpu_s: float  # schedstat: on a core
    wait_s: float  # schedstat: runnable, waiting for a core
    user_s: float
    sys_s: float


async def drive(
    stats: list[SessionStats],
    plans: list[Plan],
    wire: list[list[bytes]],
    writers: list[Callable[[bytes], object]],
    duration: float,
    stagger: float,
) -> Sent:
    """Send each session's framed messages (``wire[plan]``) with its writer at real time,
    the starts spread over `stagger` s; mark START, STEADY and TAIL for the orchestrator;
    then let the last turns arrive (3 s at most). A writer that raises ends its session."""
    n = len(stats)
    per_session = int(duration / PERIOD)
    t0 = time.perf_counter() + 0.5
    for k, s in enumerate(stats):
        s.start = t0 + stagger * k / n
    triggers = [{idx: j for j, (idx, _, _) in enumerate(p.turns)} for p in plans]
    stop = asyncio.Event()
    loop_lags: list[float] = []
    probe = asyncio.create_task(_loop_probe(loop_lags, stop))
    send_lags: list[float] = []
    heap = [(s.start, k) for k, s in enumerate(stats)]
    heapq.heapify(heap)
    run0, wait0 = schedstat()
    times0 = os.times()
    loop = asyncio.get_running_loop()
    loop.call_later(0.5, _mark, "START")
    loop.call_later(0.5 + stagger, _mark, "STEADY")
    tail = False
    limits = [min(per_session, len(p.messages)) for p in plans]
    perf_counter, heapreplace, heappop = time.perf_counter, heapq.heapreplace, heapq.heappop
    lag = send_lags.append
    while heap:
        due, k = heap[0]
        now = perf_counter()
        if due > now:
            await asyncio.sleep(due - now)
            continue
        s = stats[k]
        i = s.sent
        j = triggers[s.plan].get(i)
        if j is not None:
            s.sent_at[j] = now
        lag(now - due)
        try:
            writers[k](wire[s.plan][i])
        except Exception as exc:
            s.errors.append(f"send: {type(exc).__name__}")
            heappop(heap)
            continue
        s.sent = i + 1
        if i + 1 < limits[s.plan]:
            heapreplace(heap, (due + PERIOD, k))  # one sift instead of a pop and a push
        else:
            heappop(heap)
            if not tail:
                tail = True
                _mark("TAIL")
    # Let the last turns arrive, then stop.
    deadline = time.perf_counter() + 3.0
    while time.perf_counter() < deadline:
        if all(len(s.turns) >= len(s.sent_at) for s in stats):
            break
        await asyncio.sleep(0.05)
    wall = time.perf_counter() - t0
    run1, wait1 = schedstat()
    times1 = os.times()
    stop.set()
    await probe
    return Sent(
        wall=wall,
        send_lags=send_lags,
        loop_lags=loop_lags,
        cpu_s=run1 - run0,
        wait_s=wait1 - wait0,
        user_s=times1.user - times0.user,
        sys_s=times1.system - times0.system,
    )


def worker_result(
    connect_s: float,
    stats: list[SessionStats],
    plans: list[Plan],
    sent: Sent,
    whole_ms: bool = False,
) -> WorkerResult:
    """The worker's figures from what its sessions sent and saw. `whole_ms`: the server
    reports a turn's end in whole milliseconds (the OpenAI Realtime door's ``audio_end_ms``)."""
    eot: list[float] = []
    expected = received = mismatched = missing = errors = 0
    lateness: list[float] = []
    for s in stats:
        plan = plans[s.plan]
        expected += len(s.sent_at)
        received += len(s.turns)
        errors += len(s.errors)
        lateness += s.chunk_lateness
        for j, at in sorted(s.sent_at.items()):
            if j >= len(s.turns):
                missing += 1
                continue
            arrived, end_ms = s.turns[j]
            want = int(plan.turns[j][2]) if whole_ms else plan.turns[j][2]
            mismatched += end_ms != want
            eot.append(arrived - at)
    send_lags, wall = sent.send_lags, sent.wall
    return WorkerResult(
        n=len(stats),
        connect_s=connect_s,
        wall_s=wall,
        expected=expected,
        received=received,
        mismatched=mismatched,
        missing=missing,
        errors=errors,
        eot=eot,
        send_lag_p50=pct(send_lags, 50),
        send_lag_p99=pct(send_lags, 99),
        send_lag_max=max(send_lags, default=0.0),
        loop_lag_p99=pct(sent.loop_lags, 99),
        loop_lag_max=max(sent.loop_lags, default=0.0),
        gen_cpu=sent.cpu_s / wall,
        gen_cpu_s=sent.cpu_s,
        gen_sys_share=sent.sys_s / max(1e-9, sent.user_s + sent.sys_s),
        gen_wait=sent.wait_s / wall,
        reply_lag_p99=pct(lateness, 99),
        sends=len(send_lags),
    )


def _transport_writer(ws: ClientConnection) -> Any:
    transport = ws.transport

    def write(frame: bytes) -> None:
        if transport.is_closing():
            raise ConnectionError("closed")
        transport.write(frame)

    return write


def worker_main(args: argparse.Namespace) -> None:
    if args.door != "duplex":  # 24 kHz audio through either door (bench/capacity_door.py)
        from bench.capacity_door import worker_main as door_worker

        door_worker(args)
        return
    plans = load_plans(args)
    run = run_worker(args.port, args.worker, args.duration, args.stagger, plans, args.client)
    if args.client == "raw":
        result = uvloop.run(run)
    else:
        result = asyncio.run(run)
    print("RESULT " + json.dumps(asdict(result)), flush=True)


def load_plans(args: argparse.Namespace) -> list[Plan]:
    return [plan_for(c.audio) for c in conversations(args.conversations, args.turns)]


# ---- orchestration ----------------------------------------------------------------------------


@dataclass
class Point:
    """A worker's result plus what the orchestrator saw of the server process."""

    n: int
    result: dict[str, Any]
    server_cpu: float  # fraction of one core over the steady window
    server_wait: float  # fraction of that window it was runnable but waiting (others' load)
    verdict: str
    log_tail: list[str]
    scrapes: int = 0  # metrics scrapes that answered 200 during the run
    #: Server CPU seconds from the worker's start to its end: the work is fixed (N sessions
    #: of the same audio), so this compares across runs even when others take the core.
    total_cpu_s: float = 0.0

    @property
    def us_per_message(self) -> float:
        return self.total_cpu_s * 1e6 / max(1, self.result.get("sends", 0))


def warm_up(server: ServerProc, plans: list[Plan]) -> None:
    """One short session, so the first-connection imports are not in the measurement."""

    async def go() -> None:
        ws = await open_ws(server, True)
        for msg in plans[0].messages[:100]:
            await ws.send(msg)
        await ws.send('{"type":"ping","id":"warm"}')
        async for raw in ws:
            if '"pong"' in str(raw):
                break
        await ws.close()

    asyncio.run(go())


METRICS_TOKEN = "bench-metrics"


def metrics_env(mode: str) -> tuple[dict[str, str], int | None]:
    """The server's DUPLEX_METRICS* settings for ``--metrics``, and the separate port."""
    if mode == "on":
        return {"DUPLEX_METRICS": "on", "DUPLEX_METRICS_TOKEN": METRICS_TOKEN}, None
    if mode == "port":
        port = free_port()
        return {"DUPLEX_METRICS": "port", "DUPLEX_METRICS_PORT": str(port)}, port
    return {"DUPLEX_METRICS": "off"}, None


class Scraper(threading.Thread):
    """GETs the server's metrics every ``every`` seconds until stopped (as Prometheus)."""

    def __init__(self, url: str, headers: dict[str, str], every: float) -> None:
        super().__init__(daemon=True)
        self.url, self.headers, self.every = url, headers, every
        self.ok = 0
        self.last = ""
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(self.every):
            self.scrape()

    def scrape(self) -> None:
        try:
            reply = httpx.get(self.url, headers=self.headers, timeout=5)
        except httpx.HTTPError:
            return
        if reply.status_code == 200:
            self.ok += 1
            self.last = reply.text


def server_cpus(workers: int) -> set[int]:
    return set(range(workers)) if workers > 1 else {SERVER_CPU}


def client_cpu(workers: int) -> int | None:
    """The generator's core: after the server's, if the machine has one left."""
    cpu = workers if workers > 1 else CLIENT_CPU
    return cpu if cpu < (os.cpu_count() or 1) else None


def run_point(args: argparse.Namespace, n: int, plans: list[Plan], profile: bool) -> Point:
    env, metrics_port = metrics_env(args.metrics)
    env["DUPLEX_ECHO_PACE"] = "1"
    if args.store_url:
        env["DUPLEX_STORE_URL"] = args.store_url
    extra = ["--workers", str(args.workers)] if args.workers > 1 else []
    server = start_duplex(env, server_cpus(args.workers), extra)
    scraper: Scraper | None = None
    if args.metrics == "on":
        scraper = Scraper(
            f"http://127.0.0.1:{server.port}/metrics",
            {"Authorization": f"Bearer {METRICS_TOKEN}"},
            args.scrape_every,
        )
    elif args.metrics == "port":
        scraper = Scraper(f"http://127.0.0.1:{metrics_port}/metrics", {}, args.scrape_every)
    spy: subprocess.Popen[bytes] | None = None
    raw_path = Path(tempfile.gettempdir()) / f"duplex-capacity-{n}.txt"
    try:
        warm_up(server, plans)
        if scraper is not None:
            scraper.start()
        argv = [sys.executable, "-m", "bench.bench_capacity", "--worker", str(n)]
        argv += ["--port", str(server.port), "--duration", str(args.duration)]
        argv += ["--stagger", str(args.stagger), "--conversations", str(args.conversations)]
        argv += ["--turns", str(args.turns), "--door", getattr(args, "door", "duplex")]
        argv += ["--client", getattr(args, "client", "raw")]
        gen_cpu = client_cpu(args.workers)

        def pin() -> None:
            if gen_cpu is not None:
                os.sched_setaffinity(0, {gen_cpu})

        cpu_start = tree_schedstat(server.pid)[0]
        worker = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True, preexec_fn=pin)
        assert worker.stdout is not None
        result: dict[str, Any] = {}
        cpu0 = wait0 = t0 = cpu = wait = 0.0
        for line in worker.stdout:
            word = line.strip()
            if word == "STEADY":  # every session is streaming
                (cpu0, wait0), t0 = tree_schedstat(server.pid), time.perf_counter()
                if profile and shutil.which("py-spy"):
                    seconds = max(2, int(args.duration - args.stagger - 1))
                    spy_argv = ["py-spy", "record", "--pid", str(server.pid), "-d", str(seconds)]
                    spy_argv += ["-r", "200", "-f", "raw", "-o", str(raw_path)]
                    spy = subprocess.Popen(
                        spy_argv,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
            elif word == "TAIL" and t0:  # the first session has finished
                (cpu1, wait1), dt = tree_schedstat(server.pid), time.perf_counter() - t0
                cpu, wait = (cpu1 - cpu0) / dt, (wait1 - wait0) / dt
            elif word.startswith("RESULT "):
                result = json.loads(word[7:])
        worker.wait(timeout=60)
        total_cpu = tree_schedstat(server.pid)[0] - cpu_start
        if scraper is not None:
            scraper.halt.set()
            scraper.join(timeout=10)
            scraper.scrape()  # the final figures: every turn counted
            if "duplex_messages_received_total" not in scraper.last:
                raise RuntimeError(f"metrics scrape failed for N={n}")
        if spy is not None:
            spy.wait(timeout=60)
        if not result:
            raise RuntimeError(f"worker for N={n} failed (exit {worker.returncode})")
    finally:
        server.stop()
    verdict = judge(result)
    if verdict != "pass" and wait > 0.10:
        verdict += f" (server waited {wait * 100:.0f}% for its core)"
    scrapes = scraper.ok if scraper is not None else 0
    point = Point(n, result, cpu, wait, verdict, server.log[-5:], scrapes, total_cpu)
    print(
        f"run N={n} metrics={args.metrics}: server CPU over the run {total_cpu:.2f} s, "
        f"{point.us_per_message:.1f} us per client message, CPU wait {wait * 100:.0f}%",
        file=sys.stderr,
        flush=True,
    )
    return point


def measure(args: argparse.Namespace, n: int, plans: list[Plan]) -> Point:
    """`run_point` at N; once more if it did not pass while another process held the
    server's core (the less disturbed of the two is kept)."""
    point = run_point(args, n, plans, profile=args.profile == n)
    if point.verdict != "pass" and point.server_wait > 0.10:
        again = run_point(args, n, plans, profile=args.profile == n)
        point = min(point, again, key=lambda p: p.server_wait)
        point.verdict += " (best of 2)"
    return point


def kept_up(p: Point) -> bool:
    """The server processed audio as it came (so CPU per session-second is its real cost)."""
    r = p.result
    return bool(p.server_cpu) and r["missing"] == 0 and pct(r["eot"], 50) < 0.100


#: The table columns of a point's turns and server CPU (`point_cells`).
POINT_COLUMNS = [
    "turns got/expected",
    "EOT p50 ms",
    "EOT p99 ms",
    "mismatch/missing/errors",
    "server CPU",
    "server CPU wait",
    "server CPU ms per session-s",
    "N at 100% CPU",
]


def point_cells(p: Point) -> list[Any]:
    """A point's turns and server CPU, in the order of `POINT_COLUMNS`."""
    r = p.result
    return [
        f"{r['received']}/{r['expected']}",
        pct(r["eot"], 50) * 1000,
        pct(r["eot"], 99) * 1000,
        f"{r['mismatched']}/{r['missing']}/{r['errors']}",
        f"{p.server_cpu * 100:.0f}%",
        f"{p.server_wait * 100:.0f}%",
        p.server_cpu * 1000 / p.n if kept_up(p) else "n/a (behind)",
        f"{p.n / p.server_cpu:.0f}" if kept_up(p) else "n/a",
    ]


def gen_ms_per_session_s(r: dict[str, Any]) -> float:
    """The generator's own CPU per second of audio it streamed (its cost, for the record)."""
    return r.get("gen_cpu_s", float("nan")) * 1000 / max(1e-9, r["sends"] * PERIOD)


def judge(r: dict[str, Any]) -> str:
    """pass / FAIL (the server's doing) / inconclusive (the generator was late)."""
    eot_p99 = pct(r["eot"], 99)
    loop_lag = r["loop_lag_p99"]
    clean = r["missing"] == 0 and r["mismatched"] == 0 and r["errors"] == 0
    if clean and r["expected"] > 0 and eot_p99 < 0.050 and r["send_lag_p99"] < 0.020:
        return "pass"
    if not clean or eot_p99 - loop_lag >= 0.050:
        return "FAIL"
    if r["send_lag_p99"] >= 0.020 and loop_lag < 0.010:
        return "FAIL"  # sends held back by a server that stopped reading
    return "inconclusive"


def summarize_profile(path: Path, top: int = 25) -> str:
    """Inclusive share of the server's hot-path functions, and self time by package."""
    incl: collections.Counter[str] = collections.Counter()
    by_pkg: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        stack, count = line.rsplit(" ", 1)
        n = int(count)
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        total += n
        for f in set(frames):
            incl[f] += n
        leaf = frames[-1]
        m = re.search(r"\(([^)]*)\)$", leaf)
        file = m.group(1) if m else "?"
        pkg = file.split("/")[0] if "/" in file else file
        by_pkg[pkg] += n
    if not total:
        return "(no samples)"
    skip = ("<module>", "_run_module_as_main", "_run_code", "run (", "Runner.run", "run_forever")
    rows = [
        [f"`{name}`", f"{count / total * 100:.1f}%"]
        for name, count in incl.most_common(200)
        if not any(s in name for s in skip) and count / total < 0.97
    ][:top]
    pkgs = [[f"`{k}`", f"{v / total * 100:.1f}%"] for k, v in by_pkg.most_common(12)]
    return (
        f"{total} samples (py-spy, 200 Hz, idle excluded).\n\nInclusive:\n\n"
        + md_table(["function (file)", "share"], rows)
        + "\n\nSelf time by top-level package or file:\n\n"
        + md_table(["package", "self share"], pkgs)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs, a short curve")
    parser.add_argument("--n", type=int, nargs="*", help=f"session counts (default {CURVE})")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds each session")
    parser.add_argument("--stagger", type=float, default=3.0, help="session starts spread (s)")
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--turns", type=int, default=10, help="turns per conversation")
    parser.add_argument("--all", action="store_true", help="do not stop after two failures")
    parser.add_argument("--profile", type=int, help="py-spy the server at this N")
    parser.add_argument(
        "--metrics",
        choices=["off", "on", "port"],
        default="off",
        help="the server's DUPLEX_METRICS (on/port: scraped during the run)",
    )
    parser.add_argument(
        "--scrape-every", type=float, default=5.0, help="seconds between metrics scrapes"
    )
    parser.add_argument("--workers", type=int, default=1, help="duplex serve --workers N")
    parser.add_argument(
        "--store",
        choices=["auto", "memory", "redis", "sqlite"],
        default="auto",
        help="the server's store (auto: memory for 1 worker, redis for more)",
    )
    parser.add_argument(
        "--door",
        choices=["duplex", "duplex24", "realtime", "both"],
        default="duplex",
        help="24 kHz audio to /v1/duplex, /v1/realtime or both (bench/capacity_door.py)",
    )
    parser.add_argument(
        "--client",
        choices=["raw", "websockets"],
        default="raw",
        help="the generator's client: raw asyncio transports on uvloop (default), or the "
        "websockets library on asyncio (the earlier generator, for comparison)",
    )
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args)
        return
    if args.quick:
        args.duration, args.stagger = 10.0, 2.0
    store = args.store if args.store != "auto" else ("memory" if args.workers == 1 else "redis")
    if store == "memory" and args.workers > 1:
        parser.error("--workers N > 1 needs a shared store: --store redis or sqlite")
    with contextlib.ExitStack() as stack:
        args.store_url = None
        if store == "redis":
            args.store_url = stack.enter_context(redis_server())
        elif store == "sqlite":
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-sqlite-"))
            args.store_url = f"sqlite:///{folder}/duplex.db"
        if args.door != "duplex":
            from bench.capacity_door import run_doors

            run_doors(args, store)
        else:
            run_curve(args, store)


def run_curve(args: argparse.Namespace, store: str) -> None:
    curve = args.n or (QUICK_CURVE if args.quick else CURVE)
    if args.profile and args.profile not in curve:
        curve = sorted({*curve, args.profile})
    pin_self(client_cpu(args.workers))
    plans = load_plans(args)
    points: list[Point] = []
    fails = 0  # consecutive FAILs
    for n in curve:
        point = measure(args, n, plans)
        points.append(point)
        print(f"N={n}: {point.verdict}", file=sys.stderr, flush=True)
        fails = fails + 1 if point.verdict.startswith("FAIL") else 0
        if fails >= 2 and not args.all and args.profile not in [c for c in curve if c > n]:
            break
    print(
        header(
            "Sessions per core (bench/bench_capacity.py)", ["bench.bench_capacity", *sys.argv[1:]]
        )
    )
    print(machine_line())
    gen = client_cpu(args.workers)
    print(
        f"\nServer: {args.workers} worker(s), store {store}, pinned to CPU(s) "
        f"{sorted(server_cpus(args.workers))}; load generator (one process, "
        f"{'raw transports on uvloop' if args.client == 'raw' else 'websockets on asyncio'}) "
        f"{'on CPU ' + str(gen) if gen is not None else 'sharing those cores'}. "
        f"Each session: {args.duration:g} s of 20 ms PCM16 16 kHz messages at "
        f"real time, starts spread over {args.stagger:g} s; {args.conversations} "
        f"conversations of {args.turns} turns; echo replies at real time. Metrics: "
        f"{args.metrics}"
        + (
            f" (scraped every {args.scrape_every:g} s: "
            + ", ".join(f"{p.scrapes} at N={p.n}" for p in points)
            + ")"
            if args.metrics != "off"
            else ""
        )
        + ".\n"
    )
    rows = []
    for p in points:
        r = p.result
        rows.append(
            [
                p.n,
                *point_cells(p),
                r["send_lag_p99"] * 1000,
                r["loop_lag_p99"] * 1000,
                f"{r['gen_cpu'] * 100:.0f}% / {r['gen_wait'] * 100:.0f}%",
                f"{gen_ms_per_session_s(r):.3f} ({r.get('gen_sys_share', 0) * 100:.0f}% sys)",
                r["reply_lag_p99"] * 1000,
                p.verdict,
            ]
        )
    print(
        md_table(
            [
                "N",
                *POINT_COLUMNS,
                "send lag p99 ms",
                "gen loop lag p99 ms",
                "gen CPU / wait",
                "gen CPU ms per session-s (kernel share)",
                "reply audio lag p99 ms",
                "verdict",
            ],
            rows,
        )
    )
    print(
        "\nEOT: end-of-turn overhead (trigger message sent -> turn.ended received). "
        "server CPU: share of one core over the steady window (all sessions streaming); "
        "CPU wait: share of that window the server was runnable but another process held "
        "its core (schedstat run delay). 'N at 100% CPU' = N / server CPU: the projection "
        "of the measured per-session cost to a full core (an upper bound; latency grows "
        "well before). gen: the load generator (its own loop lag and CPU)."
    )
    costs = [p.server_cpu / p.n for p in points if kept_up(p)]
    print(
        "\nServer CPU over each whole run (fixed work, so comparable across runs even when "
        "other processes take the core): "
        + "; ".join(
            f"N={p.n}: {p.total_cpu_s:.2f} s, {p.us_per_message:.1f} µs per client message"
            for p in points
        )
        + "."
    )
    if costs:
        lo, hi = min(costs), max(costs)
        print(
            f"\nServer CPU per real-time session where it kept up: {lo * 1000:.1f}-"
            f"{hi * 1000:.1f} ms per second of audio ({lo * 50e3:.0f}-{hi * 50e3:.0f} µs per "
            f"20 ms message, replies included), so one core holds at most "
            f"{1 / hi:.0f}-{1 / lo:.0f} sessions at 100% CPU."
        )
    passing = [p.n for p in points if p.verdict == "pass"]
    best = max(passing, default=0)
    print(
        f"\nLargest N with EOT p99 < 50 ms and no audio lost or late: **{best}** "
        f"(target >= 500: {'met' if best >= 500 else 'NOT met'})."
    )
    for p in points:
        if p.n == args.profile:
            raw = Path(tempfile.gettempdir()) / f"duplex-capacity-{p.n}.txt"
            if raw.exists():
                print(f"\n### Server profile at N={p.n}\n")
                print(summarize_profile(raw))
            else:
                print("\n(py-spy not found or produced nothing: pip install py-spy)")


if __name__ == "__main__":
    main()
