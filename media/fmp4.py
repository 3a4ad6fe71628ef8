"""Fragmented MP4 (ISO BMFF) demuxing for live video: boxes, moov/moof/trun, samples from mdat.

Fragmented MP4 is boxes (size, type, payload) whose ``moof`` gives every
sample's offset and size before its ``mdat``, so it can be walked as it
arrives: see :class:`Fmp4Demuxer`.
"""

from __future__ import annotations

import math
import struct
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from media.bytequeue import ByteQueue
from media.errors import Corrupt, MediaError
from media.h264 import H264Params, avcc_to_annexb, parse_avcc
from media.samples import MAX_HEADER_BYTES, MAX_SKIP_BYTES, Break, Item
from media.vpx import vp_sample


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
                raise Corrupt("truncated box header")
            size = struct.unpack(">Q", data[i + 8 : i + 16])[0]
            header = 16
        elif size == 0:
            size = end - i
        if size < header or i + size > end:
            raise Corrupt(f"box {kind!r} overruns its parent")
        yield kind, i + header, i + size
        i += size


def _child(data: bytes, start: int, end: int, kind: bytes) -> tuple[int, int] | None:
    for child, begin, finish in _boxes(data, start, end):
        if child == kind:
            return begin, finish
    return None


def _printable(kind: bytes) -> bool:
    return all(0x20 <= b < 0x7F for b in kind)


class Fmp4Demuxer:
    """Incremental box walker for fragmented MP4 (MediaRecorder, ffmpeg frag_keyframe).

    ``moov`` and each ``moof`` are read whole (small); the ``moof`` yields the
    offset and size of every sample of the video track, so the following
    ``mdat`` is consumed sample by sample as it arrives, buffering at most
    one sample and skipping the rest (audio) unbuffered.
    """

    def __init__(self, max_frame_bytes: int) -> None:
        self._max_frame = max_frame_bytes
        self._buf = ByteQueue(2 * max_frame_bytes)
        self._skip = 0
        self._resync = False
        self._origin = 0  # where the current recording's byte 0 is, in our byte count
        self._lost = False  # bytes were lost since: absolute offsets no longer match ours
        self._track: _Mp4Track | None = None
        self._codec: str | None = None
        self._length_size = 4
        self._params = H264Params()
        self._next_dts = 0
        self._trex: dict[int, tuple[int, int, int]] = {}  # per track: default duration, size, flags
        self._samples: deque[tuple[int, int, float]] = deque()
        self._mdat_end: float | None = None
        self._chunk, self._time_ms = 0, 0.0

    def reset(self) -> None:
        self._buf.clear()
        self._lose_sync()

    def _lose_sync(self) -> None:
        """Resume at the next fragment; absolute offsets no longer match our byte count."""
        self._skip = 0
        self._resync = True
        self._lost = True
        self._samples.clear()
        self._mdat_end = None
        self._params.forget_order()

    def feed(self, data: bytes, chunk: int, pts_ms: float | None, time_ms: float) -> list[Item]:
        self._buf.extend(data)
        self._chunk, self._time_ms = chunk, time_ms
        out: list[Item] = []
        while self._step(out):
            pass
        return out

    def _step(self, out: list[Item]) -> bool:
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
        if size < header or size > MAX_SKIP_BYTES:
            return self._desync(out, f"implausible size for box {kind!r}")
        if kind in (b"moov", b"moof"):
            if size > MAX_HEADER_BYTES:
                return self._desync(out, f"{kind.decode()} box too large")
            if len(buf) < size:
                return False
            box = buf.take(size)
            try:
                if kind == b"moov":
                    self._moov(box, header, out)
                else:
                    self._moof(box, header, start, out)
            except (Corrupt, struct.error, IndexError) as exc:
                out.append(Break(MediaError(415, f"corrupt MP4 {kind.decode()} ({exc})")))
            return True
        buf.skip(header)
        self._skip = size - header
        return True

    def _moov(self, box: bytes, header: int, out: list[Item]) -> None:
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
            out.append(Break(MediaError(415, "the MP4 data has no video track")))
            return
        self._trex, self._next_dts = trex, 0
        entry = video.entry.decode("latin-1")
        if entry in ("avc1", "avc3"):
            found = _child(video.entry_body, 78, len(video.entry_body), b"avcC")
            if found is None:
                raise Corrupt("avc1 sample entry without avcC")
            self._length_size, sps, pps = parse_avcc(video.entry_body[found[0] : found[1]])
            self._params = H264Params(sps, pps)
            self._codec = "h264"
        elif entry in ("vp08", "vp09"):
            self._codec = "vp8" if entry == "vp08" else "vp9"
        else:
            out.append(Break(MediaError(415, f"unsupported video codec {entry!r} in MP4")))
            return
        if video.timescale <= 0:
            raise Corrupt("video track without a timescale")
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

    def _moof(self, box: bytes, header: int, moof_start: int, out: list[Item]) -> None:
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
                raise Corrupt("traf without tfhd")
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
            raise Corrupt("trun sample table runs past the box")
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

    def _mdat(self, out: list[Item]) -> bool:
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
                out.append(Break(MediaError(413, message)))
                buf.mark(False)
                self._skip = size
                return True
            buf.mark()
            if len(buf) < size:
                return False
            self._samples.popleft()
            try:
                out.append(self._sample(buf.take(size), pts_ms))
            except Corrupt as exc:  # offsets no longer match the data: bytes were lost
                return self._desync(out, f"sample does not parse: {exc}")
        buf.mark(False)
        if math.isinf(self._mdat_end):
            self._buf.skip(len(self._buf))
            return False
        self._skip = int(self._mdat_end) - buf.consumed
        self._mdat_end = None
        return True

    def _sample(self, data: bytes, pts_ms: float) -> Item:
        assert self._codec is not None
        fields = {"pts_ms": pts_ms, "time_ms": pts_ms, "chunk_index": self._chunk}
        if self._codec == "h264":
            return self._params.sample(avcc_to_annexb(data, self._length_size), **fields)
        return vp_sample(self._codec, data, **fields)

    def _desync(self, out: list[Item], reason: str) -> bool:
        out.append(
            Break(
                MediaError(
                    415, f"corrupt MP4 data ({reason}); resuming at the next fragment and keyframe"
                )
            )
        )
        self._buf.rewind()  # rescan from the sample that did not fit
        self._buf.skip(1)
        self._lose_sync()
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
            plausible = 8 <= size <= MAX_HEADER_BYTES or kind == b"ftyp"
            if plausible and (kind != b"moof" or head[at + 8 : at + 12] == b"mfhd"):
                buf.skip(at - 4)
                self._resync = False
                return True
            buf.skip(at + 1)
