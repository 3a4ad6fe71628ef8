"""Client images to provider-ready JPEG.

Every image is checked against what the client declared, refused before
decoding when its header promises too many pixels (a small PNG can inflate to
gigabytes), decoded once, and re-encoded only when it must be: a JPEG already
small enough is sent on byte for byte.

Decoding uses a bare PyAV ``CodecContext`` fed the whole file as one packet,
as FFmpeg's own image2pipe demuxer does: no format probing, no file-like
callbacks, no container layer, so it is the cheapest path and every failure
surfaces as one exception from one call.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from media.errors import MediaError

JPEG = "image/jpeg"
PNG = "image/png"
WEBP = "image/webp"

_DECODERS = {JPEG: "mjpeg", PNG: "png", WEBP: "webp"}
_ALIASES = {"image/jpg": JPEG, "image/pjpeg": JPEG}
# swscale's bilinear widens its filter when shrinking, so it does not alias
# like a GPU bilinear would, and it is the cheapest of the good filters.
_INTERPOLATION = "BILINEAR"
# JPEG SOFn markers: C0-CF except DHT (C4), JPG (C8) and DAC (CC).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_EXIF_ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class ImageLimits:
    """Bounds applied to every client image (and to sampled video frames).

    ``max_pixels`` (40 MP) admits any phone photo at its default resolution
    while bounding the decode buffer to about 60 MB for a 4:2:0 JPEG and
    160 MB for an RGBA PNG. ``max_bytes`` (8 MiB) is the encoded size, before
    base64 on the wire. ``jpeg_quality`` uses libjpeg's 1-100 scale.
    """

    max_dimension: int = 1024
    max_pixels: int = 40_000_000
    max_bytes: int = 8 * 1024 * 1024
    jpeg_quality: int = 85

    def __post_init__(self) -> None:
        if self.max_dimension < 1 or self.max_pixels < 1 or self.max_bytes < 1:
            raise ValueError("image limits must be positive")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError("jpeg_quality must be within 1..100")


@dataclass(frozen=True)
class PreparedImage:
    """An image ready for a provider.

    Sizes are as displayed, i.e. after the JPEG's EXIF orientation, which a
    passthrough JPEG still carries and a re-encoded one has applied.
    """

    data: bytes
    width: int
    height: int
    source_width: int
    source_height: int
    passthrough: bool
    mime_type: str = JPEG


@dataclass(frozen=True)
class _Header:
    width: int
    height: int
    orientation: int = 1
    animated: bool = False


def fit_within(width: int, height: int, max_dimension: int) -> tuple[int, int]:
    """Largest size with the same aspect whose longer side is <= ``max_dimension``."""
    if width <= 0 or height <= 0:
        raise ValueError("width and height must be positive")
    longest = max(width, height)
    if longest <= max_dimension:
        return width, height
    scale = max_dimension / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def normalize_image_mime(mime_type: str) -> str:
    """Canonical image mime type, or MediaError(415) when it is not accepted."""
    base = mime_type.split(";", 1)[0].strip().lower()
    base = _ALIASES.get(base, base)
    if base not in _DECODERS:
        raise MediaError(
            415, f"unsupported image type {mime_type!r}; use image/jpeg, image/png or image/webp"
        )
    return base


def sniff_image(data: bytes) -> str | None:
    """Mime type named by the data's magic bytes, whatever was declared."""
    if data[:3] == b"\xff\xd8\xff":
        return JPEG
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return PNG
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return WEBP
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return None


def image_pixels(data: bytes) -> int:
    """Pixels a decode of ``data`` will hold, per its header; 0 when it is not a JPEG,
    PNG or WebP with a readable header (`prepare_image` then says what is wrong).

    Cheap (no decoding): a server bounds the pixels decoded at once with it.
    """
    kind = sniff_image(data)
    if kind is None or kind not in _DECODERS:
        return 0
    try:
        header = read_image_header(kind, data)
    except MediaError:
        return 0
    return header.width * header.height


def prepare_image(
    data: bytes,
    mime_type: str,
    limits: ImageLimits,
    width: int | None = None,
    height: int | None = None,
) -> PreparedImage:
    """Check, decode and (only if needed) downscale and re-encode one client image.

    Raises MediaError: 400 when the data contradicts the declared type or
    size, 413 when it is too large (bytes, or pixels per its header, checked
    before any decoding), 415 when the type is unsupported or the data does
    not decode.
    """
    declared = normalize_image_mime(mime_type)
    if not data:
        raise MediaError(400, "image data is empty")
    if len(data) > limits.max_bytes:
        raise MediaError(413, f"image is {len(data)} bytes; the limit is {limits.max_bytes}")
    actual = sniff_image(data)
    if actual is None:
        raise MediaError(415, f"declared {declared} but data is not a JPEG, PNG or WebP image")
    if actual != declared:
        raise MediaError(400, f"declared {declared} but data is {actual}")
    header = read_image_header(actual, data)
    pixels = header.width * header.height
    if pixels > limits.max_pixels:
        raise MediaError(
            413,
            f"image is {header.width}x{header.height} ({pixels} pixels); "
            f"the limit is {limits.max_pixels} pixels",
        )
    if header.animated:
        raise MediaError(415, "animated WebP is not supported; send a still image")
    shown_w, shown_h = _displayed_size(header)
    _check_declared_size(width, height, header)
    frame = _decode_image(actual, data, limits.max_pixels)
    if (frame.width, frame.height) != (header.width, header.height):
        raise MediaError(
            415,
            f"image header says {header.width}x{header.height} "
            f"but data decodes to {frame.width}x{frame.height}",
        )
    if actual == JPEG and max(header.width, header.height) <= limits.max_dimension:
        return PreparedImage(data, shown_w, shown_h, shown_w, shown_h, passthrough=True)
    try:
        out, out_w, out_h = _render(frame, header.orientation, limits)
    except MediaError:
        raise
    except Exception as exc:  # any codec or scaler failure is an undecodable image
        raise MediaError(415, f"image cannot be converted: {exc}") from exc
    return PreparedImage(out, out_w, out_h, shown_w, shown_h, passthrough=False)


