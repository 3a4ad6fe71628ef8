"""Reply audio at the session's output rate, one converter per response."""

from __future__ import annotations

from media.audio import StreamResampler
from server.protocol import Media


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
