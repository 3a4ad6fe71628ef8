"""VP8 / VP9 frame headers: is it a keyframe, and of what size (read before decoding)."""

from __future__ import annotations

import struct

from media.errors import Corrupt
from media.samples import Sample


def vp8_key(data: bytes) -> tuple[bool, tuple[int, int] | None]:
    if len(data) < 10 or data[0] & 0x01 or data[3:6] != b"\x9d\x01\x2a":
        return False, None
    width, height = struct.unpack("<HH", data[6:10])
    return True, (width & 0x3FFF, height & 0x3FFF)


def vp9_key(data: bytes) -> tuple[bool, tuple[int, int] | None]:
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


def vp_sample(codec: str, data: bytes, **fields: object) -> Sample:
    """A VP8/VP9 frame; Corrupt if its first bytes cannot start one (framing is off)."""
    if codec == "vp8":
        first_partition = int.from_bytes(data[:3], "little") >> 5
        if len(data) < 3 or first_partition > len(data):
            raise Corrupt("not a VP8 frame")
    elif not data or data[0] >> 6 != 2:
        raise Corrupt("not a VP9 frame")
    key, size = (vp8_key if codec == "vp8" else vp9_key)(data)
    return Sample(data, codec, key, size=size, **fields)  # type: ignore[arg-type]
