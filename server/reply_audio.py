"""Reply audio at the session's output rate, one converter per response."""

from __future__ import annotations

import numpy as np

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
        """The piece at the output rate; None while the resampler is still filling."""
        rate = media.sample_rate or 24000
        if self.out_rate and rate != self.out_rate:
            if self._resampler is None:
                self._resampler = StreamResampler(rate, 1, self.out_rate, 1)
            pcm = self._resampler.push(np.frombuffer(media.data, dtype="<i2"))
            if pcm.size == 0:
                return None
            media = Media(
                mime_type="audio/pcm",
                data=pcm.astype("<i2").tobytes(),
                sample_rate=self.out_rate,
                channels=1,
            )
        self.ms_sent += len(media.data) / 2 / (media.sample_rate or rate) * 1000
        return media
