"""Whole (non-fragmented) MP4 and QuickTime files: collected as they arrive, then sampled.

A phone or an editor writes one ``moov`` holding every sample's offset for the whole
file, often after the ``mdat`` it describes, so nothing can be decoded before the file
is complete. :class:`Mp4File` collects the bytes of one recording, walks its top-level
boxes as they arrive to tell a whole file from a fragmented one (a fragmented one has
``mvex`` in its ``moov`` and ``moof`` boxes; it goes to the streaming demuxer instead),
and knows when the file is complete. :func:`sample_file` then demuxes it with
libavformat (a complete file in memory can be probed) and, in one pass, decodes only
what the frames it hands out need (see :class:`_Picker`).
"""

from __future__ import annotations

import io
import math
import struct
from dataclasses import dataclass, field

import av

from media.errors import MediaError
from media.image import ImageLimits, frame_to_jpeg

#: A whole file is held in memory until complete: this bounds it (per stream).
MAX_FILE_BYTES = 32 * 1024 * 1024
#: Frames taken from one file at most, spread evenly over it when it is long.
MAX_FILE_FRAMES = 8

FRAGMENTED = "fragmented"
WHOLE = "whole"

#: Boxes an MP4 or QuickTime file can start with.
_FIRST_BOXES = {
    b"ftyp", b"styp", b"moov", b"moof", b"mdat", b"free", b"skip", b"wide", b"pnot",
    b"uuid", b"sidx", b"junk", b"pdin", b"meta",
}  # fmt: skip


@dataclass
class Mp4File:
    """The bytes of one MP4/MOV recording until its layout is known (and, whole, complete)."""

    max_bytes: int = MAX_FILE_BYTES
    data: bytearray = field(default_factory=bytearray)
    layout: str | None = None  # FRAGMENTED or WHOLE once known
    _pos: int = 0  # the next top-level box starts here
    _moov: bool = False
    _mdat: bool = False
    _open_ended: bool = False  # a box of size 0 runs to the end of the file

    def add(self, data: bytes) -> None:
        """Take the next bytes; MediaError(413) when the file outgrows ``max_bytes``."""
        if len(self.data) + len(data) > self.max_bytes:
            size = len(self.data) + len(data)
            self.data.clear()
            raise MediaError(
                413,
                f"MP4 file of over {size} bytes; the limit for a whole (non-fragmented) file "
                f"is {self.max_bytes}: send a shorter clip, or fragmented MP4 "
                "(ffmpeg -movflags frag_keyframe+empty_moov)",
            )
        self.data += data
        self._walk()

    @property
    def complete(self) -> bool:
        """Every top-level box has arrived whole, and there are a ``moov`` and an ``mdat``."""
        return (
            self.layout == WHOLE
            and self._moov
            and self._mdat
            and not self._open_ended
            and self._pos == len(self.data)
        )

    def _walk(self) -> None:
        data = self.data
        while self._pos + 8 <= len(data) and not self._open_ended:
            size, kind = struct.unpack(">I4s", data[self._pos : self._pos + 8])
            header = 8
            if size == 1:
                if self._pos + 16 > len(data):
                    return
                size, header = struct.unpack(">Q", data[self._pos + 8 : self._pos + 16])[0], 16
            if not all(0x20 <= c < 0x7F for c in kind) or (
                self._pos == 0 and kind not in _FIRST_BOXES
            ):
                raise MediaError(415, "not MP4 data: no MP4 box where one should start")
            if size > self.max_bytes:
                raise MediaError(
                    413,
                    f"MP4 box {kind.decode()!r} of {size} bytes; the limit for a whole "
                    f"(non-fragmented) file is {self.max_bytes}: send a shorter clip, or "
                    "fragmented MP4 (ffmpeg -movflags frag_keyframe+empty_moov)",
                )
            if kind == b"moof":
                self.layout = self.layout or FRAGMENTED
            elif kind == b"mdat":
                self.layout = self.layout or WHOLE  # media before any moof: a whole file
            if size == 0:
                self._open_ended = True
                self._mdat = self._mdat or kind == b"mdat"
                return
            if size < header:
                raise MediaError(415, f"not an MP4 file: box {kind!r} of size {size}")
            end = self._pos + size
            if end > len(data):
                return
            if kind == b"moov":
                self._moov = True
                if self.layout is None:
                    fragmented = b"mvex" in _child_types(data, self._pos, end)
                    self.layout = FRAGMENTED if fragmented else WHOLE
            elif kind == b"mdat":
                self._mdat = True
            self._pos = end


def _child_types(data: bytearray, start: int, end: int) -> set[bytes]:
    """Types of the boxes directly inside the box at ``data[start:end]``."""
    kinds, i = set(), start + 8
    while i + 8 <= end:
        size, kind = struct.unpack(">I4s", data[i : i + 8])
        if size == 1 and i + 16 <= end:
            size = struct.unpack(">Q", data[i + 8 : i + 16])[0]
        kinds.add(bytes(kind))
        if size < 8:
            break
        i += size
    return kinds


@dataclass(frozen=True)
class FileFrame:
    data: bytes  # JPEG
    width: int
    height: int
    pts_ms: float


