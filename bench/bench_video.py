"""Video and image CPU cost: full decode vs the sampling policy, and the image path.

Run: ``python -m bench.bench_video`` (prints a Markdown section; ``--write``
also stores it in BENCHMARKS.md.video). Everything is generated here with
PyAV; CPU is process time with single-threaded codecs, so figures are
per core.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from media.image import ImageLimits, encode_jpeg, prepare_image
from media.video import FramePolicy, VideoStream

WIDTH, HEIGHT, FPS = 640, 480, 30
SECONDS = 20
BITRATE = 1_000_000
KEYINT_S = 2
CHUNK_MS = 100  # MediaRecorder-style timeslice
ZERO_LATENCY = {"preset": "veryfast", "tune": "zerolatency"}
MODES = (("policy, idle (0.2 fps)", False), ("policy, speaking (1 fps)", True))
OUTPUT = Path(__file__).resolve().parent.parent / "BENCHMARKS.md.video"


def webcam_frames(count: int, width: int, height: int) -> Iterator[av.VideoFrame]:
    """Textured, moving, slightly noisy planes: enough detail to spend 1 Mbit/s."""
    rng = np.random.default_rng(0)
    texture = rng.integers(40, 215, (height + 64, width + 64), dtype=np.uint8)
    texture = (texture.astype(np.uint16) + np.roll(texture, 1, 0) + np.roll(texture, 1, 1)) // 3
    y, x = np.mgrid[0:height, 0:width]
    background = (60 + 80 * x / width + 40 * y / height).astype(np.int16)
    noise = rng.integers(-3, 4, (8, height, width), dtype=np.int16)
    chroma = np.full((height // 2, width), 128, np.uint8)
    for index in range(count):
        dx, dy = int(32 + 24 * np.sin(index / 20)), int(32 + 16 * np.cos(index / 27))
        luma = background.copy()
        window = texture[dy : dy + height // 2, dx : dx + width // 2].astype(np.int16)
        luma[height // 4 : height // 4 + height // 2, width // 4 : width // 4 + width // 2] = window
        luma += noise[index % 8]
        plane = np.clip(luma, 16, 235).astype(np.uint8)
        yield av.VideoFrame.from_ndarray(np.concatenate([plane, chroma]), format="yuv420p")


def make_h264(options: dict[str, str], keyint_s: float = KEYINT_S) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="h264") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.bit_rate = BITRATE
        gop = str(round(keyint_s * FPS))
        stream.options = {"g": gop, "keyint_min": gop, "sc_threshold": "0", **options}
        for frame in webcam_frames(SECONDS * FPS, WIDTH, HEIGHT):
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buf.getvalue()


def cpu(run: Callable[[], object], repeat: int = 3) -> float:
    """Best of ``repeat`` process-time measurements, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        run()
        best = min(best, time.process_time() - start)
    return best


def full_decode(data: bytes) -> int:
    parser = av.CodecContext.create("h264", "r")
    decoder = av.CodecContext.create("h264", "r")
    decoder.thread_count = 1
    frames = 0
    for packet in parser.parse(data) + parser.parse(None):
        frames += len(decoder.decode(packet))
    return frames + len(decoder.decode(None))


@dataclass
class PolicyRun:
    cpu_s: float
    decoded: int
    emitted: int
    samples: int


def timed_chunks(data: bytes) -> list[bytes]:
    """CHUNK_MS of video per chunk, each cut at a random point inside a frame (split NALs)."""
    with av.open(io.BytesIO(data), format="h264") as container:
        frames = [(p.pos, p.size) for p in container.demux(container.streams.video[0]) if p.size]
    per_chunk = FPS * CHUNK_MS // 1000
    rng = np.random.default_rng(2)
    cuts = [pos + int(rng.integers(0, size)) for pos, size in frames[per_chunk::per_chunk]]
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def policy_decode(data: bytes, speaking: bool) -> PolicyRun:
    chunks = timed_chunks(data)
    result: PolicyRun | None = None

    def run() -> None:
        nonlocal result
        stream = VideoStream("video/h264", FramePolicy(fps_speaking=1.0, fps_idle=0.2))
        for index, chunk in enumerate(chunks):
            now = float(index * CHUNK_MS)
            stream.push(index, chunk, now_ms=now, speaking=speaking, timestamp_ms=now)
        stats = stream.stats
        result = PolicyRun(0.0, stats.frames_decoded, stats.frames_emitted, stats.samples)

    spent = cpu(run)
    assert result is not None
    result.cpu_s = spent
    return result


def photo(width: int, height: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([128 + 100 * np.sin(x / 97), 128 + 100 * np.cos(y / 71), (x + y) % 256], -1)
    return np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)  # sensor noise


