"""Client video chunks to a few sampled JPEG frames.

A ``VideoStream`` takes the chunks of one client video stream (raw H.264
Annex B, WebM/Matroska with VP8, VP9 or H.264, or fragmented MP4 with H.264
or VP9), puts them back in ``chunk_index`` order, demuxes them incrementally
and hands out at most ``fps_speaking`` / ``fps_idle`` JPEG frames per second.

Demuxing is ours, not libavformat's: ``av.open()`` reads a file-like object
synchronously and wants to probe and seek, which a live stream of arbitrary
byte ranges cannot offer. Both containers are simple to walk incrementally:
WebM is EBML elements (ID, size, payload) and fragmented MP4 is boxes
(size, type, payload) whose ``moof`` gives every sample's offset and size
before its ``mdat``. So the parsers keep at most one incomplete unit (one
frame, or one ``moov``/``moof``) buffered, skip everything else without
buffering it, and resynchronise on the next Cluster / ``moof`` after a gap
or corruption. Compressed frames go to one PyAV ``CodecContext`` per stream
that lives across chunks.

Decoding follows use, not input: frames are decoded only when one is due,
and a keyframe is decoded alone whenever it is at most one sampling interval
older than the newest frame received (see ``VideoStream`` for the rule).

Damage is caught before it reaches a provider: container framing is checked
(element IDs valid at their level, sizes, frame headers), H.264 ``frame_num``
gaps reveal lost reference frames, the decoder runs with
``err_detect=explode``, and with B-frames a frame is only sent once every
frame decoded before it has come out clean.
"""

from __future__ import annotations

import hashlib
import logging
import math
import struct
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import av
from av.video.reformatter import VideoReformatter

from media.errors import MediaError
from media.image import ImageLimits, frame_to_jpeg

_log = logging.getLogger(__name__)

H264 = "video/h264"
WEBM = "video/webm"
MP4 = "video/mp4"

_CONTAINERS = {"video/h264": H264, "video/webm": WEBM, "video/x-matroska": WEBM, "video/mp4": MP4}
_CODEC_PREFIXES = {
    "vp8": "vp8",
    "vp08": "vp8",
    "vp9": "vp9",
    "vp09": "vp9",
    "avc1": "h264",
    "avc3": "h264",
    "h264": "h264",
}
_AUDIO_CODECS = ("opus", "vorbis", "mp4a", "pcm", "flac")
_CODEC_NAMES = {"h264": "H.264", "vp8": "VP8", "vp9": "VP9"}

# Undecoded frames held for one GOP before they are decoded anyway, so a
# stream whose keyframes never come does not grow without bound.
_MAX_PENDING_SAMPLES = 300
_MAX_PENDING_BYTES = 16 * 1024 * 1024
_MAX_HEADER_BYTES = 4 * 1024 * 1024  # one moov / moof / CodecPrivate
_MAX_SKIP_BYTES = 256 * 1024 * 1024  # a larger element size is taken as corruption
_FRAME_META = 64  # decoder delay is at most 16 frames; keep a margin


# --------------------------------------------------------------------------- public values


@dataclass(frozen=True)
class FramePolicy:
    """How many frames per second reach the provider; 0 sends none in that state."""

    fps_speaking: float = 1.0
    fps_idle: float = 0.2

    def __post_init__(self) -> None:
        if not (self.fps_speaking >= 0 and self.fps_idle >= 0):
            raise ValueError("frame rates must be >= 0")

    def interval_ms(self, speaking: bool) -> float:
        fps = self.fps_speaking if speaking else self.fps_idle
        return 1000.0 / fps if fps > 0 else math.inf


@dataclass(frozen=True)
class VideoFrameOut:
    """One sampled frame, downscaled and JPEG-encoded like a client image."""

    data: bytes
    width: int
    height: int
    timestamp_ms: float | None  # media time of the frame (the chunk's timestamp for raw H.264)
    chunk_index: int  # chunk that completed the frame
    mime_type: str = "image/jpeg"


@dataclass
class VideoPushResult:
    """Frames to forward and problems to report; the stream goes on either way."""

    frames: list[VideoFrameOut] = field(default_factory=list)
    notices: list[MediaError] = field(default_factory=list)


@dataclass
class VideoStats:
    chunks_received: int = 0
    chunks_ignored: int = 0  # duplicates and chunks arriving after their gap was declared
    chunks_missing: int = 0  # given up on in a gap
    chunks_refused: int = 0  # too large, or not the declared format
    gaps: int = 0
    samples: int = 0  # compressed frames demuxed
    samples_skipped: int = 0  # never decoded: awaiting a keyframe, or a GOP tail nobody needed
    frames_decoded: int = 0
    frames_emitted: int = 0
    errors: int = 0  # corrupt or undecodable data (reported once per incident)


def parse_video_mime(mime_type: str) -> tuple[str, str | None]:
    """(container, declared video codec or None), or MediaError(415)."""
    base, _, params = mime_type.partition(";")
    container = _CONTAINERS.get(base.strip().lower())
    if container is None:
        raise MediaError(
            415,
            f"unsupported video type {mime_type!r}; use video/h264, "
            "video/webm;codecs=vp8|vp9 or video/mp4",
        )
    if container == H264:
        return container, "h264"
    codecs = ""
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "codecs":
            codecs = value.strip().strip("\"'").lower()
    for item in filter(None, (c.strip() for c in codecs.split(","))):
        prefix = item.split(".", 1)[0]
        if prefix in _CODEC_PREFIXES:
            return container, _CODEC_PREFIXES[prefix]
        if not prefix.startswith(_AUDIO_CODECS):
            raise MediaError(415, f"unsupported video codec {item!r}; use vp8, vp9 or h264")
    return container, None


def sniff_video(data: bytes) -> str | None:
    """Container named by the data's first bytes, whatever was declared."""
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return WEBM
    if data[4:8] in (b"ftyp", b"styp", b"moov", b"moof"):
        return MP4
    if data[:4] == b"\x00\x00\x00\x01" or data[:3] == b"\x00\x00\x01":
        return H264
    return None


# --------------------------------------------------------------------------- the stream


