"""``POST /v1/client_tokens`` and ``DELETE /v1/client_tokens/{id}``: a backend (with its API
token) mints short-lived tokens for browsers, and revokes them (server/client_tokens.py)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, Field

from server.client_tokens import MIN_TTL_S
from server.http_api import Tenant

router = APIRouter()


class ClientTokenRequest(BaseModel):
    #: Lifetime in seconds (default ``DUPLEX_CLIENT_TOKEN_TTL_S``).
    ttl_s: int | None = Field(None, ge=MIN_TTL_S, le=3600)
    #: Scope the token to this session (it then opens or resumes that one only).
    session_id: str | None = Field(None, min_length=1, max_length=128)


@router.post("/v1/client_tokens", status_code=201)
async def mint_client_token(
    request: Request, tenant: Tenant, body: ClientTokenRequest | None = None
) -> dict[str, Any]:
    app = request.app.state.duplex
    body = body or ClientTokenRequest()
    if body.session_id is not None:
        record = await app.services.store.get_session(body.session_id, tenant)
        if record is None:
            raise HTTPException(404, f"unknown session {body.session_id!r}")
    token, claims = app.client_tokens.mint(tenant, ttl_s=body.ttl_s, session_id=body.session_id)
    return {
        "token": token,
        "id": claims.id,
        "session_id": claims.session_id,
        "expires_at": claims.expires_at,
    }


@router.delete("/v1/client_tokens/{token_id}", status_code=204)
async def revoke_client_token(request: Request, tenant: Tenant, token_id: str) -> None:
    """Revoke one of the caller's tokens (an unknown id is not an error: 204 either way,
    as the server keeps no list of what it minted)."""
    if not token_id.startswith("ct_") or len(token_id) > 64:
        raise HTTPException(404, f"unknown client token {token_id!r}")
    await request.app.state.duplex.client_tokens.revoke(tenant, token_id)
