"""The browser demo (server/static) in real headless Chromium, against a real server.

Chromium's fake microphone plays a WAV of two spoken turns, so the whole audio path runs
as it would for a user: getUserMedia -> AudioWorklet -> binary PCM frames -> server VAD ->
turn events and echo replies -> Web Audio playback -> `playback` reports.

The echo provider streams reply audio at twice real time, so the page holds seconds of
audio queued ahead of what it has played; the first turn is long, so the second turn
talks over the first reply while it still streams. On the interruption the page must
drop that queue at once rather than play it out.

The page connects with a short-lived client token it mints with the API token typed into
it; the API token never appears in a URL or in the browser's storage.
"""

from __future__ import annotations

import base64
import json
import re
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import TOKEN
from tests.speech import SAMPLE_RATE, resample, rms, synth

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
WAV_RATE = 48000
INPUT_RATES = {8000, 16000, 24000, 32000, 44100, 48000}

# The first turn is long (about 7 s of speech), so its echo still streams when the second
# turn starts 2 s after it: that is the barge-in.
TURN_1 = (
    "Could you tell me the weather for tomorrow? I would like to book a table for two. "
    "Remind me to call my sister tonight."
)
TURN_2 = "Set a timer for fifteen minutes."

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Chromium at /usr/bin/chromium"),
]


def write_mic_wav(path: Path) -> None:
    """1 s silence, turn 1, 2 s silence, turn 2, 4 s silence: 16-bit mono PCM at 48 kHz."""
    level = 32768 * 10 ** (-20 / 20)  # a comfortable -20 dBFS RMS speaking level

    def speech(text: str) -> np.ndarray:
        clip = synth(text, voice="en-us", speed=150).astype(np.float64)
        return clip * level / rms(clip)

    def silence(seconds: float) -> np.ndarray:
        return np.zeros(int(seconds * SAMPLE_RATE))

    parts = [silence(1), speech(TURN_1), silence(2), speech(TURN_2), silence(4)]
    audio = np.clip(np.round(np.concatenate(parts)), -32768, 32767).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(WAV_RATE)
        w.writeframes(resample(audio, SAMPLE_RATE, WAV_RATE).astype("<i2").tobytes())


