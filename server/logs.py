"""One log adapter for everything that acts on behalf of a session."""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any


class SessionLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefixes every record with the session id (and keeps it in ``extra``), so one
    session's story can be grepped across the server, modes and providers."""

    def __init__(self, logger: logging.Logger, session_id: str) -> None:
        super().__init__(logger, {"session_id": session_id})

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(self.extra or {})
        kwargs["extra"] = {**extra, **kwargs.get("extra", {})}
        return f"[{extra.get('session_id')}] {msg}", kwargs
