"""Provider interfaces: what the modes call, what each model backend implements.

Two shapes, because the products differ: a *unary* provider answers one turn
per call (an LLM over HTTP, the echo provider), a *realtime* provider holds one
long streaming session that takes input as it comes (OpenAI Realtime, Gemini
Live). Providers know the protocol types only, never the session or socket.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from duplex.protocol import (
    ErrorEvent,
    ImageFrame,
    Message,
    ProviderReconnect,
    ResponseDone,
    ResponseStarted,
    SessionConfig,
    SpeechStarted,
    SpeechStopped,
    StreamChunk,
    ToolCancelled,
    ToolOutput,
    ToolSpec,
    Transcript,
)


@asynccontextmanager
async def closing_stream(iterator: AsyncIterator[Any]) -> AsyncIterator[AsyncIterator[Any]]:
    """Like ``contextlib.aclosing`` but also for iterators without ``aclose``.

    Closing the upstream generator is what ends its HTTP request at once, even
    when we stop between two of its chunks.
    """
    try:
        yield iterator
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()


class ProviderError(Exception):
    """A provider failure, reported to the client as ``error`` 502 (or the code given)."""

    def __init__(
        self,
        message: str,
        *,
        code: int = 502,
        upstream_status: int | None = None,
        upstream_code: str | None = None,
        retry_after: float | None = None,
        fatal: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.upstream_status = upstream_status
        self.upstream_code = upstream_code
        self.retry_after = retry_after
        self.fatal = fatal


@dataclass(frozen=True, slots=True)
class AudioClip:
    """Mono PCM s16le audio at ``sample_rate``."""

    pcm: bytes
    sample_rate: int

    @property
    def duration_ms(self) -> float:
        return len(self.pcm) / 2 / self.sample_rate * 1000.0


@dataclass
class TurnRequest:
    """Everything a unary provider needs to answer one user turn."""

    session_id: str
    turn_id: str
    response_id: str
    config: SessionConfig
    instructions: str  # with {{variables}} substituted
    history: list[Message]  # earlier messages, oldest first (tool messages included)
    text: str = ""
    audio: AudioClip | None = None
    frames: list[ImageFrame] = field(default_factory=list)
    tools: list[ToolSpec] = field(default_factory=list)


class UnaryProvider(ABC):
    """One streamed call per turn."""

    @abstractmethod
    def stream(self, request: TurnRequest) -> AsyncIterator[StreamChunk]:
        """Yield the reply as StreamChunks; the last carries ``finish_reason``.

        Cancelling the consuming task must stop the upstream call promptly.
        Failures raise ProviderError.
        """

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release shared resources (HTTP pools)."""


#: What a realtime session yields: output chunks plus the lifecycle it detected.
RealtimeEvent = (
    StreamChunk
    | ResponseStarted
    | ResponseDone
    | SpeechStarted
    | SpeechStopped
    | Transcript
    | ToolCancelled
    | ProviderReconnect
    | ErrorEvent
)


@dataclass
class RealtimeSetup:
    """How to open a long streaming session."""

    session_id: str
    config: SessionConfig
    instructions: str
    tools: list[ToolSpec]
    options: dict[str, Any] = field(default_factory=dict)
    #: The stored conversation, oldest first: a provider that must open a new
    #: upstream session re-seeds it from here.
    history: Callable[[], Awaitable[list[Message]]] | None = None


class RealtimeSession(ABC):
    """One long provider session: input forwarded as it comes, events read back."""

    @abstractmethod
    async def send_audio(self, pcm: bytes) -> None:
        """Mono PCM s16le at the provider's ``input_sample_rate``."""

    @abstractmethod
    async def send_image(self, frame: ImageFrame) -> None: ...

    @abstractmethod
    async def send_text(self, text: str) -> None:
        """A complete user text turn; the provider answers it."""

    @abstractmethod
    async def commit(self) -> None:
        """End the user's audio turn now (when our VAD or the client decides turns)."""

    @abstractmethod
    async def cancel_response(self) -> None: ...

    @abstractmethod
    async def truncate(self, response_id: str, audio_end_ms: float) -> None:
        """The user heard only ``audio_end_ms`` of that response's audio."""

    @abstractmethod
    async def send_tool_results(self, outputs: list[ToolOutput], *, respond: bool = True) -> None:
        """The outputs of one round of calls, in one go.

        ``respond=False``: the calls will not be run (the hop limit was reached); the
        outputs only keep the model's conversation whole, and the model must not
        answer them within the user's turn (as far as the protocol allows).
        """

    async def send_tool_result(self, call_id: str, name: str, output: str) -> None:
        """One call's output (the model answers it)."""
        await self.send_tool_results([ToolOutput(call_id=call_id, name=name, output=output)])

    @abstractmethod
    async def reconfigure(self, setup: RealtimeSetup) -> None:
        """Apply changed session settings and return once they are in effect.

        Raises ProviderError (code 400) for a change this provider cannot make
        mid-session; the caller must then keep the old settings.
        """

    @abstractmethod
    def events(self) -> AsyncIterator[RealtimeEvent]:
        """Provider output, mapped to protocol types, until the session closes."""

    @abstractmethod
    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a realtime provider really does, so the mode need not guess.

    ``can_truncate``: ``truncate`` cuts the provider's copy of a reply to what was
    heard (else the model keeps the whole reply). ``can_cancel``: the service
    stops generating on ``cancel_response`` (else the provider only drops the
    rest of the reply). ``own_turn_detection``: the service finds turns itself.
    ``images`` / ``video``: ``send_image`` accepts still images / frames of a
    video. ``can_resume``: a lost connection resumes the same upstream session.
    ``live_config``: settings can change without a new upstream connection.
    """

    can_truncate: bool = False
    can_cancel: bool = False
    own_turn_detection: bool = False
    images: bool = False
    video: bool = False
    can_resume: bool = False
    live_config: bool = False


class RealtimeProvider(ABC):
    #: The rate the mode resamples input audio to before ``send_audio``.
    input_sample_rate: int = 16000
    capabilities: Capabilities = Capabilities()

    @abstractmethod
    async def connect(self, setup: RealtimeSetup) -> RealtimeSession: ...
