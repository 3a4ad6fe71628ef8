"""Server-added latency of VAD-mode turns over the OpenAI-compatible HTTP provider.

1. First token: a text turn sent to Duplex -> its first ``chunk`` with text, against the
   same request made straight to the (fake) model server -> its first content delta, in
   the same run, interleaved. The difference is what Duplex adds.
2. TTS first audio: with ``tts: true``, the time from the chunk that completes the
   reply's first sentence to the first reply audio chunk.

The fake model server runs in this process's event loop; Duplex runs as its own process
(``python -m server.cli serve``), as in production, so the two never share a GIL (an
in-process thread adds GIL hand-offs of up to 5 ms per hop, which is not the server's
cost). Run: ``python -m bench.bench_chat [--trials N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx
import websockets

from bench.bench_ws import auth_headers, start_duplex
from tests.fakes.openai_http import ChatReply, run_fake

KEY = "sk-bench"
REPLY = "Sure. This is the first sentence of the answer. And here is some more text after it."


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def direct_first_token(http: httpx.AsyncClient, url: str) -> float:
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    start = time.perf_counter()
    async with http.stream("POST", f"{url}/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {") and '"content"' in line:
                delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                if delta:
                    return time.perf_counter() - start
    raise RuntimeError("no content")


async def duplex_turn(ws: websockets.ClientConnection, tts: bool) -> tuple[float, float | None]:
    """(first text chunk latency, first audio after the first sentence ended)."""
    start = time.perf_counter()
    await ws.send(json.dumps({"type": "input.text", "text": "hi", "final": True}))
    first_text = sentence_end = first_audio = None
    text = ""
    while True:
        event = json.loads(await ws.recv())
        now = time.perf_counter()
        if event["type"] == "chunk":
            if event.get("delta"):
                first_text = first_text or now
                text += event["delta"]
                if sentence_end is None and ". " in text + " " and len(text) >= 20:
                    sentence_end = now
            if event.get("media") and first_audio is None:
                first_audio = now
        elif event["type"] == "response.done":
            break
    assert first_text is not None
    tts_latency = None
    if tts and sentence_end is not None and first_audio is not None:
        tts_latency = max(0.0, first_audio - sentence_end)
    return first_text - start, tts_latency


async def run(trials: int) -> None:
    async with run_fake(api_key=KEY, seed=1) as fake:
        fake.script(*[ChatReply(text=REPLY) for _ in range(3 * trials + 10)])
        server = await asyncio.to_thread(
            start_duplex, {"DUPLEX_OPENAI_BASE_URL": fake.url, "OPENAI_API_KEY": KEY}
        )
        try:
            headers = auth_headers()
            direct: list[float] = []
            relayed: list[float] = []
            tts_lat: list[float] = []
            async with (
                httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}) as http,
                websockets.connect(server.ws_url, additional_headers=headers) as ws,
                websockets.connect(server.ws_url, additional_headers=headers) as ws_tts,
            ):
                for conn, cfg in ((ws, {}), (ws_tts, {"stt": False, "tts": True})):
                    await conn.recv()
                    update = {
                        "type": "session.update",
                        "config": {"provider": "openai-chat", **cfg},
                    }
                    await conn.send(json.dumps(update))
                    await conn.recv()
                for _ in range(3):  # warm up both paths
                    await direct_first_token(http, fake.url)
                    await duplex_turn(ws, False)
                for _ in range(trials):
                    direct.append(await direct_first_token(http, fake.url))
                    relayed.append((await duplex_turn(ws, False))[0])
                # A phase of its own: the fake synthesises speech in this process, which
                # would slow the first-token trials above if they were interleaved.
                for _ in range(trials):
                    _, lat = await duplex_turn(ws_tts, True)
                    if lat is not None:
                        tts_lat.append(lat)
        finally:
            server.stop()
    ms = 1000.0
    d50, d99 = pct(direct, 0.5) * ms, pct(direct, 0.99) * ms
    r50, r99 = pct(relayed, 0.5) * ms, pct(relayed, 0.99) * ms
    print(f"### First token, {trials} interleaved trials (python -m bench.bench_chat)\n")
    print("| path | p50 ms | p99 ms |\n|---|---:|---:|")
    print(f"| client -> fake model directly | {d50:.2f} | {d99:.2f} |")
    print(f"| client -> Duplex -> fake model -> Duplex -> client | {r50:.2f} | {r99:.2f} |")
    print(f"| server-added (difference) | {r50 - d50:.2f} | {r99 - d99:.2f} |")
    print(f"| ratio | {r50 / d50:.2f}x | {r99 / d99:.2f}x |\n")
    if tts_lat:
        t50, t99 = pct(tts_lat, 0.5) * ms, pct(tts_lat, 0.99) * ms
        print(f"### TTS first audio after the first sentence completes ({len(tts_lat)} turns)\n")
        print("| p50 ms | p99 ms | mean ms |\n|---:|---:|---:|")
        print(f"| {t50:.2f} | {t99:.2f} | {statistics.mean(tts_lat) * ms:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=100)
    args = parser.parse_args()
    asyncio.run(run(args.trials))


if __name__ == "__main__":
    main()
