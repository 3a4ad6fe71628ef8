"""A local stand-in for the Gemini Live ``BidiGenerateContent`` WebSocket service.

Faithful to the public API where the provider depends on it:

* path ``/ws/google.ai.generativelanguage.{v1beta|v1alpha}.GenerativeService.BidiGenerateContent``
  (anything else: HTTP 404 at the handshake) and ``?key=`` auth; a wrong key is
  accepted at the handshake and then closed with ``1007 API key not valid...``
  as the real service does;
* ``setup`` must come first (unknown fields refused, as proto JSON parsing does)
  and is answered with ``setupComplete``; every server message is JSON in a
  binary frame;
* ``realtimeInput.audio`` must be ``audio/pcm;rate=16000`` with whole s16le
  samples, else ``1007 Request contains an invalid argument.`` (the real
  service resamples other rates; the fake is strict so a regression shows);
* turn taking: energy-based activity detection on the received audio, or
  ``activityStart``/``activityEnd`` when automatic detection is disabled;
  ``interrupted`` when user activity starts during a response and
  ``activityHandling`` allows it;
* responses: ``inputTranscription``, ``modelTurn`` parts (24 kHz PCM
  ``inlineData`` for AUDIO, text for TEXT), ``outputTranscription``,
  ``generationComplete``, ``turnComplete`` with ``usageMetadata``;
* ``sessionResumptionUpdate`` (``resumable: false`` while generating) every few
  client messages and after each turn, with ``lastConsumedClientMessageIndex``
  when the setup asked for ``transparent`` resumption. The index counts the
  client messages of the connection with ``setup`` as message 0 (the provider
  makes the same, conservative, assumption). ``consume_lag`` makes the server
  lag behind its input, as the real one does under load: a handle then covers
  (and its index names) only the messages up to ``consume_lag`` before the
  newest one received.
* initial history: with ``historyConfig.initialHistoryInClientContent`` in the
  setup, the connection first takes ``clientContent`` only, up to one with
  ``turnComplete: true``; that history starts no generation (anything else
  before it: ``1007``). A resumption handle the fake does not know (or has
  forgotten: ``expire_handles()``) is refused with ``1007``.

The fake keeps session state across connections: a handle restores exactly the
input consumed up to the message it covers, so a test can check what the
"model" heard (``session_audio``) as well as every message received
(``connections``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

PATH_RE = re.compile(
    r"^/ws/google\.ai\.generativelanguage\.(v1beta|v1alpha)\.GenerativeService\.BidiGenerateContent$"
)
BAD_KEY_REASON = "API key not valid. Please pass a valid API key."
INVALID_ARGUMENT = "Request contains an invalid argument."
QUOTA_REASON = "You exceeded your current quota, please check your plan and billing details."
OUTPUT_RATE = 24000

SETUP_FIELDS = frozenset(
    {
        "model",
        "generationConfig",
        "systemInstruction",
        "tools",
        "realtimeInputConfig",
        "sessionResumption",
        "contextWindowCompression",
        "inputAudioTranscription",
        "outputAudioTranscription",
        "proactivity",
        "historyConfig",
    }
)
REALTIME_FIELDS = frozenset(
    {"audio", "video", "text", "activityStart", "activityEnd", "audioStreamEnd", "mediaChunks"}
)

Scenario = Literal[
    "normal",
    "tool_call",
    "tool_loop",
    "go_away",
    "go_away_after_answer",
    "drop_mid_response",
    "quota_exceeded",
]


class _Refused(Exception):
    """The client broke the protocol: the connection closes with this code and reason."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass
class ConnectionRecord:
    """Everything one connection saw; ``messages[0]`` is the ``setup`` message."""

    number: int
    key: str | None
    setup: dict[str, Any] | None = None
    resumed_from: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    handles: list[str] = field(default_factory=list)
    closed_with: tuple[int, str] | None = None

    def audio(self) -> list[bytes]:
        return [
            base64.b64decode(m["realtimeInput"]["audio"]["data"])
            for m in self.messages
            if "audio" in m.get("realtimeInput", {})
        ]

    def realtime_kinds(self) -> list[str]:
        """The realtimeInput field of each message in order, e.g. ``activityStart``."""
        return [k for m in self.messages for k in m.get("realtimeInput", {})]


