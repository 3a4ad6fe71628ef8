"""API tokens -> tenant. Every session belongs to the tenant of the token that opened it."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from server.config import Settings

ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class TokenAuth:
    tokens: dict[str, str]  # token -> tenant
    allow_anonymous: bool = False
    #: Set when no token was configured and one was made for this run (printed at start).
    generated: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenAuth:
        entries = [e for e in settings.api_tokens.split(",") if e.strip()]
        if settings.tokens_file is not None:
            for line in settings.tokens_file.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    entries.append(line)
        tokens: dict[str, str] = {}
        for entry in entries:
            token, _, tenant = entry.strip().partition(":")
            # Without a tenant name, a digest names it: logs never show the token itself.
            tokens[token] = tenant or "tenant-" + hashlib.sha256(token.encode()).hexdigest()[:10]
        generated = None
        if not tokens and not settings.allow_anonymous:
            generated = "dev-" + secrets.token_urlsafe(18)
            tokens[generated] = "dev"
        return cls(tokens, settings.allow_anonymous, generated)

    def tenant_for(self, authorization: str | None, query_token: str | None) -> str | None:
        """The caller's tenant, or None when the credentials are missing or wrong."""
        token = None
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                token = value.strip()
        token = token or query_token
        if not token:
            return ANONYMOUS if self.allow_anonymous else None
        found = None
        for known, tenant in self.tokens.items():
            # Compare against every token so timing does not reveal which prefix matched.
            if hmac.compare_digest(known.encode(), token.encode()):
                found = tenant
        return found
