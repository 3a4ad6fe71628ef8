"""The StateStore interface: conversations outlive connections (and, with a shared store, nodes).

Callers only use this interface; ``server.state.open.open_store(url)`` picks the
implementation, so adding a backend changes no caller.
"""

from __future__ import annotations

import binascii
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from duplex.protocol import Message

#: A rewrite of a session's messages (`StateStore.edit_messages`): the new list, or None.
MessageEdit = Callable[[list[Message]], "list[Message] | None"]


class StoreUnavailable(Exception):
    """The state store cannot be reached now (an outage): new sessions and REST calls get 503."""


class FencedWrite(Exception):
    """A write refused because another replica has taken the session over (its lease's
    fencing token is newer than this process's): this process must stop running it."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id} is now owned by another replica")
        self.session_id = session_id


#: The endpoints that open sessions; a session belongs to its own (`SessionRecord.endpoint`).
DUPLEX_ENDPOINT = "/v1/duplex"
REALTIME_ENDPOINT = "/v1/realtime"


@dataclass
class SessionRecord:
    """What a session is, apart from its messages."""

    id: str
    tenant: str
    name: str = ""
    variables: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    parent_id: str | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    #: The client messages the last live session had received when it closed cleanly
    #: (docs/protocol.md "Resending input"); None while one runs (or after it died).
    input_received: int | None = None
    #: The endpoint that opened the session, the only one that continues or resumes it
    #: (its outbox is in that endpoint's wire format). Records from before: /v1/duplex.
    endpoint: str = DUPLEX_ENDPOINT

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SessionRecord:
        """A stored record; keys this version does not know (written by a newer replica
        during a rolling upgrade) are ignored rather than making the session unloadable."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class StreamEvent:
    """A persisted piece of a response still streaming (text deltas, tool results)."""

    response_id: str
    kind: str  # "delta" | "tool_result"
    data: dict[str, Any]
    created_at: float = field(default_factory=time.time)


class OutboxEntry:
    """One server message as it was sent: its ``seq``, its JSON text, when (wall clock).

    A message carrying audio is held compactly: the raw audio bytes (the very object the
    reply was encoded from, not a copy) and the JSON around its base64, which `text`
    rebuilds, identical, when the message is replayed or stored. Base64 JSON is 4/3 of
    the audio, and most of what a voice session sends."""

    __slots__ = ("_audio", "_cut", "_json", "at", "end_ms", "response_id", "seq")

    def __init__(
        self,
        seq: int,
        text: str,
        at: float,
        *,
        audio: bytes | None = None,
        cut: int = 0,
        response_id: str | None = None,
        end_ms: float = 0.0,
    ) -> None:
        self.seq = seq
        self.at = at
        #: The JSON text; with ``audio``, the text without the audio's base64, which goes
        #: at ``cut``.
        self._json = text
        self._audio = audio
        self._cut = cut
        #: For reply audio: its response, and where in the response's audio it ends (ms),
        #: so that a ``playback`` report tells which messages the client has received.
        self.response_id = response_id
        self.end_ms = end_ms

    @classmethod
    def of_audio(
        cls, seq: int, text: str, at: float, audio: bytes, response_id: str, end_ms: float
    ) -> OutboxEntry:
        """An entry holding ``audio`` raw when ``text`` has it as base64 (any JSON shape:
        the base64 is found, not assumed); else the whole text."""
        b64 = binascii.b2a_base64(audio, newline=False).decode("ascii")
        cut = text.find(b64[:64])  # a short needle: finding all of it costs more than this
        if cut < 0 or not audio or not text.startswith(b64, cut):
            return cls(seq, text, at, response_id=response_id, end_ms=end_ms)
        rest = text[:cut] + text[cut + len(b64) :]
        return cls(seq, rest, at, audio=audio, cut=cut, response_id=response_id, end_ms=end_ms)

    @property
    def text(self) -> str:
        """The message's JSON text, exactly as it was sent."""
        audio = self._audio
        if audio is None:
            return self._json
        cut = self._cut
        b64 = binascii.b2a_base64(audio, newline=False).decode("ascii")
        return self._json[:cut] + b64 + self._json[cut:]

    @property
    def size(self) -> int:
        """What the entry holds, in bytes of text and raw audio (`outbox_max_bytes`)."""
        return len(self._json) + (0 if self._audio is None else len(self._audio))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OutboxEntry):
            return NotImplemented
        return (self.seq, self.text, self.at) == (other.seq, other.text, other.at)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"OutboxEntry(seq={self.seq}, at={self.at!r}, size={self.size})"


