"""Reply audio at the session's output rate, one converter per response, and what
the client reports it has played of it (both modes cut an interrupted answer the same way)."""

from __future__ import annotations

import asyncio
import contextlib

from duplex.protocol import Media
from media.audio import StreamResampler

_KEEP_RATES = 4  # providers answer at one or two rates; more is not worth keeping
#: After an interruption, how long to wait for the client's last ``playback`` report
#: (it is sent when playback stops, so it crosses the interruption on the wire).
PLAYBACK_GRACE_S = 0.3


class ResamplerPool:
    """Reply resamplers shared by the sessions of one app: a session takes one for a
    reply and gives it back after. Each costs ~150 KB of native memory once used, and
    0.06-0.3 ms to build (up to 0.26 ms measured at 500 sessions, caches cold): kept per
    session between replies they cost memory, rebuilt per reply they cost CPU. Pooled, a
    server holds one per reply streaming plus at most ``max_idle``."""

    def __init__(self, max_idle: int = 64) -> None:
        self.max_idle = max_idle
        self._idle: dict[tuple[int, int], list[StreamResampler]] = {}
        self._count = 0

    @property
    def idle(self) -> int:
        return self._count

    def take(self, in_rate: int, out_rate: int) -> StreamResampler:
        """A resampler with nothing of any earlier reply in it."""
        kept = self._idle.get((in_rate, out_rate))
        if kept:
            self._count -= 1
            resampler = kept.pop()
            resampler.restart()
            return resampler
        return StreamResampler(in_rate, 1, out_rate, 1)

    def give(self, resampler: StreamResampler) -> None:
        if self._count < self.max_idle:
            self._idle.setdefault((resampler.in_rate, resampler.out_rate), []).append(resampler)
            self._count += 1


class ReplyResamplers:
    """A session's reply resamplers, kept from one response to the next (responses
    stream one at a time). Building one costs 0.06-0.3 ms, as much as resampling a
    few seconds of reply; `StreamResampler.restart` costs one push.

    With a ``pool`` (the app's), `clear` gives them back to it rather than dropping them.
    """

    def __init__(self, pool: ResamplerPool | None = None) -> None:
        self._kept: dict[tuple[int, int], StreamResampler] = {}
        self._pool = pool

    def fresh(self, in_rate: int, out_rate: int) -> StreamResampler:
        """A resampler with nothing of any earlier response in it."""
        key = (in_rate, out_rate)
        resampler = self._kept.get(key)
        if resampler is not None:
            resampler.restart()
            return resampler
        if len(self._kept) >= _KEEP_RATES:
            self.clear()
        if self._pool is not None:
            resampler = self._kept[key] = self._pool.take(in_rate, out_rate)
        else:
            resampler = self._kept[key] = StreamResampler(in_rate, 1, out_rate, 1)
        return resampler

    def clear(self) -> None:
        """Let the kept resamplers go (to the pool, if any): their filter graphs are
        native memory."""
        if self._pool is not None:
            for resampler in self._kept.values():
                self._pool.give(resampler)
        self._kept.clear()


class ReplyAudio:
    """Resamples a response's PCM pieces to ``out_rate`` (stateful across pieces, so no
    clicks at piece boundaries) and counts the milliseconds handed to the client.

    With ``resamplers`` (one per session), the resampler comes from there; otherwise
    each response builds its own.
    """

    def __init__(self, out_rate: int | None, resamplers: ReplyResamplers | None = None) -> None:
        self.out_rate = out_rate
        self.ms_sent = 0.0
        self._resampler: StreamResampler | None = None
        self._resamplers = resamplers

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
                resampler = self._resampler = (
                    self._resamplers.fresh(rate, out_rate)
                    if self._resamplers is not None
                    else StreamResampler(rate, 1, out_rate, 1)
                )
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
