"""One user turn against a unary provider: build the request, run tools, stream, record.

Shared by VAD mode and ``UnarySession`` so that a turn is answered and stored
the same way whichever door it came in by. While the answer streams, its text
is persisted in batches as stream events (readable after a crash); at the end
it is compacted into messages.

Durability order: the user's turn is stored before the provider is called (a crash
mid-answer keeps the question); the answer is stored by ``record``, which callers
await before they announce the end of the response.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass, field
from typing import Any, Protocol

from duplex.protocol import (
    ImageFrame,
    Message,
    SessionConfig,
    StreamChunk,
    ToolEvent,
    ToolOutput,
    new_id,
)
from server.idempotency import TurnLocks
from server.limits import SessionLimits
from server.providers.base import AudioClip, TurnRequest, UnaryProvider
from server.providers.catalog import ProviderCatalog
from server.reply_audio import ReplyAudio
from server.state.base import StateStore, StreamEvent
from server.tools import ClientTool, ToolRegistry, run_tool_loop, with_tool_messages


class TurnHost(Protocol):
    """What a turn needs from its session: a ``UnarySession`` is one, and so is the
    ``SessionPort`` a mode holds."""

    @property
    def id(self) -> str: ...
    @property
    def config(self) -> SessionConfig: ...
    @property
    def store(self) -> StateStore: ...
    @property
    def providers(self) -> ProviderCatalog: ...
    @property
    def tools(self) -> ToolRegistry: ...
    @property
    def limits(self) -> SessionLimits: ...
    @property
    def turn_locks(self) -> TurnLocks: ...
    def instructions(self) -> str: ...
    def messages(self) -> Awaitable[list[Message]]: ...


@dataclass
class Turn:
    turn_id: str
    text: str = ""
    audio: AudioClip | None = None
    frames: list[ImageFrame] = field(default_factory=list)
    request_id: str | None = None
    audio_start_ms: float | None = None
    audio_end_ms: float | None = None
    #: When the user's turn ended: its stored message's time, before any answer's.
    created_at: float = field(default_factory=time.time)
    #: The history the turn is answered from instead of the stored one (an out-of-band
    #: response's own context); None: the stored history.
    context: list[Message] | None = None
    #: Whether the user's turn and the answer join the stored history (an out-of-band
    #: response stores neither, or only its answer).
    store_user: bool = True
    store_answer: bool = True


class TurnRunner:
    """Streams one response and remembers what was sent, so it can be stored
    whole, or cut to what the user heard when it is interrupted.

    Always call ``record()`` after ``chunks()``, whatever happened: it stores the
    turn and releases the turn's ``request_id``. It runs once, shielded from the
    caller's cancellation (which it does not swallow) and bounded by the store's timeouts.
    """

    def __init__(
        self,
        session: TurnHost,
        provider: UnaryProvider,
        turn: Turn,
        *,
        response_id: str | None = None,
        output_rate: int | None = None,
        client_tool: ClientTool | None = None,
        on_transcript: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.session = session
        self.provider = provider
        self.turn = turn
        self.response_id = response_id or new_id("resp")
        self.audio = ReplyAudio(output_rate)
        self.client_tool = client_tool
        self.on_transcript = on_transcript
        self.hop_text: list[str] = []  # text of the current model call (after the last tools)
        self.tool_messages: list[Message] = []  # complete tool exchanges, then the answer
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.cached = False
        self._recording: asyncio.Future[None] | None = None
        self._user_stored = False
        self._exit = AsyncExitStack()
        self._unsaved: list[str] = []
        self._last_flush = time.monotonic()
        self._persisted_any = False

    async def request(self) -> TurnRequest:
        session = self.session
        return TurnRequest(
            session_id=session.id,
            turn_id=self.turn.turn_id,
            response_id=self.response_id,
            config=session.config,
            instructions=session.instructions(),
            history=await session.messages() if self.turn.context is None else self.turn.context,
            text=self.turn.text,
            audio=self.turn.audio,
            frames=list(self.turn.frames),
            tools=session.tools.merge_specs(session.config.tools),
        )

    async def chunks(self) -> AsyncIterator[StreamChunk | ToolEvent]:
        """The response's chunks and its typed tool events (``tool.execution``, ...)."""
        session = self.session
        if self.turn.request_id:
            await self._exit.enter_async_context(
                session.turn_locks.hold(session.id, self.turn.request_id)
            )
            cached = await self._stored_answer(self.turn.request_id)
            if cached is not None:
                self.cached = True
                self.finish_reason = cached.metadata.get("finish_reason", "stop")
                yield StreamChunk(
                    response_id=self.response_id,
                    delta=cached.content,
                    metadata={
                        "cached": True,
                        "original_response_id": cached.metadata.get("response_id"),
                    },
                )
                yield StreamChunk(response_id=self.response_id, finish_reason=self.finish_reason)  # type: ignore[arg-type]
                return
        catalog = session.providers
        config = session.config
        if config.stt and self.turn.audio is not None and catalog.stt is not None:
            transcript = await catalog.stt.transcribe(self.turn.audio)
            self.turn.text = " ".join(part for part in (self.turn.text, transcript) if part)
            if self.on_transcript is not None:
                await self.on_transcript(transcript)
        request = await self.request()  # history as it was before this turn
        await self._store_user()
        self._last_flush = time.monotonic()  # batches count from the answer's start
        stream = run_tool_loop(
            lambda extra: self.provider.stream(with_tool_messages(request, extra)),
            session.tools,
            client_tool=self.client_tool,
            hop_limit=session.limits.tool_hop_limit,
            new_messages=self.tool_messages,
            turn_id=self.turn.turn_id,
        )
        if config.tts and catalog.tts is not None:
            stream = catalog.tts(config.voice).speak_stream(stream)
        async with aclosing(stream):
            async for chunk in stream:
                if not isinstance(chunk, StreamChunk):
                    chunk.response_id = self.response_id
                    if isinstance(chunk, ToolOutput):
                        await self._persist_tool_output(chunk)
                    yield chunk
                    continue
                if not self._track(chunk):
                    continue
                if chunk.delta:
                    await self._persist(chunk)
                elif self._unsaved:
                    await self._flush()  # the text is stored before its audio plays
                yield chunk
        await self._flush()

    def _track(self, chunk: StreamChunk) -> bool:
        """Bookkeeping for one outgoing chunk (in place): response id, audio rate, ending.
        False when nothing is left to send (audio the resampler is still holding).

        Synchronous: an audio chunk, most of a reply, costs no coroutine; only text
        goes on to ``_persist``.
        """
        if chunk.response_id != self.response_id:
            chunk.response_id = self.response_id
        media = chunk.media
        if media is not None and media.mime_type == "audio/pcm":
            media = chunk.media = self.audio.convert(media)
            if media is None and chunk.model_dump(exclude_none=True).keys() <= {"response_id"}:
                return False
        if chunk.finish_reason:
            self.finish_reason = chunk.finish_reason
            self.usage = (chunk.metadata or {}).get("usage") or None
        return True

    async def _persist(self, chunk: StreamChunk) -> None:
        """The answer's text so far, as stream events."""
        if chunk.delta:
            self.hop_text.append(chunk.delta)
            await self._persist_delta(chunk.delta)

    async def _persist_tool_output(self, event: ToolOutput) -> None:
        """A tool result, as a stream event; the text heard restarts with the next hop."""
        self.hop_text.clear()
        await self._persist_event(
            "tool_result", event.model_dump(include={"call_id", "name", "output"})
        )

    async def _stored_answer(self, request_id: str) -> Message | None:
        """The stored answer to ``request_id``; notes whether its question is stored (a
        retry of a turn that never finished), so it is not stored twice."""
        for message in reversed(await self.session.messages()):
            if message.metadata.get("request_id") != request_id:
                continue
            if message.role == "assistant":
                return message
            if message.role == "user":
                self._user_stored = True
        return None

    # ---- persistence while streaming --------------------------------------------------

    async def _persist_delta(self, delta: str) -> None:
        self._unsaved.append(delta)
        limits = self.session.limits
        due = (time.monotonic() - self._last_flush) * 1000 >= limits.persist_interval_ms
        if due or sum(map(len, self._unsaved)) >= limits.persist_min_chars:
            await self._flush()

    async def _flush(self) -> None:
        self._last_flush = time.monotonic()
        if self._unsaved:
            text, self._unsaved = "".join(self._unsaved), []
            await self._persist_event("delta", {"text": text})

    async def _persist_event(self, kind: str, data: dict[str, Any]) -> None:
        if not self.turn.store_answer:
            return  # nothing to recover: the answer is not stored
        self._persisted_any = True
        await self.session.store.append_events(
            self.session.id, [StreamEvent(self.response_id, kind, data)]
        )

    # ---- recording ----------------------------------------------------------------------

    async def record(self, finish_reason: str, played_ms: float | None = None) -> None:
        """Store the user's turn (unless already stored) and the answer as far as it went,
        once, then release the ``request_id``.

        The work runs in its own task: the caller's cancellation interrupts only the
        wait (and is re-raised), never the write; later calls wait for the same work.
        """
        if self._recording is None:
            self._recording = asyncio.ensure_future(self._record(finish_reason, played_ms))
        await asyncio.shield(self._recording)

    async def _record(self, finish_reason: str, played_ms: float | None) -> None:
        try:
            if not self.cached:
                await self._store(finish_reason, played_ms)
        finally:
            await self._exit.aclose()

    def _user_message(self) -> Message:
        turn = self.turn
        user_meta: dict[str, Any] = {"turn_id": turn.turn_id}
        if turn.audio is not None:
            user_meta["audio_ms"] = round(turn.audio.duration_ms, 1)
        if turn.frames:
            user_meta["frames"] = len(turn.frames)
        if turn.request_id:
            user_meta["request_id"] = turn.request_id
        # When the turn ended, even if stored only with its answer: before the answer's time.
        return Message(
            role="user", content=turn.text, created_at=turn.created_at, metadata=user_meta
        )

    async def _store_user(self) -> None:
        if not self._user_stored and self.turn.store_user:
            self._user_stored = True
            await self.session.store.append_messages(self.session.id, [self._user_message()])

    async def _store(self, finish_reason: str, played_ms: float | None) -> None:
        turn = self.turn
        meta: dict[str, Any] = {"response_id": self.response_id, "finish_reason": finish_reason}
        if self.audio.ms_sent:
            meta["audio_ms"] = round(self.audio.ms_sent, 1)
        if played_ms is not None:
            meta["played_ms"] = round(min(played_ms, self.audio.ms_sent), 1)
        if turn.request_id:
            meta["request_id"] = turn.request_id
        if self.usage:
            meta["usage"] = self.usage
        # Complete tool exchanges go first; the loop's own final answer is replaced by
        # ours, which knows how far the answer really went.
        messages: list[Message] = []
        if turn.store_answer:
            messages += [
                m for m in self.tool_messages if m.role == "tool" or "tool_calls" in m.metadata
            ]
            messages.append(
                Message(role="assistant", content=self.heard_text(played_ms), metadata=meta)
            )
        if not self._user_stored and turn.store_user:  # ended before the provider was called
            self._user_stored = True
            messages.insert(0, self._user_message())
        store = self.session.store
        if messages:
            await store.append_messages(self.session.id, messages)
        if self._persisted_any:
            await store.drop_events(self.session.id, self.response_id)

    def heard_text(self, played_ms: float | None) -> str:
        """The text of the last model call; when its audio was cut short, the share heard."""
        return self.audio.heard_text("".join(self.hop_text), played_ms)