def frame_to_jpeg(
    frame: av.VideoFrame,
    max_dimension: int,
    quality: int,
    reformatter: VideoReformatter | None = None,
) -> tuple[bytes, int, int]:
    """Downscale (aspect kept) and JPEG-encode a decoded frame in one swscale pass.

    A caller converting many same-sized frames (a video stream) passes its own
    ``reformatter``, which keeps the swscale context instead of rebuilding it
    for every frame (about 1 ms of 1.5 at 640x480).
    """
    out_w, out_h = fit_within(frame.width, frame.height, max_dimension)
    scaler = reformatter or VideoReformatter()
    if _has_alpha(frame):
        rgba = scaler.reformat(frame, out_w, out_h, "rgba", interpolation=_INTERPOLATION)
        return encode_jpeg(_over_white(rgba.to_ndarray()), quality), out_w, out_h
    scaled = scaler.reformat(
        frame, out_w, out_h, "yuv420p", interpolation=_INTERPOLATION, dst_color_range="JPEG"
    )
    return encode_jpeg(scaled, quality), out_w, out_h


def encode_jpeg(image: av.VideoFrame | np.ndarray, quality: int) -> bytes:
    """JPEG-encode a frame, or an HxW / HxWx3 (RGB) / HxWx4 (RGBA) uint8 array.

    ``quality`` follows libjpeg's 1-100 scale; it is mapped onto FFmpeg's
    quantiser so that, e.g., 85 gives quantisation tables close to libjpeg's 85.
    """
    frame = _as_frame(image)
    if frame.format.name != "yuv420p" or frame.color_range != 2:
        frame = frame.reformat(format="yuv420p", dst_color_range="JPEG")
    encoder = av.CodecContext.create("mjpeg", "w")
    encoder.width = frame.width
    encoder.height = frame.height
    encoder.pix_fmt = "yuv420p"
    encoder.color_range = 2  # full range, as JFIF expects
    encoder.time_base = Fraction(1, 1)
    encoder.thread_count = 1
    encoder.qmin = encoder.qmax = _qscale(quality)
    packets = encoder.encode(frame) + encoder.encode(None)
    return b"".join(bytes(packet) for packet in packets)


def read_image_header(kind: str, data: bytes) -> _Header:
    """Dimensions (and JPEG orientation) from the header alone, without decoding."""
    try:
        header = {JPEG: _jpeg_header, PNG: _png_header, WEBP: _webp_header}[kind](data)
    except (IndexError, struct.error):
        header = None
    if header is None or header.width <= 0 or header.height <= 0:
        raise MediaError(415, f"{kind} header is truncated or corrupt")
    return header


def _png_header(data: bytes) -> _Header | None:
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return _Header(width, height)


