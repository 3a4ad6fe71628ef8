"""Images, video and compressed audio through a real server: what reaches the provider,
and a documented error for every bad input with the session still answering."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import zlib

import av
import numpy as np

from tests.conftest import TOKEN
from tests.speech import make_conversation
from tests.wsutil import connect, reply_text


def encode_image(codec: str, width: int, height: int, pix_fmt: str) -> bytes:
    x = np.linspace(0, 255, width, dtype=np.uint8)
    pixels = np.broadcast_to(x[None, :, None], (height, width, 3)).copy()  # compresses well
    frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
    ctx = av.CodecContext.create(codec, "w")
    ctx.width, ctx.height, ctx.pix_fmt = width, height, pix_fmt
    return b"".join(bytes(p) for p in ctx.encode(frame.reformat(format=pix_fmt)))


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    row = b"\x00" * (width + 1)
    idat = zlib.compress(row * 16, 9)  # a few rows are enough: it must never be decoded
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def h264_stream(seconds: float = 3.0, fps: int = 15) -> bytes:
    out = io.BytesIO()
    with av.open(out, "w", format="h264") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        stream.options = {"g": str(fps), "preset": "ultrafast", "tune": "zerolatency"}
        for i in range(int(seconds * fps)):
            img = np.full((240, 320, 3), (i * 5) % 255, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def image_msg(data: bytes, mime: str, **extra) -> dict:
    return {
        "type": "input.image",
        "data": base64.b64encode(data).decode(),
        "mime_type": mime,
        **extra,
    }


async def start(c) -> None:
    await c.recv()
    # Frames: let every image through, so the test is about validation, not rate.
    await c.send(
        {"type": "session.update", "config": {"video": {"fps_idle": 30, "fps_speaking": 30}}}
    )
    await c.recv()


async def test_images_attach_to_the_turn_and_bad_ones_get_errors(live_server):
    jpeg = encode_image("mjpeg", 640, 480, "yuvj420p")
    png = encode_image("png", 2000, 1000, "rgb24")
    async with connect(live_server, TOKEN) as c:
        await start(c)
        await c.send(image_msg(jpeg, "image/jpeg", width=640, height=480))
        # Paced like a camera: at 30 fps, two images accepted within 33 ms of each other
        # would count as one interval, where the newest wins.
        await asyncio.sleep(0.1)
        await c.send(image_msg(png, "image/png"))
        events = await c.ask("what do you see")
        text = reply_text(events)
        assert "Saw 2 frame(s): 640x480 image/jpeg, 1024x512 image/jpeg" in text
        cases = [
            (image_msg(jpeg, "image/png", id="m1"), 400, "image/jpeg"),
            (image_msg(jpeg, "image/jpeg", width=320, height=240, id="m2"), 400, "640x480"),
            (image_msg(png_bomb(), "image/png", id="m3"), 413, "pixels"),
            (image_msg(jpeg[: len(jpeg) // 3], "image/jpeg", id="m4"), 415, ""),
            (image_msg(np.random.default_rng(1).bytes(5000), "image/jpeg", id="m5"), 415, "not a"),
            (image_msg(jpeg, "image/gif", id="m6"), 415, "gif"),
        ]
        for message, code, words in cases:
            await c.send(message)
            err = await c.until("error")
            assert err[-1]["code"] == code and err[-1]["id"] == message["id"], err[-1]
            assert words in err[-1]["message"] and not err[-1]["fatal"]
        events = await c.ask("still there?")
        assert "still there?" in reply_text(events)


async def test_video_chunks_become_frames_and_bad_chunks_are_reported(live_server):
    data = h264_stream()
    pieces = [data[i : i + 4000] for i in range(0, len(data), 4000)]
    async with connect(live_server, TOKEN) as c:
        await start(c)

        def video(index: int, payload: bytes) -> dict:
            return {
                "type": "input.video",
                "id": f"v{index}",
                "data": base64.b64encode(payload).decode(),
                "mime_type": "video/h264",
                "chunk_index": index,
            }

        for i, piece in enumerate(pieces):
            await c.send(video(i, piece))
        events = await c.ask("describe the video")
        assert "Saw " in reply_text(events) and "320x240 image/jpeg" in reply_text(events)
        # A duplicate is ignored, a gap is reported once, garbage is reported, the session lives.
        n = len(pieces)
        await c.send(video(n - 1, pieces[-1]))
        for i in range(n + 6, n + 12):
            await c.send(video(i, pieces[(i - n) % len(pieces)]))
        await c.send(video(n + 12, np.random.default_rng(2).bytes(3000)))
        await c.send({"type": "ping", "id": "after"})
        seen = await c.until("pong", timeout=15)
        errors = [e for e in seen if e["type"] == "error"]
        assert any("missing" in e["message"] for e in errors), errors
        assert all(not e["fatal"] for e in errors)
        await c.send(video(0, b"x" * 10) | {"mime_type": "video/avi"})
        err = (await c.until("error"))[-1]
        assert err["code"] == 415
        assert "ok" in reply_text(await c.ask("ok"))


async def test_opus_webm_audio_is_decoded_into_turns(live_server):
    conv = make_conversation(seed=11, n_turns=1, voices=["en"], speeds=[170])
    pcm = np.concatenate([conv.audio, np.zeros(16000, np.int16)])
    out = io.BytesIO()
    with av.open(out, "w", format="webm") as container:
        stream = container.add_stream("libopus", rate=48000)
        stream.layout = "mono"
        resampled = np.repeat(pcm, 3)  # 16 kHz -> 48 kHz (sample-and-hold is fine for speech)
        for start_ in range(0, len(resampled), 960):
            block = resampled[start_ : start_ + 960]
            if len(block) < 960:
                block = np.pad(block, (0, 960 - len(block)))
            frame = av.AudioFrame.from_ndarray(block.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = 48000
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    webm = out.getvalue()
    async with connect(live_server, TOKEN) as c:
        await c.recv()
        await c.send(
            {
                "type": "session.update",
                "config": {"input_audio": {"format": "opus", "sample_rate": 48000}},
            }
        )
        await c.recv()
        for i in range(0, len(webm), 1000):
            await c.send(webm[i : i + 1000])
        events = await c.until("response.done", timeout=20)
    ended = next(e for e in events if e["type"] == "turn.ended")
    onset = conv.turns[0][0]
    assert abs(ended["audio_start_ms"] - onset) < 150
    assert "Heard" in reply_text(events)


async def test_mulaw_telephony_audio(live_server):
    conv = make_conversation(seed=12, n_turns=1, voices=["en"], speeds=[170])
    pcm8k = np.ascontiguousarray(np.concatenate([conv.audio, np.zeros(16000, np.int16)])[::2])
    ctx = av.CodecContext.create("pcm_mulaw", "w")
    ctx.sample_rate, ctx.format, ctx.layout = 8000, "s16", "mono"
    frame = av.AudioFrame.from_ndarray(pcm8k.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = 8000
    ulaw = b"".join(bytes(p) for p in ctx.encode(frame)) + b"".join(
        bytes(p) for p in ctx.encode(None)
    )
    async with connect(live_server, TOKEN) as c:
        await c.recv()
        await c.send(
            {
                "type": "session.update",
                "config": {"input_audio": {"format": "mulaw", "sample_rate": 8000}},
            }
        )
        await c.recv()
        for i in range(0, len(ulaw), 160):
            await c.send(ulaw[i : i + 160])
        events = await c.until("response.done", timeout=20)
    assert any(e["type"] == "turn.ended" for e in events)
