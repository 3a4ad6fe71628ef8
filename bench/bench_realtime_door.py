"""Server-added latency of the OpenAI Realtime door (/v1/realtime) against /v1/duplex, on
the same turns, interleaved in one run (one server, one connection per door).

Run: ``python -m bench.bench_realtime_door`` (``--trials N``). Prints markdown.

* **Text turn -> first audio delta.** Duplex: ``input.text`` (final) -> first ``chunk``
  with audio. Realtime: ``response.create`` (after ``conversation.item.create``, whose
  ``conversation.item.done`` is awaited first) -> first ``response.output_audio.delta``.
  Model: echo with the TTS stage of the project's OpenAI-compatible HTTP fake (in this
  process), so a text turn is answered with audio.
* **End of speech -> speech stopped.** The same espeak-ng utterance (24 kHz PCM16, 20 ms
  messages) to both doors: Duplex as binary frames, Realtime as base64
  ``input_audio_buffer.append``. The message that completes the silence (``stop_ms``
  500 on both, aggressiveness 3 = Realtime ``threshold`` 0.75) is found offline with
  ``AudioIngest``; everything before it is sent paced (2 ms apart), then 50 ms of quiet,
  then the trigger is sent and timed to ``speech.stopped`` /
  ``input_audio_buffer.speech_stopped``.

Both doors answer every turn; each trial drains to ``response.done`` before the next.

``--append-cost``: instead, the CPU one 20 ms append costs each door's direct receive
path in this process, the session's own work left out (its ``send_audio_nowait`` is a
stub): /v1/realtime's ``RealtimeBridge.take_nowait`` (UTF-8 decode, JSON, base64, budget)
against /v1/duplex's binary ``take`` (budget). Thread CPU time, best and median of 15.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import time
from typing import Any

import websockets

from bench.bench_ws import auth_headers, start_duplex
from duplex.protocol import InputAudioConfig, TurnDetectionConfig
from server.modes.audio_ingest import AudioIngest
from tests.fakes.openai_http import run_fake
from tests.speech import resample, synth
from vad import turns as vt

KEY = "sk-bench"
CHUNK = 24 * 2 * 20  # 20 ms at 24 kHz, s16le
STOP_MS = 500


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def utterance() -> tuple[list[bytes], int]:
    """20 ms messages of one utterance with quiet around it, and the trigger's index."""
    speech = resample(synth("Hello there, how are you today?"), 16000, 24000)
    pcm = b"\x00\x00" * (24 * 300) + speech.astype("<i2").tobytes() + b"\x00\x00" * (24 * 900)
    chunks = [pcm[i : i + CHUNK] for i in range(0, len(pcm) - CHUNK + 1, CHUNK)]
    ingest = AudioIngest(
        InputAudioConfig(format="pcm16", sample_rate=24000),
        TurnDetectionConfig(stop_ms=STOP_MS, aggressiveness=3),
    )
    for index, chunk in enumerate(chunks):
        if any(isinstance(e, vt.SpeechEnd) for e in ingest.events(chunk)):
            return chunks, index
    raise RuntimeError("the utterance never ends a turn offline")


async def recv_json(ws: Any) -> dict[str, Any]:
    async with asyncio.timeout(30):
        return json.loads(await ws.recv())


async def until(ws: Any, *kinds: str) -> dict[str, Any]:
    while True:
        event = await recv_json(ws)
        if event["type"] in kinds:
            return event
        if event["type"] == "error":
            raise RuntimeError(f"error event: {event}")


# ---- one trial per door -------------------------------------------------------------------


async def duplex_text(ws: Any) -> float:
    start = time.perf_counter()
    await ws.send(json.dumps({"type": "input.text", "text": "hi", "final": True}))
    first = None
    while True:
        event = await recv_json(ws)
        if first is None and event["type"] == "chunk" and event.get("media"):
            first = time.perf_counter() - start
        if event["type"] == "response.done":
            break
    assert first is not None, "no audio"
    return first


