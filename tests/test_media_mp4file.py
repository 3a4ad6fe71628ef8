"""Whole (non-fragmented) MP4/MOV files, as phones and editors write them, and `final`.

Before: a whole MP4 sent as video/mp4 gave no frames and no error.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import av
import numpy as np
import pytest

from media.errors import MediaError
from media.image import ImageLimits
from media.mp4file import FRAGMENTED, WHOLE, Mp4File, _Picker, _targets, sample_file
from media.video import FramePolicy, VideoStream


def clip(
    fmt: str = "mp4", codec: str = "libx264", *, frames: int = 30, options=None, gop: int = 0
) -> bytes:
    """A 3 s, 10 fps, 160x120 clip whose picture changes every frame."""
    with tempfile.TemporaryDirectory() as folder:  # faststart rewrites the file: a real one
        path = Path(folder) / f"clip.{fmt}"
        _write(path, fmt, codec, frames, options or {}, gop)
        return path.read_bytes()


def _write(
    path: Path, fmt: str, codec: str, frames: int, options: dict[str, str], gop: int
) -> None:
    with av.open(str(path), "w", format=fmt, options=options) as container:
        stream = container.add_stream(codec, rate=10)
        if gop:
            stream.codec_context.gop_size = gop
        stream.width, stream.height = 160, 120
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for i in range(frames):
            img = np.zeros((120, 160, 3), np.uint8)
            img[:, : (i * 5) % 160] = (200, 30, 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


WHOLE_FILES = {
    "mp4, moov at the end": lambda: clip("mp4"),
    "mp4, faststart": lambda: clip("mp4", options={"movflags": "faststart"}),
    "mov, H.264": lambda: clip("mov"),
    "mov, Motion JPEG": lambda: clip("mov", "mjpeg"),
}


def push_all(stream: VideoStream, data: bytes, piece: int, *, final: bool, now: float = 0.0):
    frames, notices = [], []
    starts = range(0, len(data), piece)
    for index, start in enumerate(starts):
        last = final and index == len(starts) - 1
        result = stream.push(
            index, data[start : start + piece], now_ms=now, speaking=False, final=last
        )
        frames += result.frames
        notices += result.notices
    return frames, notices


@pytest.mark.parametrize("name", list(WHOLE_FILES))
@pytest.mark.parametrize("final", [True, False])
def test_whole_file_in_chunks_gives_frames_over_its_media_time(name, final):
    data = WHOLE_FILES[name]()
    stream = VideoStream("video/mp4", FramePolicy(fps_speaking=1.0, fps_idle=0.2))
    frames, notices = push_all(stream, data, 1000, final=final)
    assert notices == []
    # 3 s at 1 fps of media time: 0, 1, 2 s and the last frame (2.9 s).
    assert [f.timestamp_ms for f in frames] == [0.0, 1000.0, 2000.0, 2900.0]
    assert all((f.width, f.height) == (160, 120) and f.data[:2] == b"\xff\xd8" for f in frames)
    assert len({f.data for f in frames}) == 4  # four different pictures


def test_a_long_file_is_spread_over_at_most_max_frames():
    data = clip("mp4", frames=300)  # 30 s
    frames = sample_file(data, 1000.0, ImageLimits(), max_frames=8)
    assert len(frames) == 8
    assert frames[0].pts_ms == 0.0 and frames[-1].pts_ms == 29900.0


class _CountingDecoder:
    def __init__(self, ctx) -> None:
        self.ctx, self.packets = ctx, 0

    def decode(self, packet):
        self.packets += packet is not None
        return self.ctx.decode(packet)

    def flush_buffers(self) -> None:
        self.ctx.flush_buffers()


def test_only_the_gops_of_the_frames_taken_are_decoded():
    """A 30 s clip with a keyframe every second, 8 frames taken: 8 GOPs decoded at most,
    each packet at most once (no seeking back and decoding again)."""
    data = clip("mp4", frames=300, gop=10)
    with av.open(io.BytesIO(data), format="mov") as container:
        stream = container.streams.video[0]
        counting = _CountingDecoder(stream.codec_context)
        targets = _targets(stream, 1000.0, 8)
        picked = _Picker(counting, targets).run(container.demux(stream))
    assert len(picked) == 8
    assert picked[0].pts == stream.start_time == 0
    assert counting.packets <= 8 * 10 + 8 * 4, counting.packets  # GOPs + B-frame delay
    assert counting.packets < 300 / 2
    # One GOP for the whole clip (a screen recording): still each packet at most once.
    with av.open(io.BytesIO(clip("mp4", frames=300, gop=300)), format="mov") as container:
        stream = container.streams.video[0]
        counting = _CountingDecoder(stream.codec_context)
        picked = _Picker(counting, _targets(stream, 1000.0, 8)).run(container.demux(stream))
    assert len(picked) == 8 and counting.packets <= 300


def test_layout_is_told_apart():
    whole, fragmented = Mp4File(), Mp4File()
    whole.add(clip("mp4"))
    fragmented.add(clip("mp4", options={"movflags": "frag_keyframe+empty_moov"}))
    assert (whole.layout, whole.complete) == (WHOLE, True)
    assert fragmented.layout == FRAGMENTED


def test_fragmented_mp4_still_streams():
    data = clip("mp4", options={"movflags": "frag_keyframe+empty_moov"})
    stream = VideoStream("video/mp4")
    frames, notices = push_all(stream, data, 1000, final=False)
    assert notices == [] and len(frames) == 1  # streamed: one frame per (wall-clock) interval


def test_final_sends_the_newest_frame_of_a_stream_and_starts_afresh():
    data = clip("h264")
    stream = VideoStream("video/h264")
    first = stream.push(0, data[:1500], now_ms=0, speaking=False)
    assert len(first.frames) == 1
    end = stream.push(1, data[1500:], now_ms=10, speaking=False, final=True)
    assert len(end.frames) == 1 and end.frames[0].data != first.frames[0].data
    # The same file again is a new recording, not duplicates of the old one.
    again = stream.push(0, data, now_ms=20_000, speaking=False, final=True)
    assert again.notices == [] and len(again.frames) >= 1


@pytest.mark.parametrize(
    "data,code,words",
    [
        (b"this is not a video file at all, just text", 415, "not MP4"),
        (clip("mp4")[:2000], 415, "incomplete"),  # cut short, then marked final
    ],
    ids=["text", "cut short"],
)
def test_what_cannot_be_decoded_is_a_415(data, code, words):
    stream = VideoStream("video/mp4")
    frames, notices = push_all(stream, data, 1000, final=True)
    assert frames == []
    assert [n.code for n in notices] == [code] and words in notices[0].message


def test_undecodable_video_in_a_complete_file_is_a_415():
    data = bytearray(clip("mp4"))
    start = data.find(b"mdat") + 4
    data[start : start + 3000] = bytes(3000)  # the samples zeroed
    with pytest.raises(MediaError) as info:
        sample_file(bytes(data), 1000.0, ImageLimits())
    assert info.value.code == 415


def test_a_file_over_the_limit_is_a_413():
    stream = VideoStream("video/mp4", max_file_bytes=2000)
    frames, notices = push_all(stream, clip("mp4"), 1000, final=True)
    assert frames == [] and [n.code for n in notices] == [413]
    assert "fragmented" in notices[0].message


def test_picture_over_max_pixels_is_a_413():
    with pytest.raises(MediaError) as info:
        sample_file(clip("mp4"), 1000.0, ImageLimits(max_pixels=160 * 100))
    assert info.value.code == 413