def test_browser_demo_voice_text_and_camera(server_factory: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    wav = tmp_path / "mic.wav"
    write_mic_wav(wav)
    server = server_factory(echo_pace=0.5)  # reply audio at twice real time
    ARTIFACTS.mkdir(exist_ok=True)

    # The page's WebSocket traffic in order, as the browser saw it: ("out"|"in", message).
    wire: list[tuple[str, dict[str, Any]]] = []
    sent_binary: list[int] = []  # sizes of the audio frames

    def on_sent(payload: str | bytes) -> None:
        if isinstance(payload, bytes):
            sent_binary.append(len(payload))
        else:
            wire.append(("out", json.loads(payload)))

    def on_received(payload: str | bytes) -> None:
        wire.append(("in", json.loads(payload)))

    def sent(kind: str) -> list[dict[str, Any]]:
        return [m for d, m in wire if d == "out" and m["type"] == kind]

    socket_urls: list[str] = []
    request_urls: list[str] = []

    def watch(ws: Any) -> None:
        socket_urls.append(ws.url)
        ws.on("framesent", on_sent)
        ws.on("framereceived", on_received)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=[
                "--no-sandbox",
                "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={wav}",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            console: list[str] = []
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
            page.on("websocket", watch)
            page.on("request", lambda r: request_urls.append(r.url))
            page.set_default_timeout(20_000)

            page.goto(server.base)
            # The page says what it is for and what to do, before anything is connected.
            intro = page.locator("#intro")
            expect(intro).to_be_visible()
            for words in ("echo", "API token", "Connect", "microphone", "camera", "interrupt"):
                expect(intro).to_contain_text(words)
            for event in ("speech.started", "turn.ended", "error"):
                expect(intro).to_contain_text(event)
            turn_state = page.locator("#turn-state")
            expect(turn_state).to_have_attribute("data-state", "idle")
            # Every turn state the badge takes, in order (the test watches; the page
            # does not know).
            page.evaluate(
                """() => {
                  window.turnStates = [];
                  const el = document.getElementById("turn-state");
                  new MutationObserver(() => {
                    const s = el.dataset.state;
                    if (window.turnStates.at(-1) !== s) window.turnStates.push(s);
                  }).observe(el, { attributes: true, attributeFilter: ["data-state"] });
                }"""
            )

            # One click: paste the API token, Connect.
            page.fill("#token", TOKEN)
            page.click("#connect")
            expect(page.locator("#status")).to_have_attribute("data-state", "connected")
            expect(turn_state).to_have_attribute("data-state", "listening")
            # It connected with a client token minted for it, not with the API token.
            assert len(socket_urls) == 1
            query_token = re.search(r"[?&]token=([^&]+)", socket_urls[0])
            assert query_token and query_token.group(1).startswith("ek_"), socket_urls
            assert not [u for u in request_urls + socket_urls if TOKEN in u]
            stored = page.evaluate(
                "() => JSON.stringify([{...localStorage}, {...sessionStorage}, document.cookie])"
            )
            assert TOKEN not in stored and "ek_" not in stored, stored

            # Right after session.created the page declares its capture format.
            update = sent("session.update")[0]
            rate = update["config"]["input_audio"]["sample_rate"]
            assert rate in INPUT_RATES
            assert update["config"]["input_audio"]["format"] == "pcm16"
            assert update["config"]["output_audio"] == {"sample_rate": 24000}

            page.click("#mic")
            expect(page.locator("#mic")).to_have_attribute("aria-pressed", "true")

            # The server finds both turns of the WAV and echoes each one.
            turns = page.locator('.event[data-type="turn.ended"]')
            turns.nth(1).wait_for()
            expect(turns.first).to_contain_text(re.compile(r"\d+ ms – \d+ ms"))
            heard = page.locator(".reply").filter(
                has_text=re.compile(r"Heard \d+\.\d\d s of audio")
            )
            expect(heard.first).to_be_visible()
            expect(page.locator('.event[data-type="speech.started"]').first).to_be_visible()

            # The second turn barges in on the first reply: the page stops its playback and
            # reports how much of that reply was heard.
            cut = page.locator('.event[data-type="chunk.interrupted"]').first
            expect(cut).to_be_visible()
            cut_id = cut.get_attribute("data-response-id")
            expect(page.locator(f'.reply[data-response-id="{cut_id}"]')).to_have_attribute(
                "data-finish-reason", "interrupted"
            )
            # The badge followed the turns: listening, the user speaking, the server
            # thinking, then answering (the second turn talks over the first answer).
            states = page.evaluate("() => window.turnStates")
            assert states[0] == "listening", states
            for a, b in [
                ("listening", "user-speaking"),
                ("user-speaking", "thinking"),
                ("thinking", "answering"),
                ("answering", "user-speaking"),
            ]:
                assert any(states[i : i + 2] == [a, b] for i in range(len(states))), (a, b, states)
            page.click("#mic")  # the fake microphone loops; stop it before the text turn
            expect(page.locator("#mic")).to_have_attribute("aria-pressed", "false")

            # Microphone audio went out as binary frames of 20 ms at the declared rate.
            assert sent_binary, "no audio frames were sent"
            assert set(sent_binary) == {rate * 20 // 1000 * 2}
            # The cut reply's playback was reported while it played, and stopped at the cut:
            # the audio still queued would otherwise have gone on being reported every
            # 250 ms. After the cut come at most the final report and one periodic report
            # racing the interruption message; the final amount heard is less than the page
            # had received (the queue was dropped, not played out).
            cut_at = next(i for i, (d, m) in enumerate(wire) if d == "in" and m.get("interrupted"))
            reports = [
                (i, m["played_ms"])
                for i, (d, m) in enumerate(wire)
                if d == "out" and m["type"] == "playback" and m["response_id"] == cut_id
            ]
            assert any(i < cut_at and played > 0 for i, played in reports), reports
            assert len([i for i, _ in reports if i > cut_at]) <= 2, reports
            received_ms = sum(
                len(base64.b64decode(m["media"]["data"])) / 2 / 24  # PCM16 at 24 kHz
                for d, m in wire
                if d == "in" and m.get("response_id") == cut_id and "media" in m
            )
            assert 0 < reports[-1][1] < received_ms, (reports, received_ms)

            # Camera: the fake camera's frames go out as JPEG and reach the next turn.
            page.click("#camera")
            expect(page.locator("#frames")).not_to_have_attribute("data-count", "0")
            image = sent("input.image")[0]
            assert image["mime_type"] == "image/jpeg" and image["width"] > 0

            # Text turn through the text box.
            page.fill("#text-input", "hello from the browser")
            page.click("#send")
            reply = page.locator('.reply[data-request-id="text-1"]')
            expect(reply).to_contain_text("You said: “hello from the browser”")
            expect(reply).to_contain_text(re.compile(r"Saw \d+ frame\(s\): \d+x\d+ image/jpeg"))
            expect(reply).to_have_attribute("data-finish-reason", "stop")
            expect(turn_state).to_have_attribute("data-state", "listening")

            expect(page.locator(".entry.error")).to_have_count(0)
            assert not [c for c in console if c.startswith(("error", "pageerror"))], console
            page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)

            page.click("#connect")  # Disconnect
            expect(page.locator("#status")).to_have_attribute("data-state", "closed")
            expect(page.locator("#status")).to_contain_text("closed (1000")

            expect(turn_state).to_have_attribute("data-state", "idle")

            # A wrong API token: minting is refused, and the page says so with the code.
            page.goto(server.base)
            page.fill("#token", "not-a-token")
            page.click("#connect")
            expect(page.locator('.entry.error[data-code="401"]')).to_contain_text("API token")
            expect(page.locator("#status")).to_contain_text("not connected (401)")

            # An expired client token (as a backend might hand one over): the WebSocket
            # is refused with 401, shown with its code, then the close code.
            tokens = server.app.state.duplex.client_tokens
            expired, _ = tokens.mint("tenant-a", now=time.time() - 3600)
            page.goto("about:blank")
            page.goto(f"{server.base}/#client_token={expired}")
            expect(page.locator("#token")).to_have_value(expired)
            assert "client_token" not in page.url  # taken out of the address bar
            page.click("#connect")
            expect(page.locator('.entry.error[data-code="401"]')).to_contain_text("expired")
            expect(page.locator("#status")).to_contain_text("closed (1008")
        finally:
            browser.close()


class CuttableProxy:
    """A loopback TCP proxy whose open connections can be cut, as a network drop cuts them.

    The browser talks to the server through it; `cut()` closes every connection it carries
    (both sides see the TCP connection end, no WebSocket close handshake) while it keeps
    accepting new ones, so the page can reconnect.
    """

    def __init__(self, target_port: int) -> None:
        import socket
        import threading

        self._target = target_port
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: list[Any] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._target))
            with self._lock:
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: Any, dst: Any) -> None:
        import contextlib
        import socket

        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        import contextlib
        import socket

        with self._lock:
            conns, self._open = self._open, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self.cut()


