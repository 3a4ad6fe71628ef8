"""A session's outbox: the server messages it sent recently, with their ``seq``.

A client that lost its socket reconnects with the last ``seq`` it saw, and the server
replays the rest from here (server/resume.py). The live owner keeps the outbox in
memory: an append is a few hundred nanoseconds, no await, no store call (the hot path
sends tens of messages a second per session). An `OutboxWriter`, one per app, copies
every session's new entries to the state store in one store call (one Redis pipeline)
each ``outbox_flush_ms``, so that the session can be resumed after it closed or by
another process reading the same store. A store call per session would cost more CPU
than the messages themselves (measured: BENCHMARKS.md, "Outbox cost").

What it holds is compact: reply audio as the raw bytes the message was encoded from
(shared with it, not copied), the JSON around it as text; a replay re-encodes the same
text (`OutboxEntry`). Base64 JSON would be 4/3 of the audio, and reply audio is most of
what a voice session sends.

Bounds: ``outbox_max_messages`` messages, ``outbox_max_bytes`` bytes (JSON text plus raw
audio) and ``outbox_max_age_s`` seconds, whichever is reached first; the store keeps the
same window (``keep_from``) and expires entries by age. And what the client has received
is dropped: a ``playback`` report says how much of a response's audio the user heard, so
the client has every message up to the last audio chunk it heard (one socket delivers
in order); a resume from that client asks only for later ones (`heard`). So does the
pong to a delivery ping (`release`, ``outbox_ack_interval_s``), for any client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from duplex.protocol import ChunkEvent
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
        self._bytes = sum(e.size for e in self._entries)
        self._pending: list[OutboxEntry] = []  # appended, not yet given to the writer
        #: The last ``seq`` let go of (by a bound or a playback report), so the store's
        #: copy can let go too.
        self._dropped_to = self._entries[0].seq - 1 if self._entries else 0
        self._stored_from = self._dropped_to + 1  # the store holds nothing below this
        self._response: str | None = None  # the response whose audio is being sent
        self._response_ms = 0.0  # how much of its audio (ms) is sent

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def first_seq(self) -> int | None:
        """The oldest ``seq`` still held (None when empty)."""
        return self._entries[0].seq if self._entries else None

    @property
    def size(self) -> int:
        """Bytes held (JSON text and raw audio), as `outbox_max_bytes` counts them."""
        return self._bytes

    def record(self, seq: int, text: str, message: object) -> None:
        """Record ``message``, sent as ``text`` (the hot path): reply audio is kept raw."""
        if type(message) is ChunkEvent:
            media = message.media
            if (
                media is not None
                and type(media.data) is bytes
                and media.mime_type == "audio/pcm"
                and media.sample_rate
            ):
                response_id = message.response_id
                if response_id != self._response:
                    self._response, self._response_ms = response_id, 0.0
                self._response_ms += (
                    len(media.data) * 500 / (media.channels or 1) / media.sample_rate
                )
                self._add(
                    OutboxEntry.of_audio(
                        seq, text, time.time(), media.data, response_id, self._response_ms
                    )
                )
                return
        self._add(OutboxEntry(seq, text, time.time()))

    def append(self, seq: int, text: str) -> None:
        """Record a message as sent, as its text."""
        self._add(OutboxEntry(seq, text, time.time()))

    def _add(self, entry: OutboxEntry) -> None:
        entries = self._entries
        entries.append(entry)
        self._bytes += entry.size
        oldest = entry.at - self._max_age
        while len(entries) > 1 and (
            len(entries) > self._max_messages
            or self._bytes > self._max_bytes
            or entries[0].at < oldest
        ):
            self._drop_first()
        if not self._pending:
            self._writer.mark(self)
        self._pending.append(entry)

    def heard(self, response_id: str, played_ms: float) -> None:
        """The client heard ``played_ms`` of ``response_id``'s audio: it has received every
        message up to the last audio chunk of it that ends there, so they go (a resume
        from that client asks for later ones only; another one gets `error` 410)."""
        last = 0
        for entry in self._entries:
            if entry.response_id == response_id:
                if entry.end_ms > played_ms + 0.5:  # rounding of the client's clock
                    break
                last = entry.seq
        self.release(last)

    def release(self, seq: int) -> None:
        """The client has every message up to ``seq``: they go, here and in the store (a
        resume from that client asks for later ones; one asking for them gets 410). Said
        by a ``playback`` report (`heard`) or by the pong to a ping written after them
        (server/ws_protocol.py: the client's WebSocket library read them)."""
        entries = self._entries
        if not entries or entries[0].seq > seq:
            return
        while entries and entries[0].seq <= seq:
            self._drop_first()
        self._writer.mark(self)  # the store's copy lets go of them too

    def _drop_first(self) -> None:
        entry = self._entries.popleft()
        self._bytes -= entry.size
        self._dropped_to = entry.seq

    def after(self, last_seq: int) -> list[OutboxEntry]:
        """Every held entry with ``seq > last_seq``, in order (after trimming by age)."""
        oldest = time.time() - self._max_age
        entries = self._entries
        while entries and entries[0].at < oldest:
            self._drop_first()
        return [e for e in entries if e.seq > last_seq]

    def take_pending(self) -> OutboxBatch | None:
        """What the store lacks, and how far back it may keep (for `OutboxWriter`)."""
        keep_from = self._dropped_to + 1
        batch = [e for e in self._pending if e.seq >= keep_from]  # trimmed while waiting
        self._pending = []
        trim = keep_from > self._stored_from  # the store holds older entries than the window
        if not batch and not trim:
            return None
        self._stored_from = keep_from
        return OutboxBatch(self.session_id, batch, keep_from if trim else None)

    async def close(self) -> None:
        """Write what is pending now (bounded); the held entries stay readable."""
        await self._writer.write_now(self)

    async def discard(self, last_seq: int) -> None:
        """Drop everything (the session ended and will not be resumed): the entries held
        here at once, the store's copy up to ``last_seq`` in one write (bounded)."""
        self._entries.clear()
        self._pending = []
        self._bytes = 0
        self._dropped_to = max(self._dropped_to, last_seq)
        await self._writer.drop(self)


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

    async def drop(self, outbox: Outbox) -> None:
        """Let the store's copy of ``outbox`` go (see `Outbox.discard`), after a write of
        it that may be under way, so that write cannot put entries back."""
        self._dirty.pop(outbox.session_id, None)
        if self._writing is not None:
            await asyncio.wait([self._writing], timeout=STORE_TIMEOUT_S)
        await self.write_now(outbox)  # nothing pending: only the trim

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
