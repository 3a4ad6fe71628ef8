"""Duplex for Python: the client SDK (``from duplex import Client``) and the wire types.

``duplex.protocol`` holds the wire types that the server and the SDK share; it imports
nothing of ours. The SDK names below load on first use, so ``import duplex.protocol``
(which the server does) does not pull in the client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "AuthError",
    "Client",
    "ConflictError",
    "ConnectionLost",
    "DuplexError",
    "Message",
    "NotFoundError",
    "Reconnect",
    "Session",
    "SyncClient",
    "SyncSession",
]

if TYPE_CHECKING:
    from duplex.sdk import (
        AuthError,
        Client,
        ConnectionLost,
        DuplexError,
        Message,
        NotFoundError,
        Reconnect,
        Session,
        SyncClient,
        SyncSession,
    )


def __getattr__(name: str) -> Any:
    if name in __all__:
        from duplex import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'duplex' has no attribute {name!r}")
