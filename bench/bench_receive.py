"""Receive path: server CPU per 20 ms audio message, by server stack, same client.

Run: ``python -m bench.bench_receive`` (``--n`` connections, ``--seconds``). Prints markdown.

N raw TCP clients (one uvloop process, pinned to CPU 1) each send a masked 640-byte
binary WebSocket frame every 20 ms, as a 16 kHz mono client does. Each server runs as
its own process pinned to CPU 0; its CPU time (user + system, from /proc) over the
sending window, divided by the messages sent, is the figure. Servers:

* ``raw``: an asyncio protocol that counts bytes and parses nothing: the floor (kernel,
  event loop, one Python callback per read).
* ``websockets``: the bare ``websockets`` asyncio server, a loop of ``recv()``: the
  baseline a plain Python WebSocket server gives.
* ``uvicorn``: FastAPI + uvicorn's stock ``websockets-sansio`` protocol, an endpoint
  looping on ``receive()``: what any ASGI app pays.
* ``direct``: the same app under ``DuplexWebSocketProtocol`` with a direct sink that
  only counts: the framing cost of Duplex's direct path.
* ``duplex``: ``python -m server.cli serve`` receiving silence at /v1/duplex (VAD ingest
  included, no turns).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import socket
import subprocess
import sys
import time

from fastapi import WebSocket  # at module level: FastAPI resolves the annotation here

from bench.bench_ws import ROOT, header, machine_line, md_table
from server.ws_protocol import DIRECT

MSG = 640
PERIOD = 0.02


# ---- servers (run with --serve KIND PORT) ------------------------------------------------


def serve(kind: str, port: int) -> None:
    import uvloop

    if kind == "raw":

        class Counter(asyncio.Protocol):
            def connection_made(self, transport):  # type: ignore[no-untyped-def]
                self.transport, self.head = transport, b""

            def data_received(self, data: bytes) -> None:
                if self.head is not None:  # answer the handshake, then only count
                    self.head += data
                    if b"\r\n\r\n" in self.head:
                        self.transport.write(_handshake_response(self.head))
                        self.head = None

        async def main() -> None:
            server = await asyncio.get_running_loop().create_server(Counter, "127.0.0.1", port)
            await server.serve_forever()

        uvloop.run(main())
    elif kind == "websockets":
        import logging

        from websockets.asyncio.server import serve as ws_serve

        logging.getLogger("websockets").setLevel(logging.CRITICAL)  # clients just hang up

        async def handler(ws):  # type: ignore[no-untyped-def]
            async for _ in ws:
                pass

        async def main() -> None:
            async with ws_serve(
                handler, "127.0.0.1", port, compression=None, max_size=None, ping_interval=None
            ):
                await asyncio.Future()

        uvloop.run(main())
    else:
        import uvicorn
        from fastapi import FastAPI

        from server.ws_protocol import DuplexWebSocketProtocol

        app = FastAPI()

        @app.websocket("/v1/duplex")
        async def endpoint(ws: WebSocket) -> None:
            await ws.accept()
            direct = ws.scope["extensions"].get(DIRECT)
            if direct is not None:
                direct.take = lambda data: True
            while True:
                if direct is not None:
                    direct.ready = True
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    return

        uvicorn.run(
            app,
            host="127.0.0.1",
            port=port,
            ws=DuplexWebSocketProtocol if kind == "direct" else "websockets-sansio",
            ws_per_message_deflate=False,
            loop="uvloop",
            http="httptools",
            log_level="warning",
        )


def _handshake_response(request: bytes) -> bytes:
    import hashlib

    key = next(
        line.split(b":", 1)[1].strip()
        for line in request.split(b"\r\n")
        if line.lower().startswith(b"sec-websocket-key")
    )
    accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )


# ---- the client -----------------------------------------------------------------------


async def _clients(port: int, n: int, seconds: float, path: str) -> int:
    from websockets.frames import Frame, Opcode

    frame = Frame(Opcode.BINARY, bytes(MSG)).serialize(mask=True, extensions=[])

    async def one(i: int, t0: float) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        await reader.readuntil(b"\r\n\r\n")
        drain = asyncio.ensure_future(_discard(reader))
        await asyncio.sleep(max(0.0, t0 - time.monotonic()) + PERIOD * i / n)
        sent, start = 0, time.monotonic()
        while time.monotonic() < t0 + seconds:
            writer.write(frame)
            sent += 1
            await asyncio.sleep(max(0.0, start + sent * PERIOD - time.monotonic()))
        drain.cancel()
        writer.close()
        return sent

    t0 = time.monotonic() + 1.0
    return sum(await asyncio.gather(*(one(i, t0) for i in range(n))))


async def _discard(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def measure(kind: str, n: int, seconds: float, port: int) -> tuple[float, int]:
    """Server CPU µs per message, and messages sent."""
    if kind == "duplex":
        env = os.environ | {"DUPLEX_ALLOW_ANONYMOUS": "true", "DUPLEX_PORT": str(port)}
        cmd = [sys.executable, "-m", "server.cli", "serve", "--log-level", "warning"]
    else:
        env = dict(os.environ)
        cmd = [sys.executable, "-m", "bench.bench_receive", "--serve", kind, str(port)]
    proc = subprocess.Popen(
        ["taskset", "-c", "0", *cmd], cwd=ROOT, env=env, stdout=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{kind} server did not start") from None
                time.sleep(0.1)
        os.sched_setaffinity(0, {1})
        import uvloop

        ticks0 = _cpu_ticks(proc.pid)
        sent = uvloop.run(_clients(port, n, seconds, "/v1/duplex"))
        ticks = _cpu_ticks(proc.pid) - ticks0
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    hz = os.sysconf("SC_CLK_TCK")
    return ticks / hz / sent * 1e6, sent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--only", nargs="*", help="run only these servers")
    ap.add_argument("--serve", nargs=2, metavar=("KIND", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return
    kinds = tuple(args.only) if args.only else ("raw", "websockets", "uvicorn", "direct", "duplex")
    results = {}
    for i, kind in enumerate(kinds):
        results[kind] = measure(kind, args.n, args.seconds, 18870 + i)
        print(f"{kind}: {results[kind][0]:.1f} µs/message", file=sys.stderr)
    base = results.get("websockets", (float("nan"), 0))[0]
    floor = results.get("raw", (float("nan"), 0))[0]
    rows = [
        [kind, f"{sent:,}", f"{us:.1f}", f"{us / base:.2f}", f"{us / floor:.2f}"]
        for kind, (us, sent) in results.items()
    ]
    print(header("Receive path (bench/bench_receive.py)", ["bench.bench_receive", *sys.argv[1:]]))
    print(machine_line())
    print(
        f"\n{args.n} connections x one 640-byte binary message per 20 ms, {args.seconds:g} s; "
        "server pinned to CPU 0, clients to CPU 1.\n"
    )
    print(
        md_table(
            ["server", "messages", "server CPU µs / message", "x bare websockets", "x raw floor"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
