"""The /v1/duplex endpoint: frames in, session calls; session output, frames out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from duplex.protocol import (
    ID_PEEK_BYTES,
    INTERNAL,
    RATE_LIMITED,
    STORE_UNAVAILABLE,
    TOO_LARGE,
    UNAVAILABLE,
    ErrorEvent,
    InputAudio,
    ProtocolError,
    SessionResume,
    encode_server_message,
    parse_client_message,
    peek_id,
)
from server.client_tokens import socket_access
from server.rate import InputBudget, audio_bytes_per_second
from server.replica import refuse_unavailable
from server.resume import Link, ResumeRequest, request_from_query, resume
from server.session import DuplexSession
from server.state.base import StoreUnavailable
from server.ws_input import (
    CLOSE_NORMAL,
    input_budget,
    pace_audio,
    pace_message,
    receive_frame,
)
from server.ws_protocol import DIRECT, DirectPath, delivery_pings

log = logging.getLogger(__name__)
router = APIRouter()

CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013


async def _refuse(
    ws: WebSocket, code: int, message: str, close: int | None = None, *, accept: bool = True
) -> None:
    if ws.app.state.duplex.metrics is not None:
        ws.app.state.duplex.metrics.count_error(code)
    if accept:
        await ws.accept()
    await ws.send_text(
        encode_server_message(ErrorEvent(seq=1, code=code, message=message, fatal=True))
    )
    await ws.close(close or (CLOSE_INTERNAL if code >= 500 else CLOSE_POLICY))


@router.websocket("/v1/duplex")
async def duplex(ws: WebSocket) -> None:
    app = ws.app.state.duplex
    refusal = app.replica.refusal()
    if refusal is not None:  # draining
        await refuse_unavailable(ws, refusal)
        return
    access = await socket_access(
        app.auth, app.client_tokens, ws.headers.get("authorization"), ws.query_params.get("token")
    )
    if isinstance(access, ProtocolError):
        retry = CLOSE_TRY_AGAIN if access.code == STORE_UNAVAILABLE else None
        await _refuse(ws, access.code, access.message, retry)
        return
    tenant = access.tenant
    link: Link | None = None
    greeting: list[str] = []
    try:
        request = request_from_query(ws.query_params)
        if request is not None:
            access.session(request.session_id)  # a scoped client token: its session only
            session, link, greeting = await resume(
                app.services, app.registry, tenant, request, app.replica.reopen
            )
        else:
            session_id = access.session(ws.query_params.get("session_id"))
            session = await app.replica.open(app.services, tenant=tenant, session_id=session_id)
    except ProtocolError as exc:
        if exc.code == UNAVAILABLE:  # live on another replica: HTTP 503, the balancer retries
            await refuse_unavailable(ws, exc.message)
        else:
            await _refuse(ws, exc.code, exc.message)
        return
    except StoreUnavailable as exc:
        await _refuse(ws, STORE_UNAVAILABLE, f"{exc}; try again later", CLOSE_TRY_AGAIN)
        return
    await ws.accept()
    while True:
        asked = await _serve(ws, app, tenant, session, link or Link(ws=None), greeting)
        if asked is None:
            return
        # session.resume as the first message: the fresh session (closed by `_serve`)
        # gives way to the asked one
        with contextlib.suppress(StoreUnavailable):  # it expires with the store's TTL
            await app.services.store.delete_session(session.id)
        try:
            access.session(asked.session_id)
            session, link, greeting = await resume(
                app.services, app.registry, tenant, asked, app.replica.reopen
            )
        except ProtocolError as exc:
            close = CLOSE_TRY_AGAIN if exc.code == UNAVAILABLE else None
            await _refuse(ws, exc.code, exc.message, close, accept=False)
            return
        except StoreUnavailable as exc:
            await _refuse(
                ws, STORE_UNAVAILABLE, f"{exc}; try again later", CLOSE_TRY_AGAIN, accept=False
            )
            return


async def _serve(
    ws: WebSocket, app: Any, tenant: str, session: DuplexSession, link: Link, greeting: list[str]
) -> ResumeRequest | None:
    """Run one session on the connection; returns a first-message resume request, if any.

    When the client goes, a live session is detached for ``resume_grace_s`` (see
    server/resume.py) instead of closed, unless the client closed with 1000 (it is done:
    the session ends at once); one taken over by another connection is left alone.
    """
    link.ws = ws
    session.connection = link
    app.registry.add(tenant, session)
    session.log.info("%s (tenant %s)", "resumed" if greeting else "connected", tenant)
    settings = app.settings
    budget = input_budget(settings)
    if session.tap is not None:
        session.tap.attach_input(budget)  # its message count and clocks feed the metrics
    asked: ResumeRequest | None = None
    keep = True  # False when the server itself is stopping this connection
    try:
        try:
            async with asyncio.TaskGroup() as tg:
                writer = link.writer = tg.create_task(
                    _write(
                        ws,
                        session,
                        greeting,
                        lambda: reader.cancel(),
                        settings.output_stall_timeout_s,
                        settings.outbox_ack_interval_s,
                    )
                )
                reader = tg.create_task(
                    _read(
                        ws,
                        session,
                        link,
                        settings.max_message_bytes,
                        budget,
                        writer,
                        not greeting,
                    )
                )
            asked = None if reader.cancelled() else reader.result()
        except* Exception as group:
            session.log.error("connection failed", exc_info=group.exceptions[0])
    except asyncio.CancelledError:
        keep = False
        raise
    finally:
        grace = app.services.limits.resume_grace_s
        if link.replaced:
            pass  # another connection serves the session now
        elif session.closed or asked is not None or not keep:
            await session.close()  # first: a resume meanwhile waits for it (server/resume.py)
            app.registry.remove(tenant, session)
        elif link.close_code == CLOSE_NORMAL or grace <= 0:
            # A client's close 1000 says it is done: nobody resumes the session, so its
            # outbox goes too (memory and the store's copy). An answer in progress is
            # stopped and stored as it stood; the close waits for that write (bounded).
            await session.close(resumable=link.close_code != CLOSE_NORMAL)
            app.registry.remove(tenant, session)
        else:
            session.detach(grace, lambda: app.registry.remove(tenant, session))
        session.log.info("disconnected (close code %s)", link.close_code or "-")
    return asked


def _direct_take(
    session: DuplexSession, link: Link, max_bytes: int, budget: InputBudget
) -> Callable[[bytes], bool]:
    """The direct path's sink: audio within the budget goes straight to the session;
    the rest takes the usual path, where it waits for its budget."""
    fmt: Any = None
    bytes_per_s = 1.0
    try_audio = budget.try_audio
    send = session.send_audio_nowait

    def take(data: bytes) -> bool:
        nonlocal fmt, bytes_per_s
        size = len(data)
        if size > max_bytes or link.replaced:
            return False
        if session.config.input_audio is not fmt:  # changed by a session.update
            fmt = session.config.input_audio
            bytes_per_s = audio_bytes_per_second(fmt)
        if not try_audio(size, bytes_per_s):
            return False
        if send(data):
            session.take_input()  # taken: counted (docs/protocol.md "Resending input")
            return True
        budget.refund_audio(size, bytes_per_s)
        return False

    return take


async def _read(
    ws: WebSocket,
    session: DuplexSession,
    link: Link,
    max_bytes: int,
    budget: InputBudget,
    writer: asyncio.Task[None],
    fresh: bool,
) -> ResumeRequest | None:
    """Feed the session until the client goes or the session ends; then stop the writer.

    Under `DuplexWebSocketProtocol`, binary audio arriving while this loop waits
    skips the ASGI queue: the protocol hands it to the session synchronously.
    ``fresh``: a ``session.resume`` first message is returned, not handled.
    """
    direct: DirectPath | None = ws.scope.get("extensions", {}).get(DIRECT)
    if direct is not None:
        direct.take = _direct_take(session, link, max_bytes, budget)
    try:
        return await _receive_loop(ws, session, link, max_bytes, direct, budget, fresh)
    finally:
        if direct is not None:
            direct.take = None
        if not session.closed:  # the client went; a closed session's writer ends by itself
            writer.cancel()


async def _receive_loop(
    ws: WebSocket,
    session: DuplexSession,
    link: Link,
    max_bytes: int,
    direct: DirectPath | None,
    budget: InputBudget,
    fresh: bool,
) -> ResumeRequest | None:
    while not session.closed and not link.replaced:
        frame = await receive_frame(ws, session, direct)
        if isinstance(frame, int):
            link.close_code = frame
            break
        if link.replaced or not session.take_input():
            # not taken, not counted: the client resends it where the session went on
            break
        data = frame.get("bytes")
        text = frame.get("text")
        size = len(data) if data is not None else len((text or "").encode())
        if size > max_bytes:
            # The id is echoed when the first bytes hold it (docs/protocol.md "Errors").
            msg_id = peek_id(text[:ID_PEEK_BYTES]) if text is not None else None
            await session.emit_error(
                TOO_LARGE, f"message of {size} bytes is over {max_bytes}", id=msg_id
            )
            continue
        try:
            if data is not None:
                await pace_audio(session, budget, len(data))
                await session.send_audio(data)
            elif text is not None:
                message = parse_client_message(text, session.services.limits.json)
                if fresh and isinstance(message, SessionResume):
                    return ResumeRequest(message.session_id, message.last_seq)
                if isinstance(message, InputAudio):
                    await pace_audio(session, budget, len(message.audio))
                else:
                    await pace_message(session, budget)
                await session.handle(message)
        except ProtocolError as exc:
            await session.emit_error(exc.code, exc.message, id=exc.id, fatal=exc.fatal)
        except Exception:
            session.log.exception("internal error handling a message")
            await session.fail(INTERNAL, "internal error")
        fresh = False
    return None


async def _write(
    ws: WebSocket,
    session: DuplexSession,
    greeting: list[str],
    stop_reader: Callable[[], Any],
    stall_timeout_s: float,
    ack_interval_s: float = 0.0,
) -> None:
    """The greeting (a resume's replay), then session output to the socket. A send that
    cannot complete for ``stall_timeout_s`` (the client stopped reading: the kernel's
    buffers and the transport's are full) ends the session with a fatal 429 and drops
    the connection. Under `DuplexWebSocketProtocol`, every ``ack_interval_s`` a ping
    tells which written messages the client read (`DuplexSession.acknowledge`)."""
    direct: DirectPath | None = ws.scope.get("extensions", {}).get(DIRECT)
    with delivery_pings(direct, ack_interval_s, session.acknowledge):
        await _write_all(ws, session, greeting, stop_reader, stall_timeout_s, direct)


async def _write_all(
    ws: WebSocket,
    session: DuplexSession,
    greeting: list[str],
    stop_reader: Callable[[], Any],
    stall_timeout_s: float,
    direct: DirectPath | None,
) -> None:
    for text in greeting:
        try:
            async with asyncio.timeout(stall_timeout_s):
                await ws.send_text(text)
        except (TimeoutError, WebSocketDisconnect, RuntimeError, OSError):
            return  # the client is gone (or not reading): the session is detached
    send_now = direct.send_text if direct is not None else None
    if direct is not None and send_now is not None:
        session.attach_output(_counting(session, direct, send_now))
    stalled: str | None = None  # the frame that could not be written
    async for text in session.frames():
        seq = session.last_seq  # this message's (numbered as it was taken)
        if send_now is None or not send_now(text):
            try:
                async with asyncio.timeout(stall_timeout_s):
                    await ws.send_text(text)
            except TimeoutError:
                stalled = text
                break
            except (WebSocketDisconnect, RuntimeError, OSError):
                break
        if direct is not None:
            direct.written = seq
        del text  # not held while the next message is awaited (it may be long)
    session.attach_output(None)
    if stalled is not None:
        await _drop_stalled(session, direct, stall_timeout_s, stalled)
    elif ws.client_state == WebSocketState.CONNECTED:
        code = session.close_code
        if session.error is not None:
            code = CLOSE_INTERNAL if session.error.code >= 500 else CLOSE_POLICY
        try:
            await ws.close(code)
        except RuntimeError:
            pass
    stop_reader()


def _counting(
    session: DuplexSession, direct: DirectPath, send_now: Callable[[str], bool]
) -> Callable[[str], bool]:
    """``send_now`` for `DuplexSession.emit_nowait`, keeping ``direct.written``: that
    numbers its message ``last_seq + 1`` and counts it only once it is written."""

    def send(text: str) -> bool:
        if send_now(text):
            direct.written = session.last_seq + 1
            return True
        return False

    return send


async def _drop_stalled(
    session: DuplexSession,
    direct: DirectPath | None,
    stall_timeout_s: float,
    unsent_text: str,
) -> None:
    """End the session with a fatal 429 and send that error (with its ``seq``) past the
    backpressure, then drop the connection; queued output in between is discarded."""
    session.log.warning("output stalled for %g s: closing", stall_timeout_s)
    await session.fail(RATE_LIMITED, f"client is not reading: stalled for {stall_timeout_s:g} s")
    error = session.error
    last = unsent_text if error is not None and error.seq else None  # it was being sent
    if last is None:
        async for item in session.response():  # bounded: the error is queued, then the end
            if item is session.error:
                last = encode_server_message(item)
                break
    if direct is not None and direct.abort is not None:
        direct.abort(last, CLOSE_POLICY)