class VideoStream:
    """One client video stream: reorder, demux, decode what is used, sample.

    Sampling: a frame is due when ``1/fps`` (speaking or idle) has passed
    since the last one sent; the newest decodable frame is then sent, unless
    it was already sent. Decoding: frames are kept compressed until one is
    due. Then, if the latest keyframe is at most one sampling interval older
    than the newest frame received, that keyframe alone is decoded (so with
    keyframes at least as frequent as samples, only keyframes are ever
    decoded, and a sent frame is never staler than the sampling interval it
    stands for); otherwise the GOP is decoded from where the decoder stands
    up to the newest frame, and the tail of a GOP after the last sample is
    never decoded. Only sent frames are scaled and JPEG-encoded.

    Chunks are released in ``chunk_index`` order; out-of-order ones wait in
    a window of ``reorder_window`` chunks or ``reorder_timeout_ms``, after
    which the missing ones are reported once as a gap and decoding resumes at
    the next keyframe. Corrupt data is reported once per incident (until a
    good frame decodes) and the stream also resumes at the next keyframe.
    Nothing but ``MediaError`` values leaves ``push``/``poll``; notices are
    returned, never raised. Call ``poll`` from a timer (``next_due_ms``) to
    get a due frame without waiting for the next chunk.
    """

    def __init__(
        self,
        mime_type: str,
        policy: FramePolicy | None = None,
        limits: ImageLimits | None = None,
        *,
        reorder_window: int = 4,
        reorder_timeout_ms: float = 1000.0,
        first_chunk_index: int = 0,
    ) -> None:
        self.mime_type = mime_type
        self.container, self._declared_codec = parse_video_mime(mime_type)
        self.policy = policy or FramePolicy()
        self.limits = limits or ImageLimits()
        self.stats = VideoStats()
        self._reorder_args = (first_chunk_index, reorder_window, reorder_timeout_ms)
        self._reorder = _Reorder(*self._reorder_args, 4 * self.limits.max_bytes)
        self._demux = _make_demuxer(self.container, self.limits, self._declared_codec)
        self._first_digest: bytes | None = None
        self._first_chunk = True
        self._refusing = False
        self._codec_checked = False
        self._decoder: _Decoder | None = None
        self._seq = 0
        # The current GOP: its keyframe and the frames after it not yet decoded.
        self._key: _Sample | None = None
        self._rest: list[_Sample] = []
        self._rest_bytes = 0
        self._synced = False  # decoder state = keyframe + everything before self._rest
        self._awaiting_key = True
        self._newest_ms: float | None = None
        # Newest decoded frame, in display order (the decoder's output order).
        self._latest: tuple[av.VideoFrame, _Sample] | None = None
        self._unconfirmed: list[tuple[av.VideoFrame, _Sample]] = []
        self._gop_decoded = False  # self._latest belongs to the current GOP
        self._emitted: _Sample | None = None
        self._scaler = VideoReformatter()  # keeps its swscale context from frame to frame
        self._last_emit_ms: float | None = None
        self._incident = False
        self._last_notice: dict[int, str] = {}
        self._declared_size: tuple[int | None, int | None] | None = None
        self._size_reported: tuple[object, ...] = ()

    @property
    def codec(self) -> str | None:
        """Codec being decoded (``h264``, ``vp8``, ``vp9``), once known."""
        return self._decoder.codec if self._decoder else None

    def next_due_ms(self, speaking: bool) -> float | None:
        """When a frame may next be sent (None: never, at this frame rate)."""
        interval = self.policy.interval_ms(speaking)
        if math.isinf(interval):
            return None
        return 0.0 if self._last_emit_ms is None else self._last_emit_ms + interval

    def push(
        self,
        chunk_index: int,
        data: bytes,
        *,
        now_ms: float,
        speaking: bool,
        timestamp_ms: float | None = None,
        width: int | None = None,
        height: int | None = None,
    ) -> VideoPushResult:
        """Take one chunk; return the frames due now and any problems found.

        ``width``/``height`` are what the client declares; decoded frames of
        another size are reported (once per size) and still used.
        """
        result = VideoPushResult()
        self.stats.chunks_received += 1
        if width is not None or height is not None:
            self._declared_size = (width, height)
        payload: bytes | None = data
        if len(data) > self.limits.max_bytes:
            self.stats.chunks_refused += 1
            self._notify(
                result,
                MediaError(
                    413,
                    f"video chunk {chunk_index} is {len(data)} bytes; "
                    f"the limit is {self.limits.max_bytes}",
                ),
            )
            payload = None  # its place in the order is kept, its bytes are lost
        if payload is not None and chunk_index == self._reorder_args[0]:
            self._maybe_restart(payload)
        events, accepted = self._reorder.add(chunk_index, payload, timestamp_ms, now_ms)
        if not accepted:
            self.stats.chunks_ignored += 1
        self._guarded(events, now_ms, speaking, result)
        return result

    def _maybe_restart(self, data: bytes) -> None:
        """The first index again, with other bytes that start a recording: a new recording.

        (MediaRecorder stopped and started again.) The same bytes again are a
        duplicate, and ignored like any other.
        """
        digest = hashlib.blake2b(data, digest_size=16).digest()
        if self._first_digest is None:
            self._first_digest = digest
            return
        if digest == self._first_digest or sniff_video(data) != self.container:
            return
        self._first_digest = digest
        self._reorder = _Reorder(*self._reorder_args, 4 * self.limits.max_bytes)
        self._demux = _make_demuxer(self.container, self.limits, self._declared_codec)
        self._first_chunk = self._refusing = False
        self._forget_gop()

    def poll(self, *, now_ms: float, speaking: bool) -> VideoPushResult:
        """Give up on overdue missing chunks and send a frame if one is due."""
        result = VideoPushResult()
        self._guarded(self._reorder.expire(now_ms), now_ms, speaking, result)
        return result

    def _guarded(
        self, events: list[_Event], now_ms: float, speaking: bool, result: VideoPushResult
    ) -> None:
        """Process and sample; a fault of ours costs the stream a keyframe, not the session."""
        try:
            self._run(events, now_ms, result)
            self._maybe_emit(now_ms, speaking, result)
        except Exception as exc:  # client bytes reached a path no test covered: log it
            _log.exception("video stream %s: unexpected failure", self.mime_type)
            self._notify(result, MediaError(415, f"video data could not be processed ({exc!r})"))
            self._demux.reset()
            if self._decoder is not None:
                self._decoder.reset()
            self._forget_gop()

    # -- chunk and sample intake

    def _run(self, events: list[_Event], now_ms: float, result: VideoPushResult) -> None:
        for event in events:
            if event.missing:
                first, last = event.missing
                self.stats.gaps += 1
                self.stats.chunks_missing += last - first + 1
                span = str(first) if first == last else f"{first}-{last}"
                self._notify(
                    result,
                    MediaError(400, f"video chunk {span} missing; resuming at the next keyframe"),
                )
                self._discontinuity()
            elif event.data is None:
                self._discontinuity()
            else:
                self._take_chunk(event, now_ms, result)

    def _take_chunk(self, event: _Event, now_ms: float, result: VideoPushResult) -> None:
        data = event.data or b""
        sniffed = sniff_video(data)
        if self._first_chunk or self._refusing:
            self._first_chunk = False
            if sniffed is not None and sniffed != self.container:
                if not self._refusing:
                    self._notify(
                        result, MediaError(400, f"declared {self.mime_type} but data is {sniffed}")
                    )
                self._refusing = True
                self.stats.chunks_refused += 1
                return
            if self._refusing and sniffed is None:
                self.stats.chunks_refused += 1
                return
            if self._refusing:
                self._refusing = False
                self._discontinuity()
        time_ms = event.timestamp_ms if event.timestamp_ms is not None else now_ms
        for item in self._demux.feed(data, event.index, event.timestamp_ms, time_ms):
            if isinstance(item, _Break):
                if item.error is not None:
                    self._notify(result, item.error)
                self._discontinuity(reset_demuxer=False)
            else:
                self._take_sample(item, result)

    def _take_sample(self, sample: _Sample, result: VideoPushResult) -> None:
        self.stats.samples += 1
        self._seq += 1
        sample.seq = self._seq
        self._newest_ms = sample.time_ms
        if self._decoder is None or self._decoder.codec != sample.codec:
            self._check_codec(sample.codec, result)
            self._decoder = _Decoder(sample.codec, self.limits.max_pixels)
            self._forget_gop()
        if sample.key:
            if sample.size and sample.size[0] * sample.size[1] > self.limits.max_pixels:
                w, h = sample.size
                self._notify(
                    result,
                    MediaError(
                        413, f"video is {w}x{h}; the limit is {self.limits.max_pixels} pixels"
                    ),
                )
                self._forget_gop()
                self.stats.samples_skipped += 1
                return
            self.stats.samples_skipped += len(self._rest)
            self._key, self._rest, self._rest_bytes = sample, [], 0
            self._synced = self._gop_decoded = False
            self._awaiting_key = False
        elif self._awaiting_key:
            self.stats.samples_skipped += 1
        else:
            self._rest.append(sample)
            self._rest_bytes += len(sample.data)
            if len(self._rest) > _MAX_PENDING_SAMPLES or self._rest_bytes > _MAX_PENDING_BYTES:
                self._decode_forward(result)

    def _check_codec(self, codec: str, result: VideoPushResult) -> None:
        if self._codec_checked:
            return
        self._codec_checked = True
        if self._declared_codec is not None and self._declared_codec != codec:
            declared = _CODEC_NAMES[self._declared_codec]
            self._notify(
                result,
                MediaError(
                    400,
                    f"declared {self.mime_type} ({declared}) but the video is "
                    f"{_CODEC_NAMES[codec]}; decoding {_CODEC_NAMES[codec]}",
                ),
            )

    # -- sampling and decoding

    def _maybe_emit(self, now_ms: float, speaking: bool, result: VideoPushResult) -> None:
        interval = self.policy.interval_ms(speaking)
        if math.isinf(interval):
            return
        if self._last_emit_ms is not None and now_ms - self._last_emit_ms < interval:
            return
        picked = self._pick(interval, result)
        if picked is None:
            return
        frame, sample = picked
        try:
            jpeg, width, height = frame_to_jpeg(
                frame, self.limits.max_dimension, self.limits.jpeg_quality, self._scaler
            )
        except Exception as exc:  # a frame the scaler or encoder rejects
            self._corrupt(result, MediaError(415, f"video frame cannot be converted: {exc}"))
            return
        result.frames.append(VideoFrameOut(jpeg, width, height, sample.pts_ms, sample.chunk_index))
        self.stats.frames_emitted += 1
        self._emitted = sample
        self._last_emit_ms = now_ms

    def _pick(
        self, interval: float, result: VideoPushResult
    ) -> tuple[av.VideoFrame, _Sample] | None:
        key = self._key
        if key is not None and self._newest_ms is not None:
            key_is_fresh = self._newest_ms - key.time_ms <= interval
            if key_is_fresh and key is not self._emitted:
                if not self._gop_decoded:
                    self._decode_key_alone(result)
            elif self._rest or not self._synced:
                self._decode_forward(result)
        if self._latest is None or self._latest[1] is self._emitted:
            return None
        return self._latest

    def _decode_key_alone(self, result: VideoPushResult) -> None:
        """Decode just the keyframe, draining the decoder if it holds the frame back."""
        assert self._decoder is not None and self._key is not None
        key = self._key
        self._flush_decoder()
        try:
            decoded = self._decoder.decode(key)
            if not any(sample is key for _, sample in decoded):
                decoded += self._decoder.drain()
                self._synced = False
            else:
                self._synced = True
        except MediaError as error:
            self._corrupt(result, error)
            return
        self._accept(decoded, result)

    def _decode_forward(self, result: VideoPushResult) -> None:
        """Bring the decoder up to the newest frame received in this GOP."""
        if self._decoder is None or self._key is None:
            return
        batch = self._rest if self._synced else [self._key, *self._rest]
        if not self._synced:
            self._flush_decoder()
        self._rest, self._rest_bytes = [], 0
        self._synced = True
        for sample in batch:
            try:
                decoded = self._decoder.decode(sample)
            except MediaError as error:
                self._corrupt(result, error)
                return
            if not self._accept(decoded, result):
                return

    def _accept(
        self, decoded: list[tuple[av.VideoFrame, _Sample]], result: VideoPushResult
    ) -> bool:
        """Keep the newest confirmed frame; on a corrupt one, restart at the next keyframe.

        The decoder was flushed before this GOP's keyframe went in, so what it
        outputs belongs to this GOP, in display order. A frame is usable once
        every frame decoded before it has come out (``confirmed_below``), and
        only if it was decoded before any frame flagged corrupt.
        """
        assert self._decoder is not None
        self.stats.frames_decoded += len(decoded)
        bad = next((sample for frame, sample in decoded if frame.is_corrupt), None)
        waiting = self._unconfirmed + [
            (frame, sample) for frame, sample in decoded if bad is None or sample.seq < bad.seq
        ]
        floor = self._decoder.confirmed_below()
        if bad is not None:
            floor = min(floor, bad.seq)
        confirmed = [item for item in waiting if item[1].seq < floor]
        self._unconfirmed = [item for item in waiting if item[1].seq >= floor]
        if confirmed:
            self._latest = confirmed[-1]
            self._gop_decoded = True
            self._incident = False
            self._check_size(self._latest[0].width, self._latest[0].height, result)
        if bad is not None:
            message = "corrupt video data; resuming at the next keyframe"
            self._corrupt(result, MediaError(415, message))
            return False
        return True

    def _check_size(self, width: int, height: int, result: VideoPushResult) -> None:
        declared = self._declared_size
        if declared is None or (declared[0] in (None, width) and declared[1] in (None, height)):
            return
        if self._size_reported != (declared, width, height):
            self._size_reported = (declared, width, height)
            shown = "x".join("?" if d is None else str(d) for d in declared)
            self._notify(result, MediaError(400, f"declared {shown} but video is {width}x{height}"))

    def _corrupt(self, result: VideoPushResult, error: MediaError) -> None:
        self._notify(result, error)
        if self._decoder is not None:
            self._decoder.reset()
        self._forget_gop()

    def _flush_decoder(self) -> None:
        assert self._decoder is not None
        self._decoder.flush()
        self._unconfirmed = []

    # -- state

    def _discontinuity(self, reset_demuxer: bool = True) -> None:
        if reset_demuxer:
            self._demux.reset()
        self._forget_gop()

    def _forget_gop(self) -> None:
        if self._key is not None or self._rest:
            self.stats.samples_skipped += len(self._rest)
        self._key, self._rest, self._rest_bytes = None, [], 0
        self._synced = self._gop_decoded = False
        self._awaiting_key = True
        if self._decoder is not None:
            self._flush_decoder()

    def _notify(self, result: VideoPushResult, error: MediaError) -> None:
        """Report a problem once: 415s once per incident, others unless just said."""
        if error.code == 415:
            self.stats.errors += 1
            if self._incident:
                return
            self._incident = True
        elif self._last_notice.get(error.code) == error.message:
            return  # e.g. the same oversized picture at every keyframe
        self._last_notice[error.code] = error.message
        result.notices.append(error)


