"""WebM / Matroska demuxers for live streams: the video track, and the Opus audio track.

Both walk the stream with :class:`media.ebml.EbmlWalker` (element headers, unknown-size
Segments and Clusters, skipping unbuffered, resync on the next Cluster or EBML header).
What they do with the elements differs, for reasons given in each class:

- :class:`WebmVideoDemuxer` (``VideoStream``): walks into the header masters and reads
  each value, checks every element ID against the level it may appear at, and resumes
  only at a Cluster, since decoding must wait for a keyframe anyway and MediaRecorder
  starts each Cluster with one.
- :class:`WebmOpusDemuxer` (``OpusStreamDecoder``): buffers the small EBML header and
  Tracks whole, and also resumes at the next plausible block of its track, since every
  Opus packet decodes on its own and a Cluster may be seconds of speech away.
"""

from __future__ import annotations

from dataclasses import dataclass

from media import ebml
from media.errors import Corrupt, MediaError
from media.h264 import H264Params, avcc_to_annexb, parse_avcc
from media.opus import OPUS_RATE, OpusEvent
from media.samples import MAX_HEADER_BYTES, MAX_SKIP_BYTES, Break, Item
from media.vpx import vp8_key, vp9_key, vp_sample

# --------------------------------------------------------------------------- video

# fmt: off
# Masters whose children we read: walked into, so their size (often unknown) never matters.
_ENTER = frozenset({ebml.SEGMENT, ebml.INFO, ebml.TRACKS, ebml.TRACK_ENTRY, ebml.VIDEO,
                    ebml.CLUSTER, ebml.BLOCK_GROUP})
_VALUES = frozenset({ebml.TIMESTAMP_SCALE, ebml.TIMESTAMP, ebml.TRACK_NUMBER, ebml.TRACK_TYPE,
                     ebml.CODEC_ID, ebml.CODEC_PRIVATE})
# Once clusters flow, only top-level, Cluster and BlockGroup elements may appear: the
# many one-byte IDs of track headers are then noise, which is how desync is noticed early.
_CLUSTER_LEVEL = ebml.TOP_LEVEL | ebml.CLUSTER_CHILDREN | ebml.BLOCK_GROUP_CHILDREN
# Every element that may appear where we walk and is not entered, read or a block is
# skipped. Anything else means we lost sync.
_SKIP = _CLUSTER_LEVEL | frozenset({
    # Info
    0x73A4, 0x7384, 0x3CB923, 0x3C83AB, 0x3EB923, 0x3E83BB, 0x4444, 0x6924, 0x4489, 0x4461,
    0x7BA9, 0x4D80, 0x5741,
    # TrackEntry
    0x73C5, 0xB9, 0x88, 0x55AA, 0x55AB, 0x55AC, 0x55AD, 0x55AE, 0x55AF, 0x9C, 0x6DE7, 0x6DF8,
    0x23E383, 0x234E7A, 0x23314F, 0x537F, 0x55EE, 0x41E4, 0x536E, 0x22B59C, 0x22B59D,
    0x258688, 0x7446, 0x3A9697, 0x3B4040, 0x26B240, 0xAA, 0x6FAB, 0x56AA, 0x56BB, 0x6624,
    0xE1, 0xE2, 0xC0, 0xC1, 0xC6, 0xC7, 0xC4, 0x6D80,
    # Video (PixelWidth/Height included: the frame size is read from the bitstream)
    0x9A, 0x9D, 0x53B8, 0x53C0, 0x53B9, 0xB0, 0xBA, 0x54AA, 0x54BB, 0x54CC, 0x54DD, 0x54B0,
    0x54BA, 0x54B2, 0x54B3, 0x2EB524, 0x2FB523, 0x2383E3, 0x55B0, 0x7670,
})
# Integers (Timestamp, Position, PrevSize, BlockDuration, ReferencePriority,
# ReferenceBlock, ReferenceVirtual) and CRC-32: 8 bytes at most.
_TINY = frozenset({ebml.TIMESTAMP, ebml.POSITION, ebml.PREV_SIZE, 0x9B, 0xFA, 0xFB, 0xFD,
                   ebml.CRC32})
