"""H.264 at demux time: Annex B NAL units, avcC / AVCC conversion, frame_num gaps, raw streams.

Container demuxers (``webm``, ``fmp4``) turn AVCC samples into Annex B with
:func:`avcc_to_annexb` and hand them to an :class:`H264Params`, which keeps SPS/PPS
and watches ``frame_num``; raw Annex B streams go through :class:`AnnexBDemuxer`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import av

from media.errors import Corrupt, MediaError
from media.samples import Break, Item, Sample

_HIGH_PROFILES = frozenset({100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135})


def nal_spans(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(nal_unit_type, start, end) of each NAL unit of an Annex B buffer."""
    start = data.find(b"\x00\x00\x01")
    while start >= 0 and start + 3 < len(data):
        begin = start + 3
        nxt = data.find(b"\x00\x00\x01", begin)
        end = len(data) if nxt < 0 else (nxt - 1 if data[nxt - 1] == 0 else nxt)
        yield data[begin] & 0x1F, begin, end
        start = nxt


class H264Params:
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

    def sample(self, annexb: bytes, **fields: object) -> Sample | Break:
        """The access unit as a sample, or a Break if frame_num says frames were lost."""
        types = set()
        sps, pps = [], []
        first_slice: tuple[int, int] | None = None
        for nal_type, begin, end in nal_spans(annexb):
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
            gap = self._frame_num_gap(annexb[first_slice[0] : first_slice[1]], key)
            if gap is not None:
                return Break(MediaError(415, f"H.264 frames missing ({gap})"))
        if key and not (sps and pps) and self._sps and self._pps:
            annexb = b"".join(b"\x00\x00\x00\x01" + nal for nal in self._sps + self._pps) + annexb
        return Sample(annexb, "h264", key, **fields)  # type: ignore[arg-type]

    def _frame_num_gap(self, slice_nal: bytes, key: bool) -> str | None:
        order = self._order
        if order is None or order.gaps_allowed:
            return None
        try:
            bits = _Bits(_unescape(slice_nal[1:32]))
            bits.ue(), bits.ue(), bits.ue()  # first_mb_in_slice, slice_type, pps_id
            if order.separate_colour_planes:
                bits.u(2)
            frame_num = bits.u(order.frame_num_bits)
        except Corrupt:
            return None
        previous = self._prev_frame_num
        if not key and previous is not None:
            following = (previous + 1) % (1 << order.frame_num_bits)
            if frame_num not in (previous, following):
                self._prev_frame_num = None
                return f"frame_num jumps from {previous} to {frame_num}"
        if slice_nal[0] & 0x60:  # nal_ref_idc: a reference picture advances the count
            self._prev_frame_num = frame_num
        return None


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
            raise Corrupt("bitstream ends early")
        self._pos += n
        return (self._value >> (self._length - self._pos)) & ((1 << n) - 1)

    def ue(self) -> int:
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
            if zeros > 31:
                raise Corrupt("invalid Exp-Golomb code")
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        code = self.ue()
        return (code + 1) // 2 if code & 1 else -(code // 2)


def _unescape(nal: bytes) -> bytes:
    return nal.replace(b"\x00\x00\x03", b"\x00\x00")


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
    except Corrupt:
        return None


# --------------------------------------------------------------------------- AVCC (in containers)


def avcc_to_annexb(data: bytes, length_size: int) -> bytes:
    """Length-prefixed NAL units (MP4, Matroska) -> start-code-prefixed ones."""
    out = bytearray()
    i = 0
    while i < len(data):
        if i + length_size > len(data):
            raise Corrupt("NAL length runs past the sample")
        size = int.from_bytes(data[i : i + length_size], "big")
        i += length_size
        if size == 0 or i + size > len(data):
            raise Corrupt("NAL unit runs past the sample")
        out += b"\x00\x00\x00\x01"
        out += data[i : i + size]
        i += size
    return bytes(out)


def parse_avcc(config: bytes) -> tuple[int, list[bytes], list[bytes]]:
    """AVCDecoderConfigurationRecord -> (NAL length size, SPS list, PPS list)."""
    if len(config) < 7 or config[0] != 1:
        raise Corrupt("bad avcC record")
    length_size = (config[4] & 0x03) + 1
    lists: list[list[bytes]] = [[], []]
    i = 5
    for which, mask in ((0, 0x1F), (1, 0xFF)):
        if i >= len(config):
            raise Corrupt("bad avcC record")
        count = config[i] & mask
        i += 1
        for _ in range(count):
            size = int.from_bytes(config[i : i + 2], "big")
            if i + 2 + size > len(config):
                raise Corrupt("bad avcC record")
            lists[which].append(config[i + 2 : i + 2 + size])
            i += 2 + size
    return length_size, lists[0], lists[1]


# --------------------------------------------------------------------------- raw Annex B


class AnnexBDemuxer:
    """Raw H.264: FFmpeg's parser splits access units across chunk boundaries.

    The parser emits an access unit once the next one starts, so the last
    frame of a chunk comes out with the next chunk. It buffers until it finds
    an access unit boundary, so bytes without any are dropped past a bound.
    """

    def __init__(self, max_frame_bytes: int) -> None:
        self._max_unit = 2 * max_frame_bytes
        self._parser = av.CodecContext.create("h264", "r")
        self._params = H264Params()
        self._unparsed = 0  # bytes fed since the parser last produced an access unit

    def feed(self, data: bytes, chunk: int, pts_ms: float | None, time_ms: float) -> list[Item]:
        try:
            packets = self._parser.parse(data)
        except Exception:  # the parser never should; if it does, start afresh
            self.reset()
            return [Break(MediaError(415, "unparseable H.264 data; resuming at the next keyframe"))]
        self._unparsed = len(data) if packets else self._unparsed + len(data)
        out: list[Item] = []
        for packet in packets:
            fields = {"pts_ms": pts_ms, "time_ms": time_ms, "chunk_index": chunk}
            out.append(self._params.sample(bytes(packet), **fields))
        if self._unparsed > self._max_unit:
            self.reset()
            message = f"no H.264 access unit in {self._max_unit} bytes; is this Annex B?"
            out.append(Break(MediaError(415, message)))
        return out

    def reset(self) -> None:
        self._parser = av.CodecContext.create("h264", "r")
        self._params.forget_order()
        self._unparsed = 0
