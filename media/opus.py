"""Opus streams: OpusHead (RFC 7845 §5.1) and packet decoding to int16 PCM at 48 kHz.

The container demuxers (``media.ogg``, ``media.webm``) report what they find as
:data:`OpusEvent` tuples; ``media.audio.OpusStreamDecoder`` feeds them to an
:class:`OpusPacketDecoder`.
"""

from __future__ import annotations

import av
import numpy as np
from av.error import FFmpegError

from media.errors import MediaError

OPUS_RATE = 48000
MAX_PACKET = 1 << 16  # Opus packets are <= 61,440 bytes (48 frames x 1275 + TOC).

# ("head", OpusHead bytes) | ("packet", bytes, samples to trim from its end)
# | ("granule", Ogg granule position, end of stream) | ("error", MediaError)
OpusEvent = tuple


def parse_opus_head(head: bytes) -> tuple[int, int]:
    """Validate an OpusHead (RFC 7845 §5.1); returns (channels, pre_skip)."""
    if len(head) < 19 or head[:8] != b"OpusHead":
        raise MediaError(415, "Opus stream header is not a valid OpusHead")
    if head[8] >> 4:
        raise MediaError(415, f"unsupported OpusHead version {head[8]}")
    channels, family = head[9], head[18]
    if family != 0 or channels not in (1, 2):
        raise MediaError(
            415,
            f"unsupported Opus channel mapping (family {family}, {channels} channels); "
            "only mono and stereo",
        )
    return channels, int.from_bytes(head[10:12], "little")


def _remix(pcm: np.ndarray, src: int, dst: int) -> np.ndarray:
    if src == dst:
        return pcm
    if src == 2:  # stereo -> mono: average
        return ((pcm[0::2].astype(np.int32) + pcm[1::2]) >> 1).astype(np.int16)
    return np.repeat(pcm, 2)  # mono -> stereo


class OpusPacketDecoder:
    """One Opus logical stream: OpusHead -> PyAV decoder; packets -> int16 at 48 kHz.

    ``codec`` is the FFmpeg decoder: ``libopus``, or ``opus`` (FFmpeg's own, float
    output). libavcodec applies the OpusHead pre-skip itself (extradata sets the
    codec delay).
    """

    def __init__(self, head: bytes, out_channels: int, codec: str) -> None:
        self.channels, self.pre_skip = parse_opus_head(head)
        self._out_channels = out_channels
        self._ctx = av.CodecContext.create(codec, "r")
        self._ctx.extradata = head
        self.out_total = 0  # per-channel samples emitted (after pre-skip)
        self.start_granule: int | None = None  # Ogg only (RFC 7845 §4.5)

    def decode(self, packet: bytes) -> np.ndarray:
        try:
            frames = self._ctx.decode(av.Packet(packet))
        except FFmpegError as e:
            raise MediaError(415, f"undecodable Opus packet ({len(packet)} bytes): {e}") from None
        parts = []
        for f in frames:
            if f.layout.nb_channels != self.channels:
                raise MediaError(415, "Opus decoder output does not match the OpusHead channels")
            if f.format.name == "s16":
                pcm = np.frombuffer(f.planes[0], dtype=np.int16, count=f.samples * self.channels)
            else:  # float output (FFmpeg's native decoder)
                x = f.to_ndarray().reshape(-1, f.samples) if f.format.is_planar else f.to_ndarray()
                x = x.T.ravel() if f.format.is_planar else x.ravel()
                pcm = np.clip(np.rint(x * 32768.0), -32768, 32767).astype(np.int16)
            parts.append(pcm)
        pcm = parts[0] if len(parts) == 1 else np.concatenate(parts or [np.empty(0, np.int16)])
        self.out_total += pcm.size // self.channels
        return _remix(pcm, self.channels, self._out_channels)