async def realtime_text(ws: Any) -> float:
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}
    await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
    await until(ws, "conversation.item.done")
    start = time.perf_counter()
    await ws.send(json.dumps({"type": "response.create"}))
    first = None
    while True:
        event = await recv_json(ws)
        if first is None and event["type"] == "response.output_audio.delta":
            first = time.perf_counter() - start
        if event["type"] == "response.done":
            break
    assert first is not None, "no audio"
    return first


async def speech_trial(ws: Any, chunks: list[bytes], trigger: int, realtime: bool) -> float:
    def frame(chunk: bytes) -> str | bytes:
        if not realtime:
            return chunk
        audio = base64.b64encode(chunk).decode()
        return json.dumps({"type": "input_audio_buffer.append", "audio": audio})

    frames = [frame(c) for c in chunks]
    for message in frames[:trigger]:
        await ws.send(message)
        await asyncio.sleep(0.002)
    await asyncio.sleep(0.05)
    start = time.perf_counter()
    await ws.send(frames[trigger])
    stopped = "input_audio_buffer.speech_stopped" if realtime else "speech.stopped"
    await until(ws, stopped)
    elapsed = time.perf_counter() - start
    for message in frames[trigger + 1 :]:
        await ws.send(message)
    await until(ws, "response.done")
    return elapsed


# ---- the run -----------------------------------------------------------------------------


async def open_doors(port: int) -> tuple[Any, Any, Any, Any]:
    """(duplex text, realtime text, duplex speech, realtime speech) connections."""
    headers = auth_headers()
    base = f"ws://127.0.0.1:{port}"
    opts: dict[str, Any] = {"additional_headers": headers, "compression": None, "max_size": None}
    conns = [
        await websockets.connect(f"{base}/v1/duplex", **opts),
        await websockets.connect(f"{base}/v1/realtime?model=duplex-echo", **opts),
        await websockets.connect(f"{base}/v1/duplex", **opts),
        await websockets.connect(f"{base}/v1/realtime?model=duplex-echo", **opts),
    ]
    for ws in conns:
        await recv_json(ws)  # session.created
    d_text, r_text, d_speech, r_speech = conns
    await d_text.send(json.dumps({"type": "session.update", "config": {"tts": True}}))
    await until(d_text, "session.updated")
    duplex_vad = {
        "input_audio": {"sample_rate": 24000},
        "turn_detection": {"stop_ms": STOP_MS, "aggressiveness": 3, "pre_roll_ms": 300},
    }
    await d_speech.send(json.dumps({"type": "session.update", "config": duplex_vad}))
    await until(d_speech, "session.updated")
    session = {
        "type": "realtime",
        "output_modalities": ["text"],
        "audio": {
            "input": {
                "turn_detection": {
                    "type": "server_vad",
                    "threshold": 0.75,
                    "silence_duration_ms": STOP_MS,
                    "prefix_padding_ms": 300,
                }
            }
        },
    }
    await r_speech.send(json.dumps({"type": "session.update", "session": session}))
    await until(r_speech, "session.updated")
    return d_text, r_text, d_speech, r_speech


