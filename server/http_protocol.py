"""uvicorn's HTTP protocol plus what it lacks against idle or greedy clients.

uvicorn's httptools protocol has no timeout for a request's headers (a client can
hold a connection forever by sending them slowly), and ``limit_concurrency`` only
answers HTTP requests after their headers arrive and ignores WebSocket upgrades.
So each connection here:

- is counted from its first byte to its close (across the upgrade to WebSocket)
  against a server-wide cap and a per-client-address cap; over a cap it is answered
  ``503`` with the reason and closed before anything is parsed;
- must deliver complete request headers within ``header_timeout_s`` of connecting
  (or of starting the next request on a kept-alive connection), else ``408``;
- sends without Nagle's delay (``TCP_NODELAY``): the event loop sets it only on
  sockets whose protocol number says TCP, and a socket uvicorn binds itself
  (``--workers``, ``--fd``, a socket handed over) has 0 there; a small event written
  after another then waited for the peer's delayed ACK, up to 40 ms.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

#: A refused connection is answered when its request headers are in, or after this long.
_LINGER_S = 1.0
_REFUSAL_LOG_EVERY_S = 10.0


@dataclass
class ConnectionLimits:
    """Open-connection counts of one server, and its caps (0: no cap)."""

    max_total: int
    max_per_client: int
    header_timeout_s: float
    total: int = 0
    per_client: dict[str, int] = field(default_factory=dict)
    refused: int = 0
    _logged_at: float = 0.0

    def admit(self, host: str) -> str | None:
        """Count a new connection from ``host``; or the reason it is refused."""
        if self.max_total and self.total >= self.max_total:
            return self._refuse(f"server connection limit ({self.max_total}) reached")
        count = self.per_client.get(host, 0)
        if self.max_per_client and count >= self.max_per_client:
            return self._refuse(
                f"connection limit per client address ({self.max_per_client}) reached"
            )
        self.total += 1
        self.per_client[host] = count + 1
        return None

    def release(self, host: str) -> None:
        self.total -= 1
        count = self.per_client.get(host, 1) - 1
        if count > 0:
            self.per_client[host] = count
        else:
            self.per_client.pop(host, None)

    def _refuse(self, reason: str) -> str:
        self.refused += 1
        now = time.monotonic()
        if now - self._logged_at >= _REFUSAL_LOG_EVERY_S:  # one line per 10 s at most
            self._logged_at = now
            log.warning("refusing connections: %s (%d refused so far)", reason, self.refused)
        return reason


def http_protocol(limits: ConnectionLimits) -> type[asyncio.Protocol]:
    """The HTTP protocol class for one server, bound to its ``limits``."""
    return type("DuplexHttpProtocol", (DuplexHttpProtocol,), {"limits": limits})


def _response(status: bytes, reason: str, extra: bytes = b"") -> bytes:
    body = (reason + "\n").encode()
    return (
        b"HTTP/1.1 " + status + b"\r\n"
        b"content-type: text/plain; charset=utf-8\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n" + extra + b"connection: close\r\n"
        b"\r\n" + body
    )


class DuplexHttpProtocol(HttpToolsProtocol):
    limits: ClassVar[ConnectionLimits]  # set by `http_protocol`

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._host: str | None = None  # set while this connection holds a slot
        self._refused = False
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        peer = transport.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) and peer else "local"
        reason = self.limits.admit(host)
        if reason is not None:
            self._refuse(transport, reason)
            return
        self._host = host
        _no_delay(transport)
        super().connection_made(transport)
        self._arm_header_timer()

    def _refuse(self, transport: asyncio.Transport, reason: str) -> None:
        """Answer 503 once the request's headers are in (clients expect an answer to a
        request, and closing on unread bytes would reset the connection and lose it),
        or after ``_LINGER_S`` at most; nothing is parsed or kept meanwhile."""
        self._refused = True
        self._refusal = _response(b"503 Service Unavailable", reason, b"retry-after: 1\r\n")
        self._tail = b""
        self.transport = transport
        self._header_timer = self.loop.call_later(_LINGER_S, self._send_refusal)

    def _send_refusal(self) -> None:
        self._cancel_header_timer()
        if not self.transport.is_closing():
            self.transport.write(self._refusal)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            self._tail = (self._tail + data)[-4:] if len(data) < 4 else data[-4:]
            if b"\r\n\r\n" in self._tail or b"\r\n\r\n" in data:
                self._send_refusal()
            return
        super().data_received(data)

    def eof_received(self) -> bool | None:
        if self._refused:
            self._send_refusal()
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        if self._refused:
            return
        self._release()
        super().connection_lost(exc)

    def _release(self) -> None:
        if self._host is not None:
            self.limits.release(self._host)
            self._host = None

    # ---- header timeout -----------------------------------------------------------------

    def _arm_header_timer(self) -> None:
        if self._header_timer is None and self.limits.header_timeout_s > 0:
            self._header_timer = self.loop.call_later(
                self.limits.header_timeout_s, self._header_timeout
            )

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        self.transport.write(_response(b"408 Request Timeout", "request headers took too long"))
        self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_timer()  # the next request on a kept-alive connection

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()

    def handle_websocket_upgrade(self) -> None:
        self._cancel_header_timer()
        super().handle_websocket_upgrade()
        # The WebSocket protocol owns the connection now; it gives the slot back at close.
        protocol = self.transport.get_protocol()
        release, self._host = self._host, None
        if release is None:
            return
        limits = self.limits
        hook: Callable[[], None] = lambda: limits.release(release)  # noqa: E731
        if hasattr(protocol, "on_connection_lost"):  # called later, from the event loop
            protocol.on_connection_lost = hook  # type: ignore[attr-defined]
        else:
            hook()


def _no_delay(transport: asyncio.Transport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # not a TCP socket after all, or already closed
            pass