# fmt: on
_MKV_CODECS = {"V_VP8": "vp8", "V_VP9": "vp9", "V_MPEG4/ISO/AVC": "h264"}


@dataclass
class _Track:
    number: int = 0
    kind: int = 0  # TrackType: 1 video, 2 audio
    codec_id: str = ""
    private: bytes = b""


class WebmVideoDemuxer(ebml.EbmlWalker):
    """The video track of WebM/Matroska as MediaRecorder writes it, frame by frame.

    Masters we need are entered rather than read whole, so unknown-size
    Segments and Clusters (live recordings) need no special case; blocks of
    our video track are buffered whole (one frame), everything else is
    skipped without buffering. A block's start is marked, so that after a
    desync the rescan starts there: its size may have swallowed the next Cluster.
    """

    def __init__(self, max_frame_bytes: int, declared_codec: str | None) -> None:
        super().__init__(2 * max_frame_bytes)
        self._max_frame = max_frame_bytes
        self._declared_codec = declared_codec
        self._header_lost_reported = False
        self._tracks: list[_Track] = []
        self._video: _Track | None = None
        self._video_codec: str | None = None
        self._chosen = False
        self._guessed = False  # the video track was found without the Tracks header
        self._length_size = 4
        self._params = H264Params()
        self._scale_ns = 1_000_000
        self._cluster_ts: int | None = None
        self._chunk, self._time_ms = 0, 0.0

    def reset(self) -> None:
        super().reset()
        self._cluster_ts = None
        self._params.forget_order()

    def feed(self, data: bytes, chunk: int, pts_ms: float | None, time_ms: float) -> list[Item]:
        self._buf.extend(data)
        out: list[Item] = []
        self._chunk, self._time_ms = chunk, time_ms
        self._walk(out)
        return out

    def _element(self, out: list[Item], eid: int, size: int, header: int) -> bool:
        buf = self._buf
        unknown = size == ebml.UNKNOWN_SIZE
        if self._chosen and eid not in _CLUSTER_LEVEL:
            return self._desync(out, f"unexpected element 0x{eid:X} among clusters")
        if eid in _TINY and (unknown or size > 8):
            return self._desync(out, f"implausible size for element 0x{eid:X}")
        if eid in _ENTER:
            if unknown and eid not in (ebml.SEGMENT, ebml.CLUSTER):
                return self._desync(out, "unknown size where none is allowed")
            buf.skip(header)
            self._enter(eid, out)
            return True
        if unknown or size > MAX_SKIP_BYTES:
            return self._desync(out, f"implausible size for element 0x{eid:X}")
        if eid in _VALUES:
            if size > MAX_HEADER_BYTES:
                return self._desync(out, f"implausible size for element 0x{eid:X}")
            if len(buf) < header + size:
                return False
            buf.skip(header)
            self._value(eid, buf.take(size), out)
            return True
        if eid in (ebml.SIMPLE_BLOCK, ebml.BLOCK):
            buf.mark(size <= self._max_frame)
            return self._block(header, size, out)
        if eid == ebml.EBML:
            if size > 4096:
                return self._desync(out, "implausible EBML header")
            if len(buf) < header + size:
                return False
            buf.skip(header)
            # A byte search, not ebml.doc_type() as for audio: a damaged EBML header is
            # still taken (kept as it was; the Tracks after it are what matters).
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

    def _enter(self, eid: int, out: list[Item]) -> None:
        if eid == ebml.TRACK_ENTRY and not self._chosen:
            self._tracks.append(_Track())
        elif eid == ebml.CLUSTER:
            self._cluster_ts = None
            self._choose_track(out)

    def _value(self, eid: int, payload: bytes, out: list[Item]) -> None:
        number = ebml.uint(payload)
        track = self._tracks[-1] if self._tracks else None
        if eid == ebml.TIMESTAMP:
            self._cluster_ts = number
        elif self._chosen:
            return
        elif eid == ebml.TIMESTAMP_SCALE:
            self._scale_ns = number or 1_000_000
        elif track is None:
            return
        elif eid == ebml.TRACK_NUMBER:
            track.number = number
        elif eid == ebml.TRACK_TYPE:
            track.kind = number
        elif eid == ebml.CODEC_ID:
            track.codec_id = ebml.string(payload)
        elif eid == ebml.CODEC_PRIVATE:
            track.private = payload

    def _restart(self, out: list[Item]) -> None:
        """A new EBML header: a new recording, possibly with other tracks and codec."""
        if self._tracks or self._cluster_ts is not None:
            out.append(Break(None))
        self._tracks, self._video, self._chosen, self._guessed = [], None, False, False
        self._scale_ns, self._cluster_ts = 1_000_000, None
        self._header_lost_reported = False

    def _choose_track(self, out: list[Item]) -> None:
        if self._chosen or not self._tracks:
            return
        self._chosen = True
        video = next((t for t in self._tracks if t.kind == 1), None)
        if video is None:
            out.append(Break(MediaError(415, "the WebM data has no video track")))
            return
        codec = _MKV_CODECS.get(video.codec_id)
        if codec is None:
            out.append(Break(MediaError(415, f"unsupported video codec {video.codec_id}")))
            return
        if codec == "h264":
            try:
                self._length_size, sps, pps = parse_avcc(video.private)
            except Corrupt:
                out.append(Break(MediaError(415, "H.264 track without a valid avcC")))
                return
            self._params = H264Params(sps, pps)
        self._video, self._video_codec = video, codec

    def _block(self, header: int, size: int, out: list[Item]) -> bool:
        buf = self._buf
        try:
            track_info = ebml.read_vint(buf.peek(8, header))
        except Corrupt:
            return self._desync(out, "invalid block track number")
        if track_info is None:
            return False
        self._choose_track(out)
        number = track_info[0]
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
            out.append(Break(MediaError(413, message)))
            buf.skip(header)
            self._skip = size
            return True
        if len(buf) < header + size:
            return False
        buf.skip(header)
        body = buf.take(size)
        try:
            _track, relative, flags, start = ebml.block_header(body)
        except Corrupt as exc:
            return self._desync(out, str(exc))
        if flags & 0x06:
            out.append(Break(MediaError(415, "laced video blocks are not supported")))
            return True
        payload = body[start:]
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
                annexb = avcc_to_annexb(payload, self._length_size)
                out.append(self._params.sample(annexb, **fields))
            else:
                out.append(vp_sample(self._video_codec, payload, **fields))
        except Corrupt as exc:  # a frame that cannot be one: the block boundaries are off
            return self._desync(out, f"frame does not parse: {exc}")
        return True

    def _can_guess(self, out: list[Item]) -> bool:
        """Without the Tracks header (lost with the first chunk), VP8/VP9 can still be found."""
        if self._declared_codec in ("vp8", "vp9"):
            return True
        if not self._header_lost_reported:
            self._header_lost_reported = True
            message = "the WebM header (Tracks) is missing; start a new stream"
            out.append(Break(MediaError(415, message)))
        return False

    def _adopt(self, number: int, payload: bytes, out: list[Item]) -> bool:
        """Take ``number`` as the video track once it carries a keyframe of the declared codec."""
        codec = self._declared_codec
        key, _ = (vp8_key if codec == "vp8" else vp9_key)(payload)
        if not key:
            return False
        self._tracks = [_Track(number, 1, "V_VP8" if codec == "vp8" else "V_VP9")]
        self._chosen, self._guessed = False, True  # other tracks stay unknown: no desync on them
        self._choose_track(out)
        return True

    def _desync(self, out: list[Item], reason: str, code: int = 415) -> bool:
        message = f"corrupt WebM data ({reason}); resuming at the next cluster and keyframe"
        out.append(Break(MediaError(415, message)))
        self._params.forget_order()
        self._cluster_ts = None
        return super()._desync(out, reason, code)


