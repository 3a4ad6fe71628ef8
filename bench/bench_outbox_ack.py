"""CPU of one delivery ping and its pong on the server (server/ws_protocol.py acks).

Run: ``python -m bench.bench_outbox_ack [--n 50000]``. One `DuplexWebSocketProtocol`
on a fake transport, after a real handshake; each round writes a message's worth of
``written``, runs the ping tick (timer, payload, one ``transport.write``), feeds the
client's masked pong through the protocol's receive path (framing, websockets' parser,
uvicorn's event dispatch, `handle_pong`) and lets the outbox release one entry. Prints
the CPU per round (``time.process_time``), which sets the cost of
``outbox_ack_interval_s``: per session, that much CPU every interval.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from uvicorn import Config
from uvicorn.server import ServerState
from websockets.frames import Frame, Opcode

from server.limits import SessionLimits
from server.outbox import Outbox
from server.ws_protocol import DIRECT, DuplexWebSocketProtocol

HANDSHAKE = (
    b"GET /v1/duplex HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.last = b""

    def write(self, data: Any) -> None:
        self.last = bytes(data)

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1), "sockname": ("127.0.0.1", 2)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


class NoWriter:
    def mark(self, outbox: Outbox) -> None:
        pass


async def run(n: int) -> float:
    accepted, done = asyncio.Event(), asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        accepted.set()
        await done.wait()
        await send({"type": "websocket.close"})

    config = Config(app, lifespan="off", log_config=None, interface="asgi3")
    config.load()
    proto = DuplexWebSocketProtocol(
        config=config, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop()
    )
    transport = Transport()
    proto.connection_made(transport)
    proto.data_received(HANDSHAKE)
    await asyncio.wait_for(accepted.wait(), 5)
    direct = proto.scope["extensions"][DIRECT]
    outbox = Outbox("bench", NoWriter(), SessionLimits())  # type: ignore[arg-type]
    direct.acks(1000.0, outbox.release)
    started = time.process_time()
    for seq in range(1, n + 1):
        outbox.append(seq, '{"type":"chunk"}')
        direct.written = seq
        proto._ack_timer.cancel()  # type: ignore[union-attr]
        proto._ack_tick()
        payload = transport.last[2:]
        pong = Frame(Opcode.PONG, payload).serialize(mask=True, extensions=[])
        proto.data_received(pong)
    cpu = time.process_time() - started
    assert len(outbox) == 0, "the pongs did not release the outbox"
    # the pong frame's construction (the client's side) is not the server's cost
    started = time.process_time()
    for _ in range(n):
        Frame(Opcode.PONG, payload).serialize(mask=True, extensions=[])
    client = time.process_time() - started
    done.set()
    await asyncio.sleep(0.01)
    return (cpu - client) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=50_000)
    args = ap.parse_args()
    per = asyncio.run(run(args.n))
    print(f"server CPU per delivery ping + pong + release: {per * 1e6:.1f} µs (n={args.n})")


if __name__ == "__main__":
    main()
