"""What a session mode implements (`Mode`), and what it may do to its session (`SessionPort`).

The session builds its mode through a factory the app chooses (``SessionServices.modes``),
so neither side imports the other: modes see their session only through the port.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel

from duplex.protocol import (
    BAD_REQUEST,
    ImageFrame,
    Message,
    ProtocolError,
    SessionConfig,
    TextChunk,
    VideoChunk,
)
from server.decode_budget import PixelBudget
from server.idempotency import TurnLocks
from server.limits import SessionLimits
from server.logs import SessionLog
from server.providers.catalog import ProviderCatalog
from server.state.base import StateStore
from server.tools import ToolRegistry


class EmitError(Protocol):
    def __call__(
        self, code: int, message: str, *, id: str | None = None, fatal: bool = False
    ) -> Awaitable[None]: ...


@dataclass(slots=True, eq=False)
class SessionPort:
    """A mode's view of its session: the session's own bound methods and resources.

    A plain object of attributes, so a call through the port costs what a call on the
    session does. The session keeps ``config`` current (``session.update``).
    """

    id: str
    config: SessionConfig
    log: SessionLog
    store: StateStore
    providers: ProviderCatalog
    tools: ToolRegistry
    limits: SessionLimits
    turn_locks: TurnLocks
    #: Decoded image pixels in flight across the app (server/decode_budget.py).
    decode_budget: PixelBudget
    #: Send or queue one server message; waits while the output queue is full.
    emit: Callable[[BaseModel], Awaitable[None]]
    #: `emit` without waiting: False (nothing done) if the output queue is full.
    emit_nowait: Callable[[BaseModel], bool]
    #: An ``error`` message; ``fatal=True`` ends the session.
    emit_error: EmitError
    #: How many messages `emit_nowait` can take now.
    output_room: Callable[[], int]
    #: A background task owned by the session: cancelled at close, faults are fatal.
    spawn: Callable[[Awaitable[Any], str], asyncio.Task[Any]]
    #: The session's instructions with its variables substituted.
    instructions: Callable[[], str]
    #: The session's stored history.
    messages: Callable[[], Awaitable[list[Message]]]


class Mode:
    """What a session mode implements; the session forwards input to it.

    ``self.session`` is the mode's `SessionPort`, not the session itself.
    """

    def __init__(self, session: SessionPort) -> None:
        self.session = session

    async def on_text(self, chunk: TextChunk, msg_id: str | None) -> None:
        raise NotImplementedError

    async def on_audio(self, pcm: bytes, msg_id: str | None) -> None:
        """Audio in the session's input format (``config.input_audio``)."""
        raise NotImplementedError

    #: Whether `on_audio_nowait` is implemented (see `DuplexSession.send_audio_nowait`).
    direct_audio: ClassVar[bool] = False

    def on_audio_nowait(self, pcm: bytes) -> Coroutine[Any, Any, None] | None:
        """Handle one message of audio in the session's input format synchronously;
        return what must still be awaited, if anything."""
        raise NotImplementedError

    async def on_frame(self, frame: ImageFrame, msg_id: str | None) -> None:
        raise NotImplementedError

    async def on_video(self, chunk: VideoChunk, msg_id: str | None) -> None:
        raise NotImplementedError

    async def on_commit(self, request_id: str | None, msg_id: str | None) -> None:
        raise NotImplementedError

    async def on_audio_clip(self, pcm: bytes, msg_id: str | None) -> None:
        """A recorded clip (session input format) that joins the user's next turn as it
        is, unheard by turn detection (the Realtime door's ``input_audio`` items)."""
        raise ProtocolError(BAD_REQUEST, "audio clips are not available in this mode")

    async def on_respond(
        self, text: str, context: list[Message] | None, *, store_answer: bool
    ) -> str:
        """Queue an out-of-band response: answer ``text`` from ``context`` (None: the
        stored history) without taking or storing the user's turn being collected; the
        answer is stored only with ``store_answer``. Returns its turn id."""
        raise ProtocolError(BAD_REQUEST, "out-of-band responses are not available in this mode")

    async def on_cancel(self, msg_id: str | None) -> None:
        raise NotImplementedError

    async def on_playback(self, response_id: str, played_ms: float) -> None:
        raise NotImplementedError

    async def on_tool_result(self, call_id: str, output: Any, msg_id: str | None) -> None:
        raise NotImplementedError

    async def reconfigure(self, old: SessionConfig) -> None:
        """The config changed (same mode)."""

    @property
    def busy(self) -> bool:
        """A response is in flight or a turn waits for one (a drain lets these finish)."""
        return False

    @property
    def responding(self) -> bool:
        """A response has started and its ``response.done`` is not sent yet."""
        return False

    def cut_response(self) -> None:
        """End the response in flight as interrupted (like a barge-in) and drop turns
        waiting for one: the server is going away (a drain's timeout)."""

    async def close(self) -> None:
        """Stop background work; called once."""


#: Builds a session's mode (a `Mode` subclass is one); the app maps mode names to these.
ModeFactory = Callable[[SessionPort], Mode]