async def run(trials: int) -> None:
    chunks, trigger = utterance()
    async with run_fake(api_key=KEY, seed=1, speech_ms_per_char=1.0) as fake:
        env = {
            "DUPLEX_OPENAI_BASE_URL": fake.url,
            "OPENAI_API_KEY": KEY,
            "DUPLEX_ECHO_PACE": "0",
            "DUPLEX_REALTIME_MODELS": json.dumps(
                {"duplex-echo": {"provider": "echo", "tts": True}}
            ),
        }
        server = await asyncio.to_thread(start_duplex, env)
        try:
            d_text, r_text, d_speech, r_speech = await open_doors(server.port)
            for _ in range(3):  # warm up every path
                await duplex_text(d_text)
                await realtime_text(r_text)
                await speech_trial(d_speech, chunks, trigger, False)
                await speech_trial(r_speech, chunks, trigger, True)
            results: dict[str, list[float]] = {k: [] for k in ("dt", "rt", "ds", "rs")}
            for i in range(trials):
                # Interleaved, and which door goes first alternates.
                pair = [("dt", duplex_text(d_text)), ("rt", realtime_text(r_text))]
                for key, trial in pair if i % 2 == 0 else pair[::-1]:
                    results[key].append(await trial)
                speech = [
                    ("ds", speech_trial(d_speech, chunks, trigger, False)),
                    ("rs", speech_trial(r_speech, chunks, trigger, True)),
                ]
                for key, trial in speech if i % 2 == 0 else speech[::-1]:
                    results[key].append(await trial)
            for ws in (d_text, r_text, d_speech, r_speech):
                await ws.close()
        finally:
            server.stop()
    ms = 1000.0
    print(f"### /v1/realtime vs /v1/duplex, {trials} interleaved trials each\n")
    print("| metric | door | p50 ms | p99 ms | mean ms |\n|---|---|---:|---:|---:|")
    for label, d, r in (
        ("text turn -> first audio delta", "dt", "rt"),
        ("end of speech -> speech stopped", "ds", "rs"),
    ):
        for door, key in (("/v1/duplex", d), ("/v1/realtime", r)):
            v = results[key]
            print(
                f"| {label} | {door} | {pct(v, 0.5) * ms:.2f} | {pct(v, 0.99) * ms:.2f} "
                f"| {statistics.fmean(v) * ms:.2f} |"
            )
    print("\n| metric | p50 ratio | p99 ratio |\n|---|---:|---:|")
    for label, d, r in (
        ("text turn -> first audio delta", "dt", "rt"),
        ("end of speech -> speech stopped", "ds", "rs"),
    ):
        p50 = pct(results[r], 0.5) / pct(results[d], 0.5)
        p99 = pct(results[r], 0.99) / pct(results[d], 0.99)
        print(f"| {label} | {p50:.2f}x | {p99:.2f}x |")


def append_cost(n: int = 20000) -> None:
    import types

    from duplex.protocol import JsonLimits
    from server.rate import InputBudget
    from server.realtime_door.bridge import RealtimeBridge
    from server.realtime_door.models import RealtimeModel
    from server.realtime_door.session_map import RealtimeSessionState
    from server.ws import _direct_take

    session: Any = types.SimpleNamespace(
        id="sess_bench",
        config=types.SimpleNamespace(input_audio=InputAudioConfig(sample_rate=24000)),
        send_audio_nowait=lambda pcm: True,
    )
    state = RealtimeSessionState(RealtimeModel("duplex-echo", {"provider": "echo"}))
    bridge = RealtimeBridge(session, state, JsonLimits())
    budget = InputBudget.of(0, 1, 0, 1)  # unlimited: the check runs, never waits
    pcm = bytes(range(256)) * 3 + bytes(192)  # 960 bytes: 20 ms at 24 kHz
    frame = json.dumps(
        {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()}
    ).encode()
    take = _direct_take(session, 1 << 20, budget)

    def door() -> None:
        bridge.take_nowait(frame.decode(), budget)

    def duplex() -> None:
        take(pcm)

    assert bridge.take_nowait(frame.decode(), budget) and take(pcm)
    runs: dict[str, list[float]] = {"realtime": [], "duplex": []}
    for _ in range(15):
        for name, step in (("realtime", door), ("duplex", duplex)):
            t = time.thread_time()
            for _ in range(n):
                step()
            runs[name].append((time.thread_time() - t) / n * 1e6)
    print("| door | best µs per append | median µs |\n|---|---:|---:|")
    for name, v in runs.items():
        print(f"| {name} | {min(v):.2f} | {statistics.median(v):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--append-cost", action="store_true", help="in-process append CPU")
    args = parser.parse_args()
    if args.append_cost:
        append_cost()
        return
    asyncio.run(run(args.trials))


if __name__ == "__main__":
    main()
