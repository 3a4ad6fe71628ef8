"""A client's numbered media chunks back in order; gaps declared when waiting stops paying."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ReorderEvent:
    """A chunk released in order (``data`` None: it was refused), or a gap (``missing``)."""

    index: int = 0
    data: bytes | None = None
    timestamp_ms: float | None = None
    missing: tuple[int, int] | None = None


class ChunkReorder:
    """Releases chunks in index order; declares a gap when waiting is no longer worth it."""

    def __init__(self, first: int, window: int, timeout_ms: float, max_bytes: int) -> None:
        self.expected = first
        self._window = max(0, window)
        self._timeout_ms = timeout_ms
        self._max_bytes = max_bytes
        self._held: dict[int, tuple[bytes | None, float | None]] = {}
        self._held_bytes = 0
        self._waiting_since: float | None = None

    def add(
        self, index: int, data: bytes | None, timestamp_ms: float | None, now_ms: float
    ) -> tuple[list[ReorderEvent], bool]:
        if index < self.expected or index in self._held:
            return self.expire(now_ms), False
        self._held[index] = (data, timestamp_ms)
        self._held_bytes += len(data or b"")
        return self.expire(now_ms), True

    def expire(self, now_ms: float) -> list[ReorderEvent]:
        events: list[ReorderEvent] = []
        while self._held:
            if self.expected in self._held:
                data, timestamp_ms = self._held.pop(self.expected)
                self._held_bytes -= len(data or b"")
                events.append(ReorderEvent(self.expected, data, timestamp_ms))
                self.expected += 1
                self._waiting_since = None
                continue
            if self._waiting_since is None:
                self._waiting_since = now_ms
            first = min(self._held)
            if (
                len(self._held) > self._window
                or first - self.expected > self._window
                or self._held_bytes > self._max_bytes
                or now_ms - self._waiting_since >= self._timeout_ms
            ):
                events.append(ReorderEvent(missing=(self.expected, first - 1)))
                self.expected = first
                continue
            break
        if not self._held:
            self._waiting_since = None
        return events
