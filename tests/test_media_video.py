"""VideoStream: chunks cut anywhere, reordered, lost or corrupted still give true frames.

All media is generated here with PyAV. Every frame carries its index as eight
black/white blocks across the top, so a test can tell which frame a sampled
JPEG shows and whether it is garbage.
"""

from __future__ import annotations

import io
import itertools
from dataclasses import dataclass

import av
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from media.errors import MediaError
from media.image import ImageLimits
from media.video import FramePolicy, VideoStream, parse_video_mime, sniff_video

FPS = 30
KEYINT = 30  # one keyframe a second
FRAMES = 90  # three seconds
DURATION_MS = FRAMES * 1000 / FPS


def _frames(count: int, width: int, height: int):
    _, x = np.mgrid[0:height, 0:width]
    band = width // 8
    for index in range(count):
        luma = ((x + 3 * index) % 200 + 16).astype(np.uint8)
        for bit in range(8):
            luma[: height // 4, bit * band : (bit + 1) * band] = 235 if index >> bit & 1 else 16
        chroma = np.full((height // 2, width), 128, np.uint8)
        yield av.VideoFrame.from_ndarray(np.concatenate([luma, chroma]), format="yuv420p")


def _encode(
    fmt: str,
    codec: str,
    width: int,
    height: int,
    options: dict,
    mux: dict | None = None,
    audio: str | None = None,
) -> bytes:
    """Encode FRAMES frames; with ``audio``, a 440 Hz tone track interleaved (the audio
    track comes first, as the track a demuxer must skip)."""
    buf = io.BytesIO()
    # bitexact and one thread: the same bytes on every run and machine.
    options = {**options, "threads": "1"}
    with av.open(buf, "w", format=fmt, options={"fflags": "+bitexact", **(mux or {})}) as container:
        sound = container.add_stream(audio, rate=48000) if audio else None
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = options
        tone = (8000 * np.sin(np.arange(48000 * FRAMES // FPS) * 2 * np.pi * 440 / 48000)).astype(
            np.int16
        )
        fmt_name = "fltp" if audio == "aac" else "s16"
        for index, frame in enumerate(_frames(FRAMES, width, height)):
            container.mux(stream.encode(frame))
            if sound is not None:
                part = tone[index * 1600 : (index + 1) * 1600][None, :]
                if fmt_name == "fltp":
                    part = (part / 32768).astype(np.float32)
                samples = av.AudioFrame.from_ndarray(part, format=fmt_name, layout="mono")
                samples.sample_rate, samples.pts = 48000, index * 1600
                container.mux(sound.encode(samples))
        container.mux(stream.encode(None))
        if sound is not None:
            container.mux(sound.encode(None))
    return buf.getvalue()


def frame_index(jpeg: bytes) -> int | None:
    """The index a frame shows, or None if its code blocks are not clean black/white."""
    luma = av.CodecContext.create("mjpeg", "r").decode(av.Packet(jpeg))[0].to_ndarray(format="gray")
    height, width = luma.shape
    band = width // 8
    index = 0
    for bit in range(8):
        block = luma[
            height // 16 : height * 3 // 16, bit * band + band // 4 : (bit + 1) * band - band // 4
        ]
        level = float(block.mean())
        if level > 200:
            index |= 1 << bit
        elif level > 50:
            return None
    return index


@dataclass(frozen=True)
class Clip:
    mime: str
    data: bytes
    key_positions: tuple[int, ...]  # byte offset of each keyframe
    frame_ends: tuple[int, ...]  # byte offset just past each frame, in stream order
    units: tuple[int, ...]  # where resynchronisation can happen: clusters, fragments, keyframes

    def unit_of(self, offset: int) -> int:
        """Start of the unit (cluster, fragment, GOP) that holds ``offset``."""
        return max(unit for unit in self.units if unit <= offset)

    width: int
    height: int


def _clip(mime: str, data: bytes, fmt: str | None, width: int, height: int) -> Clip:
    with av.open(io.BytesIO(data), format=fmt) as container:
        packets = [p for p in container.demux(container.streams.video[0]) if p.size]
        keys = tuple(p.pos for p in packets if p.is_keyframe)
        ends = tuple(sorted(p.pos + p.size for p in packets))
    return Clip(mime, data, keys, ends, _units(data, keys), width, height)


def _units(data: bytes, keys: tuple[int, ...]) -> tuple[int, ...]:
    if data[4:8] == b"ftyp":  # top-level boxes: the moof of each fragment
        units, at = [], 0
        while at < len(data):
            if data[at + 4 : at + 8] == b"moof":
                units.append(at)
            at += int.from_bytes(data[at : at + 4], "big")
        return tuple(units)
    if data[:4] == b"\x1a\x45\xdf\xa3":  # clusters
        units, at = [], data.find(b"\x1f\x43\xb6\x75")
        while at >= 0:
            units.append(at)
            at = data.find(b"\x1f\x43\xb6\x75", at + 1)
        return tuple(units)
    return keys


X264 = {"g": str(KEYINT), "keyint_min": str(KEYINT), "sc_threshold": "0", "preset": "veryfast"}
VPX = {"g": str(KEYINT), "deadline": "realtime", "cpu-used": "8", "b": "400k"}
FRAGMENTED = {"movflags": "frag_keyframe+empty_moov+default_base_moof"}


@pytest.fixture(scope="module")
def clips() -> dict[str, Clip]:
    h264 = _encode("h264", "libx264", 640, 480, X264)  # B-frames on (veryfast)
    vp8 = _encode("webm", "libvpx", 320, 240, VPX)
    vp9 = _encode("webm", "libvpx-vp9", 192, 144, VPX)
    mp4 = _encode("mp4", "libx264", 320, 240, X264, FRAGMENTED)
    mkv = _encode("matroska", "libx264", 320, 240, X264, {"live": "1"})
    vp8_opus = _encode("webm", "libvpx", 320, 240, VPX, audio="libopus")
    mp4_aac = _encode("mp4", "libx264", 320, 240, X264, FRAGMENTED, audio="aac")
    # Without default_base_moof: tfhd carries absolute file offsets (base_data_offset).
    mp4_abs = _encode("mp4", "libx264", 320, 240, X264, {"movflags": "frag_keyframe+empty_moov"})
    return {
        "h264": _clip("video/h264", h264, "h264", 640, 480),
        "vp8": _clip("video/webm;codecs=vp8", vp8, None, 320, 240),
        "vp8-live": _clip("video/webm;codecs=vp8", _unknown_sizes(vp8), None, 320, 240),
        "vp9": _clip("video/webm;codecs=vp9", vp9, None, 192, 144),
        "mp4": _clip("video/mp4", mp4, None, 320, 240),
        "mkv-h264": _clip('video/x-matroska;codecs="avc1.64001e"', mkv, None, 320, 240),
        "vp8-opus": _clip("video/webm;codecs=vp8,opus", vp8_opus, None, 320, 240),
        "mp4-aac": _clip("video/mp4", mp4_aac, None, 320, 240),
        "mp4-abs": _clip("video/mp4", mp4_abs, None, 320, 240),
    }


def _unknown_sizes(webm: bytes) -> bytes:
    """Rewrite the Segment and Cluster sizes as 'unknown', as live recorders write them."""
    out = bytearray(webm)
    for element in (b"\x18\x53\x80\x67", b"\x1f\x43\xb6\x75"):
        at = out.find(element)
        while at >= 0:
            length = 9 - out[at + 4].bit_length()
            out[at + 4 : at + 4 + length] = bytes([0xFF >> (length - 1)]) + b"\xff" * (length - 1)
            at = out.find(element, at + 4)
    return bytes(out)


def split(data: bytes, count: int, seed: int) -> list[bytes]:
    cuts = sorted(
        np.random.default_rng(seed).choice(np.arange(1, len(data)), count - 1, replace=False)
    )
    bounds = [0, *map(int, cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


@dataclass
class Run:
    frames: list  # (push number, VideoFrameOut)
    notices: list[MediaError]


def play(
    stream: VideoStream,
    chunks: list[tuple[int, bytes]],
    *,
    speaking: bool = True,
    step_ms: float | None = None,
    start_ms: float = 0.0,
    **extra: object,
) -> Run:
    """Push chunks in the given order, spread evenly over the clip's duration."""
    step = DURATION_MS / len(chunks) if step_ms is None else step_ms
    run = Run([], [])
    for n, (index, data) in enumerate(chunks):
        now = start_ms + n * step
        result = stream.push(index, data, now_ms=now, speaking=speaking, timestamp_ms=now, **extra)
        run.frames += [(n, frame) for frame in result.frames]
        run.notices += result.notices
    return run


def in_order(chunks: list[bytes]) -> list[tuple[int, bytes]]:
    return list(enumerate(chunks))


def assert_true_frames(run: Run, clip: Clip) -> list[int]:
    """Every sampled frame shows a clean, later frame than the one before; returns indices."""
    indices = [frame_index(frame.data) for _, frame in run.frames]
    assert None not in indices, f"garbage frame sent: {indices}"
    assert indices == sorted(set(indices)), f"frames out of order or repeated: {indices}"
    for _, frame in run.frames:
        assert (frame.width, frame.height) == (clip.width, clip.height)
    return indices  # type: ignore[return-value]


ALL = ["h264", "vp8", "vp8-live", "vp9", "mp4", "mkv-h264", "vp8-opus", "mp4-aac", "mp4-abs"]


def test_mime_parsing_and_sniffing() -> None:
    assert parse_video_mime("video/webm;codecs=vp8") == ("video/webm", "vp8")
    assert parse_video_mime('video/webm; codecs="opus, vp09.00.10.08"') == ("video/webm", "vp9")
    assert parse_video_mime("video/mp4") == ("video/mp4", None)
    assert parse_video_mime("VIDEO/H264") == ("video/h264", "h264")
    for bad in ("video/ogg", "video/webm;codecs=av01.0.04M.08", "image/png"):
        with pytest.raises(MediaError) as info:
            VideoStream(bad)
        assert info.value.code == 415
    assert sniff_video(b"\x1a\x45\xdf\xa3rest") == "video/webm"
    assert sniff_video(b"\x00\x00\x00\x20ftypisom") == "video/mp4"
    assert sniff_video(b"\x00\x00\x00\x01\x67") == "video/h264"
    assert sniff_video(b"random") is None


@pytest.mark.parametrize("name", ALL)
def test_chunks_cut_anywhere_give_true_frames(clips: dict[str, Clip], name: str) -> None:
    clip = clips[name]
    stream = VideoStream(clip.mime, FramePolicy(fps_speaking=2.0))
    run = play(stream, in_order(split(clip.data, 40, seed=1)))
    assert run.notices == []
    indices = assert_true_frames(run, clip)
    # 3 s at 2 fps: one frame at start, then one per 500 ms.
    assert 4 <= len(indices) <= 7
    assert indices[-1] >= 60
    pts = [frame.timestamp_ms for _, frame in run.frames]
    if name != "h264":  # containers carry media time: it must match what the frame shows
        for (a, ta), (b, tb) in itertools.pairwise(zip(indices, pts, strict=True)):
            assert b - a == round((tb - ta) * FPS / 1000)
    assert stream.stats.frames_emitted == len(indices)


@pytest.mark.parametrize("name", ["h264", "vp8", "mp4"])
def test_frequent_keyframes_mean_only_keyframes_are_decoded(
    clips: dict[str, Clip], name: str
) -> None:
    clip = clips[name]
    stream = VideoStream(clip.mime, FramePolicy(fps_speaking=0.5, fps_idle=0.5))
    run = play(stream, in_order(split(clip.data, 30, seed=2)), speaking=False)
    indices = assert_true_frames(run, clip)
    assert len(indices) >= 2
    assert all(index % KEYINT == 0 for index in indices)
    assert stream.stats.frames_decoded == len(indices)
    assert stream.stats.samples_skipped >= 2 * (KEYINT - 1)  # two whole GOP tails


@pytest.mark.parametrize("name", ["h264", "vp8", "mp4"])
def test_rare_keyframes_decode_forward_but_skip_gop_tails(
    clips: dict[str, Clip], name: str
) -> None:
    clip = clips[name]
    stream = VideoStream(clip.mime, FramePolicy(fps_speaking=4.0))
    chunks = split(clip.data, 60, seed=3)
    run = play(stream, in_order(chunks))
    indices = assert_true_frames(run, clip)
    assert any(index % KEYINT for index in indices)  # not only keyframes
    assert stream.stats.frames_decoded < stream.stats.samples  # GOP tails never decoded
    # The newest frame wins: a sent frame trails the newest one received by at most
    # the sampling interval (7.5 frames) plus the decoder's reordering delay.
    ends = np.cumsum([len(c) for c in chunks])
    for (n, _), index in zip(run.frames, indices, strict=True):
        received = int(np.searchsorted(clip.frame_ends, ends[n], side="right"))
        assert index >= received - 13, (n, index, received)


@pytest.mark.parametrize("name", ["h264", "vp8", "mp4"])
def test_reordered_and_duplicated_chunks_change_nothing(clips: dict[str, Clip], name: str) -> None:
    clip = clips[name]
    chunks = split(clip.data, 40, seed=4)
    reference = play(VideoStream(clip.mime), in_order(chunks))
    shuffled = in_order(chunks)
    for i in range(0, len(shuffled) - 2, 3):  # each triple becomes (i+2, i, i+1)
        shuffled[i : i + 3] = [shuffled[i + 2], shuffled[i], shuffled[i + 1]]
    doubled = [item for pair in zip(shuffled, shuffled, strict=True) for item in pair]
    doubled.insert(25, shuffled[3])  # a very late duplicate
    stream = VideoStream(clip.mime)
    run = play(stream, doubled, step_ms=DURATION_MS / len(chunks) / 2)
    assert run.notices == []
    assert [frame_index(f.data) for _, f in run.frames] == [
        frame_index(f.data) for _, f in reference.frames
    ]
    assert stream.stats.chunks_ignored == len(chunks) + 1
    assert stream.stats.gaps == 0


def test_chunk_index_back_to_zero_with_a_new_recording_restarts(clips: dict[str, Clip]) -> None:
    first = split(clips["vp8"].data, 15, seed=16)
    second = split(clips["vp8-live"].data, 15, seed=17)  # same pictures, other bytes
    stream = VideoStream(clips["vp8"].mime, FramePolicy(fps_speaking=2.0))
    before = play(stream, in_order(first))
    after = play(stream, in_order(second), start_ms=DURATION_MS)
    assert before.notices == [] and after.notices == []
    assert len(assert_true_frames(after, clips["vp8"])) >= 4
    assert after.frames[0][1].timestamp_ms < 500  # the new recording's clock
    assert stream.stats.chunks_ignored == 0 and stream.stats.gaps == 0


def _chunk_at(chunks: list[bytes], offset: int) -> int:
    return int(np.searchsorted(np.cumsum([len(c) for c in chunks]), offset, side="right"))


@pytest.mark.parametrize("name", ALL)
def test_missing_chunk_is_reported_once_and_decoding_resumes_at_a_keyframe(
    clips: dict[str, Clip], name: str
) -> None:
    clip = clips[name]
    chunks = split(clip.data, 60, seed=5)
    second_key = clip.key_positions[1]
    lost = _chunk_at(chunks, (clip.frame_ends[0] + second_key) // 2)
    assert sum(len(c) for c in chunks[: lost + 1]) < second_key  # premise: lost inside GOP 0
    stream = VideoStream(clip.mime, FramePolicy(fps_speaking=4.0))
    sent = [(i, c) for i, c in in_order(chunks) if i != lost]
    run = play(stream, sent)
    assert [n.code for n in run.notices] == [400]
    assert str(lost) in run.notices[0].message
    indices = assert_true_frames(run, clip)
    # No frame that needed the lost bytes: frames of GOP 0 only if completed before them.
    for (_, frame), index in zip(run.frames, indices, strict=True):
        assert frame.chunk_index < lost or index >= KEYINT, (frame.chunk_index, index)
    assert indices[-1] >= 2 * KEYINT
    assert stream.stats.gaps == 1 and stream.stats.chunks_missing == 1


def test_lost_webm_header_vp8_finds_its_track_h264_cannot(clips: dict[str, Clip]) -> None:
    clip = clips["vp8-opus"]  # audio track first: the video track must be told apart
    chunks = split(clip.data, 40, seed=18)
    stream = VideoStream(clip.mime, FramePolicy(fps_speaking=2.0))
    run = play(stream, in_order(chunks)[1:])
    assert [n.code for n in run.notices] == [400]  # chunk 0 missing, nothing else
    assert assert_true_frames(run, clip)[0] >= KEYINT
    mkv = clips["mkv-h264"]  # H.264 needs the avcC from the lost header
    chunks = split(mkv.data, 40, seed=18)
    run = play(VideoStream(mkv.mime), in_order(chunks)[1:])
    assert [n.code for n in run.notices] == [400, 415] and run.frames == []
    assert "header" in run.notices[1].message


def test_gap_is_declared_by_time_when_no_more_chunks_come(clips: dict[str, Clip]) -> None:
    clip = clips["vp8"]
    chunks = split(clip.data, 10, seed=6)
    stream = VideoStream(clip.mime, reorder_window=4, reorder_timeout_ms=500)
    stream.push(0, chunks[0], now_ms=0, speaking=True)
    waiting = stream.push(2, chunks[2], now_ms=100, speaking=True)
    assert waiting.notices == []
    assert stream.poll(now_ms=400, speaking=True).notices == []
    late = stream.poll(now_ms=700, speaking=True)
    assert [n.code for n in late.notices] == [400]
    assert stream.stats.gaps == 1
    # The chunk that finally arrives is too late and changes nothing.
    assert stream.push(1, chunks[1], now_ms=800, speaking=True).notices == []
    assert stream.stats.chunks_ignored == 1


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("damage", ["random", "truncated"])
@pytest.mark.parametrize("seed", [7, 14])
def test_corrupt_chunk_costs_one_notice_and_the_next_keyframe_recovers(
    clips: dict[str, Clip], name: str, damage: str, seed: int
) -> None:
    clip = clips[name]
    chunks = split(clip.data, 60, seed=seed)
    # Damage the middle of the unit holding the second GOP (frames 30..59): its cluster,
    # its fragment (where audio may come first), or the GOP itself for raw H.264.
    second, third = clip.unit_of(clip.key_positions[1]), clip.unit_of(clip.key_positions[2])
    bad = _chunk_at(chunks, (second + third) // 2)
    third_key_end = min(end for end in clip.frame_ends if end > clip.key_positions[2])
    clean_again = _chunk_at(chunks, third_key_end - 1)
    assert bad < clean_again
    rng = np.random.default_rng(seed)
    damaged = list(chunks)
    if damage == "random":
        damaged[bad] = rng.integers(0, 256, len(chunks[bad]), dtype=np.uint8).tobytes()
    else:
        damaged[bad] = chunks[bad][: len(chunks[bad]) // 2]
    stream = VideoStream(clip.mime, FramePolicy(fps_speaking=6.0))
    run = play(stream, in_order(damaged))
    assert {n.code for n in run.notices} <= {415}
    assert len(run.notices) <= 2
    # Frames made before the damage, and from the next keyframe on, are true frames.
    # In between, a decoder may turn damaged bytes into a wrong picture without
    # noticing (VP8/VP9 have no checksums): that window is not asserted.
    before = Run([f for f in run.frames if f[1].chunk_index < bad], [])
    after = Run([f for f in run.frames if f[1].chunk_index >= clean_again], [])
    assert_true_frames(before, clip)
    recovered = assert_true_frames(after, clip)
    assert recovered and recovered[0] >= 2 * KEYINT
    if damage == "truncated" and name != "h264":  # sizes stop adding up: always noticed
        assert run.notices


def test_declared_container_that_lies_is_refused_until_the_real_one_starts(
    clips: dict[str, Clip],
) -> None:
    stream = VideoStream("video/webm;codecs=vp8")
    lie = split(clips["h264"].data, 10, seed=9)
    truth = split(clips["vp8"].data, 20, seed=9)
    refused = play(stream, in_order(lie))
    assert [n.code for n in refused.notices] == [400]
    assert "declared video/webm;codecs=vp8 but data is video/h264" in refused.notices[0].message
    assert refused.frames == []
    assert stream.stats.chunks_refused == len(lie)
    run = play(stream, [(len(lie) + i, c) for i, c in enumerate(truth)])
    assert run.notices == []
    assert len(assert_true_frames(run, clips["vp8"])) >= 2


def test_declared_codec_that_lies_is_reported_and_the_real_codec_decoded(
    clips: dict[str, Clip],
) -> None:
    clip = clips["vp8"]
    run = play(VideoStream("video/webm;codecs=vp9"), in_order(split(clip.data, 20, seed=10)))
    assert [n.code for n in run.notices] == [400]
    assert "VP9" in run.notices[0].message and "VP8" in run.notices[0].message
    assert len(assert_true_frames(run, clip)) >= 2


def test_declared_size_that_lies_is_reported_once(clips: dict[str, Clip]) -> None:
    clip = clips["h264"]
    stream = VideoStream(clip.mime)
    run = play(stream, in_order(split(clip.data, 20, seed=11)), width=1280, height=720)
    assert [n.code for n in run.notices] == [400]
    assert run.notices[0].message == "declared 1280x720 but video is 640x480"
    assert len(assert_true_frames(run, clip)) >= 2
    honest = play(
        VideoStream(clip.mime), in_order(split(clip.data, 20, seed=11)), width=640, height=480
    )
    assert honest.notices == []


@pytest.mark.parametrize("name", ["h264", "vp8", "vp9", "mp4"])
def test_frames_over_the_pixel_limit_answer_413(clips: dict[str, Clip], name: str) -> None:
    clip = clips[name]
    limits = ImageLimits(max_pixels=clip.width * clip.height - 1)
    run = play(VideoStream(clip.mime, limits=limits), in_order(split(clip.data, 20, seed=12)))
    assert run.frames == []
    assert run.notices and {n.code for n in run.notices} == {413}


def test_oversized_chunk_answers_413_and_the_stream_recovers(clips: dict[str, Clip]) -> None:
    clip = clips["vp8"]
    chunks = split(clip.data, 30, seed=13)
    big = _chunk_at(chunks, clip.key_positions[0] + 2000)
    limits = ImageLimits(max_bytes=max(len(c) for i, c in enumerate(chunks) if i != big))
    chunks[big] += b"\x00" * (limits.max_bytes + 1 - len(chunks[big]))
    stream = VideoStream(clip.mime, FramePolicy(fps_speaking=4.0), limits)
    run = play(stream, in_order(chunks))
    assert [n.code for n in run.notices] == [413]
    assert assert_true_frames(run, clip)[-1] >= 2 * KEYINT


def test_bytes_without_h264_start_codes_are_dropped_past_a_bound(clips: dict[str, Clip]) -> None:
    clip = clips["h264"]
    stream = VideoStream(clip.mime, limits=ImageLimits(max_bytes=10_000))
    junk = play(stream, [(i, b"\xff" * 9000) for i in range(4)])
    assert [n.code for n in junk.notices] == [415]
    assert "access unit" in junk.notices[0].message
    chunks = split(clip.data, 30, seed=19)
    run = play(stream, [(4 + i, c) for i, c in enumerate(chunks)], start_ms=DURATION_MS)
    assert len(assert_true_frames(run, clip)) >= 2


def test_an_unexpected_fault_costs_a_keyframe_not_the_session(
    clips: dict[str, Clip], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clip = clips["vp8"]
    chunks = split(clip.data, 30, seed=20)
    broken = _chunk_at(chunks, clip.key_positions[1] - 1)
    stream = VideoStream(clip.mime, FramePolicy(fps_speaking=4.0))
    feed = type(stream._demux).feed
    calls = 0

    def flaky_feed(self: object, *args: object) -> object:
        nonlocal calls
        calls += 1
        if calls == broken + 1:
            raise RuntimeError("a bug")
        return feed(self, *args)

    monkeypatch.setattr(type(stream._demux), "feed", flaky_feed)
    run = play(stream, in_order(chunks))
    assert [n.code for n in run.notices] == [415]
    assert "a bug" in caplog.text
    assert assert_true_frames(run, clip)[-1] >= 2 * KEYINT


def test_frames_are_downscaled_to_max_dimension(clips: dict[str, Clip]) -> None:
    clip = clips["h264"]
    stream = VideoStream(clip.mime, limits=ImageLimits(max_dimension=320))
    run = play(stream, in_order(split(clip.data, 20, seed=14)))
    assert run.frames and all((f.width, f.height) == (320, 240) for _, f in run.frames)
    assert None not in [frame_index(f.data) for _, f in run.frames]


def test_rate_follows_speaking_and_poll_releases_a_due_frame(clips: dict[str, Clip]) -> None:
    clip = clips["vp8"]
    chunks = split(clip.data, 10, seed=15)
    quiet = VideoStream(clip.mime, FramePolicy(fps_speaking=1.0, fps_idle=0.0))
    assert play(quiet, in_order(chunks), speaking=False).frames == []
    assert quiet.next_due_ms(speaking=False) is None

    stream = VideoStream(clip.mime, FramePolicy(fps_speaking=1.0, fps_idle=0.2))
    burst = play(stream, in_order(chunks), step_ms=10)  # the whole clip arrives in 100 ms
    assert len(burst.frames) == 1  # at most 1 fps, whatever arrives
    assert stream.next_due_ms(speaking=True) == 1000
    assert stream.poll(now_ms=999, speaking=True).frames == []
    # Due again: the last keyframe (60) is within one interval of the newest frame (89),
    # so it is sent, decoded alone; a second later the newest frame itself.
    due = stream.poll(now_ms=1000, speaking=True).frames
    assert [frame_index(f.data) for f in due] == [60]
    later = stream.poll(now_ms=2000, speaking=True).frames
    assert [frame_index(f.data) for f in later] == [FRAMES - 1]
    assert stream.poll(now_ms=5000, speaking=True).frames == []  # nothing newer to send


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_arbitrary_chunks_never_raise(clips: dict[str, Clip], data: st.DataObject) -> None:
    clip = clips[data.draw(st.sampled_from(ALL))]
    chunks = split(clip.data, 12, seed=data.draw(st.integers(0, 1000)))
    stream = VideoStream(clip.mime, FramePolicy(fps_speaking=8.0))
    for n in range(data.draw(st.integers(1, 20))):
        index = data.draw(st.integers(-2, 14))
        choice = data.draw(st.sampled_from(["good", "random", "cut", "empty"]))
        if choice == "random":
            chunk = data.draw(st.binary(max_size=3000))
        elif choice == "empty":
            chunk = b""
        else:
            chunk = chunks[index % len(chunks)]
            chunk = chunk[: len(chunk) // 2] if choice == "cut" else chunk
        result = stream.push(index, chunk, now_ms=n * 150.0, speaking=True)
        assert all(isinstance(notice, MediaError) for notice in result.notices)
        assert all(frame.data[:2] == b"\xff\xd8" for frame in result.frames)
    stream.poll(now_ms=10_000, speaking=True)
