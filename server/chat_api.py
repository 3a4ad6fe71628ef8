"""Text-only doors to the same sessions: HTTP completions (SSE) and the chat WebSocket.

Both use the envelope text clients already know from RAGFlow's API:
``{code, message, data: {answer, reference, id, session_id}}``, with
``{code: 0, message: "", data: true}`` closing a stream and
``data.answer = "**ERROR**: ..."`` on failure.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from fastapi import APIRouter, HTTPException, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, ValidationError

from duplex.protocol import (
    BAD_REQUEST,
    STORE_UNAVAILABLE,
    UNAUTHORIZED,
    ProtocolError,
    StreamChunk,
    describe_validation_error,
    parse_json,
)
from server.http_api import Tenant, checked_body
from server.providers.base import ProviderError
from server.session import UnarySession
from server.state.base import StoreUnavailable


class EnvelopeRoute(APIRoute):
    """HTTP errors of this door (auth, body, session, provider) come in its envelope,
    with the same HTTP status, instead of FastAPI's ``{"detail": ...}``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            session_id = request.path_params.get("session_id")
            try:
                return await handler(request)
            except HTTPException as exc:
                body = error_envelope(exc.status_code, str(exc.detail), session_id)
            except RequestValidationError as exc:
                body = error_envelope(422, f"invalid request: {_describe_body(exc)}", session_id)
            return JSONResponse(body, int(body["code"]))

        return route


def _describe_body(exc: RequestValidationError) -> str:
    """One line, without echoing the input (see ``http_api.invalid_body``)."""
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p)[:64] for p in err.get("loc", ())[1:]) or "body"
        parts.append(f"{loc}: {err.get('msg')}")
    return "; ".join(parts) or "the body does not parse"


router = APIRouter(route_class=EnvelopeRoute)


class CompletionRequest(BaseModel):
    question: str = Field(min_length=1)
    stream: bool = True


class ChatRequest(BaseModel):
    type: str
    session_id: str | None = None
    question: str = Field(min_length=1)
    stream: bool = True


def envelope(answer: str, response_id: str, session_id: str, **extra: Any) -> dict[str, Any]:
    data = {"answer": answer, "reference": extra.pop("reference", {}), "id": response_id}
    return {"code": 0, "message": "", "data": {**data, "session_id": session_id, **extra}}


def error_envelope(code: int, message: str, session_id: str | None = None) -> dict[str, Any]:
    return {
        "code": code,
        "message": message,
        "data": {"answer": f"**ERROR**: {message}", "reference": {}, "session_id": session_id},
    }


DONE = {"code": 0, "message": "", "data": True}


async def answer_events(session: UnarySession, question: str) -> AsyncIterator[dict[str, Any]]:
    """Envelopes as the answer grows (each carries the whole answer so far and the delta),
    ending with the stream terminator; failures become an error envelope."""
    answer = ""
    reference: dict[str, Any] = {}
    response_id = ""
    try:
        async for chunk in session.execute_stream("user", question):
            if not isinstance(chunk, StreamChunk):
                continue  # tool events: the chat API sends the answer only
            response_id = chunk.response_id
            if chunk.metadata:
                reference.update(chunk.metadata)
            if chunk.delta:
                answer += chunk.delta
                yield envelope(answer, response_id, session.id, delta=chunk.delta)
        yield envelope(answer, response_id, session.id, reference=reference, final=True)
        yield DONE
    except ProviderError as exc:
        yield error_envelope(exc.code, exc.message, session.id)
    except StoreUnavailable as exc:
        yield error_envelope(STORE_UNAVAILABLE, f"{exc}; try again later", session.id)


async def _open(request_app: Any, tenant: str, session_id: str | None) -> UnarySession:
    return await UnarySession.open(request_app.services, tenant=tenant, session_id=session_id)


@router.post("/v1/sessions/{session_id}/completions", response_model=None)
async def completions(
    request: Request, tenant: Tenant, session_id: str, body: CompletionRequest
) -> Any:
    checked_body(request, body)
    try:
        session = await _open(request.app.state.duplex, tenant, session_id)
    except ProtocolError as exc:
        raise HTTPException(exc.code, exc.message) from None
    if body.stream:

        async def sse() -> AsyncIterator[str]:
            async for event in answer_events(session, body.question):
                yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")
    last: dict[str, Any] = DONE
    async for event in answer_events(session, body.question):
        if event is not DONE:
            last = event
    if last["code"] != 0:
        raise HTTPException(503 if last["code"] == STORE_UNAVAILABLE else 502, last["message"])
    last["data"].pop("delta", None)
    return last


@router.websocket("/v1/ws/chat")
async def chat_ws(ws: WebSocket) -> None:
    app = ws.app.state.duplex
    tenant = app.auth.tenant_for(ws.headers.get("authorization"), ws.query_params.get("token"))
    await ws.accept()
    if tenant is None:
        await ws.send_json(error_envelope(UNAUTHORIZED, "missing or invalid API token"))
        await ws.close(1008)
        return
    try:
        while True:
            raw = await ws.receive_text()
            try:
                req = ChatRequest.model_validate(parse_json(raw, app.services.limits.json))
                if req.type != "chat":
                    raise ProtocolError(BAD_REQUEST, f"unknown type {req.type[:64]!r}")
                session = await _open(app, tenant, req.session_id)
            except ValidationError as exc:
                message = f"invalid request: {describe_validation_error(exc)}"
                await ws.send_json(error_envelope(BAD_REQUEST, message))
                continue
            except ProtocolError as exc:
                await ws.send_json(error_envelope(exc.code, exc.message))
                continue
            except StoreUnavailable as exc:
                await ws.send_json(error_envelope(STORE_UNAVAILABLE, f"{exc}; try again later"))
                continue
            async for event in answer_events(session, req.question):
                if req.stream or event is DONE or event["code"] != 0 or event["data"].get("final"):
                    await ws.send_json(event)
    except (WebSocketDisconnect, RuntimeError):
        return
