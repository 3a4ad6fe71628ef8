"""Resume after reconnect: a new connection takes over a session's output.

A client that lost its socket reconnects with ``?session_id=ID&last_seq=N`` (or sends
``session.resume`` as its first message). The server finds the session live on this
process (running detached within its grace period, or still attached to a socket the
server has not yet seen die), or, when it has ended, reopens it from the store with the
store's copy of the outbox. The connection then greets with ``session.resumed``, replays
every held message with ``seq > N`` and goes on live (docs/protocol.md, "Resuming").

A session live on another connection is taken over: the old socket is closed with
``CLOSE_REPLACED`` (4001) and the new one continues. This module holds no session
state: what it needs is on the session (`DuplexSession.claim_lock`, ``connection``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from duplex.protocol import (
    BAD_REQUEST,
    RESUME_GAP,
    ErrorEvent,
    ProtocolError,
    SessionResumed,
    encode_server_message,
)
from server.registry import SessionRegistry
from server.session import DuplexSession, SessionServices, check_endpoint
from server.state.base import DUPLEX_ENDPOINT

#: Close code of a connection whose session was resumed on another connection.
CLOSE_REPLACED = 4001

#: How long a resume waits for a closing session to finish (its store writes are bounded).
CLOSING_WAIT_S = 10.0


#: Continues a session not live in this process: ``DuplexSession.reopen`` or, with
#: replicas, `Replica.reopen` (which takes the session's lease first).
Reopen = Callable[..., Awaitable[DuplexSession]]


@dataclass(frozen=True)
class ResumeRequest:
    session_id: str
    last_seq: int


@dataclass
class Link:
    """One connection's hold on a session's output (``DuplexSession.connection``)."""

    ws: Any
    writer: asyncio.Task[Any] | None = None
    #: Set when another connection took the session over: from then on this one's reader
    #: takes no new message (one being handled finishes), so the input count the new
    #: connection is told is final.
    replaced: bool = False
    #: The code the connection ended with, as the reader saw it: the client's close
    #: frame's (1000: done with the session, which then ends at once), the server's own
    #: close's, or 1005/1006 for one lost without a close frame; None until then.
    close_code: int | None = None


def request_from_query(params: Mapping[str, str]) -> ResumeRequest | None:
    """The resume a handshake asks for (``session_id`` and ``last_seq``), if any."""
    raw = params.get("last_seq")
    if raw is None:
        return None
    session_id = params.get("session_id")
    if not session_id:
        raise ProtocolError(BAD_REQUEST, "last_seq needs session_id", fatal=True)
    if not raw.isdigit():
        raise ProtocolError(BAD_REQUEST, "last_seq must be an integer >= 0", fatal=True)
    return ResumeRequest(session_id, int(raw))


async def resume(
    services: SessionServices,
    registry: SessionRegistry,
    tenant: str,
    request: ResumeRequest,
    reopen: Reopen = DuplexSession.reopen,
) -> tuple[DuplexSession, Link, list[str]]:
    """The session ``request`` names, its output now reserved for a new connection (the
    returned link), and the frames that connection sends first (greeting and replay).

    Unknown sessions and other tenants' sessions raise the same fatal 404 as a plain
    ``session_id`` continuation; a session another endpoint opened (/v1/realtime) a fatal
    409, live or not, before anything touches it. A session not live here is continued
    by ``reopen``.
    """
    session = registry.get(tenant, request.session_id)
    if session is not None:  # another endpoint's: refused, and left as it is
        check_endpoint(session.record, DUPLEX_ENDPOINT)
    if session is not None and session.closed:  # closing: its outbox is being written
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSING_WAIT_S):
                await session.done.wait()
    elif session is not None:
        async with session.claim_lock:
            await _evict(session)
            await session.claim_output()
            if not session.closed:
                link = session.connection = Link(ws=None)
                return session, link, greeting(session, request.last_seq)
    session = await reopen(services, tenant=tenant, session_id=request.session_id)
    session.advance_seq(request.last_seq)
    link = session.connection = Link(ws=None)
    session.log.info("reopened for a resume after seq %d", request.last_seq)
    return session, link, greeting(session, request.last_seq)


async def _evict(session: DuplexSession) -> None:
    """Stop the connection that reads the session's output now, if any, and close it."""
    old = session.connection
    if not isinstance(old, Link):
        return
    old.replaced = True
    session.connection = None
    session.attach_output(None)
    if old.writer is not None:
        old.writer.cancel()
        await asyncio.wait([old.writer])
    if old.ws is not None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await old.ws.close(CLOSE_REPLACED, "session resumed on another connection")
    session.log.info("resumed on a new connection: the old one is closed (%d)", CLOSE_REPLACED)


def greeting(session: DuplexSession, last_seq: int) -> list[str]:
    """``session.resumed``, any resume error, then every held message after ``last_seq``."""
    sent = session.last_seq
    errors: list[ErrorEvent] = []
    if last_seq > sent:
        errors.append(
            ErrorEvent(
                code=BAD_REQUEST,
                message=f"last_seq {last_seq} is ahead of the last message sent ({sent})",
            )
        )
        entries = []
    else:
        entries = session.sent_after(last_seq)
    first = entries[0].seq if entries else sent + 1
    if last_seq < sent and first > last_seq + 1:
        errors.append(
            ErrorEvent(
                code=RESUME_GAP,
                message=(
                    f"messages {last_seq + 1}..{first - 1} are no longer held; the "
                    f"conversation is at GET /v1/sessions/{session.id}/messages"
                ),
            )
        )
    resumed = SessionResumed(
        session=session.info(),
        last_seq=last_seq,
        first_seq=first,
        input_received=session.input_received,
    )
    return [
        encode_server_message(resumed),
        *(encode_server_message(e) for e in errors),
        *(e.text for e in entries),
    ]
