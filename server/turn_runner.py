"""One user turn against a unary provider: build the request, stream, record.

Shared by VAD mode and ``UnarySession`` so that a turn is answered and stored
the same way whichever door it came in by.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from media.audio import StreamResampler
from server.protocol import ImageFrame, Media, Message, StreamChunk, new_id
from server.providers.base import AudioClip, TurnRequest, UnaryProvider

if TYPE_CHECKING:
    from server.session import BaseSession


@dataclass
class Turn:
    turn_id: str
    text: str = ""
    audio: AudioClip | None = None
    frames: list[ImageFrame] = field(default_factory=list)
    request_id: str | None = None
    audio_start_ms: float | None = None
    audio_end_ms: float | None = None


class TurnRunner:
    """Streams one response and remembers what was sent, so it can be stored
    whole, or cut to what the user heard when it is interrupted."""

    def __init__(
        self,
        session: BaseSession,
        provider: UnaryProvider,
        turn: Turn,
        *,
        response_id: str | None = None,
        output_rate: int | None = None,
    ) -> None:
        self.session = session
        self.provider = provider
        self.turn = turn
        self.response_id = response_id or new_id("resp")
        self.output_rate = output_rate
        self.text_parts: list[str] = []
        self.audio_ms_sent = 0.0
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self._resampler: StreamResampler | None = None
        self._recorded = False

    async def request(self) -> TurnRequest:
        session = self.session
        return TurnRequest(
            session_id=session.id,
            turn_id=self.turn.turn_id,
            response_id=self.response_id,
            config=session.config,
            instructions=session.instructions(),
            history=await session.messages(),
            text=self.turn.text,
            audio=self.turn.audio,
            frames=list(self.turn.frames),
            tools=list(session.config.tools) + session.services.tools.specs(),
        )

    async def chunks(self) -> AsyncIterator[StreamChunk]:
        request = await self.request()
        async for chunk in self.provider.stream(request):
            chunk.response_id = self.response_id
            if chunk.media is not None and chunk.media.mime_type == "audio/pcm":
                chunk = self._to_output_rate(chunk)
                if chunk.media is None:
                    continue
            if chunk.delta:
                self.text_parts.append(chunk.delta)
            if chunk.finish_reason:
                self.finish_reason = chunk.finish_reason
            if chunk.metadata and "usage" in chunk.metadata:
                self.usage = chunk.metadata["usage"]
            yield chunk

    def _to_output_rate(self, chunk: StreamChunk) -> StreamChunk:
        media = chunk.media
        assert media is not None
        rate = media.sample_rate or 24000
        if self.output_rate and rate != self.output_rate:
            if self._resampler is None:
                self._resampler = StreamResampler(rate, 1, self.output_rate, 1)
            pcm = self._resampler.push(np.frombuffer(media.data, dtype="<i2"))
            if pcm.size == 0:
                return chunk.model_copy(update={"media": None})
            media = Media(
                mime_type="audio/pcm",
                data=pcm.astype("<i2").tobytes(),
                sample_rate=self.output_rate,
                channels=1,
            )
            chunk = chunk.model_copy(update={"media": media})
        self.audio_ms_sent += len(media.data) / 2 / (media.sample_rate or rate) * 1000
        return chunk

    async def record(self, finish_reason: str, played_ms: float | None = None) -> None:
        """Store the user's turn and the answer as far as it went (once)."""
        if self._recorded:
            return
        self._recorded = True
        turn = self.turn
        user_meta: dict[str, Any] = {"turn_id": turn.turn_id}
        if turn.audio is not None:
            user_meta["audio_ms"] = round(turn.audio.duration_ms, 1)
        if turn.frames:
            user_meta["frames"] = len(turn.frames)
        if turn.request_id:
            user_meta["request_id"] = turn.request_id
        assistant_meta: dict[str, Any] = {
            "response_id": self.response_id,
            "finish_reason": finish_reason,
        }
        if self.audio_ms_sent:
            assistant_meta["audio_ms"] = round(self.audio_ms_sent, 1)
        if played_ms is not None:
            assistant_meta["played_ms"] = round(min(played_ms, self.audio_ms_sent), 1)
        if turn.request_id:
            assistant_meta["request_id"] = turn.request_id
        if self.usage:
            assistant_meta["usage"] = self.usage
        await self.session.store.append_messages(
            self.session.id,
            [
                Message(role="user", content=turn.text, metadata=user_meta),
                Message(
                    role="assistant",
                    content=self.heard_text(played_ms),
                    metadata=assistant_meta,
                ),
            ],
        )

    def heard_text(self, played_ms: float | None) -> str:
        """The text sent; when audio was cut short, the share of it the user heard.

        Text and audio of one reply run in parallel, so the words heard are taken
        to be the same fraction of the text as the audio played is of the audio sent.
        """
        text = "".join(self.text_parts)
        if played_ms is None or not self.audio_ms_sent or played_ms >= self.audio_ms_sent:
            return text
        keep = int(len(text) * played_ms / self.audio_ms_sent)
        cut = text.rfind(" ", 0, keep + 1)
        return text[: cut if cut > 0 else keep]