def sample_file(
    data: bytes | bytearray,
    interval_ms: float,
    limits: ImageLimits,
    max_frames: int = MAX_FILE_FRAMES,
) -> list[FileFrame]:
    """JPEG frames of a whole MP4/MOV file: one every ``interval_ms`` of media time from its
    first frame, at most ``max_frames`` (then spread evenly over the file, the last frame
    included). MediaError(415) when the file cannot be read or its video decoded,
    413 when its picture is over ``limits.max_pixels``."""
    try:
        container = av.open(io.BytesIO(data), mode="r", format="mov")
    except av.error.FFmpegError as exc:
        raise MediaError(415, f"not a readable MP4/MOV file ({_reason(exc)})") from None
    with container:
        if not container.streams.video:
            raise MediaError(415, "the MP4 file has no video track")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        width, height = ctx.width, ctx.height
        if width * height > limits.max_pixels:
            raise MediaError(
                413, f"video is {width}x{height}; the limit is {limits.max_pixels} pixels"
            )
        ctx.thread_count = 1
        targets = _targets(stream, interval_ms, max_frames)
        try:
            picked = _Picker(ctx, targets).run(container.demux(stream))
        except av.error.FFmpegError as exc:
            codec = ctx.codec.long_name if ctx.codec else "unknown codec"
            message = f"undecodable video in the MP4 file ({codec}: {_reason(exc)})"
            raise MediaError(415, message) from None
        frames = []
        for frame in picked:
            jpeg, w, h = frame_to_jpeg(frame, limits.max_dimension, limits.jpeg_quality)
            frames.append(FileFrame(jpeg, w, h, float(frame.pts * stream.time_base) * 1000))
        if not frames:
            raise MediaError(415, "the MP4 file holds no decodable video frame")
        return frames


def _targets(stream: av.VideoStream, interval_ms: float, max_frames: int) -> list[int]:
    """Presentation times (in the stream's time base) to take frames at."""
    base = stream.time_base
    start = stream.start_time or 0
    duration = stream.duration
    if not duration or base is None:
        return [start]
    span_ms = float(duration * base) * 1000
    count = 1 if math.isinf(interval_ms) else int(span_ms // interval_ms) + 1
    if count > max_frames:
        step = span_ms / max(1, max_frames - 1)
        times = [i * step for i in range(max_frames)]
    else:
        times = [i * interval_ms for i in range(count)]
    last = start + duration - 1
    return [min(last, start + int(t / 1000 / base)) for t in times]


class _Picker:
    """One pass over the packets: for each target time, the last frame shown at or before
    it. Packets stay compressed until a target is reached; then decoding starts from the
    newest keyframe before it (or goes on from where the decoder is, when no keyframe
    came since), so each packet is decoded at most once and GOPs between targets never.
    """

    def __init__(self, ctx: av.CodecContext, targets: list[int]) -> None:
        self.ctx = ctx
        self.targets = targets
        self.next = 0  # index of the target being looked for
        self.best: av.VideoFrame | None = None  # the newest frame at or before it so far
        self.picked: list[av.VideoFrame] = []
        self.pending: list[av.Packet] = []  # demuxed, not decoded yet
        self.fresh = False  # pending starts with a keyframe: flush the decoder first
        self.seen = -math.inf  # the newest decode time demuxed

    def run(self, packets) -> list[av.VideoFrame]:
        live = False  # the demuxer passed the target, the decoder has not: decode as they come
        for packet in packets:
            if self.next >= len(self.targets):
                return self.picked
            if packet.size == 0:
                continue  # the demuxer's end-of-stream packet: drained below
            time = packet.dts if packet.dts is not None else packet.pts
            if time is not None:
                self.seen = max(self.seen, time)
            if not live and self._passed():  # every frame shown by the target is demuxed
                self._decode(self.pending)
                self.pending = []
                live = self._passed()
            if live:
                self._decode([packet])
                live = self._passed()
            elif packet.is_keyframe:
                self.pending, self.fresh = [packet], True  # what came before is not needed
            else:
                self.pending.append(packet)
        self._decode(self.pending)
        for frame in self.ctx.decode(None):
            self._take(frame)
        if self.next < len(self.targets) and self.best is not None:
            self._pick(self.best)
        return self.picked

    def _passed(self) -> bool:
        """Whether the demuxer is past the target being looked for (a packet decoded after
        it: pts >= dts > target) while no frame shown after it has come out yet."""
        return self.next < len(self.targets) and self.seen > self.targets[self.next]

    def _decode(self, packets: list[av.Packet]) -> None:
        if packets and self.fresh:
            self.ctx.flush_buffers()
            self.fresh = False
        for packet in packets:
            for frame in self.ctx.decode(packet):
                self._take(frame)

    def _take(self, frame: av.VideoFrame) -> None:
        """Frames come out in display order: one past a target resolves it."""
        if frame.pts is None:
            return
        while self.next < len(self.targets) and frame.pts > self.targets[self.next]:
            if self.best is not None:
                self._pick(self.best)
            self.next += 1
        self.best = frame

    def _pick(self, frame: av.VideoFrame) -> None:
        if not self.picked or self.picked[-1].pts != frame.pts:  # a short clip: once each
            self.picked.append(frame)


def _reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or type(exc).__name__
