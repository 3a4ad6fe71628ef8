"""Duplex Python client."""

from client.sdk import (
    AuthError,
    Client,
    ConnectionLost,
    DuplexError,
    Message,
    NotFoundError,
    Session,
    SyncClient,
    SyncSession,
)

__all__ = [
    "AuthError",
    "Client",
    "ConnectionLost",
    "DuplexError",
    "Message",
    "NotFoundError",
    "Session",
    "SyncClient",
    "SyncSession",
]
