"""REST and health endpoints. Session ids of another tenant answer 404, as unknown ones do."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from duplex.protocol import (
    BAD_REQUEST,
    Message,
    ProtocolError,
    SessionConfig,
    check_json_value,
    new_id,
)
from server.session import check_variables, checked_config
from server.state.base import SessionRecord, StoreUnavailable
from server.ws_protocol import DIRECT, DirectPath

router = APIRouter()


def _app(request: Request) -> Any:
    return request.app.state.duplex


def tenant(request: Request) -> str:
    found = _app(request).auth.tenant_for(
        request.headers.get("authorization"), request.query_params.get("token")
    )
    if found is None:
        raise HTTPException(401, "missing or invalid API token")
    return found


Tenant = Annotated[str, Depends(tenant)]


async def _record(request: Request, tenant: str, session_id: str) -> SessionRecord:
    record = await _app(request).services.store.get_session(session_id, tenant)
    if record is None or record.tenant != tenant:
        raise HTTPException(404, f"unknown session {session_id!r}")
    return record


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", response_model=None)
async def readyz(request: Request) -> dict[str, Any] | JSONResponse:
    """Ready when the store answers and holds no writes waiting for it, and the server
    is not draining; else 503."""
    app = _app(request)
    if app.replica.draining:  # from the moment SIGTERM arrives
        return JSONResponse({"status": "draining"}, status_code=503)
    store = app.services.store
    try:
        await store.get_session("readyz-probe")
        reason = store.unavailable()
    except StoreUnavailable as exc:
        reason = str(exc)
    if reason is not None:
        return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
    # What it counts: the duplex sessions this replica holds (connected, or detached
    # within their resume grace period); not the stored ones.
    return {"status": "ready", "live_sessions": app.registry.count(), "replica": app.replica.id}


#: The health socket echoes short greetings; a frame declaring more is refused at its
#: header (close 1009) under Duplex's protocol class, so no client can make it buffer.
HEALTH_MAX_MESSAGE_BYTES = 1024


@router.websocket("/v1/ws/health")
async def ws_health(ws: WebSocket) -> None:
    """No auth: lets load balancers and clients check the WebSocket path end to end."""
    direct: DirectPath | None = ws.scope.get("extensions", {}).get(DIRECT)
    if direct is not None and direct.limit is not None:
        direct.limit(HEALTH_MAX_MESSAGE_BYTES)  # before accept: no frame has arrived yet
    await ws.accept()
    await ws.send_json({"type": "hello", "service": "duplex", "time": time.time()})
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                error = {"type": "error", "code": BAD_REQUEST, "message": "send text, not binary"}
                await ws.send_json(error | {"time": time.time()})
            elif len(text.encode()) > HEALTH_MAX_MESSAGE_BYTES:  # without Duplex's protocol
                await ws.close(1009)
                return
            else:
                await ws.send_json({"type": "echo", "data": text, "time": time.time()})
    except (WebSocketDisconnect, RuntimeError):
        return


async def invalid_body(request: Request, exc: Exception) -> Response:
    """422 for a body that does not parse or validate, as FastAPI answers, without echoing
    the input (it may be megabytes, or hold text that cannot be written as UTF-8)."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    detail = [{"loc": e.get("loc"), "msg": e.get("msg"), "type": e.get("type")} for e in errors]
    return Response(json.dumps({"detail": detail[:10]}), 422, media_type="application/json")


def checked_body(request: Request, body: BaseModel) -> None:
    """Hold a parsed request body to the limits client messages have (depth, numbers,
    no unpaired surrogates): what the server keeps must be writable again."""
    try:
        check_json_value(body.model_dump(), _app(request).services.limits.json)
    except ProtocolError as exc:
        raise HTTPException(exc.code, exc.message) from None


def _limits(request: Request) -> Any:
    return _app(request).services.limits.config


