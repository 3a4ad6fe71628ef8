"""`duplex client`: stream text, a WAV, a video file or the microphone; print events live."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import time
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import websockets

from duplex.sdk import Client, DuplexError, Reconnect, Session

CHUNK_MS = 20
VIDEO_MIME = {
    ".h264": "video/h264",
    ".264": "video/h264",
    ".webm": "video/webm",
    ".mkv": "video/webm",
    ".mp4": "video/mp4",
    ".m4v": "video/mp4",
    ".mov": "video/mp4",
}
#: Input rates the server takes (Hz).
MIN_RATE, MAX_RATE = 8000, 96000


#: Where the token and URL come from when the flags are not given.
TOKEN_ENV = "DUPLEX_TOKEN"
URL_ENV = "DUPLEX_URL"
DEFAULT_URL = "ws://127.0.0.1:8000/v1/duplex"


class UsageError(Exception):
    """A problem with what the user asked for (a file, a flag): one line, exit code 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get(URL_ENV, DEFAULT_URL),
        help=f"the server's WebSocket URL (default: ${URL_ENV} or {DEFAULT_URL})",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"API token (default: ${TOKEN_ENV}); `duplex serve` prints a dev token",
    )
    parser.add_argument("--session", help="continue this session id (default: a new session)")
    parser.add_argument("--provider", help="answer with this provider (default: echo)")
    parser.add_argument(
        "--mode",
        choices=["vad", "asm"],
        help="vad: the server finds turns; asm: a realtime provider does (default: vad)",
    )
    parser.add_argument("--instructions", help="system instructions (default: none)")
    parser.add_argument(
        "--text",
        action="append",
        help="a text turn; repeatable; sent after --video and --wav, so the first one "
        "carries the video's frames",
    )
    parser.add_argument(
        "--wav",
        type=Path,
        help="stream a PCM WAV file (8-32 bit, mono or stereo, 8-96 kHz) as the microphone",
    )
    parser.add_argument(
        "--video",
        type=Path,
        help="stream a video file: .h264 (Annex B), .webm/.mkv, .mp4/.mov/.m4v (any MP4)",
    )
    parser.add_argument(
        "--mic", action="store_true", help="stream the default microphone (needs sounddevice)"
    )
    parser.add_argument(
        "--fast", action="store_true", help="send files as fast as possible (default: real time)"
    )
    parser.add_argument("--save-audio", type=Path, help="write the reply audio to this WAV file")
    parser.add_argument(
        "--idle",
        type=float,
        default=2.0,
        help="exit once no answer is open and nothing arrived for this many seconds "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="give up after this many seconds in all (default: %(default)s)",
    )
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


