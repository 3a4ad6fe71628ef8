"""Ephemeral client secrets (``POST /v1/realtime/client_secrets``): the OpenAI-shaped view
of Duplex's client tokens (server/client_tokens.py), so one mechanism, one key
(``client_secret_key``) and one token format serve both doors: a secret minted here opens
``/v1/duplex`` too, and a token from ``POST /v1/client_tokens`` (bound to no model) opens
``/v1/realtime``. A secret carries its tenant, model and expiry, signed with HMAC-SHA256,
so any replica with the same key checks it without a store round trip.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.client_tokens import PREFIX, ClientTokens

__all__ = ["PREFIX", "ClientSecret", "ClientSecrets"]


@dataclass(frozen=True)
class ClientSecret:
    tenant: str
    model: str | None  # None: a client token bound to no model
    expires_at: int


class ClientSecrets:
    def __init__(self, tokens: ClientTokens, ttl_s: float) -> None:
        self._tokens = tokens
        self.ttl_s = ttl_s

    def mint(self, tenant: str, model: str, ttl_s: float | None = None) -> tuple[str, int]:
        """A new secret for ``tenant`` and its expiry (Unix seconds)."""
        value, claims = self._tokens.mint(
            tenant, ttl_s=ttl_s if ttl_s is not None else self.ttl_s, model=model
        )
        return value, claims.expires_at

    def check(self, value: str, now: float | None = None) -> ClientSecret | None:
        """The secret's claims, or None when it is malformed, forged or expired (the deny
        list of revoked tokens is not read here: this door's checks stay synchronous)."""
        claims = self._tokens.verify(value, now)
        if claims is None:
            return None
        return ClientSecret(claims.tenant, claims.model, claims.expires_at)
