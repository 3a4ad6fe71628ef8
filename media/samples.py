"""What the video demuxers (``webm``, ``fmp4``, ``h264``) hand to ``VideoStream``.

A :class:`Sample` is one compressed frame; a :class:`Break` says data was lost or
unusable there, so decoding must restart at a keyframe.
"""

from __future__ import annotations

from dataclasses import dataclass

from media.errors import MediaError

MAX_HEADER_BYTES = 4 * 1024 * 1024  # one moov / moof / CodecPrivate
MAX_SKIP_BYTES = 256 * 1024 * 1024  # a larger element or box size is taken as corruption
CODEC_NAMES = {"h264": "H.264", "vp8": "VP8", "vp9": "VP9"}


@dataclass(eq=False)
class Sample:
    """One compressed frame: Annex B for H.264, raw for VP8/VP9."""

    data: bytes
    codec: str
    key: bool
    pts_ms: float | None
    time_ms: float  # for staleness: media time, or the chunk's time for raw H.264
    chunk_index: int
    size: tuple[int, int] | None = None  # from a VP8/VP9 keyframe header
    seq: int = 0


@dataclass(frozen=True)
class Break:
    """Data was lost or unusable here: decoding must restart at a keyframe."""

    error: MediaError | None


Item = Sample | Break
