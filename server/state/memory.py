"""In-memory store with a sliding TTL and an LRU cap: the single-node default."""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from typing import Any

from duplex.protocol import Message
from server.state.base import (
    MessageEdit,
    OutboxBatch,
    OutboxEntry,
    SessionRecord,
    StateStore,
    StreamEvent,
)

#: A stored message as its fields' values: (id, role, content, created_at, metadata or
#: None). A pydantic `Message` holds a ``__dict__`` and a fields-set besides its values:
#: ~650 bytes for a short message against ~200 as a tuple (tests/test_session_memory.py),
#: and a store keeps up to ``max_messages`` of them per session, closed sessions too.
_Stored = tuple[str, str, str, float, dict[str, Any] | None]


def _stored(message: Message) -> _Stored:
    return (
        message.id,
        message.role,
        message.content,
        message.created_at,
        message.metadata or None,
    )


def _message(stored: _Stored) -> Message:
    """A `Message` again, without validating what was valid when it was stored."""
    msg_id, role, content, created_at, metadata = stored
    return Message.model_construct(
        id=msg_id,
        role=role,
        content=content,
        created_at=created_at,
        metadata=dict(metadata) if metadata is not None else {},  # the caller's own
    )


@dataclass
class _Entry:
    record: SessionRecord
    messages: deque[_Stored]
    events: list[StreamEvent] = field(default_factory=list)
    outbox: deque[OutboxEntry] = field(default_factory=deque)
    touched: float = field(default_factory=time.monotonic)


class MemoryStore(StateStore):
    """Sessions expire ``ttl_s`` after their last use; past ``max_sessions`` the least
    recently used go first; each keeps its last ``max_messages`` messages."""

    def __init__(
        self, *, ttl_s: float = 86400, max_sessions: int = 10_000, max_messages: int = 1000
    ) -> None:
        self._ttl = ttl_s
        self._max_sessions = max_sessions
        self._max_messages = max_messages
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._revoked: dict[str, float] = {}  # key -> until (Unix seconds)
        # Sessions holding outbox entries, oldest last append first, and the outbox's age
        # bound (from `append_outbox`): entries past it are never loaded, so they go.
        self._outboxes: OrderedDict[str, float] = OrderedDict()
        self._outbox_age: float | None = None

    def _get(self, session_id: str) -> _Entry | None:
        self._expire()
        entry = self._entries.get(session_id)
        if entry is not None:
            entry.touched = time.monotonic()
            self._entries.move_to_end(session_id)
        return entry

    def _expire(self) -> None:
        self._expire_outboxes()
        deadline = time.monotonic() - self._ttl
        while self._entries:
            oldest_id, oldest = next(iter(self._entries.items()))
            if oldest.touched >= deadline and len(self._entries) <= self._max_sessions:
                break
            del self._entries[oldest_id]

    async def create_session(self, record: SessionRecord) -> None:
        self._entries[record.id] = _Entry(replace(record), deque(maxlen=self._max_messages))
        self._expire()

    async def get_session(self, session_id: str, tenant: str | None = None) -> SessionRecord | None:
        self._expire()
        found = self._entries.get(session_id)
        if found is None or (tenant is not None and found.record.tenant != tenant):
            return None
        entry = self._get(session_id)
        return replace(entry.record, variables=dict(entry.record.variables)) if entry else None

    async def update_session(self, record: SessionRecord) -> None:
        entry = self._get(record.id)
        if entry is None:
            await self.create_session(record)
        else:
            record.updated_at = time.time()  # the caller's record is current too
            entry.record = replace(record)

    async def delete_session(self, session_id: str) -> None:
        self._entries.pop(session_id, None)

    async def load_messages(self, session_id: str) -> list[Message]:
        entry = self._get(session_id)
        return [_message(m) for m in entry.messages] if entry else []

    async def append_messages(self, session_id: str, messages: list[Message]) -> None:
        entry = self._get(session_id)
        if entry is not None:
            entry.messages.extend(_stored(m) for m in messages)

    async def clear_messages(self, session_id: str) -> None:
        entry = self._get(session_id)
        if entry is not None:
            entry.messages.clear()
            entry.events.clear()

    async def edit_messages(self, session_id: str, edit: MessageEdit) -> list[Message] | None:
        # No await between the read and the write: nothing else runs in between.
        entry = self._get(session_id)
        if entry is None:
            return None
        edited = edit([_message(m).model_copy(deep=True) for m in entry.messages])
        if edited is None:
            return None
        entry.messages = deque(
            (_stored(m.model_copy(deep=True)) for m in edited), maxlen=self._max_messages
        )
        return edited

    async def append_events(self, session_id: str, events: list[StreamEvent]) -> None:
        entry = self._get(session_id)
        if entry is not None:
            entry.events.extend(events)

    async def load_events(self, session_id: str) -> list[StreamEvent]:
        entry = self._get(session_id)
        return list(entry.events) if entry else []

    async def drop_events(self, session_id: str, response_id: str) -> None:
        entry = self._get(session_id)
        if entry is not None:
            entry.events = [e for e in entry.events if e.response_id != response_id]

    async def append_outbox(self, batches: list[OutboxBatch], *, max_age_s: float) -> None:
        self._outbox_age = max_age_s
        oldest = time.time() - max_age_s
        for batch in batches:
            entry = self._entries.get(batch.session_id)  # no LRU touch: only output
            if entry is None:
                continue
            outbox = entry.outbox
            outbox.extend(batch.entries)
            keep_from = batch.keep_from
            while outbox and (
                outbox[0].at < oldest or (keep_from is not None and outbox[0].seq < keep_from)
            ):
                outbox.popleft()
            if outbox:
                self._outboxes[batch.session_id] = outbox[-1].at
                self._outboxes.move_to_end(batch.session_id)
        self._expire_outboxes()

    def _expire_outboxes(self) -> None:
        """Drop the outboxes of sessions that sent nothing for `outbox_max_age_s` (closed
        ones, mostly): a resume would load none of it, and a closed session's outbox
        (reply audio: ~64 KB of JSON a second) would otherwise stay until the session
        expires (`ttl_s`, a day by default)."""
        if self._outbox_age is None:
            return
        oldest = time.time() - self._outbox_age
        outboxes = self._outboxes
        while outboxes:
            session_id, last = next(iter(outboxes.items()))
            if last >= oldest:
                break
            del outboxes[session_id]
            entry = self._entries.get(session_id)
            if entry is not None:
                entry.outbox.clear()

    async def load_outbox(self, session_id: str, *, max_age_s: float) -> list[OutboxEntry]:
        entry = self._get(session_id)
        if entry is None:
            return []
        oldest = time.time() - max_age_s
        return [e for e in entry.outbox if e.at >= oldest]

    # ---- deny list ----------------------------------------------------------------------

    async def revoke(self, key: str, until: float) -> None:
        now = time.time()
        # Bounded by what can still be live: expired entries go whenever one is added.
        self._revoked = {k: t for k, t in self._revoked.items() if t > now}
        self._revoked[key] = until

    async def is_revoked(self, key: str) -> bool:
        until = self._revoked.get(key)
        return until is not None and until > time.time()