# --------------------------------------------------------------------------- Opus audio

_OPUS_ENTER = frozenset({ebml.SEGMENT, ebml.CLUSTER})  # masters we walk into (may be unknown-size)
# Buffered whole and parsed:
_OPUS_READ = frozenset({ebml.EBML, ebml.TRACKS, ebml.SIMPLE_BLOCK, ebml.BLOCK_GROUP})
# Known elements we step over without buffering, with the largest size we believe: a
# garbage size on a misread ID must trigger resync, not swallow the stream.
_OPUS_SKIP: dict[int, int] = {
    ebml.SEEK_HEAD: 1 << 20,
    ebml.INFO: 1 << 20,
    ebml.TAGS: 1 << 26,
    ebml.CUES: 1 << 26,
    ebml.CHAPTERS: 1 << 26,
    ebml.ATTACHMENTS: 1 << 26,
    ebml.VOID: 1 << 20,
    ebml.CRC32: 4,
    ebml.TIMESTAMP: 8,
    ebml.POSITION: 8,
    ebml.PREV_SIZE: 8,
    ebml.SILENT_TRACKS: 1 << 10,
    ebml.ENCRYPTED_BLOCK: 1 << 16,
}
_MAX_BLOCK = 1 << 16  # a (Simple)Block/BlockGroup; Opus never needs more
_MAX_HEADER_ELEMENT = 1 << 20  # EBML header / Tracks