# --------------------------------------------------------------------------- reordering


@dataclass
class _Event:
    index: int = 0
    data: bytes | None = None
    timestamp_ms: float | None = None
    missing: tuple[int, int] | None = None


class _Reorder:
    """Releases chunks in index order; declares a gap when waiting is no longer worth it."""

    def __init__(self, first: int, window: int, timeout_ms: float, max_bytes: int) -> None:
        self.expected = first
        self._window = max(0, window)
        self._timeout_ms = timeout_ms
        self._max_bytes = max_bytes
        self._held: dict[int, tuple[bytes | None, float | None]] = {}
        self._held_bytes = 0
        self._waiting_since: float | None = None

    def add(
        self, index: int, data: bytes | None, timestamp_ms: float | None, now_ms: float
    ) -> tuple[list[_Event], bool]:
        if index < self.expected or index in self._held:
            return self.expire(now_ms), False
        self._held[index] = (data, timestamp_ms)
        self._held_bytes += len(data or b"")
        return self.expire(now_ms), True

    def expire(self, now_ms: float) -> list[_Event]:
        events: list[_Event] = []
        while self._held:
            if self.expected in self._held:
                data, timestamp_ms = self._held.pop(self.expected)
                self._held_bytes -= len(data or b"")
                events.append(_Event(self.expected, data, timestamp_ms))
                self.expected += 1
                self._waiting_since = None
                continue
            if self._waiting_since is None:
                self._waiting_since = now_ms
            first = min(self._held)
            if (
                len(self._held) > self._window
                or first - self.expected > self._window
                or self._held_bytes > self._max_bytes
                or now_ms - self._waiting_since >= self._timeout_ms
            ):
                events.append(_Event(missing=(self.expected, first - 1)))
                self.expected = first
                continue
            break
        if not self._held:
            self._waiting_since = None
        return events


# --------------------------------------------------------------------------- decoding


@dataclass(eq=False)
class _Sample:
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
class _Break:
    """Data was lost or unusable here: decoding must restart at a keyframe."""

    error: MediaError | None


class _Decoder:
    """One codec context for the stream; errors come out as MediaError.

    It also knows which packets went in and have not come out yet: with
    B-frames a picture is output after pictures decoded later that refer to
    it, so a frame is only *confirmed* once everything decoded before it has
    come out unflagged (see ``confirmed_below``).
    """

    def __init__(self, codec: str, max_pixels: int) -> None:
        self.codec = codec
        self._max_pixels = max_pixels
        self._meta: OrderedDict[int, _Sample] = OrderedDict()
        self._inside: set[int] = set()
        self._ctx = self._open()

    def _open(self) -> av.CodecContext:
        ctx = av.CodecContext.create(self.codec, "r")
        ctx.thread_count = 1  # many streams per core beat one fast stream; also no frame delay
        # max_pixels: the decoder refuses larger pictures (H.264 sizes come from the SPS).
        # err_detect=explode: H.264 reports a damaged slice when it is decoded instead of
        # concealing it and flagging the picture only when it is output.
        ctx.options = {"max_pixels": str(self._max_pixels), "err_detect": "explode"}
        return ctx

    def decode(self, sample: _Sample) -> list[tuple[av.VideoFrame, _Sample]]:
        packet = av.Packet(sample.data)
        packet.pts = sample.seq
        self._meta[sample.seq] = sample
        while len(self._meta) > _FRAME_META:
            self._meta.popitem(last=False)
        self._inside.add(sample.seq)
        return self._run(packet)

    def drain(self) -> list[tuple[av.VideoFrame, _Sample]]:
        frames = self._run(None)
        self.flush()
        return frames

    def flush(self) -> None:
        self._ctx.flush_buffers()  # a no-op on a context not opened yet
        self._inside.clear()

    def reset(self) -> None:
        self._ctx = self._open()
        self._inside.clear()

    def confirmed_below(self) -> float:
        """Frames with a lower seq cannot refer to a picture still inside the decoder."""
        if not self._ctx.has_b_frames or not self._inside:
            return math.inf
        # A packet that never yields a picture must not hold everything back:
        # reordering never spans more than 16 pictures.
        newest = max(self._inside)
        self._inside = {seq for seq in self._inside if seq > newest - 16}
        return min(self._inside)

    def _run(self, packet: av.Packet | None) -> list[tuple[av.VideoFrame, _Sample]]:
        try:
            frames = self._ctx.decode(packet)
        except Exception as exc:  # av.error.* and anything else the codec raises
            width, height = self._ctx.width, self._ctx.height
            self.reset()
            if width * height > self._max_pixels:
                raise MediaError(
                    413, f"video is {width}x{height}; the limit is {self._max_pixels} pixels"
                ) from exc
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise MediaError(
                415,
                f"undecodable {_CODEC_NAMES[self.codec]} data ({reason}); "
                "resuming at the next keyframe",
            ) from exc
        out = []
        for frame in frames:
            sample = self._meta.get(frame.pts) if frame.pts is not None else None
            if sample is not None:
                self._inside.discard(sample.seq)
                out.append((frame, sample))
        return out