def _check(call: Any, *args: Any) -> None:
    """Run a check that raises ProtocolError or ValueError; answer 400 on failure."""
    try:
        call(*args)
    except ProtocolError as exc:
        raise HTTPException(exc.code, exc.message) from None
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from None


class SessionCreate(BaseModel):
    name: str = ""
    variables: dict[str, str] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)


class SessionPatch(BaseModel):
    name: str | None = None
    variables: dict[str, str] | None = None


def _session_view(record: SessionRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "name": record.name,
        "variables": record.variables,
        "parent_id": record.parent_id,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
    }


@router.post("/v1/sessions", status_code=201)
async def create_session(
    request: Request, tenant: Tenant, body: SessionCreate | None = None
) -> dict[str, Any]:
    body = body or SessionCreate()  # no body: an empty session
    checked_body(request, body)
    limits = _limits(request)
    _check(limits.check_name, "name", body.name)
    _check(check_variables, limits, body.variables)
    try:
        config = checked_config(SessionConfig(), body.config, limits)
    except ProtocolError as exc:
        raise HTTPException(exc.code, exc.message) from None
    record = SessionRecord(
        id=new_id("sess"),
        tenant=tenant,
        name=body.name,
        variables=body.variables,
        config=config.model_dump(),
    )
    await _app(request).services.store.create_session(record)
    return _session_view(record)


@router.get("/v1/sessions/{session_id}")
async def get_session(request: Request, tenant: Tenant, session_id: str) -> dict[str, Any]:
    return _session_view(await _record(request, tenant, session_id))


@router.patch("/v1/sessions/{session_id}")
async def patch_session(
    request: Request, tenant: Tenant, session_id: str, body: SessionPatch
) -> dict[str, Any]:
    checked_body(request, body)
    app = _app(request)
    live = app.registry.get(tenant, session_id)
    record = live.record if live is not None else await _record(request, tenant, session_id)
    limits = _limits(request)
    _check(limits.check_name, "name", body.name)
    if body.variables is not None:
        _check(check_variables, limits, record.variables | body.variables)
    if body.name is not None:
        record.name = body.name
    if body.variables is not None:
        record.variables.update(body.variables)
    record.updated_at = time.time()  # what the store keeps, and what this answers
    await app.services.store.update_session(record)
    return _session_view(record)


@router.get("/v1/sessions/{session_id}/messages")
async def get_messages(request: Request, tenant: Tenant, session_id: str) -> dict[str, Any]:
    await _record(request, tenant, session_id)
    store = _app(request).services.store
    messages = await store.load_messages(session_id)
    partial = await store.load_events(session_id)
    return {
        "session_id": session_id,
        "messages": [m.model_dump() for m in messages],
        "in_progress": _in_progress(partial),
    }


def _in_progress(events: list[Any]) -> list[dict[str, Any]]:
    """Responses whose stream was persisted but never completed (e.g. a crash)."""
    by_response: dict[str, list[str]] = {}
    for event in events:
        if event.kind == "delta":
            by_response.setdefault(event.response_id, []).append(event.data.get("text", ""))
    return [
        Message(
            role="assistant", content="".join(parts), metadata={"response_id": rid, "partial": True}
        ).model_dump()
        for rid, parts in by_response.items()
    ]


@router.delete("/v1/sessions/{session_id}/messages", status_code=204)
async def clear_messages(request: Request, tenant: Tenant, session_id: str) -> None:
    await _record(request, tenant, session_id)
    await _app(request).services.store.clear_messages(session_id)


@router.post("/v1/sessions/{session_id}/fork", status_code=201)
async def fork_session(request: Request, tenant: Tenant, session_id: str) -> dict[str, Any]:
    source = await _record(request, tenant, session_id)
    record = SessionRecord(
        id=new_id("sess"),
        tenant=tenant,
        name=source.name,
        variables=dict(source.variables),
        config=dict(source.config),
        parent_id=source.id,
    )
    await _app(request).services.store.fork(source.id, record)
    return _session_view(record)
