"""The door's routes: ``WS /v1/realtime``, ``GET /v1/models``,
``POST /v1/realtime/client_secrets``."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, HTTPException, Request, WebSocket
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from pydantic_core import PydanticSerializationError, to_json
from starlette.websockets import WebSocketDisconnect, WebSocketState

from duplex.protocol import (
    RATE_LIMITED,
    ProtocolError,
    SessionConfig,
    check_json_value,
)
from server.client_tokens import ClientTokens
from server.config import Settings
from server.rate import InputBudget
from server.realtime_door.bridge import RealtimeBridge
from server.realtime_door.client_secrets import PREFIX, ClientSecrets
from server.realtime_door.errors import DoorError, error_body
from server.realtime_door.models import RealtimeModel, RealtimeModels
from server.realtime_door.session_map import RealtimeSessionState
from server.resume import Link
from server.session import DuplexSession
from server.state.base import REALTIME_ENDPOINT, StoreUnavailable
from server.ws_input import (
    CLOSE_NORMAL,
    input_budget,
    pace_audio,
    pace_message,
    receive_frame,
)
from server.ws_protocol import DIRECT, DirectPath, delivery_pings

router = APIRouter()

#: The WebSocket subprotocol carrying an API key (browsers cannot set headers).
KEY_PROTOCOL = "openai-insecure-api-key."
CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011


@dataclass
class RealtimeDoor:
    """What the door keeps per app (``app.state.realtime``)."""

    models: RealtimeModels
    secrets: ClientSecrets


def setup(settings: Settings, tokens: ClientTokens) -> RealtimeDoor:
    """``tokens``: the app's client tokens, whose key signs this door's secrets too."""
    return RealtimeDoor(
        RealtimeModels.from_settings(settings),
        ClientSecrets(tokens, settings.client_secret_ttl_s),
    )


def _dumps(event: dict[str, Any]) -> str:
    """Compact JSON, UTF-8 kept. pydantic-core's writer gives the same text as
    ``json.dumps(event, separators=(",", ":"), ensure_ascii=False)`` several times faster
    (an audio delta: ~40 µs -> ~5 µs); a lone surrogate, which it refuses, still goes
    out as ``json`` writes it."""
    try:
        return to_json(event).decode()
    except PydanticSerializationError:
        return json.dumps(event, separators=(",", ":"), ensure_ascii=False)


def _offered_protocols(ws: WebSocket) -> list[str]:
    header = ws.headers.get("sec-websocket-protocol") or ""
    return [p.strip() for p in header.split(",") if p.strip()]


def _credential(authorization: str | None, protocols: list[str]) -> str | None:
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    for protocol in protocols:
        if protocol.startswith(KEY_PROTOCOL):
            return protocol[len(KEY_PROTOCOL) :]
    return None


def _tenant(
    request: Request | WebSocket, credential: str | None, *, allow_secret: bool
) -> tuple[str | None, str | None]:
    """(tenant, model the credential is bound to) or (None, None)."""
    app = request.app.state.duplex
    if credential and credential.startswith(PREFIX):
        if not allow_secret:
            return None, None
        secret = request.app.state.realtime.secrets.check(credential)
        return (secret.tenant, secret.model) if secret else (None, None)
    tenant = app.auth.tenant_for(f"Bearer {credential}" if credential else None, None)
    return tenant, None


async def _refuse(ws: WebSocket, status: int, code: str, message: str) -> None:
    """Refuse the handshake with an HTTP status where the server can (``401``), else
    accept, send the ``error`` event and close."""
    body = {"error": error_body("invalid_request_error", code, message, None, None)}
    if "websocket.http.response" in ws.scope.get("extensions", {}):
        await ws.send_denial_response(JSONResponse(body, status_code=status))
        return
    await ws.accept()
    await ws.send_text(_dumps({"type": "error", "event_id": "event_refused"} | body))
    await ws.close(CLOSE_POLICY)


@router.websocket("/v1/realtime")
async def realtime(ws: WebSocket) -> None:
    app = ws.app.state.duplex
    door: RealtimeDoor = ws.app.state.realtime
    protocols = _offered_protocols(ws)
    tenant, bound_model = _tenant(
        ws, _credential(ws.headers.get("authorization"), protocols), allow_secret=True
    )
    if tenant is None:
        await _refuse(ws, 401, "invalid_api_key", "missing, invalid or expired API key")
        return
    name = ws.query_params.get("model") or bound_model
    if bound_model is not None and name != bound_model:
        await _refuse(ws, 403, "model_mismatch", "the client secret is for another model")
        return
    model = door.models.get(name)
    if model is None:
        await _refuse(
            ws,
            404,
            "model_not_found",
            f"The model {str(name)[:64]!r} does not exist (GET /v1/models lists them)",
        )
        return
    refusal = app.replica.refusal()
    if refusal is not None:  # draining (SIGTERM): a load balancer tries another replica
        await _refuse(ws, 503, "server_draining", refusal)
        return
    state = RealtimeSessionState(model)
    try:
        config = _initial_config(model, state)
        # Through the replica: the session's lease (Redis), and the drain on SIGTERM.
        session = await app.replica.open(
            app.services, tenant=tenant, session_id=None, config=config, endpoint=REALTIME_ENDPOINT
        )
    except StoreUnavailable as exc:
        await _refuse(ws, 503, "store_unavailable", f"{exc}; try again later")
        return
    except (ProtocolError, ValueError) as exc:
        await _refuse(ws, 500, "internal_error", str(exc)[:200])
        return
    await ws.accept(subprotocol="realtime" if "realtime" in protocols else None)
    # The connection's hold on the session's output. The session belongs to /v1/realtime
    # (its record says so): /v1/duplex neither resumes nor continues it (a 409 there).
    link = session.connection = Link(ws=ws)
    app.registry.add(tenant, session)
    session.log.info("realtime connected (tenant %s, model %s)", tenant, model.name)
    bridge = RealtimeBridge(session, state, session.services.limits.json)
    try:
        async with asyncio.TaskGroup() as tg:
            reader = tg.create_task(
                _read(
                    ws,
                    session,
                    link,
                    bridge,
                    app.settings.max_message_bytes,
                    input_budget(app.settings),
                )
            )
            link.writer = tg.create_task(
                _write(
                    ws,
                    session,
                    bridge,
                    reader,
                    app.settings.output_stall_timeout_s,
                    app.settings.outbox_ack_interval_s,
                )
            )
    except* Exception as group:
        session.log.error("realtime connection failed", exc_info=group.exceptions[0])
    finally:
        # No grace period: the Realtime protocol has no resume.
        if not link.replaced:
            await session.close()
            app.registry.remove(tenant, session)
        session.log.info("realtime disconnected")


def _initial_config(model: RealtimeModel, state: RealtimeSessionState) -> SessionConfig:
    return SessionConfig().merged(model.config).merged(state.duplex_patch())


async def _read(
    ws: WebSocket,
    session: DuplexSession,
    link: Link,
    bridge: RealtimeBridge,
    max_bytes: int,
    budget: InputBudget,
) -> None:
    """Feed the bridge until the client goes or the session ends. Under Duplex's WebSocket
    protocol, audio appends arriving while this loop waits skip the ASGI queue
    (`RealtimeBridge.take_nowait`), as binary audio does on /v1/duplex. A connection
    taken over (``link.replaced``, server/resume.py) leaves the session to its new one."""
    direct: DirectPath | None = ws.scope.get("extensions", {}).get(DIRECT)
    if direct is not None:
        # At most 4 UTF-8 bytes a character: anything that could be over the limit takes
        # the usual path, which checks the size exactly.
        direct.take_text = lambda text: (
            not link.replaced and len(text) <= max_bytes // 4 and bridge.take_nowait(text, budget)
        )
    try:
        code = await _receive_loop(ws, session, link, bridge, max_bytes, direct, budget)
    finally:
        if direct is not None:
            direct.take_text = None
    if link.replaced:
        return  # another connection holds the session now: not this one's to end
    # Every disconnect ends the session here (no resume in this protocol); a client's
    # close 1000 also drops its outbox, as on /v1/duplex (docs/openai-realtime.md).
    await session.close(resumable=code != CLOSE_NORMAL)


async def _receive_loop(
    ws: WebSocket,
    session: DuplexSession,
    link: Link,
    bridge: RealtimeBridge,
    max_bytes: int,
    direct: DirectPath | None,
    budget: InputBudget,
) -> int | None:
    """Returns the close code when the client went (None: the session ended or went on
    another connection)."""
    while not session.closed and not link.replaced:
        frame = await receive_frame(ws, session, direct)
        if isinstance(frame, int):
            return frame
        if link.replaced:
            break  # not this connection's session any more: its input is not taken
        text = frame.get("text")
        if text is None:
            text = (frame.get("bytes") or b"").decode("utf-8", "replace")
        if len(text) > max_bytes and len(text.encode()) > max_bytes:
            await bridge.receive_error(
                DoorError("too_large", f"event of {len(text.encode())} bytes is over {max_bytes}")
            )
            continue
        try:
            await _pace(session, budget, text)
            await bridge.receive(text)
        except Exception:
            session.log.exception("internal error handling a realtime event")
            await session.fail(500, "internal error")
    return None


async def _pace(session: DuplexSession, budget: InputBudget, text: str) -> None:
    """Input over its rate waits here, as on /v1/duplex: audio appends and items with
    audio by their audio (counted from the base64 length), other events by count."""
    if '"input_audio_buffer.append"' in text:
        await pace_audio(session, budget, len(text) * 3 // 4)
    elif '"input_audio"' in text and '"conversation.item.create"' in text:
        await pace_audio(session, budget, len(text) * 3 // 4)  # audio items, as appends
    else:
        await pace_message(session, budget)


class _Frames:
    """The session's messages as Realtime frames: `encode` is the session's encoder (a
    message becomes its events' JSON, newline-separated: JSON written compactly holds no
    newline), `send_now` its direct writer. A message is translated once: when a direct
    write is cut short by backpressure, the frames not written are kept for the session's
    queue path, which asks `encode` again for that message. A message written whole moves
    ``direct.written`` (the delivery pings' mark, server/ws_protocol.py) to its ``seq``."""

    def __init__(self, bridge: RealtimeBridge, direct: DirectPath | None) -> None:
        self.bridge = bridge
        self.direct = direct
        self.direct_send = direct.send_text if direct is not None else None
        self._rest: dict[int, str] = {}
        self._last = 0

    def encode(self, message: BaseModel) -> str:
        key = self._last = id(message)
        rest = self._rest.pop(key, None)
        if rest is not None:
            return rest
        return "\n".join(_dumps(event) for event in self.bridge.translate(message))

    def send_now(self, text: str) -> bool:
        send = self.direct_send
        if send is None:
            return False
        # One event (or none) is the common case: `split` scans char by char (~5 µs for an
        # audio delta), `in` at memchr speed.
        frames = text.split("\n") if "\n" in text else [text] if text else []
        for i, frame in enumerate(frames):
            if not send(frame):
                self._rest[self._last] = "\n".join(frames[i:])
                return False
        if self.direct is not None:
            # `DuplexSession.emit_nowait` numbers this message last_seq + 1 once it is sent.
            self.direct.written = self.bridge.session.last_seq + 1
        return True


async def _write(
    ws: WebSocket,
    session: DuplexSession,
    bridge: RealtimeBridge,
    reader: asyncio.Task[None],
    stall_timeout_s: float,
    ack_interval_s: float = 0.0,
) -> None:
    """Write the session's messages as Realtime events. Under Duplex's WebSocket protocol a
    message emitted while this loop waits is translated and written at once (as
    /v1/duplex does); the rest goes through the session's queue, in order. Every
    ``ack_interval_s`` a delivery ping tells which written messages the client read
    (`DuplexSession.acknowledge`), as on /v1/duplex."""
    direct: DirectPath | None = ws.scope.get("extensions", {}).get(DIRECT)
    with delivery_pings(direct, ack_interval_s, session.acknowledge):
        await _write_all(ws, session, bridge, reader, direct, stall_timeout_s)


async def _write_all(
    ws: WebSocket,
    session: DuplexSession,
    bridge: RealtimeBridge,
    reader: asyncio.Task[None],
    direct: DirectPath | None,
    stall_timeout_s: float,
) -> None:
    out = _Frames(bridge, direct)
    session.attach_output(out.send_now if out.direct_send is not None else None, out.encode)
    try:
        async for text in session.frames():
            if not text:
                continue
            seq = session.last_seq  # this message's (numbered as it was taken)
            for frame in text.split("\n") if "\n" in text else (text,):
                if out.direct_send is not None and out.direct_send(frame):
                    continue
                async with asyncio.timeout(stall_timeout_s):
                    await ws.send_text(frame)
            if direct is not None:
                direct.written = seq
            del text, frame  # not held while the next message is awaited
    except TimeoutError:
        # The client stopped reading: end the session and drop the connection.
        session.log.warning("output stalled for %g s: closing", stall_timeout_s)
        await session.fail(RATE_LIMITED, "client is not reading")
        if direct is not None and direct.abort is not None:
            direct.abort(None, CLOSE_POLICY)
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass
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


# ---- HTTP -------------------------------------------------------------------------------


def _http_tenant(request: Request, *, allow_secret: bool = False) -> str:
    credential = _credential(request.headers.get("authorization"), [])
    tenant, _ = _tenant(request, credential, allow_secret=allow_secret)
    if tenant is None:
        raise HTTPException(401, "missing or invalid API token")
    return tenant


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    """The Realtime models this server offers (OpenAI's list format)."""
    _http_tenant(request, allow_secret=True)
    door: RealtimeDoor = request.app.state.realtime
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "duplex"}
            for name in door.models.names()
        ],
    }


