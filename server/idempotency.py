"""Turns with a ``request_id`` are answered once: concurrent or repeated sends share it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class TurnLocks:
    """One lock per (session, request_id) while a turn with that id is being answered,
    so a second send waits for the first and then finds its stored answer."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, session_id: str, request_id: str) -> AsyncIterator[None]:
        key = (session_id, request_id)
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)
