"""ASM relay overhead: client -> Duplex -> fake OpenAI Realtime -> Duplex -> client.

Run: ``python -m bench.bench_relay`` (``--quick`` for fewer trials). Prints markdown.

Three processes on loopback: the fake OpenAI Realtime service (tests/fakes, in a
subprocess: ``--serve-fake``), the Duplex server (``python -m server.cli serve``, ASM mode,
``DUPLEX_OPENAI_REALTIME_URL`` pointing at the fake), and this client. The baseline is the
same client talking to the fake directly with the events Duplex would send, so the
difference is what the relay adds; both are measured in interleaved blocks of one run.

Two measurements, chosen because they are what a user waits for:

* **text turn -> first audio delta.** Relay: ``input.text`` (final) -> first ``chunk``
  with ``media``. Direct: ``conversation.item.create`` + ``response.create`` -> first
  ``response.output_audio.delta``. One client message in, two upstream events out, six
  upstream events back before the first delta, then the delta itself (100 ms of 24 kHz
  audio, base64 in and out). The fake answers at once (no model time), so this is the
  relay's share of time-to-first-audio.
* **audio -> speech started.** Relay: a 100 ms binary message of a loud tone (after
  silence) -> ``speech.started``; Duplex frames it, resamples 16 -> 24 kHz, base64s it
  into ``input_audio_buffer.append``; the fake's VAD answers
  ``input_audio_buffer.speech_started``; Duplex maps it back. Direct: the same tone at
  24 kHz in an ``input_audio_buffer.append``. Provider VAD with ``create_response: false``
  (through ``provider_options``), so no reply interferes; 800 ms of silence after each
  trial ends the speech before the next.

Each audio trial sends 900 ms of audio in a few milliseconds, far above Duplex's input
rate limit (``DUPLEX_AUDIO_RATE_LIMIT``, 10x real time after a 60 s burst). With the
defaults the burst ran out after ~70 trials and every later tone waited for its budget
(100 ms of audio at 10x: ~10 ms less the round trip), which the audio row then reported
as relay time. The server is started with a burst that covers the whole run
(``server_env``): the limiter's per-message checks still run, but it never paces.

Both upstream connections (Duplex's provider and the direct client) use the
``websockets`` defaults, so per-message deflate is negotiated with the fake on both and
the fake does the same work in both paths.

The fake also reports its own share (``turn_latencies()``: ``response.create`` received
-> first delta sent), which is the same in both paths.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from websockets.asyncio.client import ClientConnection, connect

from bench.bench_ws import (
    ROOT,
    ServerProc,
    header,
    machine_line,
    md_table,
    open_ws,
    pct,
    start_duplex,
)

KEY = "sk-test-duplex-fake"
TEXT = "Hello, what is the weather like?"
TONE_MS = 100
SILENCE_MS = 800
#: Untimed trials of each kind before the measured blocks.
WARMUP = 20
#: Silence sent once to open the relay's upstream session.
OPENING_MS = 200


def tone(rate: int, ms: int) -> bytes:
    t = np.arange(rate * ms // 1000) / rate
    return (np.sin(2 * math.pi * 440 * t) * 0.3 * 32767).astype("<i2").tobytes()


def silence(rate: int, ms: int) -> bytes:
    return bytes(2 * (rate * ms // 1000))


def measured_trials(args: argparse.Namespace) -> int:
    """Trials per measure and path: whole blocks, at least one."""
    return max(1, args.trials // args.block) * args.block


def server_env(fake_url: str, args: argparse.Namespace) -> dict[str, str]:
    """Duplex's settings: the fake as its provider, and an audio burst that holds all the
    audio of the run, so the input rate limiter never paces a trial (module docstring)."""
    audio_ms = OPENING_MS + (WARMUP + measured_trials(args)) * (TONE_MS + SILENCE_MS)
    return {
        "DUPLEX_OPENAI_REALTIME_URL": fake_url,
        "DUPLEX_OPENAI_API_KEY": KEY,
        "DUPLEX_AUDIO_BURST_S": str(math.ceil(audio_ms / 1000) + 1),
    }


# ---- the fake, in its own process --------------------------------------------------------------


async def serve_fake() -> None:
    """Run the fake; print its port; on each stdin line print and reset its latencies."""
    from tests.fakes.openai_realtime import FakeOpenAIRealtime

    async with FakeOpenAIRealtime(api_key=KEY) as fake:
        print(f"PORT {fake.port}", flush=True)
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            print(json.dumps(fake.turn_latencies()), flush=True)
            fake.responses.clear()


@dataclass
class FakeProc:
    proc: subprocess.Popen[str]
    port: int

    @property
    def base_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1"

    def latencies(self) -> list[float]:
        """The fake's own trigger -> first delta times since the last call."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return list(json.loads(self.proc.stdout.readline()))

    def stop(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_fake() -> FakeProc:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.bench_relay", "--serve-fake"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        raise RuntimeError(f"fake did not start: {line!r}")
    return FakeProc(proc, int(line.split()[1]))


# ---- clients -------------------------------------------------------------------------------------


@dataclass
class Samples:
    text: list[float] = field(default_factory=list)
    audio: list[float] = field(default_factory=list)
    fake_text: list[float] = field(default_factory=list)
    server_cpu_text: float = 0.0
    server_cpu_audio: float = 0.0
    #: messages the client received per trial (the relay's output, or the fake's)
    text_events: list[int] = field(default_factory=list)
    audio_events: list[int] = field(default_factory=list)


class RelayClient:
    """A Duplex session in ASM mode with the openai-realtime provider."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.seen = 0

    @classmethod
    async def open(
        cls, server: ServerProc, provider_options: dict, turn_detection: dict | None = None
    ) -> RelayClient:
        ws = await open_ws(server, True)
        config: dict = {"mode": "asm", "provider": "openai-realtime"}
        config["provider_options"] = provider_options
        if turn_detection is not None:
            config["turn_detection"] = turn_detection
        client = cls(ws)
        await ws.send(json.dumps({"type": "session.update", "config": config}))
        await client._until(lambda e: e["type"] == "session.updated")
        return client

    async def _until(self, done: Callable[[dict], bool]) -> dict:
        async with asyncio.timeout(10):
            while True:
                event = json.loads(await self.ws.recv())
                self.seen += 1
                if event["type"] == "error":
                    raise RuntimeError(f"server error: {event}")
                if done(event):
                    return event

    async def text_turn(self) -> float:
        t0 = time.perf_counter()
        await self.ws.send(json.dumps({"type": "input.text", "text": TEXT, "final": True}))
        await self._until(lambda e: e["type"] == "chunk" and "media" in e)
        first = time.perf_counter() - t0
        await self._until(lambda e: e["type"] == "response.done")
        return first

    async def audio_turn(self, loud: bytes, quiet: bytes) -> float:
        t0 = time.perf_counter()
        await self.ws.send(loud)
        await self._until(lambda e: e["type"] == "speech.started")
        first = time.perf_counter() - t0
        await self.ws.send(quiet)
        await self._until(lambda e: e["type"] == "speech.stopped")
        return first


class DirectClient:
    """The same events straight to the fake, as Duplex's provider would send them."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.n = 0
        self.seen = 0

    @classmethod
    async def open(cls, fake: FakeProc, turn_detection: dict) -> DirectClient:
        ws = await connect(
            f"{fake.base_url}/realtime?model=gpt-realtime",
            additional_headers={"Authorization": f"Bearer {KEY}"},
            max_size=None,  # compression left at the default, as Duplex's provider does
            ping_interval=None,
        )
        client = cls(ws)
        await client._until("session.created")
        session = {
            "type": "realtime",
            "output_modalities": ["audio"],
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "turn_detection": turn_detection,
                    "transcription": {"model": "gpt-4o-mini-transcribe"},
                },
                "output": {"format": {"type": "audio/pcm", "rate": 24000}},
            },
        }
        await client.send("session.update", session=session)
        await client._until("session.updated")
        return client

    async def send(self, kind: str, **fields: object) -> None:
        self.n += 1
        await self.ws.send(json.dumps({"type": kind, "event_id": f"evt_{self.n}", **fields}))

    async def _until(self, kind: str) -> dict:
        async with asyncio.timeout(10):
            while True:
                event = json.loads(await self.ws.recv())
                self.seen += 1
                if event["type"] == "error":
                    raise RuntimeError(f"fake error: {event}")
                if event["type"] == kind:
                    return event

    async def text_turn(self) -> float:
        t0 = time.perf_counter()
        item = {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": TEXT}],
        }
        await self.send("conversation.item.create", item=item)
        await self.send("response.create")
        await self._until("response.output_audio.delta")
        first = time.perf_counter() - t0
        await self._until("response.done")
        return first

    async def audio_turn(self, loud: str, quiet: str) -> float:
        t0 = time.perf_counter()
        await self.send("input_audio_buffer.append", audio=loud)
        await self._until("input_audio_buffer.speech_started")
        first = time.perf_counter() - t0
        await self.send("input_audio_buffer.append", audio=quiet)
        await self._until("input_audio_buffer.speech_stopped")
        return first


