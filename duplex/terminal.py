"""`duplex client`: stream text, a WAV, a video file or the microphone; print events live."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
import wave
from pathlib import Path
from typing import Any

from duplex.sdk import Client, DuplexError, Reconnect, Session

CHUNK_MS = 20
VIDEO_MIME = {
    ".h264": "video/h264",
    ".264": "video/h264",
    ".webm": "video/webm",
    ".mp4": "video/mp4",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="ws://127.0.0.1:8000/v1/duplex")
    parser.add_argument("--token", default=None)
    parser.add_argument("--session", help="continue this session id")
    parser.add_argument("--provider")
    parser.add_argument("--mode", choices=["vad", "asm"])
    parser.add_argument("--instructions")
    parser.add_argument("--text", action="append", help="a text turn; repeatable")
    parser.add_argument("--wav", type=Path, help="stream a WAV file (PCM16) as the microphone")
    parser.add_argument("--video", type=Path, help="stream an .h264, .webm or .mp4 file")
    parser.add_argument("--mic", action="store_true", help="stream the default microphone")
    parser.add_argument("--fast", action="store_true", help="send files as fast as possible")
    parser.add_argument("--save-audio", type=Path, help="write the reply audio to this WAV")
    parser.add_argument("--idle", type=float, default=2.0, help="seconds of quiet before exit")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument(
        "--no-reconnect",
        action="store_true",
        help="exit when the connection drops instead of resuming the session",
    )


class Printer:
    """Prints each event with the time since start; collects reply audio."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.audio = bytearray()
        self.audio_rate = 24000
        self.last_event = time.monotonic()
        self.open_responses: set[str] = set()

    def __call__(self, event: dict[str, Any]) -> None:
        self.last_event = time.monotonic()
        line = {k: v for k, v in event.items() if k != "media"}
        media = event.get("media")
        if media:
            data = base64.b64decode(media["data"])
            if media.get("mime_type", "").startswith("audio/"):
                self.audio += data
                self.audio_rate = media.get("sample_rate") or self.audio_rate
            line["media"] = f"<{media.get('mime_type')} {len(data)} bytes>"
        if event["type"] == "response.started":
            self.open_responses.add(event["response_id"])
        elif event["type"] == "response.done":
            self.open_responses.discard(event["response_id"])
        elapsed = time.monotonic() - self.start
        print(f"{elapsed:8.3f}s {json.dumps(line, ensure_ascii=False)}", flush=True)

    def save(self, path: Path) -> None:
        with wave.open(str(path), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(self.audio_rate)
            out.writeframes(bytes(self.audio))


async def stream_wav(session: Session, path: Path, *, fast: bool) -> None:
    with wave.open(str(path), "rb") as wav:
        if wav.getsampwidth() != 2:
            raise SystemExit(f"{path}: only 16-bit PCM WAV files are supported")
        rate, channels = wav.getframerate(), wav.getnchannels()
        await session.update(
            input_audio={"format": "pcm16", "sample_rate": rate, "channels": channels}
        )
        frames_per_chunk = rate * CHUNK_MS // 1000
        started = time.monotonic()
        sent = 0
        while data := wav.readframes(frames_per_chunk):
            await session.send_audio(data)
            sent += 1
            if not fast:  # real time: never ahead of the wall clock
                await asyncio.sleep(max(0.0, started + sent * CHUNK_MS / 1000 - time.monotonic()))
    # Half a second of silence lets a turn that ends with the file end by itself.
    silence = b"\x00" * (rate * channels * 2 * CHUNK_MS // 1000)
    for _ in range(1000 // CHUNK_MS):
        await session.send_audio(silence)
        if not fast:
            await asyncio.sleep(CHUNK_MS / 1000)


async def stream_video(session: Session, path: Path, *, fast: bool) -> None:
    mime = VIDEO_MIME.get(path.suffix.lower())
    if mime is None:
        raise SystemExit(f"{path}: use a .h264, .webm or .mp4 file")
    data = await asyncio.to_thread(path.read_bytes)
    piece = 32 * 1024
    for index, start in enumerate(range(0, len(data), piece)):
        await session.send_video(data[start : start + piece], mime, index)
        if not fast:
            await asyncio.sleep(0.1)


async def stream_mic(session: Session) -> None:
    try:
        import sounddevice  # type: ignore[import-not-found]
    except ImportError:
        raise SystemExit("--mic needs the sounddevice package and a sound device") from None
    rate = 16000
    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=100)
    loop = asyncio.get_running_loop()

    def callback(indata: Any, frames: int, when: Any, status: Any) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, bytes(indata))

    await session.update(input_audio={"format": "pcm16", "sample_rate": rate, "channels": 1})
    with sounddevice.RawInputStream(
        samplerate=rate,
        channels=1,
        dtype="int16",
        blocksize=rate * CHUNK_MS // 1000,
        callback=callback,
    ):
        print("listening; Ctrl-C to stop", file=sys.stderr)
        while True:
            await session.send_audio(await queue.get())


async def run(args: argparse.Namespace) -> int:
    printer = Printer()
    config: dict[str, Any] = {
        k: v
        for k, v in {
            "provider": args.provider,
            "mode": args.mode,
            "instructions": args.instructions,
        }.items()
        if v
    }
    try:
        async with asyncio.timeout(args.timeout), Client(args.url, args.token) as client:
            session = await client.connect(
                session_id=args.session,
                on_event=printer,
                reconnect=None if args.no_reconnect else Reconnect(),
                **config,
            )
            for text in args.text or []:
                await session.ask(text, stream=False)
            if args.video:
                await stream_video(session, args.video, fast=args.fast)
            if args.wav:
                await stream_wav(session, args.wav, fast=args.fast)
            if args.mic:
                await stream_mic(session)
            # Wait for answers still on their way: no open response and a quiet moment.
            while printer.open_responses or time.monotonic() - printer.last_event < args.idle:  # noqa: ASYNC110 - a quiet period, polled
                await asyncio.sleep(0.05)
            await session.close()
    except DuplexError as exc:
        print(f"error {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"gave up after {args.timeout:g} s", file=sys.stderr)
        return 1
    finally:
        if args.save_audio and printer.audio:
            printer.save(args.save_audio)
            print(f"saved {len(printer.audio) // 2} samples to {args.save_audio}", file=sys.stderr)
    return 0
