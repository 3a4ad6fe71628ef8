"""prepare_image: what was declared is checked, bombs are refused unread, JPEG is passed on as is.

All images are generated here with PyAV (mjpeg, png and libwebp encoders) or
written byte by byte where a header has to lie.
"""

from __future__ import annotations

import struct
import zlib
from fractions import Fraction

import av
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import media.image as image_module
from media.errors import MediaError
from media.image import ImageLimits, encode_jpeg, fit_within, prepare_image

LIMITS = ImageLimits()


def halves(width: int, height: int, alpha: bool = False) -> np.ndarray:
    """Left half white, right half black (RGB or RGBA): orientation and aspect are visible."""
    pixels = np.zeros((height, width, 4 if alpha else 3), np.uint8)
    pixels[:, : width // 2] = 255
    if alpha:
        pixels[..., 3] = 255
    return pixels


def encode(codec: str, pixels: np.ndarray, pix_fmt: str) -> bytes:
    fmt = "rgba" if pixels.shape[2] == 4 else "rgb24"
    frame = av.VideoFrame.from_ndarray(pixels, format=fmt).reformat(format=pix_fmt)
    encoder = av.CodecContext.create(codec, "w")
    encoder.width, encoder.height, encoder.pix_fmt = frame.width, frame.height, pix_fmt
    encoder.time_base = Fraction(1, 1)
    return b"".join(bytes(p) for p in encoder.encode(frame) + encoder.encode(None))


def png(pixels: np.ndarray) -> bytes:
    return encode("png", pixels, "rgba" if pixels.shape[2] == 4 else "rgb24")


def webp(pixels: np.ndarray) -> bytes:
    return encode("libwebp", pixels, "yuv420p")


def decode(data: bytes) -> np.ndarray:
    frame = av.CodecContext.create("mjpeg", "r").decode(av.Packet(data))[0]
    return frame.to_ndarray(format="rgb24")


def code_of(call) -> int:
    with pytest.raises(MediaError) as info:
        call()
    return info.value.code


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of zeros: about 200 kB that inflate to width*height pixels."""
    compressor = zlib.compressobj(1)
    rows = (b"\x00" * (1 + width // 8)) * 1000
    idat = b"".join(compressor.compress(rows) for _ in range(height // 1000)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def with_orientation(jpeg: bytes, orientation: int) -> bytes:
    """Insert an EXIF APP1 segment carrying only the Orientation tag (big-endian TIFF)."""
    tiff = b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", 1)
    tiff += struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(">I", 0)
    app1 = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]


def test_fit_within_keeps_aspect() -> None:
    assert fit_within(640, 480, 1024) == (640, 480)
    assert fit_within(4000, 3000, 1024) == (1024, 768)
    assert fit_within(1000, 4000, 1024) == (256, 1024)
    assert fit_within(5000, 1, 1024) == (1024, 1)


@given(st.integers(1, 20000), st.integers(1, 20000), st.integers(16, 4096))
def test_fit_within_property(width: int, height: int, limit: int) -> None:
    out_w, out_h = fit_within(width, height, limit)
    assert max(out_w, out_h) <= max(limit, 1) and out_w >= 1 and out_h >= 1
    if max(width, height) > limit:
        assert max(out_w, out_h) == limit
        # Aspect kept: each side is the scaled side rounded to a whole pixel (at least 1).
        scale = limit / max(width, height)
        for side, out in ((width, out_w), (height, out_h)):
            assert abs(out - side * scale) <= 0.5 + 1e-9 or out == 1
    else:
        assert (out_w, out_h) == (width, height)


def test_jpeg_within_limits_passes_through_untouched() -> None:
    data = encode_jpeg(halves(640, 480), 90)
    prepared = prepare_image(data, "image/jpeg", LIMITS, width=640, height=480)
    assert prepared.passthrough and prepared.data == data
    assert (prepared.width, prepared.height) == (640, 480)
    assert prepared.mime_type == "image/jpeg"


@pytest.mark.parametrize("make,mime", [(png, "image/png"), (webp, "image/webp")])
def test_png_and_webp_become_jpeg(make, mime: str) -> None:
    prepared = prepare_image(make(halves(320, 200)), mime, LIMITS)
    assert not prepared.passthrough and prepared.mime_type == "image/jpeg"
    pixels = decode(prepared.data)
    assert pixels.shape == (200, 320, 3)
    assert pixels[:, :150].mean() > 240 and pixels[:, 170:].mean() < 15


@pytest.mark.parametrize("make,mime", [(png, "image/png"), (encode_jpeg, "image/jpeg")])
def test_big_image_is_downscaled_keeping_aspect(make, mime: str) -> None:
    source = halves(2000, 1000)
    data = make(source) if make is png else make(source, 85)
    prepared = prepare_image(data, mime, LIMITS, width=2000, height=1000)
    assert not prepared.passthrough
    assert (prepared.width, prepared.height) == (1024, 512)
    assert (prepared.source_width, prepared.source_height) == (2000, 1000)
    pixels = decode(prepared.data)
    assert pixels.shape == (512, 1024, 3)
    assert pixels[:, :500].mean() > 240 and pixels[:, 524:].mean() < 15


def test_declared_mime_that_lies_is_400_naming_both() -> None:
    data = encode_jpeg(halves(64, 48), 85)
    with pytest.raises(MediaError) as info:
        prepare_image(data, "image/png", LIMITS)
    assert info.value.code == 400
    assert info.value.message == "declared image/png but data is image/jpeg"
    gif = b"GIF89a" + b"\x00" * 32
    assert code_of(lambda: prepare_image(gif, "image/webp", LIMITS)) == 400


def test_declared_size_that_lies_is_400_naming_both() -> None:
    data = png(halves(320, 240))
    with pytest.raises(MediaError) as info:
        prepare_image(data, "image/png", LIMITS, width=640, height=480)
    assert info.value.code == 400
    assert info.value.message == "declared 640x480 but image is 320x240"
    assert code_of(lambda: prepare_image(data, "image/png", LIMITS, width=321)) == 400
    assert prepare_image(data, "image/png", LIMITS, height=240).height == 240


def test_png_bomb_is_refused_from_its_header_without_decoding(monkeypatch) -> None:
    def must_not_decode(*_: object) -> None:
        raise AssertionError("decoded a decompression bomb")

    monkeypatch.setattr(image_module, "_decode_image", must_not_decode)
    bomb = png_bomb(20000, 20000)
    assert len(bomb) < LIMITS.max_bytes
    with pytest.raises(MediaError) as info:
        prepare_image(bomb, "image/png", LIMITS)
    assert info.value.code == 413
    assert "20000x20000" in info.value.message


def test_jpeg_and_webp_headers_promising_too_many_pixels_are_413(monkeypatch) -> None:
    monkeypatch.setattr(image_module, "_decode_image", lambda *_: pytest.fail("decoded"))
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, 30000, 30000, 1) + b"\x01\x11\x00"
    jpeg = b"\xff\xd8" + sof + b"\xff\xda" + b"\x00" * 16
    assert code_of(lambda: prepare_image(jpeg, "image/jpeg", LIMITS)) == 413
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00" * 4 + (19999).to_bytes(3, "little") * 2
    webp_data = b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x
    assert code_of(lambda: prepare_image(webp_data, "image/webp", LIMITS)) == 413


def test_webp_whose_frame_is_larger_than_its_canvas_is_refused() -> None:
    frame_chunk = webp(halves(1000, 1000))[12:]  # the 'VP8 ' chunk of a 1000x1000 image
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00" * 4 + (99).to_bytes(3, "little") * 2
    body = b"WEBP" + vp8x + frame_chunk
    lying = b"RIFF" + struct.pack("<I", len(body)) + body  # canvas says 100x100
    for limit in (500_000, LIMITS.max_pixels):  # under the cap the decoder itself refuses
        assert (
            code_of(
                lambda limit=limit: prepare_image(
                    lying, "image/webp", ImageLimits(max_pixels=limit)
                )
            )
            == 415
        )


def test_too_many_bytes_is_413() -> None:
    data = png(halves(64, 64))
    assert (
        code_of(lambda: prepare_image(data, "image/png", ImageLimits(max_bytes=len(data) - 1)))
        == 413
    )


@pytest.mark.parametrize("mime", ["image/gif", "image/heic", "text/plain", ""])
def test_unsupported_type_is_415(mime: str) -> None:
    assert code_of(lambda: prepare_image(b"GIF89a....", mime, LIMITS)) == 415


def _valid_images() -> dict[str, bytes]:
    pixels = halves(96, 64)
    return {
        "image/jpeg": encode_jpeg(pixels, 85),
        "image/png": png(pixels),
        "image/webp": webp(pixels),
    }


@pytest.mark.parametrize("mime", ["image/jpeg", "image/png", "image/webp"])
def test_corrupt_data_is_415_and_the_next_image_still_works(mime: str) -> None:
    good = _valid_images()[mime]
    noise = np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    for bad in (good[: len(good) // 2], good[:20], good[:40] + noise, noise):
        assert code_of(lambda bad=bad: prepare_image(bad, mime, LIMITS)) in (415, 400)
    assert code_of(lambda: prepare_image(good[: len(good) // 2], mime, LIMITS)) == 415
    assert code_of(lambda: prepare_image(good[:40] + noise, mime, LIMITS)) == 415
    assert prepare_image(good, mime, LIMITS).width == 96


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_bytes_give_an_image_or_a_media_error(data: st.DataObject) -> None:
    mime = data.draw(st.sampled_from(["image/jpeg", "image/png", "image/webp"]))
    good = IMAGES[mime]
    kind = data.draw(st.sampled_from(["random", "prefix", "flips", "spliced"]))
    if kind == "random":
        blob = data.draw(st.binary(max_size=2000))
    elif kind == "prefix":
        blob = good[: data.draw(st.integers(0, len(good)))]
    elif kind == "flips":
        buf = bytearray(good)
        for at in data.draw(st.lists(st.integers(0, len(good) - 1), min_size=1, max_size=8)):
            buf[at] ^= data.draw(st.integers(1, 255))
        blob = bytes(buf)
    else:
        cut = data.draw(st.integers(0, len(good)))
        blob = good[:cut] + data.draw(st.binary(max_size=500))
    try:
        prepared = prepare_image(blob, mime, LIMITS)
    except MediaError as error:
        assert error.code in (400, 413, 415)
    else:
        assert prepared.data[:2] == b"\xff\xd8"


IMAGES = _valid_images()


def test_exif_orientation_is_applied_when_reencoding() -> None:
    # Stored 2000x1000 with the left half white; orientation 6 = shown rotated 90 degrees
    # clockwise, 1000x2000 with the white half on top.
    data = with_orientation(encode_jpeg(halves(2000, 1000), 85), 6)
    prepared = prepare_image(data, "image/jpeg", LIMITS, width=1000, height=2000)
    assert (prepared.width, prepared.height) == (512, 1024)
    pixels = decode(prepared.data)
    assert pixels.shape == (1024, 512, 3)
    assert pixels[:500].mean() > 240 and pixels[524:].mean() < 15
    # Stored size also accepted as declared (not every client applies EXIF).
    assert prepare_image(data, "image/jpeg", LIMITS, width=2000, height=1000).height == 1024


def test_small_jpeg_keeps_its_orientation_tag_and_reports_the_shown_size() -> None:
    data = with_orientation(encode_jpeg(halves(200, 100), 85), 8)
    prepared = prepare_image(data, "image/jpeg", LIMITS)
    assert prepared.passthrough and prepared.data == data
    assert (prepared.width, prepared.height) == (100, 200)


def test_transparency_is_flattened_onto_white() -> None:
    pixels = halves(100, 100, alpha=True)
    pixels[:, :, 3] = 0  # fully transparent everywhere: all white once flattened
    pixels[:10, :, 3] = 255  # except an opaque top band, half black
    prepared = prepare_image(png(pixels), "image/png", LIMITS)
    out = decode(prepared.data)
    assert out[30:].mean() > 245
    assert out[:8, 60:].mean() < 20


def test_encode_jpeg_takes_arrays_and_quality_matters() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    low, high = encode_jpeg(pixels, 30), encode_jpeg(pixels, 95)
    assert len(low) < len(high)
    assert decode(high).shape == (120, 160, 3)
    assert decode(encode_jpeg(pixels[..., 0], 85)).shape == (120, 160, 3)
    rgba = np.dstack([pixels, np.full((120, 160), 255, np.uint8)])
    assert decode(encode_jpeg(rgba, 85)).shape == (120, 160, 3)
    with pytest.raises(ValueError):
        encode_jpeg(np.zeros((4, 4, 2), np.uint8), 85)
