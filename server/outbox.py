"""A session's outbox: the server messages it sent recently, with their ``seq``.

A client that lost its socket reconnects with the last ``seq`` it saw, and the server
replays the rest from here (server/resume.py). The live owner keeps the outbox in
memory: an append is a few hundred nanoseconds, no await, no store call (the hot path
sends tens of messages a second per session). An `OutboxWriter`, one per app, copies
every session's new entries to the state store in one store call (one Redis pipeline)
each ``outbox_flush_ms``, so that the session can be resumed after it closed or by
another process reading the same store. A store call per session would cost more CPU
than the messages themselves (measured: BENCHMARKS.md, "Outbox cost").

Bounds: ``outbox_max_messages`` messages, ``outbox_max_bytes`` characters of JSON and
``outbox_max_age_s`` seconds, whichever is reached first; the store keeps the same
window (``keep_from``) and expires entries by age.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from server.limits import SessionLimits
from server.state.base import OutboxBatch, OutboxEntry, StateStore

log = logging.getLogger(__name__)

#: A store write that takes longer is abandoned (the entries stay in memory).
STORE_TIMEOUT_S = 5.0


class Outbox:
    def __init__(
        self,
        session_id: str,
        writer: OutboxWriter,
        limits: SessionLimits,
        entries: list[OutboxEntry] | None = None,
    ) -> None:
        self.session_id = session_id
        self._writer = writer
        self._max_messages = limits.outbox_max_messages
        self._max_bytes = limits.outbox_max_bytes
        self._max_age = limits.outbox_max_age_s
        self._entries: deque[OutboxEntry] = deque(entries or ())
        self._bytes = sum(len(e.text) for e in self._entries)
        self._pending: list[OutboxEntry] = []  # appended, not yet given to the writer
        self._stored_from = self._entries[0].seq if self._entries else 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def first_seq(self) -> int | None:
        """The oldest ``seq`` still held (None when empty)."""
        return self._entries[0].seq if self._entries else None

    def append(self, seq: int, text: str) -> None:
        """Record a message as sent (the hot path)."""
        now = time.time()
        entry = OutboxEntry(seq, text, now)
        entries = self._entries
        entries.append(entry)
        self._bytes += len(text)
        oldest = now - self._max_age
        while len(entries) > 1 and (
            len(entries) > self._max_messages
            or self._bytes > self._max_bytes
            or entries[0].at < oldest
        ):
            self._bytes -= len(entries.popleft().text)
        if not self._pending:
            self._writer.mark(self)
        self._pending.append(entry)

    def after(self, last_seq: int) -> list[OutboxEntry]:
        """Every held entry with ``seq > last_seq``, in order (after trimming by age)."""
        oldest = time.time() - self._max_age
        entries = self._entries
        while entries and entries[0].at < oldest:
            self._bytes -= len(entries.popleft().text)
        return [e for e in entries if e.seq > last_seq]

    def take_pending(self) -> OutboxBatch | None:
        """What the store lacks, and how far back it may keep (for `OutboxWriter`)."""
        keep_from = self.first_seq or 0
        batch = [e for e in self._pending if e.seq >= keep_from]  # trimmed while waiting
        self._pending = []
        if not batch:
            return None
        trim = keep_from > self._stored_from  # the store holds older entries than the window
        self._stored_from = keep_from
        return OutboxBatch(self.session_id, batch, keep_from if trim else None)

    async def close(self) -> None:
        """Write what is pending now (bounded); the held entries stay readable."""
        await self._writer.write_now(self)


class OutboxWriter:
    """Copies new outbox entries of every session to the store, one call per interval."""

    def __init__(self, store: StateStore, limits: SessionLimits) -> None:
        self._store = store
        self._flush_s = limits.outbox_flush_ms / 1000
        self._max_age = limits.outbox_max_age_s
        self._dirty: dict[str, Outbox] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._writing: asyncio.Task[None] | None = None

    def mark(self, outbox: Outbox) -> None:
        """``outbox`` has entries to write: write them at the next interval."""
        self._dirty[outbox.session_id] = outbox
        if self._timer is None and self._writing is None:
            self._timer = asyncio.get_running_loop().call_later(self._flush_s, self._start)

    def _start(self) -> None:
        self._timer = None
        self._writing = asyncio.ensure_future(self._write_all())

    async def _write_all(self) -> None:
        try:
            dirty, self._dirty = self._dirty, {}
            await self._write([b for o in dirty.values() if (b := o.take_pending())])
        finally:
            self._writing = None
            if self._dirty and self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(self._flush_s, self._start)

    async def write_now(self, outbox: Outbox) -> None:
        """Write one session's pending entries at once (it is closing)."""
        self._dirty.pop(outbox.session_id, None)
        batch = outbox.take_pending()
        if batch is not None:
            await self._write([batch])

    async def _write(self, batches: list[OutboxBatch]) -> None:
        """Best effort: a failed write is logged, never fatal (resume from memory works)."""
        if not batches:
            return
        try:
            async with asyncio.timeout(STORE_TIMEOUT_S):
                await self._store.append_outbox(batches, max_age_s=self._max_age)
        except Exception as exc:
            log.warning(
                "outbox write of %d session(s) failed: %s", len(batches), type(exc).__name__
            )

    async def aclose(self) -> None:
        """Write everything pending (app shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writing is not None:
            await asyncio.wait([self._writing])
        dirty, self._dirty = self._dirty, {}
        await self._write([b for o in dirty.values() if (b := o.take_pending())])