def test_browser_demo_resumes_after_a_dropped_connection(
    server_factory: Any, tmp_path: Path
) -> None:
    """The page reconnects by itself after its TCP connection is cut mid-answer, resumes
    after the last `seq` it handled, and gets the rest of the answer, each message once."""
    from playwright.sync_api import expect, sync_playwright

    level = 32768 * 10 ** (-20 / 20)
    clip = synth(TURN_1, voice="en-us", speed=150).astype(np.float64)
    parts = [np.zeros(SAMPLE_RATE), clip * level / rms(clip), np.zeros(20 * SAMPLE_RATE)]
    audio = np.clip(np.round(np.concatenate(parts)), -32768, 32767).astype(np.int16)
    wav = tmp_path / "mic.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(WAV_RATE)
        w.writeframes(resample(audio, SAMPLE_RATE, WAV_RATE).astype("<i2").tobytes())

    server = server_factory(echo_pace=1.0)  # the spoken answer plays back at real time
    proxy = CuttableProxy(int(server.base.rsplit(":", 1)[1]))
    received: list[dict[str, Any]] = []  # what the page received, over both sockets
    sent = [0]  # messages the page sent, over both sockets (resent ones included)

    def watch(ws: Any) -> None:
        ws.on("framereceived", lambda p: received.append(json.loads(p)))
        ws.on("framesent", lambda p: sent.__setitem__(0, sent[0] + 1))

    def reply_audio() -> list[dict[str, Any]]:
        return [m for m in received if m.get("type") == "chunk" and "media" in m]

    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=str(CHROMIUM),
                headless=True,
                args=[
                    "--no-sandbox",
                    "--use-fake-ui-for-media-stream",
                    "--use-fake-device-for-media-stream",
                    f"--use-file-for-fake-audio-capture={wav}",
                    "--disable-gpu",
                ],
            )
            try:
                page = browser.new_page()
                page.on("websocket", watch)
                page.set_default_timeout(30_000)
                page.goto(f"http://127.0.0.1:{proxy.port}/")
                page.fill("#token", TOKEN)  # the page mints a client token per connection
                page.click("#connect")
                expect(page.locator("#status")).to_have_attribute("data-state", "connected")
                page.click("#mic")
                for _ in range(600):  # up to 30 s (a safety bound, not a measurement)
                    if len(reply_audio()) >= 5:  # half a second of the answer has come
                        break
                    page.wait_for_timeout(50)
                assert len(reply_audio()) >= 5, "no answer"
                proxy.cut()
                expect(page.locator('.event[data-type="session.resumed"]')).to_be_visible()
                expect(page.locator("#status")).to_have_attribute("data-state", "connected")
                reply = page.locator(".reply").first
                expect(reply).to_have_attribute("data-finish-reason", "stop", timeout=30_000)
                heard = re.search(r"Heard (\d+\.\d\d) s of audio", reply.inner_text())
                assert heard, reply.inner_text()
                seqs = [m["seq"] for m in received if m.get("seq")]
                assert seqs == list(range(1, len(seqs) + 1)), "a seq twice, or a gap"
                response_id = reply.get_attribute("data-response-id")
                seconds = sum(
                    len(base64.b64decode(m["media"]["data"])) / 2 / m["media"]["sample_rate"]
                    for m in reply_audio()
                    if m["response_id"] == response_id
                )
                assert seconds == pytest.approx(float(heard.group(1)), abs=0.06)
                page.click("#mic")
                # What the drop swallowed was resent once: the server received each
                # message the page sent exactly once (it counts them, `input_received`).
                (resumed,) = [m for m in received if m.get("type") == "session.resumed"]
                assert "input_received" in resumed
                notes = page.locator('.entry.note:has-text("resent")').all_inner_texts()
                resent = sum(int(re.search(r"resent (\d+)", n).group(1)) for n in notes)
                live = server.app.state.duplex.registry.get(
                    "tenant-a", page.inner_text("#session-id").strip()
                )
                for _ in range(200):  # until the last frames arrived (a bound, not a measure)
                    if live.input_received == sent[0] - resent:
                        break
                    page.wait_for_timeout(50)
                assert live.input_received == sent[0] - resent
            finally:
                browser.close()
    finally:
        proxy.close()


def test_api_docs_render_offline(server_factory: Any) -> None:
    """With DUPLEX_API_DOCS on, /docs renders in Chromium with every request to anywhere
    but this server refused (as offline)."""
    from playwright.sync_api import expect, sync_playwright

    server = server_factory(api_docs=True)
    outside: list[str] = []

    def only_local(route: Any) -> None:
        if route.request.url.startswith(server.base):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            page = browser.new_page()
            page.route("**/*", only_local)
            page.goto(f"{server.base}/docs")
            expect(page.locator(".swagger-ui .info .title")).to_contain_text("Duplex")
            expect(
                page.locator(".opblock-summary-path", has_text="/v1/client_tokens").first
            ).to_be_visible()
        finally:
            browser.close()
    assert not outside, outside
