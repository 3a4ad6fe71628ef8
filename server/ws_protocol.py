"""uvicorn's WebSocket protocol, plus a direct path for binary audio messages.

Receiving a 20 ms audio message through the stock stack costs about 54 µs of CPU
on our benchmark machine: the websockets parser, uvicorn's event handling, an
ASGI message put on a queue, and a task switch to the app's reader. A bare
uvloop protocol that parses nothing costs 15 µs. At 50 messages a second per
session that difference decides how many sessions a core holds.

So this protocol frames the byte stream itself once the handshake is done. A
complete, unfragmented, masked binary frame goes straight to a *sink* that the
app registered for the connection (``scope["extensions"][DIRECT]``), called
synchronously from ``data_received``, when the sink says it can take it: the
app's reader is idle (waiting for the next message) and nothing is queued
before it, so message order is kept. Every other frame (text, control,
fragments, oversize, unmasked, or audio the sink declines) is handed, as the
exact bytes of that frame, to the stock websockets parser and uvicorn's
handlers, so close handshakes, pings, limits and errors behave as before. A
frame that cannot go direct is handed over as soon as its header is in, not
when its payload is: the stock parser then refuses a bad header (mask bit
cleared, reserved opcode or bits, size over the limit) at once, as it does
without this class, and owns the stream until the next frame boundary.

Outgoing text messages take a direct path too (`DirectPath.send_text`): one
``transport.write`` of a ready-made frame instead of the ASGI send chain, when the
transport is not applying backpressure; otherwise the app awaits the usual send.

Delivery acknowledgements (`DirectPath.acks`): while the app has written messages not
yet acknowledged, the protocol sends a ping with its own payload every interval,
remembering the ``seq`` of the last message the app wrote before it (``written``). TCP
and WebSocket keep order end to end (a proxy tunnels the upgraded stream, control frames
included), so the matching pong proves the client's WebSocket stack has read every
message written before that ping: the app's outbox lets go of them. uvicorn's keepalive
pings have 4-byte payloads, ours 8: each side ignores the other's pongs. The pings need
little of uvicorn's internals (`DeliveryPingProtocol`), so the fallback below keeps them.

The class reads private state of uvicorn's sans-I/O protocol and of the websockets
parser. `websocket_protocol()` checks, once at startup, that all of it is there (by
building one protocol and running a handshake and a frame through its parser) and
falls back to uvicorn's stock protocol, with one log line, when it is not: with the
delivery pings (`DeliveryPingProtocol`, which frames nothing itself) when what they use
is there, else plain.

Any ASGI server works without this class; the app then receives and sends every
message through the ASGI interface as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from websockets.frames import Frame, Opcode
from websockets.protocol import OPEN

from server.fifo import Fifo

try:
    from uvicorn.protocols.websockets.websockets_sansio_impl import (
        WebSocketsSansIOProtocol as _Stock,
    )
except ImportError:  # uvicorn before 0.35: no sans-I/O protocol to build on
    _Stock = None

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - websockets without its C extension
    from websockets.utils import apply_mask

log = logging.getLogger(__name__)

#: The scope extension through which an app registers its direct sink.
DIRECT = "duplex.direct_binary"

#: uvicorn's stock protocol, used when the direct path's internals are missing.
STOCK_PROTOCOL = "websockets-sansio"

_BINARY_FIN = 0x82  # FIN, no RSV bits, opcode 2
_TEXT_FIN = 0x81  # FIN, no RSV bits, opcode 1
_ABORT_GRACE_S = 2.0
#: Acknowledgement pings in flight per connection: a new one replaces the oldest.
MAX_ACK_PINGS = 4
_ACK_PREFIX = b"dxak"  # + a 4-byte counter: 8 bytes, never uvicorn's 4-byte payloads

#: What this class reads or calls on uvicorn's protocol instance (checked at startup).
PROTOCOL_ATTRS = (
    "conn",
    "client",
    "queue",
    "frames",
    "transport",
    "writable",
    "close_sent",
    "close_timer",
    "loop",
    "handshake_complete",
    "curr_msg_data_type",
    "handle_connect",
    "handle_parser_exception",
    "send_receive_event_to_app",
    "data_received",
    "handle_pong",
)
#: What it reads or sets on the websockets parser (``conn``), checked the same way.
PARSER_ATTRS = ("state", "reader", "parser", "current_size", "max_message_size")
#: What the delivery pings alone need (`DeliveryPingProtocol`, the fallback).
ACK_PROTOCOL_ATTRS = (
    "conn",
    "transport",
    "writable",
    "close_sent",
    "loop",
    "handle_connect",
    "handle_pong",
)
ACK_PARSER_ATTRS = ("state",)


@dataclass(slots=True)
class DirectPath:
    """Shared by the protocol and the app for one connection.

    The app sets ``take(payload) -> bool`` (False: deliver it the usual way) and
    ``ready``, True only while its reader waits for a message. The protocol sets
    ``send_text(text) -> bool`` (False: not now, use the ASGI send, which waits) and
    ``limit(max_bytes)``, which lowers this connection's message size limit: a frame
    declaring more is refused at its header with close 1009 (the health socket's
    small limit; uvicorn's ``ws_max_size`` is for every endpoint).
    """

    take: Callable[[bytes], bool] | None = None
    #: The same for text messages (the Realtime door's audio appends), when set.
    take_text: Callable[[str], bool] | None = None
    ready: bool = False
    send_text: Callable[[str], bool] | None = None
    limit: Callable[[int], None] | None = None
    #: ``abort(last_text, code)``: for a peer that stopped reading, queue ``last_text``
    #: and a close frame past the backpressure, then drop the connection shortly after.
    abort: Callable[[str | None, int], None] | None = None
    #: The ``seq`` of the last message the app wrote to this connection (0: none); the
    #: app sets it after each write, of any path (direct or ASGI send).
    written: int = 0
    #: ``acks(interval_s, on_ack)``: ping every ``interval_s`` while ``written`` is ahead
    #: of what was acknowledged, and call ``on_ack(seq)`` when the client's pong shows it
    #: read every message up to ``seq``; ``acks(0, None)`` stops.
    acks: Callable[[float, Callable[[int], None] | None], None] | None = None


@contextlib.contextmanager
def delivery_pings(
    direct: DirectPath | None, interval_s: float, on_ack: Callable[[int], None]
) -> Iterator[None]:
    """While a writer runs: count its writes from 0 (this connection's session, which a
    connection may change) and, every ``interval_s`` (0: never), ping to learn what the
    client read (``on_ack(seq)``); afterwards a pong acknowledges nothing of it."""
    acks = direct.acks if direct is not None and interval_s > 0 else None
    if direct is not None:
        direct.written = 0
    if acks is not None:
        acks(interval_s, on_ack)
    try:
        yield
    finally:
        if acks is not None and direct is not None and direct.acks is not None:
            direct.acks(0, None)


def text_frame(payload: bytes) -> bytes:
    """An unmasked server text frame (FIN set) carrying ``payload``."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return b"\x81\x7e" + n.to_bytes(2) + payload
    return b"\x81\x7f" + n.to_bytes(8) + payload


def _parser_at_frame_boundary(conn: Any) -> bool:
    """Whether websockets' parser has consumed everything and waits for a new frame."""
    if conn.state is not OPEN or conn.reader.buffer:
        return False
    gen = conn.parser
    while getattr(gen, "gi_yieldfrom", None) is not None:
        gen = gen.gi_yieldfrom
    return getattr(getattr(gen, "gi_code", None), "co_name", "") == "at_eof"


class DeliveryPingProtocol(_Stock or asyncio.Protocol):  # type: ignore[misc]
    """uvicorn's stock protocol plus the delivery pings (`DirectPath.acks`), nothing else.

    The fallback when the direct path's internals are missing: it needs only what
    `ACK_PROTOCOL_ATTRS` lists (the keepalive's own machinery: the sans-I/O connection,
    the transport, ``handle_pong``), and frames nothing itself. Its `DirectPath` carries
    ``acks`` alone; the app writes through the ASGI send and sets ``written`` after each.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._direct = self._make_path()
        #: Called once when the connection is gone (the server's connection count).
        self.on_connection_lost: Callable[[], None] | None = None
        # Delivery acknowledgements (see `_acks`): pings in flight as (payload, seq).
        self._on_ack: Callable[[int], None] | None = None
        self._ack_interval = 0.0
        self._ack_timer: asyncio.TimerHandle | None = None
        # A list, not a deque: at most MAX_ACK_PINGS entries (a deque's first block is 64).
        self._ack_pings: list[tuple[bytes, int]] = []
        self._ack_count = 0
        self._ack_asked = 0  # the seq the newest ping covers

    def _make_path(self) -> DirectPath:
        return DirectPath(acks=self._acks)

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"][DIRECT] = self._direct

    def connection_lost(self, exc: Exception | None) -> None:
        hook, self.on_connection_lost = self.on_connection_lost, None
        try:
            super().connection_lost(exc)
        finally:
            if hook is not None:
                hook()
            # The path's bound methods would keep this protocol (and its buffers) in a
            # cycle, left for a rare full collection (see server/app.py).
            self._acks(0, None)
            direct = self._direct
            direct.take = direct.send_text = direct.limit = direct.abort = direct.acks = None

    def _acks(self, interval_s: float, on_ack: Callable[[int], None] | None) -> None:
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        self._ack_pings.clear()
        self._on_ack = on_ack if interval_s > 0 else None
        self._ack_interval = interval_s
        if self._on_ack is not None:
            self._ack_asked = self._direct.written  # a new owner: nothing asked yet on its behalf
            self._ack_timer = self.loop.call_later(interval_s, self._ack_tick)

    def _ack_tick(self) -> None:
        """Ping if the app wrote messages since the last ping; never waits for anything."""
        self._ack_timer = self.loop.call_later(self._ack_interval, self._ack_tick)
        seq = self._direct.written
        if (
            seq <= self._ack_asked
            or self.close_sent
            or not self.writable.is_set()  # not reading: a pong would not come anyway
            or self.conn.state is not OPEN
            or self.transport.is_closing()
        ):
            return
        self._ack_count = (self._ack_count + 1) & 0xFFFFFFFF
        payload = _ACK_PREFIX + self._ack_count.to_bytes(4)
        pings = self._ack_pings
        if len(pings) == MAX_ACK_PINGS:
            del pings[0]  # the oldest goes when full
        pings.append((payload, seq))
        self._ack_asked = seq
        # uvicorn writes whatever the connection makes at once, so nothing of another
        # frame is pending in it: a whole frame of our own goes in between.
        self.transport.write(b"\x89\x08" + payload)  # FIN ping, unmasked, 8 bytes

    def handle_pong(self, event: Frame) -> None:
        pings = self._ack_pings
        if pings and len(event.data) == len(_ACK_PREFIX) + 4:
            data = bytes(event.data)
            for i, (payload, seq) in enumerate(pings):
                if payload == data:
                    del pings[: i + 1]  # older pings were answered before it (in order)
                    if self._on_ack is not None:
                        self._on_ack(seq)
                    return
        super().handle_pong(event)


class DuplexWebSocketProtocol(DeliveryPingProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if type(self.queue) is asyncio.Queue and self.queue.empty():
            # uvicorn's received events, for the app's receive(): the same FIFO without
            # asyncio.Queue's four deques (~2.5 KB a connection, server/fifo.py).
            self.queue = Fifo()
        self._framing = False  # True once this class frames the stream itself
        self._pending = bytearray()  # an incomplete frame, when framing
        self._need = 0  # its whole size once its header is in (0: not yet)

    def _make_path(self) -> DirectPath:
        return DirectPath(
            send_text=self._send_text, limit=self._limit, abort=self._abort, acks=self._acks
        )

    def data_received(self, data: bytes) -> None:
        if not self._framing:
            if not self._at_frame_boundary():
                super().data_received(data)
                return
            self._framing = True
        if self._pending:  # a large frame arrives over many reads: append, parse once
            self._pending += data
            if len(self._pending) < self._need:
                return
            data = bytes(self._pending)
            self._pending = bytearray()
            self._need = 0
        self._frames(data)

    def _at_frame_boundary(self) -> bool:
        return self.handshake_complete and _parser_at_frame_boundary(self.conn)

    def _frames(self, data: bytes) -> None:
        """Cut ``data`` into frames: direct audio to the sink, the rest to the stock parser.

        Only a frame that may go direct (FIN binary, or FIN text when the app takes text;
        masked, no fragmented message open, within the size limit) is waited for here;
        any other frame is handed over as soon as its first bytes show that, complete
        or not.
        """
        pos, size = 0, len(data)
        conn = self.conn
        max_size = conn.max_message_size
        view = memoryview(data)
        while pos < size:
            kind = data[pos]
            text = kind == _TEXT_FIN and self._direct.take_text is not None
            if (kind != _BINARY_FIN and not text) or conn.current_size is not None:
                head = self._header_end(data, pos)
                if head is None:  # not a candidate and not complete: the parser's from here
                    self._hand_over(data, pos)
                    return
                end, _ = head
                super().data_received(data[pos:end])
                if self.transport.is_closing():
                    return
                pos = end
                continue
            if size - pos < 2:
                break
            if not data[pos + 1] & 0x80:  # unmasked: a protocol error the parser reports
                self._hand_over(data, pos)
                return
            length = data[pos + 1] & 0x7F
            head = pos + 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(data[head : head + 2])
                head += 2
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(data[head : head + 8])
                head += 8
            if max_size is not None and length > max_size:  # the parser refuses it (1009)
                self._hand_over(data, pos)
                return
            end = head + 4 + length
            if end > size:
                self._need = end - pos
                break
            if text and self._deliver_direct(text=True):
                payload = apply_mask(view[head + 4 : end], data[head : head + 4])
                try:
                    taken = self._direct.take_text(payload.decode())  # type: ignore[misc]
                except UnicodeDecodeError:  # the parser reports it
                    taken = False
                if taken:
                    pos = end
                    continue
            elif not text and self._deliver_direct():
                payload = apply_mask(view[head + 4 : end], data[head : head + 4])
                if self._direct.take(payload):  # type: ignore[misc]
                    pos = end
                    continue
            super().data_received(data[pos:end])
            if self.transport.is_closing():
                return
            pos = end
        if pos < size:
            self._pending = bytearray(data[pos:])

    @staticmethod
    def _header_end(data: bytes, pos: int) -> tuple[int, int] | None:
        """(end of the frame, end of its header) if the whole frame at ``pos`` is in."""
        size = len(data)
        if size - pos < 2:
            return None
        b1 = data[pos + 1]
        length = b1 & 0x7F
        head = pos + 2
        if length == 126:
            if size - pos < 4:
                return None
            length = int.from_bytes(data[head : head + 2])
            head += 2
        elif length == 127:
            if size - pos < 10:
                return None
            length = int.from_bytes(data[head : head + 8])
            head += 8
        end = head + (4 if b1 & 0x80 else 0) + length
        return (end, head) if end <= size else None

    def _hand_over(self, data: bytes, pos: int) -> None:
        """Give the stream from ``pos`` to the stock parser until the next frame boundary."""
        self._framing = False
        super().data_received(data[pos:])

    def _deliver_direct(self, text: bool = False) -> bool:
        direct = self._direct
        return (
            direct.ready
            and (direct.take_text if text else direct.take) is not None
            and not self.close_sent
            and self.queue.empty()
            and not self.frames
        )

    def _limit(self, max_bytes: int) -> None:
        current = self.conn.max_message_size
        self.conn.max_message_size = max_bytes if current is None else min(current, max_bytes)

    def send_receive_event_to_app(self) -> None:
        """uvicorn's, but invalid UTF-8 in a text message is one log line, not a traceback.

        The answer is the same as uvicorn's (close 1007); a client sending such frames
        in a loop must not be able to fill the logs with tracebacks.
        """
        if self.curr_msg_data_type == "text" and not self.close_sent and self.frames:
            frames = self.frames
            data = frames[0] if len(frames) == 1 else b"".join(frames)
            self.frames = [data]
            if not data.isascii():
                try:
                    data.decode()
                except UnicodeDecodeError as exc:
                    self.frames = []
                    client = self.client
                    log.info(
                        "%s - invalid UTF-8 in a text message (%s at byte %d): close 1007",
                        f"{client[0]}:{client[1]}" if client else "-",
                        exc.reason,
                        exc.start,
                    )
                    self.conn.send_close(1007, "invalid UTF-8")
                    self.handle_parser_exception()
                    return
        super().send_receive_event_to_app()

    def _send_text(self, text: str) -> bool:
        if (
            self.close_sent
            or not self.writable.is_set()
            or self.conn.state is not OPEN
            or self.transport.is_closing()
        ):
            return False
        self.transport.write(text_frame(text.encode()))
        return True

    def _abort(self, last_text: str | None, code: int) -> None:
        if self.transport.is_closing() or self.close_sent or self.conn.state is not OPEN:
            return
        if last_text is not None:
            self.transport.write(text_frame(last_text.encode()))
        self.conn.send_close(code)
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        # A peer that reads again gets the message and the close (its close reply cancels
        # this timer and closes cleanly); one that does not is reset: a plain close would
        # wait for the unsent bytes forever.
        self.close_timer = self.loop.call_later(_ABORT_GRACE_S, self.transport.abort)


def direct_path_missing() -> str | None:
    """What the direct path needs and this uvicorn/websockets lacks; None if nothing.

    Builds one protocol object (no socket), checks the attributes the class uses, and
    runs a handshake and two frames through its websockets parser to see the parser
    come back to the frame boundary the class detects.
    """
    return _missing(PROTOCOL_ATTRS, PARSER_ATTRS, _parser_probe)


def delivery_pings_missing() -> str | None:
    """What `DeliveryPingProtocol` needs and this uvicorn/websockets lacks; None if nothing."""
    return _missing(ACK_PROTOCOL_ATTRS, ACK_PARSER_ATTRS, None)


def _missing(
    attrs: tuple[str, ...], parser_attrs: tuple[str, ...], probe: Callable[[Any], str | None] | None
) -> str | None:
    if _Stock is None:
        return "uvicorn has no sans-I/O WebSocket protocol"
    from uvicorn import Config
    from uvicorn.server import ServerState

    async def app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover
        pass

    config = Config(app, ws=STOCK_PROTOCOL, lifespan="off", log_config=None, interface="asgi3")
    loop = asyncio.new_event_loop()
    try:
        proto = _Stock(config=config, server_state=ServerState(), app_state={}, _loop=loop)
        missing = [a for a in attrs if not hasattr(proto, a)]
        missing += [f"conn.{a}" for a in parser_attrs if not hasattr(proto.conn, a)]
        if missing:
            return "missing " + ", ".join(missing)
        return probe(proto.conn) if probe is not None else None
    except Exception as exc:  # any surprise means: not the internals we know
        return f"{type(exc).__name__}: {exc}"
    finally:
        loop.close()


def _parser_probe(conn: Any) -> str | None:
    conn.receive_data(
        b"GET / HTTP/1.1\r\nHost: probe\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    (request,) = conn.events_received()
    conn.send_response(conn.accept(request))
    conn.data_to_send()
    if not hasattr(conn.reader, "buffer") or not _parser_at_frame_boundary(conn):
        return "websockets' parser does not wait at a frame boundary as expected"
    first = Frame(Opcode.BINARY, b"ab", fin=False).serialize(mask=True, extensions=[])
    conn.receive_data(first)
    if conn.current_size != 2 or not _parser_at_frame_boundary(conn):
        return "websockets' parser does not track fragmented messages as expected"
    conn.receive_data(Frame(Opcode.CONT, b"cd").serialize(mask=True, extensions=[]))
    if conn.current_size is not None or len(conn.events_received()) != 2:
        return "websockets' parser does not end fragmented messages as expected"
    return None


def websocket_protocol() -> type[asyncio.Protocol] | str:
    """The ``ws`` option for uvicorn: our class; else uvicorn's stock protocol with the
    delivery pings only, or plain (one log line either way)."""
    missing = direct_path_missing()
    if missing is None:
        return DuplexWebSocketProtocol
    stock = STOCK_PROTOCOL if _Stock is not None else "auto"
    pings_missing = delivery_pings_missing()
    if pings_missing is None:
        log.warning(
            "direct WebSocket path off (%s); using uvicorn's %r protocol with delivery pings",
            missing,
            stock,
        )
        return DeliveryPingProtocol
    log.warning(
        "direct WebSocket path off (%s); using uvicorn's %r protocol, no delivery pings (%s)",
        missing,
        stock,
        pings_missing,
    )
    return stock