@dataclass(slots=True)
class OutboxBatch:
    """New outbox entries of one session; ``keep_from``: drop the stored ones below it."""

    session_id: str
    entries: list[OutboxEntry]
    keep_from: int | None = None


class StateStore(ABC):
    #: Exceptions of this backend that mean "unreachable now, try again" (not a bug).
    transient_errors: tuple[type[BaseException], ...] = ()
    #: Every exception its driver raises for a failed call (what a lease step survives).
    driver_errors: tuple[type[BaseException], ...] = ()
    #: Whether other processes may open the same store (then live sessions need leases).
    shared = False

    @abstractmethod
    async def create_session(self, record: SessionRecord) -> None: ...

    @abstractmethod
    async def get_session(self, session_id: str, tenant: str | None = None) -> SessionRecord | None:
        """The record, or None when unknown or (with ``tenant``) another tenant's. A
        foreign id takes the unknown id's path and touches nothing (no TTL renewed)."""

    @abstractmethod
    async def update_session(self, record: SessionRecord) -> None: ...

    @abstractmethod
    async def delete_session(self, session_id: str) -> None: ...

    @abstractmethod
    async def load_messages(self, session_id: str) -> list[Message]: ...

    @abstractmethod
    async def append_messages(self, session_id: str, messages: list[Message]) -> None: ...

    @abstractmethod
    async def clear_messages(self, session_id: str) -> None: ...

    @abstractmethod
    async def edit_messages(self, session_id: str, edit: MessageEdit) -> list[Message] | None:
        """Replace the session's messages with ``edit(messages)``, atomically: no reader
        sees half a rewrite, a crash leaves the old list or the new one, and a message
        appended meanwhile is not lost (``edit`` may run again on the newer list, so it
        must be pure). ``edit`` returns None to change nothing. Returns the new list, or
        None when nothing changed. Stream events (crash-recovery records) are untouched."""

    @abstractmethod
    async def append_events(self, session_id: str, events: list[StreamEvent]) -> None:
        """Persist stream events of a response in progress (readable after a crash)."""

    @abstractmethod
    async def load_events(self, session_id: str) -> list[StreamEvent]: ...

    @abstractmethod
    async def drop_events(self, session_id: str, response_id: str) -> None:
        """Forget a response's stream events once it is compacted into a message."""

    @abstractmethod
    async def append_outbox(self, batches: list[OutboxBatch], *, max_age_s: float) -> None:
        """Add sent messages to sessions' outboxes (many sessions in one call: the writer
        batches them) and drop those below each ``keep_from`` (the live owner's window);
        an outbox may expire ``max_age_s`` after its last write."""

    @abstractmethod
    async def load_outbox(self, session_id: str, *, max_age_s: float) -> list[OutboxEntry]:
        """The session's outbox in ``seq`` order, without entries older than ``max_age_s``."""

    @abstractmethod
    async def revoke(self, key: str, until: float) -> None:
        """Put ``key`` on the deny list until ``until`` (Unix seconds); client tokens use it."""

    @abstractmethod
    async def is_revoked(self, key: str) -> bool:
        """Whether ``key`` is on the deny list (and its time has not passed)."""

    async def fork(self, source_id: str, record: SessionRecord) -> None:
        """Create ``record`` with an independent copy of the source's messages."""
        messages = await self.load_messages(source_id)
        await self.create_session(record)
        copies = [m.model_copy(deep=True) for m in messages]
        if copies:
            await self.append_messages(record.id, copies)

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and files."""

    def unavailable(self) -> str | None:
        """Why the store is known to be unavailable now (an outage), or None."""
        return None

    def watch(self, session_id: str, callback: Callable[[bool], None]) -> Callable[[], None]:
        """Call ``callback(available)`` when the store goes down or comes back, while
        ``session_id`` is live; returns the function that stops watching."""
        return lambda: None