class WebmOpusDemuxer(ebml.EbmlWalker):
    """The first Opus track of WebM/Matroska (browser MediaRecorder), as OpusEvents.

    Walks the element stream flat: Segment and Cluster (unknown-size in MediaRecorder
    output) are entered; EBML header, Tracks and blocks are buffered whole (bounded) and
    parsed; other known elements are skipped by size without buffering. An unknown
    element ID means corruption: report it and resync at the next Cluster, EBML header
    or plausible SimpleBlock of our track (unlike video, which needs a keyframe, any
    Opus packet decodes on its own, so the next block loses the least speech). Opus
    payloads carry no checksum, so garbage inside a block is only caught if libopus
    rejects it.
    """

    def __init__(self) -> None:
        super().__init__()
        self._track: int | None = None
        self._tracks: set[int] = set()
        self._complained_no_head = False

    def mid_element(self) -> bool:
        """True if an in-sync stream stopped inside an element (data would be lost)."""
        return not self._resync and bool(len(self._buf) or self._skip)

    def feed(self, data: bytes, out: list[OpusEvent]) -> None:
        self._buf.extend(data)
        self._walk(out)

    def _element(self, out: list[OpusEvent], ident: int, size: int, header: int) -> bool:
        buf = self._buf
        if ident in _OPUS_ENTER:
            buf.skip(header)
            return True
        if size == ebml.UNKNOWN_SIZE:
            raise Corrupt(f"unknown size on element 0x{ident:x}")
        if ident in _OPUS_SKIP:
            if size > _OPUS_SKIP[ident]:
                raise Corrupt(f"implausible size {size} for element 0x{ident:x}")
            buf.skip(header)
            self._skip = size
            return True
        if ident not in _OPUS_READ:
            raise Corrupt(f"unexpected element 0x{ident:x}")
        limit = _MAX_HEADER_ELEMENT if ident in (ebml.EBML, ebml.TRACKS) else _MAX_BLOCK
        if size > limit:
            raise Corrupt(f"element 0x{ident:x} of {size} bytes exceeds {limit}", 413)
        if ident == ebml.SIMPLE_BLOCK and size < 4:
            raise Corrupt(f"SimpleBlock of {size} bytes")
        is_block = ident in (ebml.SIMPLE_BLOCK, ebml.BLOCK_GROUP)
        if is_block and not self._plausible_block(header, ident):
            raise Corrupt("block for an unknown track")
        if len(buf) < header + size:
            return False
        try:
            self._parse(ident, bytes(buf.peek(size, header)), out)
        except IndexError:
            raise Corrupt(f"truncated element 0x{ident:x}") from None
        buf.skip(header + size)
        return True

    def _plausible_block(self, header: int, ident: int) -> bool:
        """Early check on a block's track number, so garbage sizes do not stall the stream."""
        if not self._tracks:
            return True  # reported as "data before header" once parsed
        if ident == ebml.BLOCK_GROUP:
            first = self._buf.peek(1, header)
            return not first or first[0] in (ebml.BLOCK, ebml.VOID, ebml.CRC32)
        track = ebml.read_vint(self._buf.peek(8, header))
        return track is None or track[0] in self._tracks

    def _parse(self, ident: int, body: bytes, out: list[OpusEvent]) -> None:
        if ident == ebml.EBML:
            doc_type = ebml.doc_type(body)
            if doc_type not in (b"webm", b"matroska"):
                raise Corrupt(f"EBML DocType {doc_type!r} is not webm/matroska")
            self._track, self._tracks, self._complained_no_head = None, set(), False
        elif ident == ebml.TRACKS:
            self._parse_tracks(body, out)
        elif self._track is None:
            if not self._complained_no_head:
                out.append(("error", MediaError(415, "WebM audio data before its Tracks header")))
                self._complained_no_head = True
        elif ident == ebml.SIMPLE_BLOCK:
            self._block(body, 0, out)
        else:  # BlockGroup
            block, padding_ns = None, 0
            for cid, payload in ebml.children(body):
                if cid == ebml.BLOCK:
                    block = payload
                elif cid == ebml.DISCARD_PADDING:
                    padding_ns = int.from_bytes(payload, "big", signed=True)
            if block is not None:
                self._block(block, max(0, round(padding_ns * OPUS_RATE / 1e9)), out)

    def _parse_tracks(self, body: bytes, out: list[OpusEvent]) -> None:
        codecs = []
        self._tracks = set()
        self._track = None
        head = b""
        for cid, entry in ebml.children(body):
            if cid != ebml.TRACK_ENTRY:
                continue
            fields = dict(ebml.children(entry))
            number = ebml.uint(fields.get(ebml.TRACK_NUMBER, b""))
            codec = ebml.string(fields.get(ebml.CODEC_ID, b""))
            self._tracks.add(number)
            codecs.append(codec)
            if codec == "A_OPUS" and self._track is None:
                self._track, head = number, fields.get(ebml.CODEC_PRIVATE, b"")
        if self._track is None:
            message = f"WebM stream has no Opus audio track (codecs: {codecs})"
            out.append(("error", MediaError(415, message)))
            self._complained_no_head = True  # its blocks are not "before the header"
        else:
            out.append(("head", head))

    def _block(self, body: bytes, trim: int, out: list[OpusEvent]) -> None:
        track, _timestamp, flags, start = ebml.block_header(body)
        if track != self._track:
            return
        frames = ebml.unlace(body, start, flags)
        for i, frame in enumerate(frames):
            out.append(("packet", frame, trim if i == len(frames) - 1 else 0))

    def _desync(self, out: list[OpusEvent], reason: str, code: int = 415) -> bool:
        out.append(("error", MediaError(code, f"corrupt WebM data ({reason}), resyncing")))
        return super()._desync(out, reason, code)

    def _sync_candidates(self) -> list[int]:
        hits = super()._sync_candidates()
        if self._track is not None:
            hits.append(self._buf.find(b"\xa3"))  # a SimpleBlock, perhaps
        return hits

    def _sync_verdict(self) -> bool | None:
        if self._buf.peek(1) != b"\xa3":
            return super()._sync_verdict()
        verdict = self._block_verdict()
        if verdict is None:  # cannot tell yet: a Cluster or EBML header further on goes first
            later = [at for at in super()._sync_candidates() if at >= 0]
            if later:
                self._buf.skip(min(later))
                return super()._sync_verdict()
        return verdict

    def _block_verdict(self) -> bool | None:
        """A SimpleBlock of our track, of plausible size, followed by a known element?"""
        buf = self._buf
        try:
            head = buf.peek(17)
            size = ebml.read_size(head, 1)
            if size is None:
                return None
            if not 4 <= size[0] <= _MAX_BLOCK:
                return False
            track = ebml.read_vint(head, 1 + size[1])
            if track is None:
                return None
            if track[0] != self._track:
                return False
            eid = ebml.read_id(buf.peek(4, 1 + size[1] + size[0]))
            if eid is None:
                return None
            return eid[0] in _OPUS_ENTER or eid[0] in _OPUS_READ or eid[0] in _OPUS_SKIP
        except Corrupt:
            return False