async def measure(args: argparse.Namespace, server: ServerProc, fake: FakeProc) -> dict:
    relay, direct = Samples(), Samples()
    no_reply = {
        "type": "server_vad",
        "silence_duration_ms": 700,
        "prefix_padding_ms": 300,
        "interrupt_response": True,
        "create_response": False,
    }
    r_text = await RelayClient.open(server, {})
    d_text = await DirectClient.open(fake, {"type": "server_vad"})
    # The same upstream VAD as the direct client's (700 ms of silence ends speech): with
    # Duplex's default 800 ms, 800 ms of silence less the resampler's delay never would.
    r_audio = await RelayClient.open(
        server, {"turn_detection": {"create_response": False}}, {"stop_ms": 700}
    )
    d_audio = await DirectClient.open(fake, no_reply)
    loud16, quiet16 = tone(16000, TONE_MS), silence(16000, SILENCE_MS)
    loud24 = base64.b64encode(tone(24000, TONE_MS)).decode()
    quiet24 = base64.b64encode(silence(24000, SILENCE_MS)).decode()
    await r_audio.ws.send(silence(16000, OPENING_MS))  # opens the upstream session
    for _ in range(WARMUP):  # warm-up (first upstream connect, imports, caches)
        await r_text.text_turn()
        await d_text.text_turn()
        await r_audio.audio_turn(loud16, quiet16)
        await d_audio.audio_turn(loud24, quiet24)
    fake.latencies()
    for _ in range(measured_trials(args) // args.block):
        cpu0 = server.cpu_seconds()
        for _ in range(args.block):
            seen = r_text.seen
            relay.text.append(await r_text.text_turn())
            relay.text_events.append(r_text.seen - seen)
        relay.server_cpu_text += server.cpu_seconds() - cpu0
        relay.fake_text += fake.latencies()
        for _ in range(args.block):
            seen = d_text.seen
            direct.text.append(await d_text.text_turn())
            direct.text_events.append(d_text.seen - seen)
        direct.fake_text += fake.latencies()
        cpu0 = server.cpu_seconds()
        for _ in range(args.block):
            seen = r_audio.seen
            relay.audio.append(await r_audio.audio_turn(loud16, quiet16))
            relay.audio_events.append(r_audio.seen - seen)
        relay.server_cpu_audio += server.cpu_seconds() - cpu0
        for _ in range(args.block):
            seen = d_audio.seen
            direct.audio.append(await d_audio.audio_turn(loud24, quiet24))
            direct.audio_events.append(d_audio.seen - seen)
    for c in (r_text, d_text, r_audio, d_audio):
        await c.ws.close()
    return {"relay": relay, "direct": direct}


def report(args: argparse.Namespace, got: dict) -> str:
    relay, direct = got["relay"], got["direct"]
    ms = 1000.0
    rows = []
    for label, r, d in (
        ("text turn -> first audio delta", relay.text, direct.text),
        ("audio (100 ms tone) -> speech started", relay.audio, direct.audio),
    ):
        r50, r99, d50, d99 = pct(r, 50), pct(r, 99), pct(d, 50), pct(d, 99)
        rows.append(
            [
                label,
                len(r),
                d50 * ms,
                d99 * ms,
                r50 * ms,
                r99 * ms,
                r50 / d50,
                r99 / d99,
                (r50 - d50) * ms,
            ]
        )
    table = md_table(
        [
            "measure",
            "trials",
            "direct p50 ms",
            "direct p99 ms",
            "relay p50 ms",
            "relay p99 ms",
            "x direct p50",
            "x direct p99",
            "relay adds p50 ms",
        ],
        rows,
    )
    n = len(relay.text)
    med = {
        k: float(np.median(v))
        for k, v in (
            ("rt", relay.text_events),
            ("dt", direct.text_events),
            ("ra", relay.audio_events),
            ("da", direct.audio_events),
        )
    }
    notes = [
        "",
        f"- The fake's own share (response.create received -> first delta sent), p50: "
        f"{pct(relay.fake_text, 50) * ms:.3f} ms in relay runs, "
        f"{pct(direct.fake_text, 50) * ms:.3f} ms in direct runs.",
        f"- Per text turn the fake sends {med['dt']:.0f} events (the direct client reads "
        f"them all) and Duplex relays {med['rt']:.0f} messages to its client; per audio "
        f"trial {med['da']:.0f} and {med['ra']:.0f}.",
        f"- Duplex server CPU: {relay.server_cpu_text / n * 1e6:.0f} µs per text turn, "
        f"{relay.server_cpu_audio / n * 1e6:.0f} µs per audio trial (100 ms + 800 ms of "
        f"audio resampled and relayed).",
    ]
    return table + "\n" + "\n".join(notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer trials")
    parser.add_argument("--trials", type=int, default=600, help="per measure and path")
    parser.add_argument("--block", type=int, default=50, help="trials per interleaved block")
    parser.add_argument("--serve-fake", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_fake:
        asyncio.run(serve_fake())
        return
    if args.quick:
        args.trials = 150
    fake = start_fake()
    server = start_duplex(server_env(fake.base_url, args))
    try:
        got = asyncio.run(measure(args, server, fake))
    finally:
        server.stop()
        fake.stop()
    print(header("ASM relay overhead (bench/bench_relay.py)", ["bench.bench_relay", *sys.argv[1:]]))
    print(machine_line() + " Fake, server and client: three processes, not pinned.\n")
    print(report(args, got))


if __name__ == "__main__":
    main()
