"""Reply audio at the session's output rate, one converter per response, and what
the client reports it has played of it (both modes cut an interrupted answer the same way).

A response's resampler is its own: it holds under 1 KB and costs a few µs to make
(media/resample.py), so nothing is kept or pooled between responses."""

from __future__ import annotations

import asyncio
import contextlib

from duplex.protocol import Media
from media.audio import StreamResampler

#: After an interruption, how long to wait for the client's last ``playback`` report
#: (it is sent when playback stops, so it crosses the interruption on the wire).
PLAYBACK_GRACE_S = 0.3


class ReplyAudio:
    """Resamples a response's PCM pieces to ``out_rate`` (stateful across pieces, so no
    clicks at piece boundaries) and counts the milliseconds handed to the client."""

    def __init__(self, out_rate: int | None) -> None:
        self.out_rate = out_rate
        self.ms_sent = 0.0
        self._resampler: StreamResampler | None = None

    def convert(self, media: Media) -> Media | None:
        """The piece at the output rate; None while the resampler is still filling.

        Bytes in, bytes out (``push_bytes``): this runs for every reply audio chunk,
        and the numpy views and copies around the resampler cost ~20% of its call.
        A piece at a new input rate gets a new resampler rather than the wrong pitch.
        """
        rate = media.sample_rate or 24000
        out_rate = self.out_rate
        if out_rate and rate != out_rate:
            resampler = self._resampler
            if resampler is None or resampler.in_rate != rate:
                resampler = self._resampler = StreamResampler(rate, 1, out_rate, 1)
            pcm = resampler.push_bytes(media.data)
            if not pcm:
                return None
            self.ms_sent += len(pcm) / 2 / out_rate * 1000
            return Media(mime_type="audio/pcm", data=pcm, sample_rate=out_rate, channels=1)
        self.ms_sent += len(media.data) / 2 / rate * 1000
        return media

    def heard_text(self, text: str, played_ms: float | None) -> str:
        """The share of ``text`` the user heard when its audio was cut short.

        Text and audio of one reply run in parallel, so the words heard are taken
        to be the same fraction of the text as the audio played is of the audio sent.
        """
        if played_ms is None or not self.ms_sent or played_ms >= self.ms_sent:
            return text
        keep = int(len(text) * played_ms / self.ms_sent)
        cut = text.rfind(" ", 0, keep + 1)
        return text[: cut if cut > 0 else keep]


class Playback:
    """The client's ``playback`` reports for one reply: the position heard so far."""

    def __init__(self) -> None:
        self.played_ms: float | None = None
        self._reported = asyncio.Event()

    def report(self, played_ms: float) -> None:
        self.played_ms = played_ms
        self._reported.set()

    def cut(self) -> None:
        """The reply was interrupted now: only a report after this one says what was heard."""
        self._reported.clear()

    async def heard_ms(self) -> float | None:
        """The position heard, after waiting up to the grace window for a report since ``cut``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(PLAYBACK_GRACE_S):
                await self._reported.wait()
        return self.played_ms