@dataclass
class WavSource:
    """A PCM WAV file checked before connecting; read as 16-bit samples."""

    path: Path
    rate: int
    channels: int
    width: int  # bytes per sample in the file

    @classmethod
    def open(cls, path: Path) -> WavSource:
        try:
            with wave.open(str(path), "rb") as wav:
                rate, channels, width = wav.getframerate(), wav.getnchannels(), wav.getsampwidth()
        except FileNotFoundError:
            raise UsageError(f"{path}: no such file") from None
        except (wave.Error, EOFError) as exc:
            raise UsageError(
                f"{path}: not a PCM WAV file ({exc}); convert it, e.g. "
                f"`sox {path} -b 16 out.wav` or `ffmpeg -i {path} out.wav`"
            ) from None
        except OSError as exc:
            raise UsageError(f"{path}: {exc.strerror or exc}") from None
        if not MIN_RATE <= rate <= MAX_RATE:
            raise UsageError(f"{path}: {rate} Hz; use a WAV from {MIN_RATE} to {MAX_RATE} Hz")
        if channels not in (1, 2):
            raise UsageError(f"{path}: {channels} channels; use a mono or stereo WAV")
        return cls(path, rate, channels, width)

    def chunks(self, ms: int) -> Iterator[bytes]:
        """PCM s16le pieces of ``ms`` milliseconds (8, 24 and 32-bit samples converted)."""
        with wave.open(str(self.path), "rb") as wav:
            while data := wav.readframes(self.rate * ms // 1000):
                yield _to_pcm16(data, self.width)


def _to_pcm16(data: bytes, width: int) -> bytes:
    """16-bit little-endian samples from 8-bit (unsigned) or 16/24/32-bit (signed) PCM."""
    if width == 2:
        return data
    out = bytearray(len(data) // width * 2)
    if width == 1:
        out[1::2] = data.translate(_U8_TO_HIGH_BYTE)
    else:  # keep the two most significant bytes of each little-endian sample
        out[0::2] = data[width - 2 :: width]
        out[1::2] = data[width - 1 :: width]
    return bytes(out)


_U8_TO_HIGH_BYTE = bytes((b - 128) & 0xFF for b in range(256))


async def stream_wav(session: Session, source: WavSource, *, fast: bool) -> None:
    rate, channels = source.rate, source.channels
    await session.update(input_audio={"format": "pcm16", "sample_rate": rate, "channels": channels})
    started = time.monotonic()
    sent = 0
    for data in source.chunks(CHUNK_MS):
        await session.send_audio(data)
        sent += 1
        if not fast:  # real time: never ahead of the wall clock
            await asyncio.sleep(max(0.0, started + sent * CHUNK_MS / 1000 - time.monotonic()))
    # Half a second of silence lets a turn that ends with the file end by itself.
    silence = bytes(rate * CHUNK_MS // 1000 * channels * 2)  # whole samples at any rate
    for _ in range(1000 // CHUNK_MS):
        await session.send_audio(silence)
        if not fast:
            await asyncio.sleep(CHUNK_MS / 1000)


def video_mime(path: Path) -> str:
    """The ``mime_type`` to send ``path`` as; checks the file is there."""
    mime = VIDEO_MIME.get(path.suffix.lower())
    if mime is None:
        known = ", ".join(sorted(VIDEO_MIME))
        raise UsageError(f"{path}: unknown video type; use a file ending in {known}")
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    return mime


async def stream_video(session: Session, path: Path, *, fast: bool) -> None:
    """The file in 32 KiB chunks, the last one marked ``final`` (a whole MP4 is decoded then)."""
    mime = video_mime(path)
    data = await asyncio.to_thread(path.read_bytes)
    piece = 32 * 1024
    starts = range(0, len(data), piece)
    for index, start in enumerate(starts):
        final = index == len(starts) - 1
        await session.send_video(data[start : start + piece], mime, index, final=final)
        if not fast and not final:
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
    """Connect, send what was asked, print the events; 0, or 1 with one line on stderr."""
    try:
        wav = WavSource.open(args.wav) if args.wav else None
        if args.video:
            video_mime(args.video)
        if args.save_audio and not args.save_audio.parent.is_dir():
            raise UsageError(f"{args.save_audio}: its folder does not exist")
    except UsageError as exc:
        print(f"duplex client: {exc}", file=sys.stderr)
        return 2
    printer = Printer()
    try:
        async with asyncio.timeout(args.timeout), Client(args.url, args.token) as client:
            await _converse(client, args, printer, wav)
    except DuplexError as exc:
        print(f"duplex client: error {exc.code}: {exc.message}{_hint(exc)}", file=sys.stderr)
        return 1
    except TimeoutError:
        print(f"duplex client: gave up after {args.timeout:g} s (--timeout)", file=sys.stderr)
        return 1
    except websockets.InvalidURI:
        print(f"duplex client: {args.url!r} is not a ws:// or wss:// URL", file=sys.stderr)
        return 2
    except websockets.InvalidStatus as exc:
        status = exc.response.status_code
        print(
            f"duplex client: {args.url} refused the WebSocket handshake (HTTP {status}); "
            "check --url: Duplex listens at ws://HOST:PORT/v1/duplex",
            file=sys.stderr,
        )
        return 1
    except (OSError, websockets.InvalidHandshake) as exc:
        reason = (
            "connection refused"
            if isinstance(exc, ConnectionRefusedError)
            else getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        )
        print(
            f"duplex client: cannot connect to {args.url} ({reason}); "
            "is the server running (`duplex serve`), and is --url right?",
            file=sys.stderr,
        )
        return 1
    finally:
        if args.save_audio and printer.audio:
            printer.save(args.save_audio)
            print(f"saved {len(printer.audio) // 2} samples to {args.save_audio}", file=sys.stderr)
    return 0


def _hint(exc: DuplexError) -> str:
    if exc.code == 401:
        return f" (give the token `duplex serve` printed: --token or ${TOKEN_ENV})"
    return ""


async def _converse(
    client: Client, args: argparse.Namespace, printer: Printer, wav: WavSource | None
) -> None:
    """Video and WAV stream first (together), then each text turn, then the microphone:
    so the first text turn carries the video's frames."""
    config: dict[str, Any] = {
        k: v
        for k, v in {
            "provider": args.provider,
            "mode": args.mode,
            "instructions": args.instructions,
        }.items()
        if v
    }
    session = await client.connect(
        session_id=args.session,
        on_event=printer,
        reconnect=None if args.no_reconnect else Reconnect(),
        **config,
    )
    try:
        streams = []
        if args.video:
            streams.append(stream_video(session, args.video, fast=args.fast))
        if wav is not None:
            streams.append(stream_wav(session, wav, fast=args.fast))
        await asyncio.gather(*streams)
        for text in args.text or []:
            await session.ask(text, stream=False)
        if args.mic:
            await stream_mic(session)
        # Wait for answers still on their way: no open response and a quiet moment.
        while printer.open_responses or time.monotonic() - printer.last_event < args.idle:  # noqa: ASYNC110 - a quiet period, polled
            await asyncio.sleep(0.05)
    finally:
        # Close 1000, on Ctrl-C too: the server ends the session at once instead of
        # keeping it for a resume that will not come (bounded by the close handshake).
        await session.close()
