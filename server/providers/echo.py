"""The offline default provider: deterministic, honest replies for development and tests.

It does not understand anything. It quotes the user's text, plays the user's
audio back with its duration and level, and describes the frames it got, so a
client can see every input travel through the whole pipeline without a model.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np

from duplex.protocol import Media, StreamChunk
from media.audio import audio_level_dbfs
from server.providers.base import TurnRequest, UnaryProvider

#: Reply audio goes out in pieces of this length.
AUDIO_PIECE_MS = 100


class EchoProvider(UnaryProvider):
    """``pace`` 1.0 streams reply audio at real time (so barge-in has something to
    interrupt); 0 streams as fast as possible."""

    def __init__(self, pace: float = 1.0) -> None:
        self.pace = pace

    async def stream(self, request: TurnRequest) -> AsyncIterator[StreamChunk]:
        rid = request.response_id
        lines: list[str] = []
        if request.text.strip():
            lines.append(f"You said: \u201c{request.text.strip()}\u201d")
        if request.audio is not None and request.audio.pcm:
            pcm = np.frombuffer(request.audio.pcm, dtype="<i2")
            lines.append(
                f"Heard {request.audio.duration_ms / 1000:.2f} s of audio "
                f"at {audio_level_dbfs(pcm):.1f} dBFS."
            )
        if request.frames:
            sizes = ", ".join(
                f"{f.width or '?'}x{f.height or '?'} {f.mime_type}" for f in request.frames
            )
            lines.append(f"Saw {len(request.frames)} frame(s): {sizes}.")
        if not lines:
            lines.append("(empty turn)")
        text = " ".join(lines)
        for piece in _split_deltas(text):
            yield StreamChunk(response_id=rid, delta=piece)
            await asyncio.sleep(0)
        if request.audio is not None and request.audio.pcm:
            rate = request.audio.sample_rate
            step = rate * AUDIO_PIECE_MS // 1000 * 2
            for start in range(0, len(request.audio.pcm), step):
                piece = request.audio.pcm[start : start + step]
                yield StreamChunk(
                    response_id=rid,
                    media=Media(mime_type="audio/pcm", data=piece, sample_rate=rate, channels=1),
                )
                await asyncio.sleep(self.pace * len(piece) / 2 / rate)
        yield StreamChunk(response_id=rid, finish_reason="stop")


def _split_deltas(text: str, words_per_delta: int = 3) -> list[str]:
    """Several deltas, so clients exercise incremental rendering."""
    words = text.split(" ")
    return [
        " ".join(words[i : i + words_per_delta]) + (" " if i + words_per_delta < len(words) else "")
        for i in range(0, len(words), words_per_delta)
    ]
