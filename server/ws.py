"""The /v1/duplex endpoint: frames in, session calls; session output, frames out."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect, WebSocketState

from duplex.protocol import (
    INTERNAL,
    TOO_LARGE,
    UNAUTHORIZED,
    ErrorEvent,
    ProtocolError,
    encode_server_message,
    parse_client_message,
)
from server.session import DuplexSession
from server.ws_protocol import DIRECT, DirectPath

log = logging.getLogger(__name__)
router = APIRouter()

CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011


async def _refuse(ws: WebSocket, code: int, message: str) -> None:
    await ws.accept()
    await ws.send_text(
        encode_server_message(ErrorEvent(seq=1, code=code, message=message, fatal=True))
    )
    await ws.close(CLOSE_INTERNAL if code >= 500 else CLOSE_POLICY)


@router.websocket("/v1/duplex")
async def duplex(ws: WebSocket) -> None:
    app = ws.app.state.duplex
    tenant = app.auth.tenant_for(ws.headers.get("authorization"), ws.query_params.get("token"))
    if tenant is None:
        await _refuse(ws, UNAUTHORIZED, "missing or invalid API token")
        return
    try:
        session = await DuplexSession.open(
            app.services, tenant=tenant, session_id=ws.query_params.get("session_id")
        )
    except ProtocolError as exc:
        await _refuse(ws, exc.code, exc.message)
        return
    await ws.accept()
    app.registry.add(tenant, session)
    session.log.info("connected (tenant %s)", tenant)
    try:
        async with asyncio.TaskGroup() as tg:
            reader = tg.create_task(_read(ws, session, app.settings.max_message_bytes))
            tg.create_task(_write(ws, session, reader))
    except* Exception as group:
        session.log.error("connection failed", exc_info=group.exceptions[0])
    finally:
        app.registry.remove(tenant, session)
        await session.close()
        session.log.info("disconnected")


async def _read(ws: WebSocket, session: DuplexSession, max_bytes: int) -> None:
    """Feed the session until the client goes or the session ends.

    Under `DuplexWebSocketProtocol`, binary audio arriving while this loop waits
    skips the ASGI queue: the protocol hands it to the session synchronously.
    """
    direct: DirectPath | None = ws.scope.get("extensions", {}).get(DIRECT)
    if direct is not None:
        direct.take = lambda data: len(data) <= max_bytes and session.send_audio_nowait(data)
    try:
        await _receive_loop(ws, session, max_bytes, direct)
    finally:
        if direct is not None:
            direct.take = None
    await session.close()


async def _receive_loop(
    ws: WebSocket, session: DuplexSession, max_bytes: int, direct: DirectPath | None
) -> None:
    while not session.closed:
        if direct is not None:
            direct.ready = True
        try:
            frame = await ws.receive()
        except (WebSocketDisconnect, RuntimeError):
            break
        finally:
            if direct is not None:
                direct.ready = False
        if frame["type"] == "websocket.disconnect":
            break
        await session.settle()
        data = frame.get("bytes")
        text = frame.get("text")
        size = len(data) if data is not None else len((text or "").encode())
        if size > max_bytes:
            await session.emit_error(TOO_LARGE, f"message of {size} bytes is over {max_bytes}")
            continue
        try:
            if data is not None:
                await session.send_audio(data)
            elif text is not None:
                await session.handle(parse_client_message(text, session.services.limits.json))
        except ProtocolError as exc:
            await session.emit_error(exc.code, exc.message, fatal=exc.fatal)
        except Exception:
            session.log.exception("internal error handling a message")
            await session.fail(INTERNAL, "internal error")


async def _write(ws: WebSocket, session: DuplexSession, reader: asyncio.Task[None]) -> None:
    direct: DirectPath | None = ws.scope.get("extensions", {}).get(DIRECT)
    send_now = direct.send_text if direct is not None else None
    if send_now is not None:
        session.attach_output(lambda message: send_now(encode_server_message(message)))
    async for message in session.response():
        text = encode_server_message(message)
        if send_now is not None and send_now(text):
            continue
        try:
            await ws.send_text(text)
        except (WebSocketDisconnect, RuntimeError):
            break
    session.attach_output(None)
    if ws.client_state == WebSocketState.CONNECTED:
        code = 1000
        if session.error is not None:
            code = CLOSE_INTERNAL if session.error.code >= 500 else CLOSE_POLICY
        try:
            await ws.close(code)
        except RuntimeError:
            pass
    reader.cancel()
