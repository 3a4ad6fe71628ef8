"""ASM mode: one long realtime provider session; input forwarded, output mapped back.

The provider session opens on the first input and closes with the duplex
session. Audio is decoded and resampled by the same ingest path as VAD mode;
our webrtcvad drives turns only when ``turn_detection.provider_vad`` is
"duplex" (or "none" with manual commits), otherwise the provider detects turns.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np

from duplex.protocol import (
    BAD_REQUEST,
    PROVIDER_FAILED,
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
    ToolCall,
    Transcript,
    TurnEnded,
    VideoChunk,
    chunk_event,
    new_id,
)
from media.audio import StreamResampler
from media.errors import MediaError
from server.media_inputs import FrameSource
from server.modes.audio_ingest import VAD_RATE, AudioIngest
from server.modes.base import Mode, SessionPort
from server.providers.base import ProviderError, RealtimeSession, RealtimeSetup
from server.reply_audio import ReplyAudio
from vad import turns as vt


class _Response:
    def __init__(self, response_id: str, out_rate: int) -> None:
        self.response_id = response_id
        self.text: list[str] = []
        self.audio = ReplyAudio(out_rate)
        self.played_ms: float | None = None


class AsmMode(Mode):
    def __init__(self, session: SessionPort) -> None:
        super().__init__(session)
        self._rt: RealtimeSession | None = None
        self._connecting = asyncio.Lock()
        self._ingest: AudioIngest | None = None
        self._to_provider: StreamResampler | None = None
        self._provider_rate = VAD_RATE
        self._frames = FrameSource(
            session.config.video,
            session.limits.max_image_pixels,
            session.emit_error,
            forward=self._send_image,
        )
        self._text: list[str] = []
        self._responses: dict[str, _Response] = {}
        self._current: _Response | None = None
        self._client_calls: dict[str, ToolCall] = {}

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
                setup = RealtimeSetup(
                    session_id=session.id,
                    config=session.config,
                    instructions=session.instructions(),
                    tools=session.tools.merge_specs(session.config.tools),
                )
                try:
                    self._rt = await provider.connect(setup)
                except ProviderError as exc:
                    raise ProtocolError(exc.code, exc.message, fatal=exc.fatal) from None
                self._provider_rate = provider.input_sample_rate
                session.spawn(self._pump(self._rt), "provider-events")
        return self._rt

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
                await session.emit(event)
                await self._record(event.response_id, event.finish_reason)
            case SpeechStarted() | SpeechStopped() | TurnEnded():
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
        if chunk.media is not None and chunk.media.mime_type == "audio/pcm":
            media = response.audio.convert(chunk.media)
            if media is None:
                return  # the resampler is still filling
            chunk = chunk.model_copy(update={"media": media})
        if chunk.delta:
            response.text.append(chunk.delta)
        await self.session.emit(chunk_event(chunk))
        if chunk.tool_calls:
            await self._run_tools(chunk.tool_calls)

    async def _run_tools(self, calls: list[ToolCall]) -> None:
        registry = self.session.tools
        server_calls = [c for c in calls if c.name in registry]
        for call in calls:
            if call.name not in registry:
                self._client_calls[call.id] = call  # the client answers with tool.result
        if server_calls:
            self.session.spawn(self._run_server_tools(server_calls), "tools")

    async def _run_server_tools(self, calls: list[ToolCall]) -> None:
        registry = self.session.tools
        await self.session.emit(
            chunk_event(
                StreamChunk(metadata={"kind": "tool_execution", "calls": [c.name for c in calls]})
            )
        )
        outputs = await asyncio.gather(*(registry.run(c) for c in calls))
        rt = await self._provider()
        for call, output in zip(calls, outputs, strict=True):
            await rt.send_tool_result(call.id, call.name, output)

    async def _record(self, response_id: str, finish_reason: str) -> None:
        response = self._responses.pop(response_id, None)
        if self._current is response:
            self._current = None
        if response is None:
            return
        meta: dict[str, Any] = {"response_id": response_id, "finish_reason": finish_reason}
        if response.audio.ms_sent:
            meta["audio_ms"] = round(response.audio.ms_sent, 1)
        if response.played_ms is not None:
            meta["played_ms"] = round(response.played_ms, 1)
        await self.session.store.append_messages(
            self.session.id,
            [Message(role="assistant", content="".join(response.text), metadata=meta)],
        )

    # ---- input ----------------------------------------------------------------------

    async def on_audio(self, pcm: bytes, msg_id: str | None) -> None:
        rt = await self._provider()
        if self._ingest is None:
            cfg = self.session.config
            self._ingest = AudioIngest(cfg.input_audio, cfg.turn_detection)
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
                    await rt.cancel_response()
            case vt.SpeechEnd():
                await session.emit(SpeechStopped(audio_end_ms=event.end_ms))
            case vt.TurnEnd():
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
            rt = await self._provider()
            await self.session.store.append_messages(
                self.session.id, [Message(role="user", content=text)]
            )
            await rt.send_text(text)

    async def _send_image(self, frame: ImageFrame) -> None:
        rt = await self._provider()
        await rt.send_image(frame)

    async def on_frame(self, frame: ImageFrame, msg_id: str | None) -> None:
        await self._frames.add_image(frame, speaking=self._speaking())

    async def on_video(self, chunk: VideoChunk, msg_id: str | None) -> None:
        await self._frames.add_video(chunk, speaking=self._speaking(), msg_id=msg_id)

    def _speaking(self) -> bool:
        return self._ingest is not None and self._ingest.detector.state == "speaking"

    async def on_commit(self, request_id: str | None, msg_id: str | None) -> None:
        rt = await self._provider()
        if self._ingest is not None and self._ingest.manual:
            self._ingest.commit()  # our copy of the turn's audio is not needed
        await rt.commit()

    async def on_cancel(self, msg_id: str | None) -> None:
        if self._current is None:
            raise ProtocolError(BAD_REQUEST, "no response in progress")
        rt = await self._provider()
        await rt.cancel_response()

    async def on_playback(self, response_id: str, played_ms: float) -> None:
        response = self._responses.get(response_id)
        if response is not None:
            response.played_ms = played_ms
        if self._rt is not None:
            await self._rt.truncate(response_id, played_ms)

    async def on_tool_result(self, call_id: str, output: Any, msg_id: str | None) -> None:
        call = self._client_calls.pop(call_id, None)
        if call is None:
            raise ProtocolError(BAD_REQUEST, f"no tool call {call_id!r} is waiting for a result")
        rt = await self._provider()
        text = output if isinstance(output, str) else json.dumps(output)
        await rt.send_tool_result(call_id, call.name, text)

    async def reconfigure(self, old: SessionConfig) -> None:
        new = self.session.config
        if new.input_audio != old.input_audio or new.turn_detection != old.turn_detection:
            self._ingest = None
        self._frames.reconfigure(new.video)
        if self._rt is not None and (
            new.provider != old.provider
            or new.instructions != old.instructions
            or new.tools != old.tools
            or new.voice != old.voice
        ):
            # Settings the provider took at setup: reopen with the new ones.
            await self._close_provider()

    async def _close_provider(self) -> None:
        rt, self._rt = self._rt, None
        if rt is not None:
            try:
                await rt.close()
            except ProviderError as exc:
                await self.session.emit_error(PROVIDER_FAILED, exc.message)

    async def close(self) -> None:
        self._frames.close()
        await self._close_provider()