# --------------------------------------------------------------------------- bitstreams


def _nal_spans(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(nal_unit_type, start, end) of each NAL unit of an Annex B buffer."""
    start = data.find(b"\x00\x00\x01")
    while start >= 0 and start + 3 < len(data):
        begin = start + 3
        nxt = data.find(b"\x00\x00\x01", begin)
        end = len(data) if nxt < 0 else (nxt - 1 if data[nxt - 1] == 0 else nxt)
        yield data[begin] & 0x1F, begin, end
        start = nxt


class _H264Params:
    """Per-stream H.264 bookkeeping done at demux time, before any decoding.

    Remembers SPS/PPS so a keyframe can always be decoded on its own (after a
    decoder reset, or when they live in the container's avcC). And follows
    ``frame_num``: a reference picture that goes missing (a lost or garbled
    chunk swallowing whole frames) makes it jump, which the decoder itself
    papers over by repeating old pictures without flagging anything.
    """

    def __init__(self, sps: list[bytes] | None = None, pps: list[bytes] | None = None) -> None:
        self._sps = sps or []
        self._pps = pps or []
        self._order: _SpsOrder | None = _sps_order(self._sps[-1]) if self._sps else None
        self._prev_frame_num: int | None = None

    def forget_order(self) -> None:
        """After a discontinuity: nothing to compare the next frame_num with."""
        self._prev_frame_num = None

    def sample(self, annexb: bytes, **fields: object) -> _Sample:
        """The access unit as a sample; _FramesMissing if frame_num says frames were lost."""
        types = set()
        sps, pps = [], []
        first_slice: tuple[int, int] | None = None
        for nal_type, begin, end in _nal_spans(annexb):
            types.add(nal_type)
            if nal_type == 7:
                sps.append(annexb[begin:end])
            elif nal_type == 8:
                pps.append(annexb[begin:end])
            elif nal_type in (1, 5) and first_slice is None:
                first_slice = (begin, end)
        if sps:
            self._sps, self._order = sps, _sps_order(sps[-1])
        self._pps = pps or self._pps
        key = 5 in types
        if first_slice is not None:
            self._follow_frame_num(annexb[first_slice[0] : first_slice[1]], key)
        if key and not (sps and pps) and self._sps and self._pps:
            annexb = b"".join(b"\x00\x00\x00\x01" + nal for nal in self._sps + self._pps) + annexb
        return _Sample(annexb, "h264", key, **fields)  # type: ignore[arg-type]

    def _follow_frame_num(self, slice_nal: bytes, key: bool) -> None:
        order = self._order
        if order is None or order.gaps_allowed:
            return
        try:
            bits = _Bits(_unescape(slice_nal[1:32]))
            bits.ue(), bits.ue(), bits.ue()  # first_mb_in_slice, slice_type, pps_id
            if order.separate_colour_planes:
                bits.u(2)
            frame_num = bits.u(order.frame_num_bits)
        except _Corrupt:
            return
        previous = self._prev_frame_num
        if not key and previous is not None:
            following = (previous + 1) % (1 << order.frame_num_bits)
            if frame_num not in (previous, following):
                self._prev_frame_num = None
                raise _FramesMissing(f"frame_num jumps from {previous} to {frame_num}")
        if slice_nal[0] & 0x60:  # nal_ref_idc: a reference picture advances the count
            self._prev_frame_num = frame_num


@dataclass(frozen=True)
class _SpsOrder:
    frame_num_bits: int
    separate_colour_planes: bool
    gaps_allowed: bool


class _Bits:
    """Big-endian bit reader with Exp-Golomb codes (H.264 7.2, 9.1)."""

    def __init__(self, data: bytes) -> None:
        self._value = int.from_bytes(data, "big")
        self._length = 8 * len(data)
        self._pos = 0

    def u(self, n: int) -> int:
        if self._pos + n > self._length:
            raise _Corrupt("bitstream ends early")
        self._pos += n
        return (self._value >> (self._length - self._pos)) & ((1 << n) - 1)

    def ue(self) -> int:
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
            if zeros > 31:
                raise _Corrupt("invalid Exp-Golomb code")
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        code = self.ue()
        return (code + 1) // 2 if code & 1 else -(code // 2)


def _unescape(nal: bytes) -> bytes:
    return nal.replace(b"\x00\x00\x03", b"\x00\x00")


_HIGH_PROFILES = frozenset({100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135})


def _sps_order(sps: bytes) -> _SpsOrder | None:
    """The SPS fields frame_num depends on (H.264 7.3.2.1.1), or None if unreadable."""
    try:
        bits = _Bits(_unescape(sps[1:]))
        profile = bits.u(8)
        bits.u(16)  # constraint flags, level_idc
        bits.ue()  # seq_parameter_set_id
        separate = False
        if profile in _HIGH_PROFILES:
            chroma_format = bits.ue()
            if chroma_format == 3:
                separate = bool(bits.u(1))
            bits.ue(), bits.ue(), bits.u(1)  # bit depths, qpprime_y_zero_transform_bypass
            if bits.u(1):  # seq_scaling_matrix_present_flag
                for index in range(8 if chroma_format != 3 else 12):
                    if bits.u(1):
                        last = following = 8
                        for _ in range(16 if index < 6 else 64):
                            if following:
                                following = (last + bits.se() + 256) % 256
                            last = following or last
        frame_num_bits = bits.ue() + 4
        poc_type = bits.ue()
        if poc_type == 0:
            bits.ue()
        elif poc_type == 1:
            bits.u(1), bits.se(), bits.se()
            for _ in range(bits.ue()):
                bits.se()
        bits.ue()  # max_num_ref_frames
        return _SpsOrder(frame_num_bits, separate, bool(bits.u(1)))
    except _Corrupt:
        return None


def _avcc_to_annexb(data: bytes, length_size: int) -> bytes:
    out = bytearray()
    i = 0
    while i < len(data):
        if i + length_size > len(data):
            raise _Corrupt("NAL length runs past the sample")
        size = int.from_bytes(data[i : i + length_size], "big")
        i += length_size
        if size == 0 or i + size > len(data):
            raise _Corrupt("NAL unit runs past the sample")
        out += b"\x00\x00\x00\x01"
        out += data[i : i + size]
        i += size
    return bytes(out)


def _parse_avcc(config: bytes) -> tuple[int, list[bytes], list[bytes]]:
    """AVCDecoderConfigurationRecord -> (NAL length size, SPS list, PPS list)."""
    if len(config) < 7 or config[0] != 1:
        raise _Corrupt("bad avcC record")
    length_size = (config[4] & 0x03) + 1
    lists: list[list[bytes]] = [[], []]
    i = 5
    for which, mask in ((0, 0x1F), (1, 0xFF)):
        if i >= len(config):
            raise _Corrupt("bad avcC record")
        count = config[i] & mask
        i += 1
        for _ in range(count):
            size = int.from_bytes(config[i : i + 2], "big")
            if i + 2 + size > len(config):
                raise _Corrupt("bad avcC record")
            lists[which].append(config[i + 2 : i + 2 + size])
            i += 2 + size
    return length_size, lists[0], lists[1]


def _vp8_key(data: bytes) -> tuple[bool, tuple[int, int] | None]:
    if len(data) < 10 or data[0] & 0x01 or data[3:6] != b"\x9d\x01\x2a":
        return False, None
    width, height = struct.unpack("<HH", data[6:10])
    return True, (width & 0x3FFF, height & 0x3FFF)


def _vp9_key(data: bytes) -> tuple[bool, tuple[int, int] | None]:
    """Reads the VP9 uncompressed header just far enough for frame type and size."""
    bits = int.from_bytes(data[:16].ljust(16, b"\x00"), "big")
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        pos += n
        return (bits >> (128 - pos)) & ((1 << n) - 1)

    if len(data) < 10 or read(2) != 2:
        return False, None
    profile = read(1) | (read(1) << 1)
    if profile == 3:
        read(1)
    if read(1):  # show_existing_frame
        return False, None
    if read(1) != 0:  # frame_type: 0 is a keyframe
        return False, None
    read(2)  # show_frame, error_resilient_mode
    if read(24) != 0x498342:
        return False, None
    if profile >= 2:
        read(1)  # ten_or_twelve_bit
    if read(3) != 7:  # color_space other than sRGB
        read(1)
        if profile in (1, 3):
            read(3)
    elif profile in (1, 3):
        read(1)
    return True, (read(16) + 1, read(16) + 1)


def _vp_sample(codec: str, data: bytes, **fields: object) -> _Sample:
    """A VP8/VP9 frame; _Corrupt if its first bytes cannot start one (framing is off)."""
    if codec == "vp8":
        first_partition = int.from_bytes(data[:3], "little") >> 5
        if len(data) < 3 or first_partition > len(data):
            raise _Corrupt("not a VP8 frame")
    elif not data or data[0] >> 6 != 2:
        raise _Corrupt("not a VP9 frame")
    key, size = (_vp8_key if codec == "vp8" else _vp9_key)(data)
    return _Sample(data, codec, key, size=size, **fields)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- demuxers


class _Corrupt(Exception):
    """Container or bitstream data that cannot be right."""


class _FramesMissing(_Corrupt):
    """The bitstream says frames are missing; the container framing may be fine."""


class _Bytes:
    """A growing byte buffer read from the front; tracks the stream offset consumed.

    A mark keeps the bytes from one unit start (a frame, at most) so that a
    parser that finds itself out of sync can rescan from there rather than
    from the point where it noticed, which may lie past the next sync point.
    """

    def __init__(self, max_marked: int = 16 * 1024 * 1024) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._mark: int | None = None
        self._max_marked = max_marked
        self.consumed = 0

    def extend(self, data: bytes) -> None:
        if self._mark is not None and self._pos - self._mark > self._max_marked:
            self._mark = None
        keep = self._pos if self._mark is None else min(self._pos, self._mark)
        if keep > 65536 and keep * 2 > len(self._buf):
            del self._buf[:keep]
            self._pos -= keep
            if self._mark is not None:
                self._mark -= keep
        self._buf += data

    def mark(self, on: bool = True) -> None:
        self._mark = self._pos if on else None

    def rewind(self) -> bool:
        """Back to the mark, if any (then dropped)."""
        if self._mark is None:
            return False
        self.consumed -= self._pos - self._mark
        self._pos, self._mark = self._mark, None
        return True

    def __len__(self) -> int:
        return len(self._buf) - self._pos

    def peek(self, n: int) -> bytes:
        return bytes(self._buf[self._pos : self._pos + n])

    def take(self, n: int) -> bytes:
        data = self.peek(n)
        self.skip(n)
        return data

    def skip(self, n: int) -> int:
        n = min(n, len(self))
        self._pos += n
        self.consumed += n
        return n

    def find(self, pattern: bytes) -> int:
        at = self._buf.find(pattern, self._pos)
        return -1 if at < 0 else at - self._pos

    def clear(self) -> None:
        self.consumed += len(self)
        self._buf.clear()
        self._pos = 0
        self._mark = None


_Item = _Sample | _Break


class _AnnexB:
    """Raw H.264: FFmpeg's parser splits access units across chunk boundaries.

    The parser emits an access unit once the next one starts, so the last
    frame of a chunk comes out with the next chunk. It buffers until it finds
    an access unit boundary, so bytes without any are dropped past a bound.
    """

    def __init__(self, max_frame_bytes: int) -> None:
        self._max_unit = 2 * max_frame_bytes
        self._parser = av.CodecContext.create("h264", "r")
        self._params = _H264Params()
        self._unparsed = 0  # bytes fed since the parser last produced an access unit

    def feed(self, data: bytes, chunk: int, pts_ms: float | None, time_ms: float) -> list[_Item]:
        try:
            packets = self._parser.parse(data)
        except Exception:  # the parser never should; if it does, start afresh
            self.reset()
            return [
                _Break(MediaError(415, "unparseable H.264 data; resuming at the next keyframe"))
            ]
        self._unparsed = len(data) if packets else self._unparsed + len(data)
        out: list[_Item] = []
        for packet in packets:
            fields = {"pts_ms": pts_ms, "time_ms": time_ms, "chunk_index": chunk}
            try:
                out.append(self._params.sample(bytes(packet), **fields))
            except _FramesMissing as exc:
                out.append(_Break(MediaError(415, f"H.264 frames missing ({exc})")))
        if self._unparsed > self._max_unit:
            self.reset()
            message = f"no H.264 access unit in {self._max_unit} bytes; is this Annex B?"
            out.append(_Break(MediaError(415, message)))
        return out

    def reset(self) -> None:
        self._parser = av.CodecContext.create("h264", "r")
        self._params.forget_order()
        self._unparsed = 0


def _make_demuxer(
    container: str, limits: ImageLimits, declared_codec: str | None
) -> _AnnexB | _WebM | _Fmp4:
    if container == WEBM:
        return _WebM(limits.max_bytes, declared_codec)
    if container == MP4:
        return _Fmp4(limits.max_bytes)
    return _AnnexB(limits.max_bytes)


# EBML / Matroska element IDs (RFC 9559), marker bits included.
# fmt: off
_EBML = 0x1A45DFA3
_SEGMENT, _INFO, _TRACKS, _CLUSTER = 0x18538067, 0x1549A966, 0x1654AE6B, 0x1F43B675
_TRACK_ENTRY, _VIDEO, _BLOCK_GROUP = 0xAE, 0xE0, 0xA0
_TIMESTAMP_SCALE, _TIMESTAMP = 0x2AD7B1, 0xE7
_TRACK_NUMBER, _TRACK_TYPE, _CODEC_ID, _CODEC_PRIVATE = 0xD7, 0x83, 0x86, 0x63A2
_SIMPLE_BLOCK, _BLOCK = 0xA3, 0xA1
_VOID, _CRC32 = 0xEC, 0xBF
# Masters whose children we read: walked into, so their size (often unknown) never matters.
_ENTER = frozenset({_SEGMENT, _INFO, _TRACKS, _TRACK_ENTRY, _VIDEO, _CLUSTER, _BLOCK_GROUP})
_VALUES = frozenset({_TIMESTAMP_SCALE, _TIMESTAMP, _TRACK_NUMBER, _TRACK_TYPE, _CODEC_ID,
                     _CODEC_PRIVATE})
# Every other element that may appear at those levels: skipped. Anything else means we lost sync.
_SKIP = frozenset({
    _EBML, 0x114D9B74, 0x1C53BB6B, 0x1043A770, 0x1254C367, 0x1941A469, _VOID, _CRC32,
    # Info
    0x73A4, 0x7384, 0x3CB923, 0x3C83AB, 0x3EB923, 0x3E83BB, 0x4444, 0x6924, 0x4489, 0x4461,
    0x7BA9, 0x4D80, 0x5741,
    # Cluster and BlockGroup
    0x5854, 0xA7, 0xAB, 0xAF, 0xA2, 0x75A1, 0x9B, 0xFA, 0xFB, 0xFD, 0xA4, 0x75A2, 0x8E, 0xC8,
    # TrackEntry
    0x73C5, 0xB9, 0x88, 0x55AA, 0x55AB, 0x55AC, 0x55AD, 0x55AE, 0x55AF, 0x9C, 0x6DE7, 0x6DF8,
    0x23E383, 0x234E7A, 0x23314F, 0x537F, 0x55EE, 0x41E4, 0x536E, 0x22B59C, 0x22B59D,
    0x258688, 0x7446, 0x3A9697, 0x3B4040, 0x26B240, 0xAA, 0x6FAB, 0x56AA, 0x56BB, 0x6624,
    0xE1, 0xE2, 0xC0, 0xC1, 0xC6, 0xC7, 0xC4, 0x6D80,
    # Video (PixelWidth/Height included: the frame size is read from the bitstream)
    0x9A, 0x9D, 0x53B8, 0x53C0, 0x53B9, 0xB0, 0xBA, 0x54AA, 0x54BB, 0x54CC, 0x54DD, 0x54B0,
    0x54BA, 0x54B2, 0x54B3, 0x2EB524, 0x2FB523, 0x2383E3, 0x55B0, 0x7670,
})
# Once clusters flow, only top-level, Cluster and BlockGroup elements may appear: the
# many one-byte IDs of track headers are then noise, which is how desync is noticed early.
_CLUSTER_LEVEL = frozenset({
    _EBML, _SEGMENT, _INFO, _TRACKS, _CLUSTER, 0x114D9B74, 0x1C53BB6B, 0x1043A770, 0x1254C367,
    0x1941A469, _VOID, _CRC32, _TIMESTAMP, 0x5854, 0xA7, 0xAB, _SIMPLE_BLOCK, _BLOCK_GROUP, 0xAF,
    _BLOCK, 0xA2, 0x75A1, 0x9B, 0xFA, 0xFB, 0xFD, 0xA4, 0x75A2, 0x8E, 0xC8,
})
_TINY = frozenset({_TIMESTAMP, 0xA7, 0xAB, 0x9B, 0xFA, 0xFB, 0xFD, _CRC32})  # integers, CRC
# fmt: on
_MKV_CODECS = {"V_VP8": "vp8", "V_VP9": "vp9", "V_MPEG4/ISO/AVC": "h264"}


def _vint(data: bytes, at: int, max_length: int) -> tuple[int, int, bool] | None:
    """EBML variable-size integer at ``at``: (value, length, all-ones) or None if incomplete."""
    if at >= len(data):
        return None
    first = data[at]
    length = 9 - first.bit_length()
    if first == 0 or length > max_length:
        raise _Corrupt("invalid EBML number")
    if at + length > len(data):
        return None
    value = first & (0xFF >> length)
    for byte in data[at + 1 : at + length]:
        value = (value << 8) | byte
    return value, length, value == (1 << (7 * length)) - 1


@dataclass
class _MkvTrack:
    number: int = 0
    kind: int = 0
    codec_id: str = ""
    private: bytes = b""


class _WebM:
    """Incremental EBML walker for WebM/Matroska as MediaRecorder writes it.

    Masters we need are entered rather than read whole, so unknown-size
    Segments and Clusters (live recordings) need no special case; blocks of
    our video track are buffered whole (one frame), everything else is
    skipped without buffering.
    """

    def __init__(self, max_frame_bytes: int, declared_codec: str | None) -> None:
        self._max_frame = max_frame_bytes
        self._declared_codec = declared_codec
        self._header_lost_reported = False
        self._buf = _Bytes(2 * max_frame_bytes)
        self._skip = 0
        self._resync = False
        self._tracks: list[_MkvTrack] = []
        self._video: _MkvTrack | None = None
        self._video_codec: str | None = None
        self._chosen = False
        self._guessed = False  # the video track was found without the Tracks header
        self._length_size = 4
        self._params = _H264Params()
        self._scale_ns = 1_000_000
        self._cluster_ts: int | None = None
        self._chunk, self._time_ms = 0, 0.0

    def reset(self) -> None:
        self._buf.clear()
        self._skip = 0
        self._resync = True
        self._cluster_ts = None
        self._params.forget_order()

    def feed(self, data: bytes, chunk: int, pts_ms: float | None, time_ms: float) -> list[_Item]:
        self._buf.extend(data)
        out: list[_Item] = []
        self._chunk, self._time_ms = chunk, time_ms
        while self._step(out):
            pass
        return out

    def _step(self, out: list[_Item]) -> bool:
        """Consume one element header or payload; False when more bytes are needed."""
        buf = self._buf
        if self._skip:
            self._skip -= buf.skip(self._skip)
            return not self._skip
        if self._resync and not self._find_sync():
            return False
        head = buf.peek(12)
        try:
            parsed = _vint(head, 0, 4)
            if parsed is None:
                return False
            id_length = parsed[1]
            eid = int.from_bytes(head[:id_length], "big")
            size_info = _vint(head, id_length, 8)
            if size_info is None:
                return False
        except _Corrupt:
            return self._desync(out, "invalid element header")
        size, size_length, unknown = size_info
        header = id_length + size_length
        if self._chosen and eid not in _CLUSTER_LEVEL:
            return self._desync(out, f"unexpected element 0x{eid:X} among clusters")
        if eid in _TINY and size > 8:
            return self._desync(out, f"implausible size for element 0x{eid:X}")
        if eid in _ENTER:
            if unknown and eid not in (_SEGMENT, _CLUSTER):
                return self._desync(out, "unknown size where none is allowed")
            buf.skip(header)
            self._enter(eid, out)
            return True
        if unknown or size > _MAX_SKIP_BYTES:
            return self._desync(out, f"implausible size for element 0x{eid:X}")
        if eid in _VALUES:
            if size > _MAX_HEADER_BYTES:
                return self._desync(out, f"implausible size for element 0x{eid:X}")
            if len(buf) < header + size:
                return False
            buf.skip(header)
            self._value(eid, buf.take(size), out)
            return True
        if eid in (_SIMPLE_BLOCK, _BLOCK):
            buf.mark(size <= self._max_frame)
            return self._block(header, size, out)
        if eid == _EBML:
            if size > 4096:
                return self._desync(out, "implausible EBML header")
            if len(buf) < header + size:
                return False
            buf.skip(header)
            payload = buf.take(size)
            if not any(doc in payload for doc in (b"webm", b"matroska")):
                return self._desync(out, "EBML header of another document type")
            self._restart(out)
            return True
        if eid in _SKIP:
            if size > self._max_frame:  # else keep the last block's mark: this may be noise
                buf.mark(False)
            buf.skip(header)
            self._skip = size
            return True
        return self._desync(out, f"unexpected element 0x{eid:X}")

    # Header values count only before the first Cluster: once blocks flow, an
    # element that looks like one can only be noise read out of sync.

    def _enter(self, eid: int, out: list[_Item]) -> None:
        if eid == _TRACK_ENTRY and not self._chosen:
            self._tracks.append(_MkvTrack())
        elif eid == _CLUSTER:
            self._cluster_ts = None
            self._choose_track(out)

    def _value(self, eid: int, payload: bytes, out: list[_Item]) -> None:
        number = int.from_bytes(payload[:8], "big")
        track = self._tracks[-1] if self._tracks else None
        if eid == _TIMESTAMP:
            self._cluster_ts = number
        elif self._chosen:
            return
        elif eid == _TIMESTAMP_SCALE:
            self._scale_ns = number or 1_000_000
        elif track is None:
            return
        elif eid == _TRACK_NUMBER:
            track.number = number
        elif eid == _TRACK_TYPE:
            track.kind = number
        elif eid == _CODEC_ID:
            track.codec_id = payload.rstrip(b"\x00").decode("ascii", "replace")
        elif eid == _CODEC_PRIVATE:
            track.private = payload

    def _restart(self, out: list[_Item]) -> None:
        """A new EBML header: a new recording, possibly with other tracks and codec."""
        if self._tracks or self._cluster_ts is not None:
            out.append(_Break(None))
        self._tracks, self._video, self._chosen, self._guessed = [], None, False, False
        self._scale_ns, self._cluster_ts = 1_000_000, None
        self._header_lost_reported = False

    def _choose_track(self, out: list[_Item]) -> None:
        if self._chosen or not self._tracks:
            return
        self._chosen = True
        video = next((t for t in self._tracks if t.kind == 1), None)
        if video is None:
            out.append(_Break(MediaError(415, "the WebM data has no video track")))
            return
        codec = _MKV_CODECS.get(video.codec_id)
        if codec is None:
            out.append(_Break(MediaError(415, f"unsupported video codec {video.codec_id}")))
            return
        if codec == "h264":
            try:
                self._length_size, sps, pps = _parse_avcc(video.private)
            except _Corrupt:
                out.append(_Break(MediaError(415, "H.264 track without a valid avcC")))
                return
            self._params = _H264Params(sps, pps)
        self._video, self._video_codec = video, codec

    def _block(self, header: int, size: int, out: list[_Item]) -> bool:
        buf = self._buf
        try:
            track_info = _vint(buf.peek(header + 8), header, 8)
        except _Corrupt:
            return self._desync(out, "invalid block track number")
        if track_info is None:
            return False
        self._choose_track(out)
        number, number_length, _ = track_info
        video = self._video
        guessing = video is None and not self._tracks and self._can_guess(out)
        if not guessing and (video is None or number != video.number):
            known = self._guessed or any(number == t.number for t in self._tracks)
            if self._chosen and not known:
                return self._desync(out, f"block for unknown track {number}")
            buf.skip(header)
            self._skip = size
            return True
        if size > self._max_frame:
            message = f"video frame is {size} bytes; the limit is {self._max_frame}"
            out.append(_Break(MediaError(413, message)))
            buf.skip(header)
            self._skip = size
            return True
        if len(buf) < header + size:
            return False
        buf.skip(header)
        body = buf.take(size)
        if size < number_length + 3:
            return self._desync(out, "block too short")
        relative = struct.unpack(">h", body[number_length : number_length + 2])[0]
        flags = body[number_length + 2]
        if flags & 0x06:
            out.append(_Break(MediaError(415, "laced video blocks are not supported")))
            return True
        payload = body[number_length + 3 :]
        if guessing and not self._adopt(number, payload, out):
            return True
        pts_ms = None
        if self._cluster_ts is not None:
            pts_ms = (self._cluster_ts + relative) * self._scale_ns / 1e6
        time_ms = pts_ms if pts_ms is not None else self._time_ms
        fields = {"pts_ms": pts_ms, "time_ms": time_ms, "chunk_index": self._chunk}
        assert self._video_codec is not None
        try:
            if self._video_codec == "h264":
                annexb = _avcc_to_annexb(payload, self._length_size)
                out.append(self._params.sample(annexb, **fields))
            else:
                out.append(_vp_sample(self._video_codec, payload, **fields))
        except _FramesMissing as exc:
            out.append(_Break(MediaError(415, f"H.264 frames missing ({exc})")))
        except _Corrupt as exc:  # a frame that cannot be one: the block boundaries are off
            return self._desync(out, f"frame does not parse: {exc}")
        return True

    def _can_guess(self, out: list[_Item]) -> bool:
        """Without the Tracks header (lost with the first chunk), VP8/VP9 can still be found."""
        if self._declared_codec in ("vp8", "vp9"):
            return True
        if not self._header_lost_reported:
            self._header_lost_reported = True
            message = "the WebM header (Tracks) is missing; start a new stream"
            out.append(_Break(MediaError(415, message)))
        return False

    def _adopt(self, number: int, payload: bytes, out: list[_Item]) -> bool:
        """Take ``number`` as the video track once it carries a keyframe of the declared codec."""
        codec = self._declared_codec
        key, _ = (_vp8_key if codec == "vp8" else _vp9_key)(payload)
        if not key:
            return False
        self._tracks = [_MkvTrack(number, 1, "V_VP8" if codec == "vp8" else "V_VP9")]
        self._chosen, self._guessed = False, True  # other tracks stay unknown: no desync on them
        self._choose_track(out)
        return True

    def _desync(self, out: list[_Item], reason: str) -> bool:
        out.append(
            _Break(
                MediaError(
                    415, f"corrupt WebM data ({reason}); resuming at the next cluster and keyframe"
                )
            )
        )
        self._buf.rewind()  # the last block's size may have swallowed the next cluster
        self._buf.skip(1)
        self._params.forget_order()
        self._skip = 0
        self._resync = True
        self._cluster_ts = None
        return True

    def _find_sync(self) -> bool:
        """Skip to the next plausible Cluster (ID, size, Timestamp/CRC-32) or EBML header."""
        buf = self._buf
        while True:
            hits = [
                at
                for at in (buf.find(b"\x1f\x43\xb6\x75"), buf.find(b"\x1a\x45\xdf\xa3"))
                if at >= 0
            ]
            if not hits:
                buf.skip(max(0, len(buf) - 3))
                return False
            buf.skip(min(hits))
            head = buf.peek(13)
            if head.startswith(b"\x1a\x45\xdf\xa3"):
                self._resync = False
                return True
            try:
                size_info = _vint(head, 4, 8)
            except _Corrupt:
                buf.skip(1)
                continue
            if size_info is None or len(head) <= 4 + size_info[1]:
                return False  # wait for the bytes that confirm or refute this candidate
            if head[4 + size_info[1]] in (_TIMESTAMP, _CRC32):
                self._resync = False
                return True
            buf.skip(1)


@dataclass
class _Mp4Track:
    track_id: int = 0
    handler: bytes = b""
    timescale: int = 0
    entry: bytes = b""
    entry_body: bytes = b""


def _boxes(data: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, payload end) of the boxes in data[start:end]."""
    end = len(data) if end is None else end
    i = start
    while i + 8 <= end:
        size, kind = struct.unpack(">I4s", data[i : i + 8])
        header = 8
        if size == 1:
            if i + 16 > end:
                raise _Corrupt("truncated box header")
            size = struct.unpack(">Q", data[i + 8 : i + 16])[0]
            header = 16
        elif size == 0:
            size = end - i
        if size < header or i + size > end:
            raise _Corrupt(f"box {kind!r} overruns its parent")
        yield kind, i + header, i + size
        i += size


def _child(data: bytes, start: int, end: int, kind: bytes) -> tuple[int, int] | None:
    for child, begin, finish in _boxes(data, start, end):
        if child == kind:
            return begin, finish
    return None


def _printable(kind: bytes) -> bool:
    return all(0x20 <= b < 0x7F for b in kind)


class _Fmp4:
    """Incremental box walker for fragmented MP4 (MediaRecorder, ffmpeg frag_keyframe).

    ``moov`` and each ``moof`` are read whole (small); the ``moof`` yields the
    offset and size of every sample of the video track, so the following
    ``mdat`` is consumed sample by sample as it arrives, buffering at most
    one sample and skipping the rest (audio) unbuffered.
    """

    def __init__(self, max_frame_bytes: int) -> None:
        self._max_frame = max_frame_bytes
        self._buf = _Bytes(2 * max_frame_bytes)
        self._skip = 0
        self._resync = False
        self._origin = 0  # where the current recording's byte 0 is, in our byte count
        self._lost = False  # bytes were lost since: absolute offsets no longer match ours
        self._track: _Mp4Track | None = None
        self._codec: str | None = None
        self._length_size = 4
        self._params = _H264Params()
        self._next_dts = 0
        self._trex: dict[int, tuple[int, int, int]] = {}  # per track: default duration, size, flags
        self._samples: deque[tuple[int, int, float]] = deque()
        self._mdat_end: float | None = None
        self._chunk, self._time_ms = 0, 0.0

    def reset(self) -> None:
        self._buf.clear()
        self._skip = 0
        self._resync = True
        self._lost = True
        self._samples.clear()
        self._mdat_end = None
        self._params.forget_order()

    def feed(self, data: bytes, chunk: int, pts_ms: float | None, time_ms: float) -> list[_Item]:
        self._buf.extend(data)
        self._chunk, self._time_ms = chunk, time_ms
        out: list[_Item] = []
        while self._step(out):
            pass
        return out

    def _step(self, out: list[_Item]) -> bool:
        buf = self._buf
        if self._skip:
            self._skip -= buf.skip(self._skip)
            return not self._skip
        if self._resync and not self._find_sync():
            return False
        if self._mdat_end is not None:
            return self._mdat(out)
        head = buf.peek(16)
        if len(head) < 8:
            return False
        size, kind = struct.unpack(">I4s", head[:8])
        header = 8
        if not _printable(kind):
            return self._desync(out, "invalid box type")
        if size == 1:
            if len(head) < 16:
                return False
            size, header = struct.unpack(">Q", head[8:16])[0], 16
        start = buf.consumed
        if kind == b"mdat":
            if 0 < size < header:
                return self._desync(out, "mdat smaller than its header")
            buf.skip(header)
            self._mdat_end = math.inf if size == 0 else start + size
            return True
        if kind == b"ftyp":  # a recording starts here: its absolute offsets count from here
            self._origin, self._lost = start, False
        if size < header or size > _MAX_SKIP_BYTES:
            return self._desync(out, f"implausible size for box {kind!r}")
        if kind in (b"moov", b"moof"):
            if size > _MAX_HEADER_BYTES:
                return self._desync(out, f"{kind.decode()} box too large")
            if len(buf) < size:
                return False
            box = buf.take(size)
            try:
                if kind == b"moov":
                    self._moov(box, header, out)
                else:
                    self._moof(box, header, start, out)
            except (_Corrupt, struct.error, IndexError) as exc:
                out.append(_Break(MediaError(415, f"corrupt MP4 {kind.decode()} ({exc})")))
            return True
        buf.skip(header)
        self._skip = size - header
        return True

    def _moov(self, box: bytes, header: int, out: list[_Item]) -> None:
        tracks: dict[int, _Mp4Track] = {}
        trex: dict[int, tuple[int, int, int]] = {}
        for kind, begin, end in _boxes(box, header):
            if kind == b"trak":
                track = self._trak(box, begin, end)
                tracks[track.track_id] = track
            elif kind == b"mvex":
                for child, b2, _ in _boxes(box, begin, end):
                    if child == b"trex":
                        track_id, _index, duration, size, flags = struct.unpack(
                            ">5I", box[b2 + 4 : b2 + 24]
                        )
                        trex[track_id] = (duration, size, flags)
        video = next((t for t in tracks.values() if t.handler == b"vide"), None)
        self._track = None
        if video is None:
            out.append(_Break(MediaError(415, "the MP4 data has no video track")))
            return
        self._trex, self._next_dts = trex, 0
        entry = video.entry.decode("latin-1")
        if entry in ("avc1", "avc3"):
            found = _child(video.entry_body, 78, len(video.entry_body), b"avcC")
            if found is None:
                raise _Corrupt("avc1 sample entry without avcC")
            self._length_size, sps, pps = _parse_avcc(video.entry_body[found[0] : found[1]])
            self._params = _H264Params(sps, pps)
            self._codec = "h264"
        elif entry in ("vp08", "vp09"):
            self._codec = "vp8" if entry == "vp08" else "vp9"
        else:
            out.append(_Break(MediaError(415, f"unsupported video codec {entry!r} in MP4")))
            return
        if video.timescale <= 0:
            raise _Corrupt("video track without a timescale")
        self._track = video

    def _trak(self, box: bytes, begin: int, end: int) -> _Mp4Track:
        track = _Mp4Track()
        for kind, b2, e2 in _boxes(box, begin, end):
            if kind == b"tkhd":
                offset = 20 if box[b2] == 1 else 12
                track.track_id = struct.unpack(">I", box[b2 + offset : b2 + offset + 4])[0]
            elif kind == b"mdia":
                for child, b3, e3 in _boxes(box, b2, e2):
                    if child == b"mdhd":
                        offset = 20 if box[b3] == 1 else 12
                        track.timescale = struct.unpack(">I", box[b3 + offset : b3 + offset + 4])[0]
                    elif child == b"hdlr":
                        track.handler = box[b3 + 8 : b3 + 12]
                    elif child == b"minf":
                        stbl = _child(box, b3, e3, b"stbl")
                        stsd = stbl and _child(box, stbl[0], stbl[1], b"stsd")
                        if stsd:
                            for entry, b4, e4 in _boxes(box, stsd[0] + 8, stsd[1]):
                                track.entry, track.entry_body = entry, box[b4:e4]
                                break
        return track

    def _moof(self, box: bytes, header: int, moof_start: int, out: list[_Item]) -> None:
        """Locate this fragment's video samples (offset, size, pts) in our byte count."""
        track = self._track
        self._samples.clear()
        if track is None:
            return
        previous_end = moof_start
        ours: list[tuple[int, int, float]] = []
        absolute: list[list[tuple[int, int, float]]] = []  # samples placed by base_data_offset
        trafs = [(begin, end) for kind, begin, end in _boxes(box, header) if kind == b"traf"]
        for index, (begin, end) in enumerate(trafs):
            tfhd = _child(box, begin, end, b"tfhd")
            if tfhd is None:
                raise _Corrupt("traf without tfhd")
            t0 = tfhd[0]
            flags = int.from_bytes(box[t0 + 1 : t0 + 4], "big")
            track_id = struct.unpack(">I", box[t0 + 4 : t0 + 8])[0]
            mine = track_id == track.track_id
            at = t0 + 8
            base: int | None = None
            if flags & 0x01:
                base = self._origin + struct.unpack(">Q", box[at : at + 8])[0]
                at += 8
            if flags & 0x02:
                at += 4
            duration, size, _flags = self._trex.get(track_id, (0, 0, 0))
            if flags & 0x08:
                duration = struct.unpack(">I", box[at : at + 4])[0]
                at += 4
            if flags & 0x10:
                size = struct.unpack(">I", box[at : at + 4])[0]
                at += 4
            if base is None:
                base = moof_start if (flags & 0x020000 or index == 0) else previous_end
            dts = self._next_dts if mine else 0
            tfdt = _child(box, begin, end, b"tfdt")
            if tfdt is not None and mine:
                if box[tfdt[0]] == 1:
                    dts = struct.unpack(">Q", box[tfdt[0] + 4 : tfdt[0] + 12])[0]
                else:
                    dts = struct.unpack(">I", box[tfdt[0] + 4 : tfdt[0] + 8])[0]
            samples: list[tuple[int, int, float]] = []
            position = base
            for child, b2, _e2 in _boxes(box, begin, end):
                if child == b"trun":
                    position, dts = self._trun(
                        box, b2, base, position, dts, duration, size, samples
                    )
            previous_end = position
            if flags & 0x01:
                absolute.append(samples)
            if mine:
                self._next_dts = dts
                ours = samples
        if absolute and self._lost:
            # Offsets are the file's, and bytes were lost: our count no longer matches.
            # The mdat follows the moof (8-byte header), so its first sample re-anchors it.
            first = min((pos for samples in absolute for pos, _, _ in samples), default=None)
            if first is not None:
                shift = moof_start + len(box) + 8 - first
                self._origin += shift
                self._lost = False
                for samples in absolute:
                    samples[:] = [(pos + shift, size, pts) for pos, size, pts in samples]
        self._samples.extend(sorted(ours))

    def _trun(
        self,
        box: bytes,
        at: int,
        base: int,
        position: int,
        dts: int,
        duration: int,
        size: int,
        samples: list[tuple[int, int, float]],
    ) -> tuple[int, int]:
        """Append the run's (offset, size, pts) to ``samples``; return the end offset and dts."""
        version = box[at]
        flags = int.from_bytes(box[at + 1 : at + 4], "big")
        count = struct.unpack(">I", box[at + 4 : at + 8])[0]
        at += 8
        if flags & 0x01:
            position = base + struct.unpack(">i", box[at : at + 4])[0]
            at += 4
        if flags & 0x04:
            at += 4
        fields = [bit for bit in (0x100, 0x200, 0x400, 0x800) if flags & bit]
        if count * 4 * len(fields) > len(box) - at:
            raise _Corrupt("trun sample table runs past the box")
        assert self._track is not None
        timescale = self._track.timescale
        for _ in range(count):
            sample_duration, sample_size, cts = duration, size, 0
            for bit in fields:
                value = box[at : at + 4]
                at += 4
                if bit == 0x100:
                    sample_duration = int.from_bytes(value, "big")
                elif bit == 0x200:
                    sample_size = int.from_bytes(value, "big")
                elif bit == 0x800:
                    cts = int.from_bytes(value, "big", signed=version == 1)
            samples.append((position, sample_size, (dts + cts) * 1000 / timescale))
            position += sample_size
            dts += sample_duration
        return position, dts

    def _mdat(self, out: list[_Item]) -> bool:
        buf = self._buf
        assert self._mdat_end is not None
        while self._samples:
            start, size, pts_ms = self._samples[0]
            position = buf.consumed
            if start < position or start + size > self._mdat_end:
                return self._desync(out, "sample outside its mdat")
            if position < start:
                buf.skip(start - position)
                if buf.consumed < start:
                    return False
            if size > self._max_frame:
                self._samples.popleft()
                message = f"video frame is {size} bytes; the limit is {self._max_frame}"
                out.append(_Break(MediaError(413, message)))
                buf.mark(False)
                self._skip = size
                return True
            buf.mark()
            if len(buf) < size:
                return False
            self._samples.popleft()
            try:
                out.append(self._sample(buf.take(size), pts_ms))
            except _FramesMissing as exc:
                out.append(_Break(MediaError(415, f"H.264 frames missing ({exc})")))
            except _Corrupt as exc:  # offsets no longer match the data: bytes were lost
                return self._desync(out, f"sample does not parse: {exc}")
        buf.mark(False)
        if math.isinf(self._mdat_end):
            self._buf.skip(len(self._buf))
            return False
        self._skip = int(self._mdat_end) - buf.consumed
        self._mdat_end = None
        return True

    def _sample(self, data: bytes, pts_ms: float) -> _Sample:
        assert self._codec is not None
        fields = {"pts_ms": pts_ms, "time_ms": pts_ms, "chunk_index": self._chunk}
        if self._codec == "h264":
            return self._params.sample(_avcc_to_annexb(data, self._length_size), **fields)
        return _vp_sample(self._codec, data, **fields)

    def _desync(self, out: list[_Item], reason: str) -> bool:
        out.append(
            _Break(
                MediaError(
                    415, f"corrupt MP4 data ({reason}); resuming at the next fragment and keyframe"
                )
            )
        )
        self._buf.rewind()  # rescan from the sample that did not fit
        self._buf.skip(1)
        self._params.forget_order()
        self._skip = 0
        self._resync = True
        self._lost = True
        self._samples.clear()
        self._mdat_end = None
        return True

    def _find_sync(self) -> bool:
        """Skip to the next ``moof`` (followed by its ``mfhd``) or ``ftyp``/``moov``."""
        buf = self._buf
        while True:
            hits = [
                at for at in (buf.find(b"moof"), buf.find(b"ftyp"), buf.find(b"moov")) if at >= 0
            ]
            if not hits:
                buf.skip(max(0, len(buf) - 7))
                return False
            at = min(hits)
            if at < 4:  # no room for a size field: not a box start
                buf.skip(at + 1)
                continue
            head = buf.peek(at + 12)
            if len(head) < at + 12:
                buf.skip(at - 4)
                return False
            size = struct.unpack(">I", head[at - 4 : at])[0]
            kind = head[at : at + 4]
            plausible = 8 <= size <= _MAX_HEADER_BYTES or kind == b"ftyp"
            if plausible and (kind != b"moof" or head[at + 8 : at + 12] == b"mfhd"):
                buf.skip(at - 4)
                self._resync = False
                return True
            buf.skip(at + 1)
