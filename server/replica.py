"""This process as one replica among several: who owns a session, and draining.

- **Ownership.** With a Redis or SQLite store (shared by replicas, or by the processes
  of ``duplex serve --workers N``), every live session holds a lease (`server.lease`)
  from its connect to its close; a connect for a session another replica runs waits for
  that lease to end (crash: it expires; drain: it is released), then takes the session
  over. An answer the previous owner was streaming when it died is left in the store
  as stream events; the new owner stores it as an interrupted answer, so it is neither
  lost nor answered twice.
- **Draining** (SIGTERM, see `server.serving`): readiness turns 503 and new sessions
  are refused at once; each live session is told to reconnect (`session.reconnect`),
  its responses in flight finish (up to `drain_timeout_s`) and are stored, then its
  socket closes with 1012 and its lease is released for the next replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import weakref
from typing import TYPE_CHECKING, Any

from fastapi import WebSocket
from fastapi.responses import PlainTextResponse

from duplex.protocol import (
    UNAVAILABLE,
    ErrorEvent,
    Message,
    ProtocolError,
    ResponseDone,
    SessionConfig,
    SessionReconnect,
    StreamChunk,
    chunk_event,
    encode_server_message,
)
from server.config import Settings
from server.lease import Lease, LeaseBusy, LeaseManager, LeaseSettings
from server.session import DuplexSession, SessionServices, check_endpoint
from server.state.base import DUPLEX_ENDPOINT, StateStore

if TYPE_CHECKING:  # the redis package is optional (pip install duplex[redis])
    from server.state.redis import RedisStore
    from server.state.sqlite import SqliteStore

log = logging.getLogger(__name__)

#: WebSocket close code for "service restart": reconnect, another replica continues.
CLOSE_RESTART = 1012
#: Close code of a connection whose session went on elsewhere (as `server.resume`'s).
CLOSE_REPLACED = 4001
#: WebSocket close code for "try again later".
CLOSE_TRY_AGAIN = 1013
_POLL_S = 0.05
#: After a drain's timeout, how long a cut answer may take to end (response.done).
_CUT_WAIT_S = 2.0


def _shared_store(store: StateStore) -> RedisStore | SqliteStore | None:
    """The Redis or SQLite store under ``store`` (wrappers expose what they wrap as
    ``inner``): the stores several processes may share, so sessions need leases."""
    while not store.shared:
        store = getattr(store, "inner", None)  # type: ignore[assignment]
        if store is None:
            return None
    return store  # type: ignore[return-value]


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Replica:
    """Leases and drain state of this process; the socket layer calls it around a session."""

    def __init__(self, settings: Settings, store: StateStore) -> None:
        self.id = settings.replica_id or default_replica_id()
        self.settings = settings
        self.leases: LeaseManager | None = None
        shared = _shared_store(store)
        if shared is not None:
            self.leases = LeaseManager(
                shared,
                self.id,
                LeaseSettings(
                    ttl_ms=settings.lease_ttl_ms,
                    renew_ms=min(settings.lease_renew_ms, settings.lease_ttl_ms // 2),
                    wait_ms=settings.lease_wait_ms,
                    fence_ttl_s=max(1, int(settings.store_ttl_s)),
                ),
            )
        self.draining = False
        self._leases: dict[DuplexSession, Lease] = {}
        #: Sessions this process runs; weak: a closed session is freed by reference
        #: counting alone (no cycle, no wait for the GC).
        self._live: weakref.WeakSet[DuplexSession] = weakref.WeakSet()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listener: asyncio.Task[None] | None = None  # handover requests (Redis)

    async def aclose(self) -> None:
        """Stop listening for handover requests (app shutdown)."""
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.wait([self._listener])
            self._listener = None

    # ---- connect -----------------------------------------------------------------------

    def refusal(self) -> str | None:
        """Why a new connection is refused now, if it is."""
        if self.draining:
            return "this server is shutting down: reconnect (another replica takes over)"
        return None

    async def open(
        self,
        services: SessionServices,
        *,
        tenant: str,
        session_id: str | None,
        config: SessionConfig | None = None,
        endpoint: str = DUPLEX_ENDPOINT,
    ) -> DuplexSession:
        """`DuplexSession.open`, holding the session's lease (shared stores). A session live
        on another replica past ``lease_wait_ms`` raises ProtocolError(503)."""
        return await self._own(
            services, tenant, session_id, resume=False, config=config, endpoint=endpoint
        )

    async def reopen(
        self, services: SessionServices, *, tenant: str, session_id: str
    ) -> DuplexSession:
        """`DuplexSession.reopen` for a resume of a session not live in this process (its
        grace ended, or another replica ran it): the lease first, so that two replicas
        never run it; then an answer a lost owner was streaming ends, interrupted."""
        return await self._own(services, tenant, session_id, resume=True)

    async def _own(
        self,
        services: SessionServices,
        tenant: str,
        session_id: str | None,
        *,
        resume: bool,
        config: SessionConfig | None = None,
        endpoint: str = DUPLEX_ENDPOINT,
    ) -> DuplexSession:
        lease: Lease | None = None
        cut: list[Message] = []
        try:
            record = None
            if self.leases is not None and session_id:
                record = await services.store.get_session(session_id, tenant)
            if record is not None:
                # Another endpoint's session is refused before its lease is asked for: the
                # ask would hand it over (end it) on the replica that runs it.
                check_endpoint(record, endpoint)
                lease = await self._claim(session_id)
                if not any(s.id == session_id and not s.done.is_set() for s in self._live):
                    cut = await settle_interrupted(services.store, session_id)
            # Unknown or foreign ids take the 404 path; no lease is touched for them.
            if resume:
                assert session_id is not None
                session = await DuplexSession.reopen(
                    services, tenant=tenant, session_id=session_id, endpoint=endpoint
                )
            else:
                session = await DuplexSession.open(
                    services, tenant=tenant, session_id=session_id, config=config, endpoint=endpoint
                )
            try:
                # The client saw these start: they end here, interrupted, through the
                # session's output (numbered and in the outbox, after what was replayed).
                for message in cut:
                    response_id = message.metadata["response_id"]
                    await session.emit(
                        chunk_event(StreamChunk(response_id=response_id, interrupted=True))
                    )
                    await session.emit(
                        ResponseDone(response_id=response_id, finish_reason="interrupted")
                    )
                if lease is None and self.leases is not None:
                    lease = await self._claim(session.id)
            except BaseException:
                await session.close()
                raise
        except BaseException:
            if lease is not None and self.leases is not None:
                await self.leases.release(lease)
            raise
        self._adopt(session, lease)
        return session

    async def _claim(self, session_id: str) -> Lease:
        assert self.leases is not None
        try:
            return await self.leases.acquire(session_id, handover=True)
        except LeaseBusy:
            raise ProtocolError(
                UNAVAILABLE, "the session is live on another replica: retry shortly", fatal=True
            ) from None
        except (
            OSError, TimeoutError, *self.leases.store.driver_errors,
            *self.leases.store.transient_errors,
        ) as exc:  # fmt: skip
            # The lease cannot be taken now (the store is away or overloaded): a 503 the
            # client retries, as for a new session during an outage, not a 500.
            log.warning("[%s] session lease: %s", session_id, exc)
            raise ProtocolError(
                UNAVAILABLE, "the state store is unavailable: retry shortly", fatal=True
            ) from None

    def _adopt(self, session: DuplexSession, lease: Lease | None) -> None:
        """From now until the session ends (its connections come and go: a detached
        session keeps its lease through the resume grace): renew the lease, drain the
        session on shutdown; once it has ended (its last writes done), release the lease."""
        self._live.add(session)
        if lease is not None:
            if self._listener is None and self.leases is not None:
                self._listener = asyncio.ensure_future(self.leases.listen())
            self._leases[session] = lease
            self._spawn(self._hold(session, lease))
        if self.draining:  # opened while the drain began
            self._spawn(self._drain_one(session, self.settings.drain_timeout_s))

    async def _hold(self, session: DuplexSession, lease: Lease) -> None:
        assert self.leases is not None
        keeper = asyncio.ensure_future(
            self.leases.keep(
                lease,
                lambda: self._spawn(self._end(session, "moved")),
                lambda: self._spawn(self._hand_over(session)),
            )
        )
        try:
            await session.done.wait()
        finally:
            keeper.cancel()
            self._live.discard(session)
            self._leases.pop(session, None)
            await self.leases.release(lease)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _end(self, session: DuplexSession, reason: str) -> None:
        """Another replica owns the session now: tell the client, close with 1012."""
        session.emit_nowait(
            SessionReconnect(reason=reason, retry_after_ms=self.settings.drain_retry_after_ms)  # type: ignore[arg-type]
        )
        session.close_code = CLOSE_RESTART
        await session.close()

    async def _hand_over(self, session: DuplexSession) -> None:
        """Another replica asks for the session (the client resumed there): end it here
        (an answer in flight is cut, its end in the outbox), so that the lease is
        released and the other replica reopens it from the store."""
        if session.closed:
            return
        session.log.info("handing the session over to another replica")
        await _cut(session)
        session.close_code = CLOSE_REPLACED
        await session.close()

    # ---- drain -------------------------------------------------------------------------

    def start_draining(self) -> None:
        """Readiness off and new sessions refused, at once (safe from a signal handler)."""
        self.draining = True

    async def drain(self) -> None:
        """Drain every live session (see the module doc); returns when all are closed and
        their leases released, or shortly after ``drain_timeout_s``."""
        self.start_draining()
        timeout = self.settings.drain_timeout_s
        sessions = [s for s in list(self._live) if not s.done.is_set()]
        log.info("draining %d session(s), up to %g s", len(sessions), timeout)
        await asyncio.gather(*(self._drain_one(s, timeout) for s in sessions))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                while self._tasks or any(not s.done.is_set() for s in list(self._live)):  # noqa: ASYNC110
                    await asyncio.sleep(_POLL_S)
        log.info("drained")

    async def _drain_one(self, session: DuplexSession, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        notice = SessionReconnect(
            reason="draining",
            retry_after_ms=self.settings.drain_retry_after_ms,
            deadline_ms=int(timeout * 1000),
        )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await session.emit(notice)
                while session.busy and not session.closed:  # noqa: ASYNC110 - no event for it
                    await asyncio.sleep(_POLL_S)
        if session.busy and not session.closed:
            session.log.warning("drain timeout: cutting the response in flight")
            await _cut(session)
        session.close_code = CLOSE_RESTART
        await session.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(1.0, deadline - loop.time() + 1.0)):
                await session.done.wait()


async def _cut(session: DuplexSession) -> None:
    """Cut the answer in flight like a barge-in: the client gets the interrupted chunk and
    ``response.done`` (through the outbox, so a resume replays them) and the answer is
    stored as interrupted; returns once that is done (bounded)."""
    session.cut_response()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_CUT_WAIT_S):
            while session.responding and not session.closed:  # noqa: ASYNC110 - bounded
                await asyncio.sleep(0.005)  # a client waits on this (a handover)


async def refuse_unavailable(ws: WebSocket, message: str) -> None:
    """Refuse a handshake with HTTP 503 (a load balancer then tries another replica);
    where the server cannot answer a handshake that way, accept and close with 1013."""
    try:
        await ws.send_denial_response(
            PlainTextResponse(message + "\n", 503, headers={"retry-after": "1"})
        )
    except RuntimeError:
        await ws.accept()
        await ws.send_text(
            encode_server_message(ErrorEvent(seq=1, code=UNAVAILABLE, message=message, fatal=True))
        )
        await ws.close(CLOSE_TRY_AGAIN)


async def settle_interrupted(store: StateStore, session_id: str) -> list[Message]:
    """Store the answers a previous owner was streaming when it stopped (its stream
    events, still in the store) as interrupted assistant messages, and drop the events.

    Called by the new owner, lease in hand: the previous owner can no longer write.
    """
    events = await store.load_events(session_id)
    parts: dict[str, list[str]] = {}
    started: dict[str, float] = {}
    for event in events:
        parts.setdefault(event.response_id, [])
        started.setdefault(event.response_id, event.created_at)
        if event.kind == "delta":
            parts[event.response_id].append(event.data.get("text", ""))
    messages = [
        Message(
            role="assistant",
            content="".join(texts),
            created_at=started[response_id],
            metadata={
                "response_id": response_id,
                "finish_reason": "interrupted",
                "interrupted": "replica_lost",
            },
        )
        for response_id, texts in parts.items()
    ]
    if messages:
        await store.append_messages(session_id, messages)
        for message in messages:
            await store.drop_events(session_id, message.metadata["response_id"])
        log.info(
            "[%s] stored %d interrupted answer(s) of a lost replica", session_id, len(messages)
        )
    return messages
