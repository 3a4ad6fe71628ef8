"""ASM (Audio Streaming Model) mode: one long realtime provider session; input
forwarded, output mapped back.

The provider session opens on the first input and closes with the duplex
session. Audio is decoded and resampled by the same ingest path as VAD mode;
our webrtcvad drives turns only when ``turn_detection.provider_vad`` is
"duplex" (or "none" with manual commits), otherwise the provider detects turns.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import numpy as np

from duplex.protocol import (
    BAD_REQUEST,
    PROVIDER_FAILED,
    UNSUPPORTED_MEDIA,
    ErrorEvent,
    ImageFrame,
    Message,
    ProtocolError,
    ProviderReconnect,
    ResponseDone,
    ResponseStarted,
    SessionConfig,
    SpeechStarted,
    SpeechStopped,
    StreamChunk,
    TextChunk,
    ToolCall,
    ToolCancelled,
    ToolExecution,
    ToolOutput,
    Transcript,
    TurnEnded,
    VideoChunk,
    WarningEvent,
    chunk_event,
    new_id,
)
from media.audio import StreamResampler
from media.errors import MediaError
from server.media_inputs import FrameSource
from server.modes.audio_ingest import VAD_RATE, AudioIngest
from server.modes.base import Mode, SessionPort
from server.providers.base import (
    Capabilities,
    ProviderError,
    RealtimeSession,
    RealtimeSetup,
)
from server.reply_audio import Playback, ReplyAudio
from server.tools import ClientToolWaiters, RunningCalls, execute_tool_calls
from vad import turns as vt


class _Response:
    def __init__(self, response_id: str, out_rate: int) -> None:
        self.response_id = response_id
        self.text: list[str] = []
        self.audio = ReplyAudio(out_rate)
        self.playback = Playback()
        self.barged_in = False  # our VAD cancelled it because the user spoke
        self.cut = False  # the client has been told to stop playing it
        self.calls: list[ToolCall] = []  # one round, run when the response is done

    def interrupt(self) -> bool:
        """Mark the reply cut now; False if it already was (one ``interrupted`` chunk)."""
        if self.cut:
            return False
        self.cut = True
        self.playback.cut()
        return True


class AsmMode(Mode):
    def __init__(self, session: SessionPort) -> None:
        super().__init__(session)
        self._rt: RealtimeSession | None = None
        self._connecting = asyncio.Lock()
        self._ingest: AudioIngest | None = None
        self._to_provider: StreamResampler | None = None
        self._provider_rate = VAD_RATE
        self._caps = Capabilities()
        self._frames = FrameSource(
            session.config.video,
            session.limits.max_image_pixels,
            session.emit_error,
            forward=self._send_image,
            budget=session.decode_budget,
            decode_wait_s=session.limits.decode_wait_s,
        )
        self._text: list[str] = []
        self._responses: dict[str, _Response] = {}
        self._current: _Response | None = None
        self._client_tools = ClientToolWaiters(session.limits.client_tool_timeout_s)
        self._server_calls = RunningCalls()
        self._withdrawn: set[str] = set()  # calls of running rounds the provider cancelled
        self._round_ids: set[str] = set()  # calls of the rounds running now
        self._hops = 0  # rounds of tools since the user's last turn

    @property
    def busy(self) -> bool:
        return self._current is not None

    @property
    def responding(self) -> bool:
        return self._current is not None

    def cut_response(self) -> None:
        current = self._current
        if current is not None and self._rt is not None:
            current.barged_in = True  # ends as "interrupted", stored cut like a barge-in
            self.session.spawn(self._rt.cancel_response(), "drain-cut")

    # ---- provider session -----------------------------------------------------------

    async def _provider(self) -> RealtimeSession:
        if self._rt is not None:
            return self._rt
        async with self._connecting:
            if self._rt is None:
                session = self.session
                provider = session.providers.get_realtime(session.config.provider)
                if provider is None:
                    raise ProtocolError(
                        BAD_REQUEST, f"unknown provider {session.config.provider!r}"
                    )
                setup = self._setup()
                try:
                    self._rt = await provider.connect(setup)
                except ProviderError as exc:
                    raise ProtocolError(exc.code, exc.message, fatal=exc.fatal) from None
                self._provider_rate = provider.input_sample_rate
                self._caps = provider.capabilities
                session.spawn(self._pump(self._rt), "provider-events")
        return self._rt

    def _setup(self) -> RealtimeSetup:
        session = self.session
        return RealtimeSetup(
            session_id=session.id,
            config=session.config,
            instructions=session.instructions(),
            tools=session.tools.merge_specs(session.config.tools),
            history=session.messages,
        )

    async def _pump(self, rt: RealtimeSession) -> None:
        async for event in rt.events():
            await self._on_provider_event(event)

    async def _on_provider_event(self, event: Any) -> None:
        session = self.session
        match event:
            case ResponseStarted():
                self._current = self._response(event.response_id)
                await session.emit(event)
            case StreamChunk():
                await self._on_chunk(event)
            case ResponseDone():
                await self._on_done(event)
            case SpeechStarted() | SpeechStopped() | TurnEnded():
                if not isinstance(event, SpeechStopped):
                    self._hops = 0  # the user speaks: a new turn
                await session.emit(event)
            case ToolCancelled():
                # Calls still running are stopped (server tools) or no longer waited for
                # (client tools); their outputs do not go back to the provider.
                ids = [i for i in event.call_ids if i in self._round_ids]
                self._withdrawn.update(ids)
                stopped = self._server_calls.cancel(ids)
                self._client_tools.withdraw(event.call_ids)
                await session.emit(event.model_copy(update={"stopped": stopped}))
            case ProviderReconnect():
                await session.emit(event)
            case Transcript():
                await session.emit(event)
                if event.final and event.text:
                    await session.store.append_messages(
                        session.id,
                        [
                            Message(
                                role="user", content=event.text, metadata={"source": "transcript"}
                            )
                        ],
                    )
            case ErrorEvent():
                await session.emit_error(event.code, event.message, fatal=event.fatal)

    def _response(self, response_id: str) -> _Response:
        """The response's state, made on its first event (not built per chunk)."""
        response = self._responses.get(response_id)
        if response is None:
            out_rate = self.session.config.output_audio.sample_rate
            response = self._responses[response_id] = _Response(response_id, out_rate)
        return response

    async def _on_chunk(self, chunk: StreamChunk) -> None:
        response = self._response(chunk.response_id)
        if chunk.interrupted:
            response.interrupt()
        if chunk.media is not None and chunk.media.mime_type == "audio/pcm":
            media = response.audio.convert(chunk.media)
            if media is None:
                return  # the resampler is still filling
            chunk = chunk.model_copy(update={"media": media})
        if chunk.delta:
            response.text.append(chunk.delta)
        if chunk.tool_calls:
            # One round is every call of the response: it runs when the response is done.
            response.calls.extend(chunk.tool_calls)
            chunk = chunk.model_copy(update={"tool_calls": None})
            if chunk.model_dump(exclude_none=True).keys() <= {"response_id"}:
                return
        await self.session.emit(chunk_event(chunk))

    async def _start_tools(self, response_id: str, calls: list[ToolCall]) -> str | None:
        """One round of tools through the same executor as VAD mode, or, past
        ``tool_hop_limit`` rounds in the user's turn, none (then ``tool_limit_reached``).

        What the client is told before the calls run (its own calls, then
        ``tool.execution``) goes out now, inside the calling response; the calls
        run in a task, and their outputs go to the client, then to the provider.
        Returns the finish reason that replaces ``tool_calls``, if any.
        """
        limit = self.session.limits.tool_hop_limit
        if self._hops >= limit:
            await self._decline_tools(response_id, calls, limit)
            return "tool_limit_reached"
        self._hops += 1
        self._round_ids.update(c.id for c in calls)
        events = execute_tool_calls(
            calls,
            self.session.tools,
            self._client_tools,
            hop=self._hops,
            response_id=response_id,
            running=self._server_calls,
        )
        async for event in events:
            await self._emit_tool_event(event)
            if isinstance(event, ToolExecution):
                break  # the generator is not closed: _finish_tools goes on with it
        self.session.spawn(self._finish_tools(calls, events), "tools")
        return None

    async def _decline_tools(self, response_id: str, calls: list[ToolCall], limit: int) -> None:
        """As VAD mode at the hop limit: the calls are not run, a ``warning`` says so. The
        provider gets an output per call saying why, and is not asked to answer it
        (see "Tools" in docs/providers.md)."""
        names = [c.name for c in calls]
        message = f"tool hop limit ({limit}) reached; calls not run: {names}"
        self.session.log.warning("%s", message)
        await self.session.emit(
            WarningEvent(
                response_id=response_id, code="tool_limit_reached", message=message, calls=names
            )
        )
        output = json.dumps({"error": f"tool hop limit ({limit}) reached; call not run"})
        outputs = [ToolOutput(call_id=c.id, name=c.name, output=output) for c in calls]
        try:
            rt = await self._provider()
            await rt.send_tool_results(outputs, respond=False)
        except (ProviderError, ProtocolError) as exc:
            await self.session.emit_error(exc.code, exc.message)

    async def _finish_tools(self, calls: list[ToolCall], events: AsyncIterator[Any]) -> None:
        outputs: list[ToolOutput] = []
        try:
            async with aclosing(events):  # type: ignore[type-var]
                async for event in events:
                    if isinstance(event, ToolOutput):
                        outputs.append(event)
                    await self._emit_tool_event(event)
            # Withdrawn calls want no answer; the others are answered together.
            outputs = [o for o in outputs if o.call_id not in self._withdrawn]
            if outputs:
                rt = await self._provider()
                await rt.send_tool_results(outputs)
        finally:
            for call in calls:
                self._round_ids.discard(call.id)
                self._withdrawn.discard(call.id)

    async def _emit_tool_event(self, event: Any) -> None:
        await self.session.emit(chunk_event(event) if isinstance(event, StreamChunk) else event)

    async def _on_done(self, event: ResponseDone) -> None:
        """End a reply as VAD mode does: ``interrupted`` chunk first on a barge-in; an
        interrupted or cancelled reply is truncated upstream and stored as far as heard."""
        response = self._response(event.response_id)
        if self._current is response:
            self._current = None
        reason = event.finish_reason
        if reason == "cancelled" and response.barged_in:
            reason = "interrupted"
        if response.calls:
            calls, response.calls = response.calls, []
            limited = await self._start_tools(event.response_id, calls)
            if limited is not None and reason not in ("interrupted", "cancelled"):
                reason = limited
        if reason == "interrupted" and response.interrupt():
            await self.session.emit(
                chunk_event(StreamChunk(response_id=event.response_id, interrupted=True))
            )
        elif reason == "cancelled":
            response.interrupt()  # the client asked: its next report says what it heard
        if reason != event.finish_reason:
            event = event.model_copy(update={"finish_reason": reason})
        if reason in ("interrupted", "cancelled"):
            await self.session.emit(event)
            self.session.spawn(self._finish_cut(response, reason), "cut-reply")
        else:
            await self._record(response, reason, None)  # durable before response.done
            await self.session.emit(event)

    async def _finish_cut(self, response: _Response, reason: str) -> None:
        """Wait (bounded) for the position heard, truncate the provider's copy there, store."""
        try:
            played_ms = await response.playback.heard_ms()
            if played_ms is not None and self._rt is not None and self._caps.can_truncate:
                await self._rt.truncate(response.response_id, played_ms)
        except ProviderError as exc:
            await self.session.emit_error(exc.code, exc.message, fatal=exc.fatal)
        finally:  # also when the session closes meanwhile: the last position known
            await self._record(response, reason, response.playback.played_ms)

    async def _record(self, response: _Response, reason: str, played_ms: float | None) -> None:
        self._responses.pop(response.response_id, None)
        meta: dict[str, Any] = {"response_id": response.response_id, "finish_reason": reason}
        audio = response.audio
        if audio.ms_sent:
            meta["audio_ms"] = round(audio.ms_sent, 1)
        if played_ms is not None:
            meta["played_ms"] = round(min(played_ms, audio.ms_sent), 1)
        text = audio.heard_text("".join(response.text), played_ms)
        await self.session.store.append_messages(
            self.session.id, [Message(role="assistant", content=text, metadata=meta)]
        )

    # ---- input ----------------------------------------------------------------------

    async def on_audio(self, pcm: bytes, msg_id: str | None) -> None:
        rt = await self._provider()
        if self._ingest is None:
            cfg = self.session.config
            self._ingest = AudioIngest(
                cfg.input_audio,
                cfg.turn_detection,
                idle_history_ms=self.session.limits.vad_idle_history_ms,
            )
            self._to_provider = (
                StreamResampler(VAD_RATE, 1, self._provider_rate, 1)
                if self._provider_rate != VAD_RATE
                else None
            )
        own = self.session.config.turn_detection.provider_vad == "duplex"
        try:
            result = self._ingest.push(pcm, detect=own)
        except MediaError as exc:
            raise ProtocolError(exc.code, exc.message) from None
        if result.pcm:
            pcm = np.frombuffer(result.pcm, np.int16)
            if self._to_provider is not None:
                pcm = self._to_provider.push(pcm)
            await rt.send_audio(pcm.astype("<i2").tobytes())
        for event in result.events:
            await self._on_own_turn_event(rt, event)

    async def _on_own_turn_event(self, rt: RealtimeSession, event: vt.TurnEvent) -> None:
        session = self.session
        match event:
            case vt.SpeechStart():
                await session.emit(SpeechStarted(audio_start_ms=event.start_ms))
                if self._current is not None and session.config.turn_detection.interrupt:
                    self._current.barged_in = True
                    await rt.cancel_response()
            case vt.SpeechEnd():
                await session.emit(SpeechStopped(audio_end_ms=event.end_ms))
            case vt.TurnEnd():
                self._hops = 0
                await session.emit(
                    TurnEnded(
                        turn_id=new_id("turn"),
                        audio_start_ms=event.start_ms,
                        audio_end_ms=event.end_ms,
                    )
                )
                await rt.commit()

    async def on_text(self, chunk: TextChunk, msg_id: str | None) -> None:
        self._text.append(chunk.text)
        if chunk.final:
            text = "".join(self._text)
            self._text.clear()
            self._hops = 0
            rt = await self._provider()
            await self.session.store.append_messages(
                self.session.id, [Message(role="user", content=text)]
            )
            await rt.send_text(text)

    async def _send_image(self, frame: ImageFrame) -> None:
        rt = await self._provider()
        await rt.send_image(frame)

    async def on_frame(self, frame: ImageFrame, msg_id: str | None) -> None:
        self._check_accepts("images", (await self._connected()).images)
        await self._frames.add_image(frame, speaking=self._speaking())

    async def on_video(self, chunk: VideoChunk, msg_id: str | None) -> None:
        self._check_accepts("video", (await self._connected()).video)
        await self._frames.add_video(chunk, speaking=self._speaking(), msg_id=msg_id)

    async def _connected(self) -> Capabilities:
        await self._provider()
        return self._caps

    def _check_accepts(self, what: str, accepted: bool) -> None:
        if not accepted:
            raise ProtocolError(
                UNSUPPORTED_MEDIA, f"provider {self.session.config.provider!r} takes no {what}"
            )

    def _speaking(self) -> bool:
        return self._ingest is not None and self._ingest.detector.state == "speaking"

    async def on_commit(self, request_id: str | None, msg_id: str | None) -> None:
        rt = await self._provider()
        if self._ingest is not None and self._ingest.manual:
            self._ingest.commit()  # our copy of the turn's audio is not needed
        self._hops = 0
        await rt.commit()

    async def on_cancel(self, msg_id: str | None) -> None:
        if self._current is None:
            raise ProtocolError(BAD_REQUEST, "no response in progress")
        rt = await self._provider()
        await rt.cancel_response()

    async def on_playback(self, response_id: str, played_ms: float) -> None:
        """Progress only: the provider's copy is truncated once, when a reply is cut."""
        response = self._responses.get(response_id)
        if response is not None:
            response.playback.report(played_ms)

    async def on_tool_result(self, call_id: str, output: Any, msg_id: str | None) -> None:
        self._client_tools.resolve(call_id, output)

    async def reconfigure(self, old: SessionConfig) -> None:
        new = self.session.config
        if new.input_audio != old.input_audio or new.turn_detection != old.turn_detection:
            self._ingest = None
        self._frames.reconfigure(new.video)
        if self._rt is None:
            return  # the provider session opens with the new settings on the next input
        if new.provider != old.provider:
            await self._close_provider()  # another provider: a new session on the next input
            return
        try:
            # Live where the provider can, else it reopens (resumed or re-seeded).
            await self._rt.reconfigure(self._setup())
        except ProviderError as exc:
            raise ProtocolError(exc.code, exc.message) from None

    async def _close_provider(self) -> None:
        rt, self._rt = self._rt, None
        if rt is not None:
            try:
                await rt.close()
            except ProviderError as exc:
                await self.session.emit_error(PROVIDER_FAILED, exc.message)

    async def close(self) -> None:
        self._frames.close()
        self._client_tools.cancel_all()
        await self._close_provider()
