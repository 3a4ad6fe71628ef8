"""Realtime ``error`` events: a client mistake answers one, and the session goes on."""

from __future__ import annotations

from typing import Any

#: Duplex error codes -> the Realtime error ``code`` string.
DUPLEX_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    404: "not_found",
    413: "too_large",
    415: "unsupported_media",
    429: "rate_limited",
    500: "internal_error",
    502: "provider_failed",
}


class DoorError(Exception):
    """A client event the door refuses; becomes an ``error`` event naming it."""

    def __init__(
        self,
        code: str,
        message: str,
        param: str | None = None,
        *,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.type = type


def error_body(
    type: str, code: str | None, message: str, param: str | None, event_id: str | None
) -> dict[str, Any]:
    return {"type": type, "code": code, "message": message, "param": param, "event_id": event_id}


def duplex_error_body(code: int, message: str, event_id: str | None) -> dict[str, Any]:
    kind = "server_error" if code >= 500 else "invalid_request_error"
    return error_body(kind, DUPLEX_CODES.get(code, str(code)), message, None, event_id)
