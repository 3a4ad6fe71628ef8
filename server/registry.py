"""Live sessions per tenant: the REST API reaches a connected session through here."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

from server.session import DuplexSession


class SessionRegistry:
    def __init__(self, on_remove: Callable[[], None] | None = None) -> None:
        self._live: dict[str, dict[str, DuplexSession]] = defaultdict(dict)
        self._on_remove = on_remove  # the app's heap trimmer: a session's memory is let go

    def add(self, tenant: str, session: DuplexSession) -> None:
        self._live[tenant][session.id] = session

    def remove(self, tenant: str, session: DuplexSession) -> None:
        sessions = self._live.get(tenant)
        if sessions is not None and sessions.get(session.id) is session:
            del sessions[session.id]
            if not sessions:
                del self._live[tenant]
            if self._on_remove is not None:
                self._on_remove()

    def get(self, tenant: str, session_id: str) -> DuplexSession | None:
        return self._live.get(tenant, {}).get(session_id)

    def modes_and_providers(self) -> list[tuple[str, str]]:
        """(mode, provider) of every live session. Safe from another thread (the metrics
        listener's): each copy of a dict is one C call, done while holding the GIL."""
        while True:
            try:
                return [
                    (s.config.mode, s.config.provider)
                    for sessions in list(self._live.values())
                    for s in list(sessions.values())
                ]
            except RuntimeError:  # a dict changed size under a copy: take it again
                continue

    def count(self) -> int:
        return sum(len(s) for s in self._live.values())