@router.post("/v1/realtime/client_secrets")
async def client_secrets(request: Request) -> JSONResponse:
    """A short-lived secret for one tenant and model, for a browser to connect with."""
    tenant = _http_tenant(request)
    door: RealtimeDoor = request.app.state.realtime
    try:
        body = await request.json() if await request.body() else {}
        check_json_value(body, request.app.state.duplex.services.limits.json)
        if not isinstance(body, dict):
            raise DoorError("invalid_type", "the body must be a JSON object")
        ttl = _ttl(body.get("expires_after"), door.secrets.ttl_s)
        session = body.get("session") or {}
        if not isinstance(session, dict):
            raise DoorError("invalid_type", "`session` must be an object", "session")
        model = door.models.get(session.get("model"))
        if model is None:
            raise DoorError("model_not_found", "unknown model", "session.model")
        state = RealtimeSessionState(model)
        if session:
            state = state.updated({k: v for k, v in session.items() if k != "model"})
    except DoorError as exc:
        return JSONResponse(
            {"error": error_body(exc.type, exc.code, exc.message, exc.param, None)}, 400
        )
    except (ValueError, ProtocolError):
        return JSONResponse(
            {
                "error": error_body(
                    "invalid_request_error", "invalid_json", "invalid JSON body", None, None
                )
            },
            400,
        )
    value, expires_at = door.secrets.mint(tenant, model.name, ttl)
    return JSONResponse(
        {"value": value, "expires_at": expires_at, "session": state.render("")},
        headers={"Cache-Control": "no-store"},
    )


def _ttl(expires_after: Any, default: float) -> float:
    if expires_after is None:
        return default
    if not isinstance(expires_after, dict):
        raise DoorError("invalid_type", "`expires_after` must be an object", "expires_after")
    seconds = expires_after.get("seconds", default)
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not 10 <= seconds <= 7200
    ):
        raise DoorError(
            "invalid_value",
            "expires_after.seconds must be from 10 to 7200",
            "expires_after.seconds",
        )
    return min(float(seconds), default) if default else float(seconds)
