"""Ephemeral client secrets (``POST /v1/realtime/client_secrets``): short-lived, signed
tokens a backend hands to a browser instead of its Duplex token.

A secret carries its tenant, model and expiry, signed with HMAC-SHA256, so any replica
sharing ``client_secret_key`` checks it without a shared store. The tenant name is
readable in the secret (it is not itself a credential).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

PREFIX = "ek_"


@dataclass(frozen=True)
class ClientSecret:
    tenant: str
    model: str
    expires_at: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class ClientSecrets:
    def __init__(self, key: str | None, ttl_s: float) -> None:
        self._key = (key or secrets.token_urlsafe(32)).encode()
        self.ttl_s = ttl_s

    def mint(self, tenant: str, model: str, ttl_s: float | None = None) -> tuple[str, int]:
        """A new secret for ``tenant`` and its expiry (Unix seconds)."""
        expires_at = int(time.time() + (ttl_s if ttl_s is not None else self.ttl_s))
        payload = _b64(json.dumps({"t": tenant, "m": model, "e": expires_at}).encode())
        return f"{PREFIX}{payload}.{self._sign(payload)}", expires_at

    def check(self, value: str, now: float | None = None) -> ClientSecret | None:
        """The secret's claims, or None when it is malformed, forged or expired."""
        if not value.startswith(PREFIX):
            return None
        payload, _, signature = value[len(PREFIX) :].partition(".")
        if not hmac.compare_digest(signature.encode(), self._sign(payload).encode()):
            return None
        try:
            claims = json.loads(_unb64(payload))
            secret = ClientSecret(str(claims["t"]), str(claims["m"]), int(claims["e"]))
        except (ValueError, KeyError, TypeError):
            return None
        if secret.expires_at <= (now if now is not None else time.time()):
            return None
        return secret

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest())
