"""`duplex client` and `duplex serve` as a new user runs them: real processes, a real server.

Before: the client sent `--text` turns before `--video` (no frames in the answer), a
22,050 Hz WAV was refused, and mistakes printed 29-41-line tracebacks.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import wave
from pathlib import Path

import av
import numpy as np
import pytest

from tests.conftest import TOKEN

ROOT = Path(__file__).resolve().parent.parent


def duplex(*args: str, env: dict[str, str] | None = None, timeout: float = 60):
    """Run `duplex ...` (the module behind the console script) from this tree."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DUPLEX_")}
    full_env |= {"PYTHONPATH": str(ROOT)} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=ROOT,
    )


def client(server, *args: str, env: dict[str, str] | None = None):
    return duplex(
        "client", "--url", server.ws_url, "--token", TOKEN, "--idle", "0.5", *args, env=env
    )


def video_file(folder: Path, name: str, fmt: str, codec: str, options=None) -> Path:
    path = folder / name
    with av.open(str(path), "w", format=fmt, options=options or {}) as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height = 160, 120
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        for i in range(20):
            img = np.full((120, 160, 3), i * 10, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


VIDEOS = {
    "camera.h264": ("h264", "libx264", None),
    "camera.webm": ("webm", "libvpx", None),
    "phone.mp4": ("mp4", "libx264", None),  # whole file, moov at the end
    "phone.mov": ("mov", "libx264", None),
    "edited.mp4": ("mp4", "libx264", {"movflags": "faststart"}),
    "mjpeg.mov": ("mov", "mjpeg", None),
    "live.mp4": ("mp4", "libx264", {"movflags": "frag_keyframe+empty_moov"}),
}


@pytest.fixture(scope="module")
def media_dir():
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder)


@pytest.mark.parametrize("name", list(VIDEOS))
def test_documented_video_example_shows_the_frames(live_server, media_dir, name):
    path = video_file(media_dir, name, *VIDEOS[name])
    result = client(live_server, "--video", str(path), "--text", "what do you see?")
    assert result.returncode == 0, result.stderr
    assert "You said: “what" in result.stdout
    assert "Saw " in result.stdout and "160x120 image/jpeg" in result.stdout, result.stdout
    assert '"error"' not in result.stdout


def test_unreadable_mp4_is_a_415_not_silence(live_server, media_dir):
    path = media_dir / "notes.mp4"
    path.write_bytes(b"these are my notes, not a video" * 10)
    result = client(live_server, "--video", str(path), "--text", "what do you see?")
    assert '"code": 415' in result.stdout and "MP4" in result.stdout


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")
def test_espeak_wav_at_22050_hz_is_heard(live_server, media_dir):
    path = media_dir / "question.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "what is on the table"], check=True)
    with wave.open(str(path)) as wav:
        assert wav.getframerate() == 22050
    result = client(live_server, "--wav", str(path), "--fast")
    assert result.returncode == 0, result.stderr
    assert "Heard 1." in result.stdout or "Heard 2." in result.stdout, result.stdout


@pytest.mark.parametrize("rate,channels,width", [(11025, 2, 1), (44100, 2, 3), (96000, 1, 4)])
def test_any_pcm_wav_streams(live_server, media_dir, rate, channels, width):
    """8-bit, 24-bit and 32-bit PCM, mono or stereo, odd rates: all heard as speech-length."""
    t = np.arange(int(rate * 1.5)) / rate
    tone = 0.5 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) / 2
    scaled = (tone * (2 ** (8 * width - 1) - 1)).astype(np.int64)
    if width == 1:
        raw = (scaled + 128).astype(np.uint8).tobytes()
        samples = np.frombuffer(raw, np.uint8)
    else:
        little = scaled.astype("<i8").view(np.uint8).reshape(-1, 8)[:, :width]
        samples = little.reshape(-1)
    frames = np.repeat(samples.reshape(len(t), -1), channels, axis=0).reshape(-1)
    path = media_dir / f"tone-{rate}-{channels}-{width}.wav"
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(width)
        wav.setframerate(rate)
        wav.writeframes(frames.tobytes())
    result = client(live_server, "--wav", str(path), "--fast")
    assert result.returncode == 0, result.stderr
    assert "Heard 1." in result.stdout, result.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _one_line(result, *words: str, code: int | None = None) -> None:
    assert result.returncode != 0 if code is None else result.returncode == code
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_errors_are_one_line_with_what_to_do(live_server, media_dir):
    down = f"ws://127.0.0.1:{_free_port()}/v1/duplex"
    result = duplex("client", "--url", down, "--token", TOKEN, "--text", "hi")
    _one_line(result, "cannot connect", "connection refused", "duplex serve", code=1)

    _one_line(client(live_server, "--wav", str(media_dir / "nope.wav")), "no such file", code=2)
    _one_line(client(live_server, "--video", str(media_dir / "nope.mp4")), "no such file", code=2)
    text = media_dir / "readme.wav"
    text.write_text("not audio")
    _one_line(client(live_server, "--wav", str(text)), "not a PCM WAV", "sox", code=2)
    _one_line(client(live_server, "--video", str(text)), "unknown video type", code=2)

    wrong_path = live_server.ws_url.replace("/v1/duplex", "/v1/dupex")
    result = duplex("client", "--url", wrong_path, "--token", TOKEN, "--text", "hi")
    _one_line(result, "refused the WebSocket handshake", "HTTP 403", "/v1/duplex", code=1)
    result = duplex("client", "--url", live_server.base, "--token", TOKEN, "--text", "hi")
    _one_line(result, "not a ws:// or wss:// URL", code=2)
    result = duplex("client", "--url", live_server.ws_url, "--token", "wrong", "--text", "hi")
    _one_line(result, "error 401", "DUPLEX_TOKEN", code=1)