def _webp_header(data: bytes) -> _Header | None:
    chunk = data[12:16]
    if chunk == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            return None
        width, height = struct.unpack("<HH", data[26:30])
        return _Header(width & 0x3FFF, height & 0x3FFF)
    if chunk == b"VP8L":
        if data[20] != 0x2F:
            return None
        bits = int.from_bytes(data[21:25], "little")
        return _Header((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X":
        if len(data) < 30:
            return None
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return _Header(width, height, animated=bool(data[20] & 0x02))
    return None


def _jpeg_header(data: bytes) -> _Header | None:
    """Walk the marker segments up to the first SOFn, noting EXIF orientation on the way."""
    orientation = 1
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length field
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI or scan data before any frame header
            return None
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        if length < 2:
            return None
        if marker in _SOF_MARKERS:
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return _Header(width, height, orientation)
        if marker == 0xE1 and data[i + 4 : i + 10] == b"Exif\x00\x00":
            orientation = _exif_orientation(data[i + 10 : i + 2 + length])
        i += 2 + length
    return None


def _exif_orientation(tiff: bytes) -> int:
    """Orientation tag of IFD0 (1 when absent or unreadable: never fatal)."""
    try:
        order = {b"II": "<", b"MM": ">"}[tiff[:2]]
        (ifd,) = struct.unpack(order + "I", tiff[4:8])
        (count,) = struct.unpack(order + "H", tiff[ifd : ifd + 2])
        for n in range(count):
            entry = ifd + 2 + 12 * n
            tag, kind = struct.unpack(order + "HH", tiff[entry : entry + 4])
            if tag == _EXIF_ORIENTATION_TAG and kind == 3:  # SHORT
                (value,) = struct.unpack(order + "H", tiff[entry + 8 : entry + 10])
                return value if 1 <= value <= 8 else 1
    except (KeyError, struct.error):
        pass
    return 1


def _displayed_size(header: _Header) -> tuple[int, int]:
    if header.orientation >= 5:  # the transposing orientations
        return header.height, header.width
    return header.width, header.height


def _check_declared_size(width: int | None, height: int | None, header: _Header) -> None:
    """The declared size may be the stored one or the EXIF-rotated one a browser reports."""
    if width is None and height is None:
        return
    shown = _displayed_size(header)
    for w, h in (shown, (header.width, header.height)):
        if width in (None, w) and height in (None, h):
            return
    declared = f"{'?' if width is None else width}x{'?' if height is None else height}"
    raise MediaError(400, f"declared {declared} but image is {shown[0]}x{shown[1]}")


def _decode_image(kind: str, data: bytes, max_pixels: int) -> av.VideoFrame:
    decoder = av.CodecContext.create(_DECODERS[kind], "r")
    decoder.thread_count = 1
    # max_pixels backs the header check: a WebP whose VP8 data is larger than its VP8X
    # canvas must not get the decoder to allocate it. mjpeg conceals truncated scans by
    # default; err_detect=explode makes it say so.
    decoder.options = {"max_pixels": str(max_pixels), "err_detect": "explode"}
    try:
        frames = decoder.decode(av.Packet(data)) or decoder.decode(None)
    except Exception as exc:  # av.error.* and anything else the codec raises
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise MediaError(415, f"{kind} data cannot be decoded ({reason})") from exc
    if not frames or frames[0].is_corrupt:
        raise MediaError(415, f"{kind} data cannot be decoded")
    return frames[0]


def _render(frame: av.VideoFrame, orientation: int, limits: ImageLimits) -> tuple[bytes, int, int]:
    if orientation == 1:
        return frame_to_jpeg(frame, limits.max_dimension, limits.jpeg_quality)
    shown_w, shown_h = (
        (frame.height, frame.width) if orientation >= 5 else (frame.width, frame.height)
    )
    out_w, out_h = fit_within(shown_w, shown_h, limits.max_dimension)
    stored_w, stored_h = (out_h, out_w) if orientation >= 5 else (out_w, out_h)
    fmt = "rgba" if _has_alpha(frame) else "rgb24"
    pixels = frame.reformat(stored_w, stored_h, fmt, interpolation=_INTERPOLATION).to_ndarray()
    upright = np.ascontiguousarray(_orient(pixels, orientation))
    return encode_jpeg(upright, limits.jpeg_quality), out_w, out_h


def _orient(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Apply EXIF orientation 2-8 (same transforms as Pillow's exif_transpose)."""
    if orientation == 2:
        return pixels[:, ::-1]
    if orientation == 3:
        return pixels[::-1, ::-1]
    if orientation == 4:
        return pixels[::-1]
    if orientation == 5:
        return pixels.swapaxes(0, 1)
    if orientation == 6:
        return np.rot90(pixels, -1)
    if orientation == 7:
        return pixels[::-1, ::-1].swapaxes(0, 1)
    if orientation == 8:
        return np.rot90(pixels, 1)
    return pixels


def _has_alpha(frame: av.VideoFrame) -> bool:
    fmt = frame.format
    return fmt.has_palette or any(component.is_alpha for component in fmt.components)


def _over_white(rgba: np.ndarray) -> np.ndarray:
    """Flatten transparency onto white: JPEG has no alpha, and black would hide dark content."""
    alpha = rgba[..., 3:4].astype(np.uint16)
    rgb = rgba[..., :3].astype(np.uint16)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def _as_frame(image: av.VideoFrame | np.ndarray) -> av.VideoFrame:
    if isinstance(image, av.VideoFrame):
        return image
    pixels = np.ascontiguousarray(image, dtype=np.uint8)
    if pixels.ndim == 2:
        return av.VideoFrame.from_ndarray(pixels, format="gray")
    if pixels.ndim == 3 and pixels.shape[2] == 4:
        pixels = _over_white(pixels)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an HxW, HxWx3 or HxWx4 array, got shape {image.shape}")
    return av.VideoFrame.from_ndarray(pixels, format="rgb24")


def _qscale(quality: int) -> int:
    """libjpeg quality -> FFmpeg mjpeg qscale.

    libjpeg scales its base tables by 5000/q % (q < 50) or (200 - 2q) %; FFmpeg
    scales the MPEG intra matrix by qscale/8, whose low frequencies are about
    1.3x libjpeg's, so qscale ~= 0.06 x libjpeg's percentage.
    """
    quality = min(100, max(1, quality))
    percent = 5000 / quality if quality < 50 else 200 - 2 * quality
    return min(31, max(1, round(0.06 * percent)))