@dataclass
class SessionState:
    """What the model has consumed: ``(kind, value)`` per input, in order."""

    inputs: list[tuple[str, Any]] = field(default_factory=list)
    turns: int = 0

    def copy(self) -> SessionState:
        return SessionState(list(self.inputs), self.turns)


class FakeGeminiLive:
    """``async with FakeGeminiLive(...) as fake:`` serves on ``fake.base_url`` (loopback)."""

    def __init__(
        self,
        *,
        api_key: str = "test-key",
        scenario: Scenario = "normal",
        reply_text: str = "Sure, happy to help.",
        user_transcript: str = "hello there",
        audio_chunks: int = 4,
        audio_chunk_ms: int = 20,
        hold_response: bool = False,
        pace_s: float = 0.001,
        vad_threshold: float = 1000.0,
        silence_ms: float = 200.0,
        resumption_every: int = 4,
        issue_handles: bool = True,
        go_away_after: int = 6,
        go_away_time_left_s: float = 2.0,
        drop_after_chunks: int = 2,
        tool_args: dict[str, Any] | None = None,
        expected_rate: int = 16000,
        consume_lag: int = 0,
    ) -> None:
        self.api_key = api_key
        self.scenario = scenario
        self.reply_text = reply_text
        self.user_transcript = user_transcript
        self.audio_chunks = audio_chunks
        self.audio_chunk_ms = audio_chunk_ms
        self.hold_response = hold_response
        self.pace_s = pace_s
        self.vad_threshold = vad_threshold
        self.silence_ms = silence_ms
        self.resumption_every = resumption_every
        self.issue_handles = issue_handles
        self.go_away_after = go_away_after
        self.go_away_time_left_s = go_away_time_left_s
        self.drop_after_chunks = drop_after_chunks
        self.tool_args = tool_args if tool_args is not None else {"city": "Paris"}
        self.expected_rate = expected_rate
        self.consume_lag = consume_lag

        self.connections: list[ConnectionRecord] = []
        self.handles: dict[str, SessionState] = {}
        self.states: list[SessionState] = []  # one per connection, same order
        self.tool_responses: list[dict[str, Any]] = []
        self.audio_chunks_sent = 0  # output audio chunks, all connections
        self._live: list[_FakeConnection] = []
        self._changed = asyncio.Event()
        self._server: Server | None = None
        self._handle_count = 0
        self._go_away_sent = False
        self._dropped = False
        self._quota_sent = False

    # -- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> FakeGeminiLive:
        self._server = await serve(
            self._serve, "127.0.0.1", 0, process_request=self._check_path, compression=None
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    @property
    def base_url(self) -> str:
        assert self._server is not None, "use the fake as an async context manager"
        port = next(iter(self._server.sockets)).getsockname()[1]
        return f"ws://127.0.0.1:{port}"

    # -- what tests read ------------------------------------------------------------

    def received_audio(self) -> list[bytes]:
        """Every audio chunk received, all connections, in arrival order (replays included)."""
        return [chunk for rec in self.connections for chunk in rec.audio()]

    def session_audio(self) -> list[bytes]:
        """The audio the latest session consumed: restored from its handle plus what followed."""
        if not self.states:
            return []
        return [v for kind, v in self.states[-1].inputs if kind == "audio"]

    async def wait_until(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wake on every message in or out until ``condition()`` holds (TimeoutError after)."""
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()

    async def inject(self, message: dict[str, Any]) -> None:
        """Send an arbitrary server message on the newest open connection."""
        await self._live[-1].send(message)

    def expire_handles(self) -> None:
        """Forget every resumption handle issued so far, as the service does after a while."""
        self.handles.clear()

    async def close_current(self, code: int, reason: str) -> None:
        """Close the newest open connection the way the service ends one on a fault."""
        conn = self._live[-1]
        conn.record.closed_with = (code, reason)
        await conn.ws.close(code, reason)

    # -- connections ----------------------------------------------------------------

    def _check_path(self, connection: ServerConnection, request: Request) -> Response | None:
        if PATH_RE.match(urlsplit(request.path).path):
            return None
        return connection.respond(HTTPStatus.NOT_FOUND, "Not Found\n")

    async def _serve(self, ws: ServerConnection) -> None:
        query = parse_qs(urlsplit(ws.request.path if ws.request else "").query)
        key = (query.get("key") or [None])[0]
        record = ConnectionRecord(number=len(self.connections), key=key)
        self.connections.append(record)
        self._notify()
        if key != self.api_key:
            record.closed_with = (1007, BAD_KEY_REASON)
            await ws.close(1007, BAD_KEY_REASON)
            return
        conn = _FakeConnection(self, ws, record)
        self._live.append(conn)
        try:
            await conn.run()
        finally:
            self._live.remove(conn)
            self._notify()

    def _new_handle(self, state: SessionState) -> str:
        self._handle_count += 1
        handle = f"handle-{self._handle_count}"
        self.handles[handle] = state.copy()
        return handle


class _FakeConnection:
    """One connection's protocol state machine."""

    def __init__(
        self, fake: FakeGeminiLive, ws: ServerConnection, record: ConnectionRecord
    ) -> None:
        self.fake = fake
        self.ws = ws
        self.record = record
        self.state = SessionState()
        self.index = -1  # local index of the last client message (setup = 0)
        self.inputs_after: list[int] = []  # len(state.inputs) after message i
        self.setup: dict[str, Any] = {}
        self.modality = "AUDIO"
        self.manual = False
        self.interrupts = True
        self.transparent = False
        self.history_open = False  # taking the initial history (clientContent only)
        self.tools: list[str] = []
        self.audio_messages = 0
        # activity
        self.in_speech = False
        self.quiet_ms = 0.0
        self.activity_open = False
        self.activity_text: list[str] = []
        # responses
        self.response: asyncio.Task[None] | None = None
        self.pending_tool: tuple[str, asyncio.Future[dict[str, Any]]] | None = None
        self.timers: list[asyncio.Task[None]] = []

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(message).encode())
        self.fake._notify()

    async def run(self) -> None:
        try:
            await self._setup()
            async for raw in self.ws:
                try:
                    msg = json.loads(raw)
                except json.JSONDecodeError:
                    raise _Refused(1007, INVALID_ARGUMENT) from None
                if not isinstance(msg, dict):
                    raise _Refused(1007, INVALID_ARGUMENT)
                await self._on_message(msg)
        except _Refused as exc:
            self.record.closed_with = (exc.code, exc.reason)
            await self._stop_tasks()
            await self.ws.close(exc.code, exc.reason)
        except ConnectionClosed:
            pass
        finally:
            await self._stop_tasks()

    async def _stop_tasks(self) -> None:
        tasks = [t for t in (self.response, *self.timers) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await task

    async def _setup(self) -> None:
        try:
            msg = json.loads(await self.ws.recv())
        except json.JSONDecodeError:
            raise _Refused(1007, INVALID_ARGUMENT) from None
        self.index = 0
        self.record.messages.append(msg)
        setup = msg.get("setup") if isinstance(msg, dict) else None
        if not isinstance(setup, dict) or len(msg) != 1:
            raise _Refused(1007, INVALID_ARGUMENT)
        unknown = set(setup) - SETUP_FIELDS
        if unknown:
            raise _Refused(
                1007, f"Invalid JSON payload received. Unknown name {sorted(unknown)[0]!r}"
            )
        if not str(setup.get("model", "")).startswith("models/"):
            raise _Refused(1008, "model is required and must look like models/...")
        self.record.setup = setup
        self.setup = setup
        modalities = setup.get("generationConfig", {}).get("responseModalities", ["AUDIO"])
        if modalities not in (["AUDIO"], ["TEXT"]):
            raise _Refused(1007, INVALID_ARGUMENT)
        self.modality = modalities[0]
        ric = setup.get("realtimeInputConfig", {})
        self.manual = bool(ric.get("automaticActivityDetection", {}).get("disabled", False))
        self.interrupts = ric.get("activityHandling", "START_OF_ACTIVITY_INTERRUPTS") != (
            "NO_INTERRUPTION"
        )
        resumption = setup.get("sessionResumption")
        self.transparent = bool(isinstance(resumption, dict) and resumption.get("transparent"))
        handle = resumption.get("handle") if isinstance(resumption, dict) else None
        if handle:
            if handle not in self.fake.handles:
                raise _Refused(1007, "Session resumption handle is invalid or expired.")
            self.state = self.fake.handles[handle].copy()
            self.record.resumed_from = handle
        history = setup.get("historyConfig")
        self.history_open = isinstance(history, dict) and bool(
            history.get("initialHistoryInClientContent")
        )
        self.fake.states.append(self.state)
        self.inputs_after.append(len(self.state.inputs))
        self.tools = [
            d["name"] for t in setup.get("tools", []) for d in t.get("functionDeclarations", [])
        ]
        await self.send({"setupComplete": {}})

    # -- client messages ------------------------------------------------------------

    async def _on_message(self, msg: dict[str, Any]) -> None:
        self.index += 1
        self.record.messages.append(msg)
        if len(msg) != 1:
            raise _Refused(1007, INVALID_ARGUMENT)
        if self.history_open and "clientContent" not in msg:
            raise _Refused(1007, INVALID_ARGUMENT)  # the initial history comes first
        if "realtimeInput" in msg:
            await self._on_realtime(msg["realtimeInput"])
        elif "toolResponse" in msg:
            self._on_tool_response(msg["toolResponse"])
        elif "clientContent" in msg:
            await self._on_client_content(msg["clientContent"])
        else:  # a second setup, or an unknown message
            raise _Refused(1007, INVALID_ARGUMENT)
        self.inputs_after.append(len(self.state.inputs))
        self.fake._notify()
        await self._after_message()

    async def _after_message(self) -> None:
        generating = self.response is not None and not self.response.done()
        if not generating and self.index % self.fake.resumption_every == 0:
            await self._resumption_update()
        if (
            self.fake.scenario == "go_away"
            and not self.fake._go_away_sent
            and self.audio_messages >= self.fake.go_away_after
        ):
            await self._go_away()

    async def _close_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self.record.closed_with = (1001, "going away")
        await self.ws.close(1001, "going away")

    async def _resumption_update(self, *, resumable: bool = True) -> None:
        resumable = resumable and self.fake.issue_handles
        update: dict[str, Any] = {"resumable": resumable, "newHandle": ""}
        if resumable:
            consumed = min(max(self.index - self.fake.consume_lag, 0), len(self.inputs_after) - 1)
            state = SessionState(self.state.inputs[: self.inputs_after[consumed]], self.state.turns)
            handle = self.fake._new_handle(state)
            self.record.handles.append(handle)
            update["newHandle"] = handle
            if self.transparent:
                update["lastConsumedClientMessageIndex"] = str(consumed)  # int64 -> string
        await self.send({"sessionResumptionUpdate": update})

    async def _on_realtime(self, ri: Any) -> None:
        if not isinstance(ri, dict) or not ri or set(ri) - REALTIME_FIELDS:
            raise _Refused(1007, INVALID_ARGUMENT)
        if "mediaChunks" in ri:
            raise _Refused(
                1007,
                "realtime_input.media_chunks is deprecated. Use audio, video, or text instead.",
            )
        if self.fake.scenario == "quota_exceeded" and not self.fake._quota_sent:
            self.fake._quota_sent = True
            raise _Refused(1011, QUOTA_REASON)
        if "activityStart" in ri:
            await self._activity_start()
        if "audio" in ri:
            await self._on_audio(ri["audio"])
        if "video" in ri:
            blob = ri["video"]
            if not isinstance(blob, dict) or not str(blob.get("mimeType", "")).startswith("image/"):
                raise _Refused(1007, INVALID_ARGUMENT)
            self.state.inputs.append(("video", _b64(blob.get("data"))))
        if "text" in ri:
            text = str(ri["text"])
            self.state.inputs.append(("text", text))
            if self.manual and self.activity_open:
                self.activity_text.append(text)
            else:
                await self._user_activity()
                self._start_response("text", text)
        if "audioStreamEnd" in ri:
            if self.manual:
                raise _Refused(1007, INVALID_ARGUMENT)
            if self.in_speech:
                self.in_speech = False
                self._start_response("audio", None)
        if "activityEnd" in ri:
            if not self.manual or not self.activity_open:
                raise _Refused(1007, INVALID_ARGUMENT)
            self.activity_open = False
            text = " ".join(self.activity_text)
            self.activity_text.clear()
            self._start_response("text" if text else "audio", text or None)

    async def _activity_start(self) -> None:
        if not self.manual or self.activity_open:
            raise _Refused(1007, INVALID_ARGUMENT)
        self.activity_open = True
        await self._user_activity()

    async def _on_audio(self, blob: Any) -> None:
        if not isinstance(blob, dict):
            raise _Refused(1007, INVALID_ARGUMENT)
        match = re.fullmatch(r"audio/pcm;rate=(\d+)", str(blob.get("mimeType", "")))
        if not match or int(match.group(1)) != self.fake.expected_rate:
            raise _Refused(1007, INVALID_ARGUMENT)
        pcm = _b64(blob.get("data"))
        if len(pcm) % 2:
            raise _Refused(1007, INVALID_ARGUMENT)
        self.audio_messages += 1
        self.state.inputs.append(("audio", pcm))
        if self.manual or not pcm:
            return
        samples = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
        rms = float(np.sqrt(np.mean(samples**2)))
        ms = len(pcm) / 2 / self.fake.expected_rate * 1000.0
        if rms >= self.fake.vad_threshold:
            self.quiet_ms = 0.0
            if not self.in_speech:
                self.in_speech = True
                await self._user_activity()
        elif self.in_speech:
            self.quiet_ms += ms
            if self.quiet_ms >= self.fake.silence_ms:
                self.in_speech = False
                self.quiet_ms = 0.0
                self._start_response("audio", None)

    async def _user_activity(self) -> None:
        """The user started an activity: barge in on a response, cancel a pending tool call."""
        if not self.interrupts:
            return
        if self.pending_tool is not None:
            call_id, future = self.pending_tool
            self.pending_tool = None
            future.cancel()
            await self.send({"toolCallCancellation": {"ids": [call_id]}})
        if self.response is not None and not self.response.done():
            self.response.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.response
            await self.send({"serverContent": {"interrupted": True}})

    async def _on_client_content(self, content: Any) -> None:
        if not isinstance(content, dict):
            raise _Refused(1007, INVALID_ARGUMENT)
        if self.history_open:
            # Initial history: user and model turns, no generation.
            for turn in content.get("turns", []):
                role = turn.get("role") if isinstance(turn, dict) else None
                if role not in ("user", "model"):
                    raise _Refused(1007, INVALID_ARGUMENT)
                text = "".join(str(p.get("text", "")) for p in turn.get("parts", []))
                self.state.inputs.append(("history", (role, text)))
            if content.get("turnComplete"):
                self.history_open = False
            return
        texts = [
            str(p["text"])
            for turn in content.get("turns", [])
            for p in turn.get("parts", [])
            if "text" in p
        ]
        for text in texts:
            self.state.inputs.append(("text", text))
        if content.get("turnComplete"):
            self._start_response("text", " ".join(texts))

    def _on_tool_response(self, body: Any) -> None:
        if not isinstance(body, dict):
            raise _Refused(1007, INVALID_ARGUMENT)
        for response in body.get("functionResponses", []):
            self.fake.tool_responses.append(response)
            self.state.inputs.append(("tool", response))
            if self.pending_tool is not None and response.get("id") == self.pending_tool[0]:
                _, future = self.pending_tool
                self.pending_tool = None
                if not future.done():
                    future.set_result(response.get("response") or {})

    # -- responses ------------------------------------------------------------------

    def _start_response(self, kind: str, text: str | None) -> None:
        previous = self.response
        self.response = asyncio.create_task(self._respond(kind, text, previous))

    async def _respond(
        self, kind: str, text: str | None, previous: asyncio.Task[None] | None
    ) -> None:
        if previous is not None and not previous.done():
            with contextlib.suppress(asyncio.CancelledError):
                await previous  # NO_INTERRUPTION: answer in order
        self.state.turns += 1
        turn = self.state.turns
        await self._resumption_update(resumable=False)
        if kind == "audio":
            await self.send(
                {"serverContent": {"inputTranscription": {"text": self.fake.user_transcript}}}
            )
            reply = self.fake.reply_text
        else:
            reply = f"You said: {text}"
        calling = self.fake.scenario in ("tool_call", "tool_loop") and self.tools
        n = 0
        while calling:
            # tool_call: one call per turn; tool_loop: a model that calls its tool again
            # after every result until one is an ``{"error": ...}`` object.
            n += 1
            call_id = f"call_{turn}" if n == 1 else f"call_{turn}_{n}"
            future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            self.pending_tool = (call_id, future)
            await self.send(
                {
                    "toolCall": {
                        "functionCalls": [
                            {"id": call_id, "name": self.tools[0], "args": self.fake.tool_args}
                        ]
                    }
                }
            )
            try:
                result = await future
            except asyncio.CancelledError:
                if future.cancelled():  # the user spoke instead of waiting
                    return
                raise
            reply = f"The tool said {json.dumps(result, sort_keys=True)}"
            calling = self.fake.scenario == "tool_loop" and "error" not in result
        await self._stream(reply)
        await self.send({"serverContent": {"generationComplete": True}})
        words = len(reply.split())
        await self.send(
            {
                "serverContent": {"turnComplete": True},
                "usageMetadata": {
                    "promptTokenCount": 10 * turn,
                    "responseTokenCount": words,
                    "totalTokenCount": 10 * turn + words,
                },
            }
        )
        await self._resumption_update()
        if self.fake.scenario == "go_away_after_answer" and not self.fake._go_away_sent:
            await self._go_away()

    async def _go_away(self) -> None:
        self.fake._go_away_sent = True
        left = self.fake.go_away_time_left_s
        await self.send({"goAway": {"timeLeft": f"{left:g}s"}})
        self.timers.append(asyncio.create_task(self._close_after(left)))

    async def _stream(self, reply: str) -> None:
        words = reply.split(" ")
        if self.modality == "TEXT":
            for i, word in enumerate(words):
                piece = word if i == len(words) - 1 else word + " "
                await self.send({"serverContent": {"modelTurn": {"parts": [{"text": piece}]}}})
                await asyncio.sleep(self.fake.pace_s)
            return
        sent_words = 0
        for i in range(self.fake.audio_chunks):
            await self._send_audio_chunk(i)
            if sent_words < len(words):
                piece = words[sent_words] + ("" if sent_words == len(words) - 1 else " ")
                sent_words += 1
                await self.send({"serverContent": {"outputTranscription": {"text": piece}}})
            await asyncio.sleep(self.fake.pace_s)
            if (
                self.fake.scenario == "drop_mid_response"
                and not self.fake._dropped
                and i + 1 >= self.fake.drop_after_chunks
            ):
                self.fake._dropped = True
                self.record.closed_with = (1006, "dropped")
                self.ws.transport.abort()  # no close frame: a network drop
                await asyncio.sleep(3600)  # cancelled when the connection ends
        rest = words[sent_words:]
        if rest:
            await self.send({"serverContent": {"outputTranscription": {"text": " ".join(rest)}}})
        if self.fake.hold_response:
            # A long answer: keep speaking until interrupted (bounded, so nothing hangs).
            for i in range(self.fake.audio_chunks, self.fake.audio_chunks + 2000):
                await asyncio.sleep(0.01)
                await self._send_audio_chunk(i)

    async def _send_audio_chunk(self, i: int) -> None:
        samples = OUTPUT_RATE * self.fake.audio_chunk_ms // 1000
        t = np.arange(i * samples, (i + 1) * samples) / OUTPUT_RATE
        pcm = (8000 * np.sin(2 * math.pi * 440 * t)).astype("<i2").tobytes()
        blob = {"mimeType": f"audio/pcm;rate={OUTPUT_RATE}", "data": base64.b64encode(pcm).decode()}
        await self.send({"serverContent": {"modelTurn": {"parts": [{"inlineData": blob}]}}})
        self.fake.audio_chunks_sent += 1


def _b64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise _Refused(1007, INVALID_ARGUMENT)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _Refused(1007, INVALID_ARGUMENT) from None