def test_token_from_the_environment_and_version(live_server):
    result = duplex(
        "client", "--url", live_server.ws_url, "--text", "hi", env={"DUPLEX_TOKEN": TOKEN}
    )
    assert result.returncode == 0, result.stderr
    assert "You said: “hi”" in result.stdout
    for args in (["--version"], ["client", "--version"]):
        version = duplex(*args)
        assert version.returncode == 0 and version.stdout.startswith("duplex "), version


def test_every_client_flag_has_help_and_its_default():
    help_text = duplex("client", "--help", env={"COLUMNS": "400"}).stdout
    entries = {}  # one line per option at this width: "  --flag METAVAR   help"
    flag = ""
    for line in help_text.splitlines():
        if line.startswith("  --"):
            flag, _, rest = line.strip().partition(" ")
            entries[flag] = rest
        elif line.startswith("    ") and flag:  # the help, under a long flag
            entries[flag] += " " + line.strip()
    for flag in (
        "--url",
        "--token",
        "--session",
        "--provider",
        "--mode",
        "--instructions",
        "--text",
        "--wav",
        "--video",
        "--mic",
        "--fast",
        "--save-audio",
        "--idle",
        "--timeout",
    ):
        assert len(entries.get(flag, "").split()) >= 4, f"{flag} has no help: {entries}"
    text = " ".join(help_text.split())
    assert "$DUPLEX_TOKEN" in text and "(default: 2.0)" in text and "(default: 120.0)" in text


def test_serve_help_names_every_store_scheme():
    text = " ".join(duplex("serve", "--help").stdout.split())
    for scheme in ("memory://", "sqlite:///", "redis://", "rediss://", "unix://"):
        assert scheme in text


@pytest.mark.parametrize(
    "env,words",
    [
        ({"DUPLEX_PORT": "abc"}, ["DUPLEX_PORT", "--port", "integer"]),
        ({"DUPLEX_STORE_URL": "postgres://db/x"}, ["unsupported store URL", "memory://"]),
        ({"DUPLEX_TOKENS_FILE": "/nonexistent/tokens"}, ["/nonexistent/tokens"]),
    ],
)
def test_serve_refuses_bad_settings_in_one_line(env, words):
    port = [] if "DUPLEX_PORT" in env else ["--port", str(_free_port())]  # a flag wins
    result = duplex("serve", *port, env=env, timeout=60)
    _one_line(result, "duplex serve:", *words, code=2)


def test_serve_runs_without_the_optional_redis_package():
    """The README's first command installs `pip install -e .` only: no redis package
    (an extra). `duplex serve` on its defaults must start and answer without it (it
    failed with ModuleNotFoundError: the lease and replica modules imported redis)."""
    port = _free_port()
    code = (
        "import runpy, sys\n"
        "sys.modules['redis'] = None  # as if not installed: `import redis` fails\n"
        f"sys.argv = ['duplex', 'serve', '--port', '{port}']\n"
        "runpy.run_module('server.cli', run_name='__main__')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUPLEX_")}
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env | {"PYTHONPATH": str(ROOT)},
        cwd=ROOT,
    )
    try:
        token, seen = None, []
        assert proc.stdout is not None
        for line in proc.stdout:  # ends when the process does (a failed start)
            seen.append(line)
            if "Application startup complete" in line:
                break
            if line.startswith("Dev token"):
                token = line.split()[-1]
        assert token is not None, "".join(seen)
        result = duplex(
            "client", "--url", f"ws://127.0.0.1:{port}/v1/duplex", "--token", token,
            "--idle", "0.5", "--text", "hello there",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "You said" in result.stdout and '"finish_reason": "stop"' in result.stdout
    finally:
        proc.terminate()
        proc.wait(timeout=10)
