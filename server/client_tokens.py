"""Short-lived client tokens: what a backend hands a browser instead of its API token.

A client token carries its claims (tenant, optional session, expiry, an id) signed with
HMAC-SHA256 under ``client_secret_key``, so any replica configured with the same key
verifies it without a store round trip. Revocation is the exception: a revoked token's
id goes to a deny list in the state store (kept until the longest TTL has passed), so
every replica sharing the store refuses it. The tenant name is readable in a token (it
is not a credential); the signature is what cannot be forged.

Tokens are accepted on the WebSocket doors only (the browser's part); minting and
revoking take an API token (``POST /v1/client_tokens``, ``DELETE /v1/client_tokens/{id}``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from duplex.protocol import STORE_UNAVAILABLE, UNAUTHORIZED, ProtocolError
from server.auth import TokenAuth
from server.state.base import StateStore

log = logging.getLogger(__name__)

#: Every client token starts with this (the OpenAI ephemeral-key convention), so a token
#: is told from an API token without trying to verify it.
PREFIX = "ek_"

#: TTL bounds for a minted token, in seconds (the OpenAI door's secrets live up to 2 h;
#: ``POST /v1/client_tokens`` allows up to 1 h).
MIN_TTL_S = 10
MAX_TTL_S = 7200


@dataclass(frozen=True)
class ClientToken:
    """The verified claims of a client token."""

    id: str
    tenant: str
    expires_at: int  # Unix seconds
    #: The only session this token may open or resume, if it is scoped to one.
    session_id: str | None = None
    #: Free-form scope a door may set and check (the OpenAI door: the model).
    model: str | None = None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def revocation_key(tenant: str, token_id: str) -> str:
    """Deny-list key: per tenant, so no tenant can revoke another's tokens."""
    return f"client-token:{tenant}:{token_id}"


class ClientTokens:
    """Mints, verifies and revokes client tokens for one server (one per app).

    ``key`` is the HMAC secret; without one a random key is made for this process, and
    its tokens work on this replica only (set ``DUPLEX_CLIENT_SECRET_KEY``, the same on
    every replica, behind a load balancer)."""

    def __init__(self, key: str | None, default_ttl_s: float, store: StateStore) -> None:
        self.ephemeral_key = not key
        self._key = (key or secrets.token_urlsafe(32)).encode()
        self.default_ttl_s = default_ttl_s
        self._store = store

    def mint(
        self,
        tenant: str,
        *,
        ttl_s: float | None = None,
        session_id: str | None = None,
        model: str | None = None,
        now: float | None = None,
    ) -> tuple[str, ClientToken]:
        """A new token and its claims. ``ttl_s`` is capped at MAX_TTL_S (a revocation is
        kept that long); the endpoints hold requests to their own bounds."""
        ttl = min(MAX_TTL_S, ttl_s if ttl_s is not None else self.default_ttl_s)
        claims = ClientToken(
            id="ct_" + secrets.token_urlsafe(12),
            tenant=tenant,
            expires_at=int((now if now is not None else time.time()) + ttl),
            session_id=session_id,
            model=model,
        )
        body: dict[str, Any] = {"j": claims.id, "t": tenant, "e": claims.expires_at}
        if session_id is not None:
            body["s"] = session_id
        if model is not None:
            body["m"] = model
        payload = _b64(json.dumps(body, separators=(",", ":")).encode())
        return f"{PREFIX}{payload}.{self._sign(payload)}", claims

    def verify(self, value: str, now: float | None = None) -> ClientToken | None:
        """The token's claims, or None when it is malformed, forged or expired (the deny
        list is not consulted: see `check`)."""
        claims = self._claims(value)
        if claims is None or claims.expires_at <= (now if now is not None else time.time()):
            return None
        return claims

    def _claims(self, value: str) -> ClientToken | None:
        """The claims of a well-formed token signed with this key, expired or not."""
        if not value.startswith(PREFIX):
            return None
        payload, _, signature = value[len(PREFIX) :].partition(".")
        if not hmac.compare_digest(signature.encode(), self._sign(payload).encode()):
            return None
        try:
            body = json.loads(_unb64(payload))
            claims = ClientToken(
                id=str(body["j"]),
                tenant=str(body["t"]),
                expires_at=int(body["e"]),
                session_id=None if body.get("s") is None else str(body["s"]),
                model=None if body.get("m") is None else str(body["m"]),
            )
        except (ValueError, KeyError, TypeError):
            return None
        return claims

    async def check(self, value: str) -> ClientToken | str:
        """The claims of a token that is valid now, or why not (for the 401 message):
        ``invalid`` (malformed or forged), ``expired`` or ``revoked``."""
        claims = self._claims(value)
        if claims is None:
            return "invalid"
        if claims.expires_at <= time.time():
            return "expired"
        if await self._store.is_revoked(revocation_key(claims.tenant, claims.id)):
            return "revoked"
        return claims

    async def revoke(self, tenant: str, token_id: str) -> None:
        """Refuse ``token_id`` of ``tenant`` from now on, on every replica sharing the store.

        The entry outlives any token that can carry the id (MAX_TTL_S from now)."""
        await self._store.revoke(revocation_key(tenant, token_id), time.time() + MAX_TTL_S + 60)

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest())


@dataclass(frozen=True)
class Access:
    """Who a WebSocket connection acts for."""

    tenant: str
    #: Set for a client token scoped to one session: the only session it may open.
    session_id: str | None = None

    def session(self, requested: str | None) -> str | None:
        """The session to open: a scoped token's own (``requested`` must be it or None)."""
        if self.session_id is None or requested in (None, "", self.session_id):
            return self.session_id or requested
        raise ProtocolError(UNAUTHORIZED, "this client token is for another session", fatal=True)


async def socket_access(
    auth: TokenAuth, tokens: ClientTokens, authorization: str | None, query_token: str | None
) -> Access | ProtocolError:
    """The caller of a WebSocket door (by API token, or by a valid client token), or the
    error to refuse the connection with: 401, or 503 when the deny list cannot be read."""
    credential = query_token
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            credential = value.strip()
    if credential is not None and credential.startswith(PREFIX):
        try:
            claims = await tokens.check(credential)
        except Exception as exc:  # refuse rather than admit a token that may be revoked
            log.warning("client token not checked, state store failed: %r", exc)
            message = "cannot check the client token now: the state store is unavailable"
            return ProtocolError(STORE_UNAVAILABLE, message, fatal=True)
        if isinstance(claims, str):
            return ProtocolError(UNAUTHORIZED, f"{claims} client token", fatal=True)
        return Access(claims.tenant, claims.session_id)
    tenant = auth.tenant_for(authorization, query_token)
    if tenant is None:
        return ProtocolError(UNAUTHORIZED, "missing or invalid API token", fatal=True)
    return Access(tenant)
