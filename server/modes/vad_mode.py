"""VAD mode: the server finds the user's turns and answers each with one provider call.

Audio runs through ``AudioIngest`` (decode, resample, frame, webrtcvad, turn
state machine). Text, frames and video attach to the turn in which they
arrive. Turns are answered one at a time, in order; speech that starts while a
reply streams interrupts it (barge-in).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from duplex.protocol import (
    BAD_REQUEST,
    PROVIDER_FAILED,
    RATE_LIMITED,
    TOO_LARGE,
    ErrorEvent,
    ImageFrame,
    Message,
    ProtocolError,
    ResponseDone,
    ResponseStarted,
    SessionConfig,
    SpeechStarted,
    SpeechStopped,
    StreamChunk,
    TextChunk,
    Transcript,
    TurnDetectionConfig,
    TurnEnded,
    VideoChunk,
    chunk_event,
    new_id,
)
from media.errors import MediaError
from server.media_inputs import FrameSource
from server.modes.audio_ingest import FRAME_MS, VAD_RATE, AudioIngest
from server.modes.base import Mode, SessionPort
from server.modes.echo_guard import EchoGuard, echo_aware
from server.providers.base import AudioClip, ProviderError
from server.reply_audio import Playback
from server.tools import ClientToolWaiters
from server.turn_runner import Turn, TurnRunner
from vad import turns as vt

MAX_TEXT_CHARS = 64_000


@dataclass
class _Active:
    runner: TurnRunner
    task: asyncio.Task[None] | None = None
    cancel_reason: str = "cancelled"
    playback: Playback = field(default_factory=Playback)


class VadMode(Mode):
    direct_audio = True

    def __init__(self, session: SessionPort) -> None:
        super().__init__(session)
        limits = session.limits
        self._turns: asyncio.Queue[Turn] = asyncio.Queue(limits.max_pending_turns)
        self._text: list[str] = []
        self._text_chars = 0
        self._frames = FrameSource(
            session.config.video,
            limits.max_image_pixels,
            session.emit_error,
            budget=session.decode_budget,
            decode_wait_s=limits.decode_wait_s,
        )
        self._ingest: AudioIngest | None = None
        # Audio clips for the next turn, and turns held unanswered (``respond: false``):
        # VAD-rate PCM, each bounded by ``max_turn_ms`` of audio.
        self._clips: list[bytes] = []
        self._held: list[Turn] = []
        self._echo: EchoGuard | None = None  # echo-aware barge-in, when on
        self._active: _Active | None = None
        self._responding = False  # from a turn's start to its answer stored
        self._ending = 0  # turns ended (announced, frames collected) but not queued yet
        self._done_due = False  # response.started sent, response.done not yet
        self._client_tools = ClientToolWaiters(limits.client_tool_timeout_s)
        self._worker: asyncio.Task[None] | None = session.spawn(self._work(), "turns")

    @property
    def busy(self) -> bool:
        return self._responding or self._ending > 0 or not self._turns.empty()

    @property
    def responding(self) -> bool:
        return self._done_due

    def cut_response(self) -> None:
        while not self._turns.empty():
            turn = self._turns.get_nowait()
            self.session.log.warning("turn %s dropped unanswered: shutting down", turn.turn_id)
        self._cancel_active("interrupted")

    # ---- input ----------------------------------------------------------------------

    async def on_text(self, chunk: TextChunk, msg_id: str | None) -> None:
        self._text_chars += len(chunk.text)
        if self._text_chars > MAX_TEXT_CHARS:
            self._text.clear()
            self._text_chars = 0
            raise ProtocolError(TOO_LARGE, f"turn text over {MAX_TEXT_CHARS} characters")
        self._text.append(chunk.text)
        if chunk.final:
            await self._end_turn(Turn(turn_id=new_id("turn"), request_id=chunk.request_id))

    async def on_audio(self, pcm: bytes, msg_id: str | None) -> None:
        rest = self.on_audio_nowait(pcm)
        if rest is not None:
            await rest

    def on_audio_nowait(self, pcm: bytes) -> Coroutine[Any, Any, None] | None:
        """Ingest without waiting. Most audio ends here; a turn event or an error comes
        back as a coroutine that must run before the next input."""
        if self._ingest is None:
            cfg = self.session.config
            self._ingest = AudioIngest(
                cfg.input_audio,
                cfg.turn_detection,
                idle_history_ms=self.session.limits.vad_idle_history_ms,
            )
            if echo_aware(cfg.input_audio) and not self._ingest.manual:
                if self._echo is None:
                    self._echo = EchoGuard(VAD_RATE, FRAME_MS)
                self._ingest.filter = self._echo.filter
            else:
                self._echo = None
        try:
            events = self._ingest.events(pcm)
        except MediaError as exc:
            return _raise(ProtocolError(exc.code, exc.message))
        if events:
            # Handled here as well unless something must wait: a full output queue, or
            # video whose due frames must be decoded before the turn is queued.
            if self._frames.has_video or self.session.output_room() <= len(events):
                ends = sum(isinstance(e, vt.TurnEnd) for e in events)
                self._ending += ends  # busy until queued (`_after_audio` counts them down)
                return self._after_audio(events, ends)
            for event in events:
                self._on_turn_event_nowait(event)
        self._check_barge_in()
        return None

    async def _after_audio(self, events: list[vt.TurnEvent], ends: int) -> None:
        try:
            for event in events:
                if isinstance(event, vt.TurnEnd):
                    ends -= 1
                    self._ending -= 1  # `_end_turn` counts it from here
                await self._on_turn_event(event)
        finally:
            self._ending -= ends
        self._check_barge_in()

    def _check_barge_in(self) -> None:
        if self._streaming() is not None and self._barge_in_due():
            self._interrupt()

    async def on_frame(self, frame: ImageFrame, msg_id: str | None) -> None:
        await self._frames.add_image(frame, speaking=self._speaking())

    async def on_video(self, chunk: VideoChunk, msg_id: str | None) -> None:
        await self._frames.add_video(chunk, speaking=self._speaking(), msg_id=msg_id)

    async def on_commit(self, request_id: str | None, msg_id: str | None) -> None:
        ended = self._ingest.commit() if self._ingest is not None else None
        turn = Turn(turn_id=new_id("turn"), request_id=request_id)
        hold = False
        if ended is not None:
            self._ending += 1  # busy from here: the turn has ended
            try:
                await self.session.emit(SpeechStopped(audio_end_ms=ended.end_ms))
            finally:
                self._ending -= 1
            turn = self._audio_turn(ended, request_id)
            hold = self._holding()
        elif not (self._text or self._frames.pending or self._held or self._clips):
            raise ProtocolError(
                BAD_REQUEST, "nothing to commit: no audio, text or frames since the last turn"
            )
        await self._end_turn(turn, hold=hold)

    async def on_audio_clip(self, pcm: bytes, msg_id: str | None) -> None:
        cfg = self.session.config
        ingest = AudioIngest(cfg.input_audio, TurnDetectionConfig(type="manual"))
        try:
            ingest.events(pcm)
        except MediaError as exc:
            raise ProtocolError(exc.code, exc.message) from None
        ended = ingest.commit()
        if ended is not None:
            limit = self._max_audio_bytes()
            self._clips.append(ended.pcm[-limit:])  # the latest part of one over the bound
            _bound(self._clips, limit, len)

    async def on_respond(
        self, text: str, context: list[Message] | None, *, store_answer: bool
    ) -> str:
        turn = Turn(
            turn_id=new_id("turn"),
            text=text,
            context=context,
            store_user=False,
            store_answer=store_answer,
        )
        self._put(turn)
        return turn.turn_id

    def _holding(self) -> bool:
        """Turns that end are held unanswered (``turn_detection.respond: false``)."""
        td = self.session.config.turn_detection
        return not td.respond and td.type == "vad"

    def _max_audio_bytes(self) -> int:
        return self.session.config.turn_detection.max_turn_ms * VAD_RATE * 2 // 1000

    async def on_cancel(self, msg_id: str | None) -> None:
        if self._streaming() is None:
            raise ProtocolError(BAD_REQUEST, "no response in progress")
        self._cancel_active("cancelled")

    async def on_playback(self, response_id: str, played_ms: float) -> None:
        active = self._active
        if active is not None and active.runner.response_id == response_id:
            active.playback.report(played_ms)
            if self._echo is not None:
                self._echo.played(played_ms)

    async def on_tool_result(self, call_id: str, output: Any, msg_id: str | None) -> None:
        self._client_tools.resolve(call_id, output)

    async def reconfigure(self, old: SessionConfig) -> None:
        new = self.session.config
        if new.input_audio != old.input_audio or new.turn_detection != old.turn_detection:
            self._ingest = None  # rebuilt on the next audio, with the new settings
        self._frames.reconfigure(new.video)

    async def close(self) -> None:
        self._frames.close()
        self._client_tools.cancel_all()
        self._worker = None  # once cancelled, its traceback would hold this mode

    # ---- turns ----------------------------------------------------------------------

    def _speaking(self) -> bool:
        return self._ingest is not None and self._ingest.detector.state == "speaking"

    def _barge_in_due(self) -> bool:
        td = self.session.config.turn_detection
        ingest = self._ingest
        if not (
            td.interrupt
            and td.type == "vad"
            and ingest is not None
            and ingest.detector.state in ("speaking", "stopping")
        ):
            return False
        speech = ingest.detector.speech_ms
        if self._echo is not None:  # the user's onset the echo hid, counted back
            speech += self._echo.suppressor.onset_credit_ms
        return speech >= td.min_barge_in_ms

    async def _on_turn_event(self, event: vt.TurnEvent) -> None:
        if isinstance(event, vt.TurnEnd):
            await self._end_turn(self._audio_turn(event, None), hold=self._holding())
        elif (message := self._event_message(event)) is not None:
            await self.session.emit(message)

    def _on_turn_event_nowait(self, event: vt.TurnEvent) -> None:
        """`_on_turn_event` when the output queue has room and no video is pending."""
        session = self.session
        if isinstance(event, vt.TurnEnd):
            turn = self._audio_turn(event, None)
            session.emit_nowait(_turn_ended(turn))
            try:
                self._queue_turn(turn, hold=self._holding())
            except ProtocolError as exc:
                session.emit_nowait(ErrorEvent(code=exc.code, message=exc.message))
        elif (message := self._event_message(event)) is not None:
            session.emit_nowait(message)

    def _event_message(self, event: vt.TurnEvent) -> SpeechStarted | SpeechStopped | None:
        match event:
            case vt.SpeechStart():
                return SpeechStarted(audio_start_ms=event.start_ms)
            case vt.SpeechEnd():
                return SpeechStopped(audio_end_ms=event.end_ms)
            case _:
                self.session.log.debug("speech too short, no turn: %s", event)
                return None

    def _audio_turn(self, ended: vt.TurnEnd, request_id: str | None) -> Turn:
        return Turn(
            turn_id=new_id("turn"),
            audio=AudioClip(ended.pcm, VAD_RATE),  # the s16le bytes as received
            request_id=request_id,
            audio_start_ms=ended.start_ms,
            audio_end_ms=ended.end_ms,
        )

    async def _end_turn(self, turn: Turn, *, hold: bool = False) -> None:
        """Close the turn being collected: announce it, attach its text and frames, queue it.

        ``turn.ended`` goes out first: collecting due video frames may wait for a decode.
        The turn counts as `busy` throughout (a drain waits for its answer).
        """
        self._ending += 1
        try:
            await self.session.emit(_turn_ended(turn))
            await self._frames.poll(speaking=False)
            self._queue_turn(turn, hold=hold)
        finally:
            self._ending -= 1

    def _queue_turn(self, turn: Turn, *, hold: bool = False) -> None:
        """Queue the turn for its answer with what was collected for it (text, frames,
        audio clips); ``hold``: keep it unanswered, for the next turn queued to take."""
        turn.text = "".join(self._text)
        self._text.clear()
        self._text_chars = 0
        turn.frames = self._frames.take()
        if self._clips:
            pcm = b"".join(self._clips) + (turn.audio.pcm if turn.audio is not None else b"")
            self._clips.clear()
            turn.audio = AudioClip(pcm, VAD_RATE)
        if hold:
            self._held.append(turn)
            _bound(self._held, self._max_audio_bytes(), _turn_audio_bytes)
            return
        if self._held:
            _take_held(turn, self._held)
            self._held.clear()
        self._put(turn)

    def _put(self, turn: Turn) -> None:
        try:
            self._turns.put_nowait(turn)
        except asyncio.QueueFull:
            raise ProtocolError(
                RATE_LIMITED, "too many turns waiting for an answer; this one was dropped"
            ) from None

    async def _work(self) -> None:
        while True:
            turn = await self._turns.get()
            self._responding = True
            try:
                await self._respond(turn)
            finally:
                self._responding = False
            del turn  # its audio (32 KB a second) would otherwise wait here for the next turn
            if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise asyncio.CancelledError  # swallowed below us: the session is closing

    async def _respond(self, turn: Turn) -> None:
        session = self.session
        provider = session.providers.get_unary(session.config.provider)
        if provider is None:  # checked at update; kept for safety
            await session.emit_error(BAD_REQUEST, f"unknown provider {session.config.provider!r}")
            return
        runner = TurnRunner(
            session,
            provider,
            turn,
            output_rate=session.config.output_audio.sample_rate,
            client_tool=self._client_tools,
            on_transcript=lambda text: session.emit(Transcript(turn_id=turn.turn_id, text=text)),
        )
        active = self._active = _Active(runner)
        self._done_due = True
        if self._echo is not None:
            self._echo.reply_started()
        await session.emit(
            ResponseStarted(
                response_id=runner.response_id, turn_id=turn.turn_id, request_id=turn.request_id
            )
        )
        active.task = asyncio.ensure_future(self._stream(runner))
        reason = "stop"
        try:
            try:
                await active.task
                reason = runner.finish_reason or "stop"
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    reason = "cancelled"  # the session is closing: keep what was said
                    raise
                reason = active.cancel_reason
            except ProviderError as exc:
                reason = "error"
                await session.emit_error(exc.code or PROVIDER_FAILED, exc.message, fatal=exc.fatal)
            if reason in ("interrupted", "cancelled") and self._echo is not None:
                self._echo.reply_cut()  # the client stops playing it
            if reason == "interrupted":
                # Stored once the client reports how much it played (or the grace ends).
                active.playback.cut()
                await session.emit(
                    chunk_event(StreamChunk(response_id=runner.response_id, interrupted=True))
                )
            else:
                await runner.record(reason)  # durable before response.done
            await session.emit(
                ResponseDone(
                    response_id=runner.response_id, finish_reason=reason, usage=runner.usage
                )
            )
            self._done_due = False
            if reason == "interrupted":
                await active.playback.heard_ms()
        finally:
            self._active = None
            self._done_due = False
            # Once (a no-op if stored above); a close waits for it, bounded, then re-raises.
            await runner.record(
                reason, active.playback.played_ms if reason == "interrupted" else None
            )

    async def _stream(self, runner: TurnRunner) -> None:
        async for chunk in runner.chunks():
            echo, media = self._echo, getattr(chunk, "media", None)
            if echo is not None and media is not None and media.mime_type == "audio/pcm":
                echo.reply_audio(media.data, media.sample_rate or VAD_RATE)
            await self.session.emit(chunk_event(chunk) if isinstance(chunk, StreamChunk) else chunk)

    def _cancel_active(self, reason: str) -> None:
        active = self._streaming()
        if active is not None and active.task is not None:
            active.cancel_reason = reason
            active.task.cancel()

    def _streaming(self) -> _Active | None:
        """The response whose stream is still running, if any."""
        active = self._active
        if active is not None and active.task is not None and not active.task.done():
            return active
        return None

    def _interrupt(self) -> None:
        active = self._streaming()
        if active is not None:
            self.session.log.info("barge-in: interrupting %s", active.runner.response_id)
            self._cancel_active("interrupted")


async def _raise(exc: Exception) -> None:
    raise exc


def _turn_audio_bytes(turn: Turn) -> int:
    return len(turn.audio.pcm) if turn.audio is not None else 0


def _bound(items: list[Any], limit: int, size: Any) -> None:
    """Drop the oldest of ``items`` (never the newest) while their size is over ``limit``."""
    total = sum(size(item) for item in items)
    while len(items) > 1 and total > limit:
        total -= size(items.pop(0))


def _take_held(turn: Turn, held: list[Turn]) -> None:
    """``turn`` takes the held turns before it: one user turn, in the order spoken."""
    pcm = b"".join(t.audio.pcm for t in held if t.audio is not None)
    if turn.audio is not None:
        pcm += turn.audio.pcm
    turn.audio = AudioClip(pcm, VAD_RATE) if pcm else None
    turn.text = " ".join(t for t in [*(h.text for h in held), turn.text] if t)
    turn.frames = [f for h in held for f in h.frames] + turn.frames


def _turn_ended(turn: Turn) -> TurnEnded:
    return TurnEnded(
        turn_id=turn.turn_id,
        request_id=turn.request_id,
        audio_start_ms=turn.audio_start_ms,
        audio_end_ms=turn.audio_end_ms,
    )
