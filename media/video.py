"""Client video chunks to a few sampled JPEG frames.

A ``VideoStream`` takes the chunks of one client video stream (raw H.264
Annex B, WebM/Matroska with VP8, VP9 or H.264, or fragmented MP4 with H.264
or VP9), puts them back in ``chunk_index`` order, demuxes them incrementally
and hands out at most ``fps_speaking`` / ``fps_idle`` JPEG frames per second.

A whole (non-fragmented) MP4/MOV file is the exception: nothing in it can be decoded
before it is complete, so its chunks are collected and the complete file goes to
libavformat (``media.mp4file``), sampled over its media time.

Streams are demuxed by us, not libavformat: ``av.open()`` reads a file-like object
synchronously and wants to probe and seek, which a live stream of arbitrary
byte ranges cannot offer. Both containers are simple to walk incrementally:
WebM is EBML elements (ID, size, payload) and fragmented MP4 is boxes
(size, type, payload) whose ``moof`` gives every sample's offset and size
before its ``mdat``. So the parsers keep at most one incomplete unit (one
frame, or one ``moov``/``moof``) buffered, skip everything else without
buffering it, and resynchronise on the next Cluster / ``moof`` after a gap
or corruption. The demuxers are ``media.webm`` (on ``media.ebml``),
``media.fmp4`` and ``media.h264``; they hand over ``media.samples`` values.
Compressed frames go to one PyAV ``CodecContext`` per stream that lives
across chunks.

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
from collections import OrderedDict
from dataclasses import dataclass, field

import av
from av.video.reformatter import VideoReformatter

from media.ebml import EBML_MAGIC
from media.errors import MediaError
from media.fmp4 import Fmp4Demuxer
from media.h264 import AnnexBDemuxer
from media.image import ImageLimits, frame_to_jpeg
from media.mp4file import FRAGMENTED, MAX_FILE_BYTES, MAX_FILE_FRAMES, WHOLE, Mp4File, sample_file
from media.reorder import ChunkReorder, ReorderEvent
from media.samples import CODEC_NAMES, Break, Sample
from media.webm import WebmVideoDemuxer

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

# Undecoded frames held for one GOP before they are decoded anyway, so a
# stream whose keyframes never come does not grow without bound.
_MAX_PENDING_SAMPLES = 300
_MAX_PENDING_BYTES = 16 * 1024 * 1024
_FRAME_META = 64  # decoder delay is at most 16 frames; keep a margin
#: Decoded pictures a stream holds while it decodes and after: the decoder's reference
#: and output pictures plus the newest frame kept for sampling. Measured: a 3840x2160
#: H.264 stream (libx264 ultrafast, one decoder thread) holds ~55 MB, 5 pictures of
#: 11.9 MB (yuv420p). Used to count a stream's decoded pixels (`decode_pixels`).
DECODE_PICTURES = 5


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
    if data[:4] == EBML_MAGIC:
        return WEBM
    if data[4:8] in (b"ftyp", b"styp", b"moov", b"moof", b"mdat", b"wide", b"free"):
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
        max_file_bytes: int = MAX_FILE_BYTES,
        max_file_frames: int = MAX_FILE_FRAMES,
    ) -> None:
        self.mime_type = mime_type
        self.container, self._declared_codec = parse_video_mime(mime_type)
        self.policy = policy or FramePolicy()
        self.limits = limits or ImageLimits()
        self.stats = VideoStats()
        self._reorder_args = (first_chunk_index, reorder_window, reorder_timeout_ms)
        self._reorder = ChunkReorder(*self._reorder_args, 4 * self.limits.max_bytes)
        self._demux = _make_demuxer(self.container, self.limits, self._declared_codec)
        self._first_digest: bytes | None = None
        self._first_chunk = True
        self._refusing = False
        self._codec_checked = False
        self._decoder: _Decoder | None = None
        self._seq = 0
        # The current GOP: its keyframe and the frames after it not yet decoded.
        self._key: Sample | None = None
        self._rest: list[Sample] = []
        self._rest_bytes = 0
        self._synced = False  # decoder state = keyframe + everything before self._rest
        self._awaiting_key = True
        self._newest_ms: float | None = None
        # Newest decoded frame, in display order (the decoder's output order).
        self._latest: tuple[av.VideoFrame, Sample] | None = None
        self._unconfirmed: list[tuple[av.VideoFrame, Sample]] = []
        self._gop_decoded = False  # self._latest belongs to the current GOP
        self._emitted: Sample | None = None
        self._scaler = VideoReformatter()  # keeps its swscale context from frame to frame
        self._last_emit_ms: float | None = None
        self._incident = False
        self._last_notice: dict[int, str] = {}
        self._declared_size: tuple[int | None, int | None] | None = None
        self._size_reported: tuple[object, ...] = ()
        # MP4 only: a recording's bytes until its layout is known, and a whole file's
        # until it is complete ("collect"); then "stream" (fragmented) or "done".
        self._file_limits = (max_file_bytes, max_file_frames)
        self._file: Mp4File | None = None
        self._file_state = "collect" if self.container == MP4 else "stream"
        self._final_index: int | None = None
        self._picture_size: int | None = None  # pixels of the last decoded picture

    @property
    def codec(self) -> str | None:
        """Codec being decoded (``h264``, ``vp8``, ``vp9``), once known."""
        return self._decoder.codec if self._decoder else None

    def decode_pixels(self, width: int | None = None, height: int | None = None) -> int:
        """Pixels this stream may hold decoded during a `push`/`poll` (for a process-wide
        budget): ``DECODE_PICTURES`` pictures of the size last decoded; before any, of
        the declared ``width``x``height``, else of the largest picture allowed."""
        size = self._picture_size
        if size is None and width and height:
            size = width * height
        if size is None or size > self.limits.max_pixels:
            size = self.limits.max_pixels
        return DECODE_PICTURES * size

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
        final: bool = False,
    ) -> VideoPushResult:
        """Take one chunk; return the frames due now and any problems found.

        ``width``/``height`` are what the client declares; decoded frames of
        another size are reported (once per size) and still used. ``final`` marks
        the recording's last chunk: once it is in, what is left is decoded, the
        newest frame is sent whatever the rate, and the next chunk (index 0)
        starts a new recording.
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
        if final:
            self._final_index = chunk_index
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
        self._restart()
        self._first_digest = digest

    def _restart(self) -> None:
        """A new recording: chunk indexes, demuxer and GOP start afresh."""
        self._first_digest = None
        self._reorder = ChunkReorder(*self._reorder_args, 4 * self.limits.max_bytes)
        self._demux = _make_demuxer(self.container, self.limits, self._declared_codec)
        self._first_chunk = self._refusing = False
        self._file = None
        self._file_state = "collect" if self.container == MP4 else "stream"
        self._final_index = None
        self._incident = False
        self._forget_gop()

    def poll(self, *, now_ms: float, speaking: bool) -> VideoPushResult:
        """Give up on overdue missing chunks and send a frame if one is due."""
        result = VideoPushResult()
        self._guarded(self._reorder.expire(now_ms), now_ms, speaking, result)
        return result

    def _guarded(
        self, events: list[ReorderEvent], now_ms: float, speaking: bool, result: VideoPushResult
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

    def _run(self, events: list[ReorderEvent], now_ms: float, result: VideoPushResult) -> None:
        for event in events:
            if event.missing is None and event.index == self._final_index:
                if event.data is not None:
                    self._take_chunk(event, now_ms, result)
                self._end_recording(event, now_ms, result)
                return  # later chunks, if any, belonged to the old recording's numbering
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

    def _take_chunk(self, event: ReorderEvent, now_ms: float, result: VideoPushResult) -> None:
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
        if self._file_state != "stream":
            data = self._collect_file(data, event, now_ms, result)
            if not data:
                return
        time_ms = event.timestamp_ms if event.timestamp_ms is not None else now_ms
        for item in self._demux.feed(data, event.index, event.timestamp_ms, time_ms):
            if isinstance(item, Break):
                if item.error is not None:
                    self._notify(result, item.error)
                self._discontinuity(reset_demuxer=False)
            else:
                self._take_sample(item, result)

    def _collect_file(
        self, data: bytes, event: ReorderEvent, now_ms: float, result: VideoPushResult
    ) -> bytes:
        """MP4: hold a recording's bytes until its layout is known. A fragmented one goes
        on to the streaming demuxer (everything so far is returned); a whole file is
        sampled once complete, or at its final chunk. Returns the bytes to demux."""
        if self._file_state == "done":
            return b""  # the rest of a file already sampled, or refused
        if self._file is None:
            self._file = Mp4File(self._file_limits[0])
        file = self._file
        try:
            file.add(data)
        except MediaError as error:
            self._notify(result, error)
            self._file, self._file_state = None, "done"
            return b""
        if file.layout == FRAGMENTED:
            self._file, self._file_state = None, "stream"
            return bytes(file.data)
        if file.layout == WHOLE and (file.complete or event.index == self._final_index):
            self._file, self._file_state = None, "done"
            self._sample_file(file.data, event.index, now_ms, result, file.complete)
        elif event.index == self._final_index:
            self._file, self._file_state = None, "done"
            kind = "a whole" if file.layout == WHOLE else "an"
            self._notify(
                result,
                MediaError(
                    415,
                    f"the video/mp4 data ended without {kind} MP4 file's moov and mdat "
                    f"({len(file.data)} bytes): incomplete, or not an MP4 file",
                ),
            )
        return b""

    def _sample_file(
        self,
        data: bytes | bytearray,
        chunk_index: int,
        now_ms: float,
        result: VideoPushResult,
        complete: bool,
    ) -> None:
        """Frames of a whole file, over its media time (at ``fps_speaking``: a clip is
        something the user shows; ``fps_idle`` when that is 0)."""
        interval = self.policy.interval_ms(True)
        if math.isinf(interval):
            interval = self.policy.interval_ms(False)
        if math.isinf(interval):
            return  # the session asked for no frames
        try:
            frames = sample_file(data, interval, self.limits, self._file_limits[1])
        except MediaError as error:
            self.stats.errors += 1
            if not complete:  # marked final before its moov or mdat was whole
                error = MediaError(
                    error.code, f"incomplete MP4 file of {len(data)} bytes: {error.message}"
                )
            result.notices.append(error)  # one file, one report: never deduplicated away
            return
        for frame in frames:
            result.frames.append(
                VideoFrameOut(frame.data, frame.width, frame.height, frame.pts_ms, chunk_index)
            )
        self.stats.frames_decoded += len(frames)
        self.stats.frames_emitted += len(frames)
        self._last_emit_ms = now_ms

    def _end_recording(self, event: ReorderEvent, now_ms: float, result: VideoPushResult) -> None:
        """The final chunk is in: a streamed recording's newest frame goes out now (if not
        sent yet), then everything starts afresh for the next recording."""
        if self._file_state == "collect" and self._file is not None:  # its last chunk refused
            message = "the MP4 file is incomplete: its last chunk was refused"
            self._notify(result, MediaError(415, message))
        elif self._file_state == "stream" and self._decoder is not None and self._key is not None:
            self._decode_forward(result)
            latest = self._latest
            if latest is not None and latest[1] is not self._emitted:
                self._emit(latest, now_ms, result)
        self._restart()

    def _take_sample(self, sample: Sample, result: VideoPushResult) -> None:
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
            declared = CODEC_NAMES[self._declared_codec]
            self._notify(
                result,
                MediaError(
                    400,
                    f"declared {self.mime_type} ({declared}) but the video is "
                    f"{CODEC_NAMES[codec]}; decoding {CODEC_NAMES[codec]}",
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
        if picked is not None:
            self._emit(picked, now_ms, result)

    def _emit(
        self, picked: tuple[av.VideoFrame, Sample], now_ms: float, result: VideoPushResult
    ) -> None:
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
    ) -> tuple[av.VideoFrame, Sample] | None:
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

    def _accept(self, decoded: list[tuple[av.VideoFrame, Sample]], result: VideoPushResult) -> bool:
        """Keep the newest confirmed frame; on a corrupt one, restart at the next keyframe.

        The decoder was flushed before this GOP's keyframe went in, so what it
        outputs belongs to this GOP, in display order. A frame is usable once
        every frame decoded before it has come out (``confirmed_below``), and
        only if it was decoded before any frame flagged corrupt.
        """
        assert self._decoder is not None
        self.stats.frames_decoded += len(decoded)
        if decoded:
            self._picture_size = decoded[-1][0].width * decoded[-1][0].height
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
        if self._file is not None:  # a whole file with a hole cannot be decoded: dropped
            self._file, self._file_state = None, "done"
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


# --------------------------------------------------------------------------- decoding


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
        self._meta: OrderedDict[int, Sample] = OrderedDict()
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

    def decode(self, sample: Sample) -> list[tuple[av.VideoFrame, Sample]]:
        packet = av.Packet(sample.data)
        packet.pts = sample.seq
        self._meta[sample.seq] = sample
        while len(self._meta) > _FRAME_META:
            self._meta.popitem(last=False)
        self._inside.add(sample.seq)
        return self._run(packet)

    def drain(self) -> list[tuple[av.VideoFrame, Sample]]:
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

    def _run(self, packet: av.Packet | None) -> list[tuple[av.VideoFrame, Sample]]:
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
                f"undecodable {CODEC_NAMES[self.codec]} data ({reason}); "
                "resuming at the next keyframe",
            ) from exc
        out = []
        for frame in frames:
            sample = self._meta.get(frame.pts) if frame.pts is not None else None
            if sample is not None:
                self._inside.discard(sample.seq)
                out.append((frame, sample))
        return out


def _make_demuxer(
    container: str, limits: ImageLimits, declared_codec: str | None
) -> AnnexBDemuxer | WebmVideoDemuxer | Fmp4Demuxer:
    if container == WEBM:
        return WebmVideoDemuxer(limits.max_bytes, declared_codec)
    if container == MP4:
        return Fmp4Demuxer(limits.max_bytes)
    return AnnexBDemuxer(limits.max_bytes)