def png_bytes(pixels: np.ndarray) -> bytes:
    frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
    encoder = av.CodecContext.create("png", "w")
    encoder.width, encoder.height, encoder.pix_fmt = frame.width, frame.height, "rgb24"
    encoder.time_base = Fraction(1, 1)
    return b"".join(bytes(p) for p in encoder.encode(frame) + encoder.encode(None))


def image_cost(data: bytes, mime: str, size: tuple[int, int], repeat: int = 20) -> float:
    limits = ImageLimits()

    def run() -> None:
        for _ in range(repeat):
            prepare_image(data, mime, limits, width=size[0], height=size[1])

    return cpu(run) / repeat


ENCODERS = (
    ("veryfast zerolatency (no B-frames, like browser encoders)", ZERO_LATENCY, KEYINT_S),
    ("veryfast (B-frames)", {"preset": "veryfast"}, KEYINT_S),
    ("veryfast zerolatency, keyframe every 1 s", ZERO_LATENCY, 1),
)
MODES = (("policy, idle (0.2 fps)", False), ("policy, speaking (1 fps)", True))


def video_rows() -> list[str]:
    rows = []
    for label, options, keyint_s in ENCODERS:
        data = make_h264(options, keyint_s)
        kbps = len(data) * 8 / SECONDS / 1000
        full = cpu(lambda data=data: full_decode(data)) / SECONDS
        frames = SECONDS * FPS
        rows.append(
            f"| {label}, {kbps:.0f} kbit/s | full decode | {full * 1000:.1f} | 1 "
            f"| {1 / full:.0f} | {frames} / {frames} | - |"
        )
        for mode, speaking in MODES:
            run = policy_decode(data, speaking)
            per_s = run.cpu_s / SECONDS
            rows.append(
                f"| | {mode} | {per_s * 1000:.2f} | 1/{full / per_s:.1f} | {1 / per_s:.0f} "
                f"| {run.decoded} / {run.samples} | {run.emitted} |"
            )
    return rows


def image_rows() -> list[str]:
    rows = []
    pixels = photo(1280, 720)
    for label, data, mime in (
        ("1280x720 JPEG (q 90)", encode_jpeg(pixels, 90), "image/jpeg"),
        ("1280x720 PNG", png_bytes(pixels), "image/png"),
    ):
        cost = image_cost(data, mime, (1280, 720))
        rows.append(f"| {label} | {len(data)} | {cost * 1000:.1f} |")
    small = encode_jpeg(photo(1024, 576), 90)
    cost = image_cost(small, "image/jpeg", (1024, 576))
    rows.append(
        f"| 1024x576 JPEG (passthrough: validated, sent as is) | {len(small)} | {cost * 1000:.1f} |"
    )
    return rows


def report() -> str:
    lines = [
        "## Video and image media path",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, PyAV {av.__version__}. CPU = process time with "
        "single-threaded codecs, so figures are per core.",
        "",
        "Reproduce: `python -m bench.bench_video --write`",
        "",
        f"### Video: {WIDTH}x{HEIGHT} {FPS} fps H.264 (libx264, {BITRATE // 1000} kbit/s "
        f"target), {SECONDS} s in {CHUNK_MS} ms chunks cut inside frames",
        "",
        "Policy `FramePolicy(fps_speaking=1.0, fps_idle=0.2)`; its CPU includes parsing, "
        "decoding and JPEG-encoding the frames sent. Full decode = parse and decode every "
        "frame, nothing else. Keyframes every 2 s unless said.",
        "",
        "| encoder | mode | CPU ms per video s | vs full decode | streams per core "
        "| frames decoded / received | frames sent |",
        "|---|---|---:|---:|---:|---:|---:|",
        *video_rows(),
        "",
        "Idle (one frame per 5 s): keyframes are at most one sampling interval older than the "
        "newest frame, so only keyframes are decoded, and only those that are sent. Speaking "
        "(1 s) with keyframes every 2 s: every other sample needs its GOP decoded from the "
        "keyframe up to the newest frame (only GOP tails after the last sample are skipped), "
        "so the saving depends on where samples fall in the GOP. With keyframes every 1 s "
        "(what clients are asked to send), speaking is keyframe-only too.",
        "",
        "### Image path: decode, check, resize to 1024 px, JPEG (quality 85)",
        "",
        "| input | bytes | CPU ms per image |",
        "|---|---:|---:|",
        *image_rows(),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"also write {OUTPUT.name}")
    args = parser.parse_args()
    text = report()
    print(text)
    if args.write:
        OUTPUT.write_text(text)


if __name__ == "__main__":
    main()
