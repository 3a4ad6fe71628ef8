"""A local fake of the OpenAI Realtime WebSocket API (GA protocol) for tests and benches.

It follows the public protocol: ``/v1/realtime?model=...`` with Bearer auth,
``session.created`` first, ``session.updated`` after a valid ``session.update``,
``event_``/``item_``/``resp_``/``call_`` ids, and ``error`` events (type
``invalid_request_error`` plus a code) for requests the real service refuses:
odd-length or undecodable PCM, a PCM rate other than 24000, unknown session
fields, committing < 100 ms, cancelling with no active response, a second
``response.create`` while one runs, truncating past the end of the audio.

Turn detection is simulated with an energy threshold on 20 ms frames. Replies
are scripted: a 440 Hz sine with a transcript (or text), a function call whose
arguments stream in several deltas (``tool_loop``: called again after every
result until one is an ``{"error": ...}`` object), a response that never ends until cancelled,
a dropped connection, an ``error`` event, a failed response.

Pick the scenario with the constructor, or per connection by putting
``[fake:<scenario>]`` in the session instructions. Every connection records the
parsed client events it received (``received``), the events it sent (``sent``)
and a ``timeline`` of ``(perf_counter, "in"|"out", type)`` so a benchmark can
separate the fake's own latency (``turn_latencies()``) from the relay's.

Only ``audio/pcm`` input is simulated; G.711 formats are accepted in the config
but their audio is not run through the VAD.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

SAMPLE_RATE = 24000
FRAME_MS = 20
FRAME_BYTES = SAMPLE_RATE * FRAME_MS // 1000 * 2
MIN_COMMIT_MS = 100.0

Scenario = Literal[
    "conversation", "long_response", "tool_call", "tool_loop", "drop", "error", "failed"
]
SCENARIOS: tuple[str, ...] = (
    "conversation",
    "long_response",
    "tool_call",
    "tool_loop",
    "drop",
    "error",
    "failed",
)
_SCENARIO_TAG = re.compile(r"\[fake:([a-z_]+)\]")
_DATA_URL = re.compile(r"^data:image/(png|jpeg);base64,(.+)$", re.DOTALL)

_SESSION_KEYS = frozenset(
    {
        "type",
        "model",
        "instructions",
        "output_modalities",
        "audio",
        "tools",
        "tool_choice",
        "max_output_tokens",
        "tracing",
        "truncation",
        "prompt",
        "include",
    }
)
_TURN_DETECTION_KEYS = {
    "server_vad": frozenset(
        {
            "type",
            "threshold",
            "prefix_padding_ms",
            "silence_duration_ms",
            "create_response",
            "interrupt_response",
            "idle_timeout_ms",
        }
    ),
    "semantic_vad": frozenset({"type", "eagerness", "create_response", "interrupt_response"}),
}
_AUDIO_TYPES = frozenset({"audio/pcm", "audio/pcmu", "audio/pcma"})
_BETA_NAMES = {
    "response.output_text.delta": "response.text.delta",
    "response.output_text.done": "response.text.done",
    "response.output_audio.delta": "response.audio.delta",
    "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
}
_CLIENT_EVENTS = (
    "session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
    "conversation.item.create",
    "conversation.item.delete",
    "conversation.item.truncate",
    "response.create",
    "response.cancel",
)
_SERVER_ERROR = {
    "type": "server_error",
    "code": "server_error",
    "message": "The server had an error while processing your request. Sorry about that!",
}


def new_id(prefix: str) -> str:
    """Ids shaped like OpenAI's (``event_...``, ``item_...``, ``resp_...``)."""
    return f"{prefix}_{uuid.uuid4().hex[:22]}"


def sine_pcm(duration_ms: int, *, start_sample: int = 0, freq: float = 440.0) -> bytes:
    """PCM16 mono 24 kHz sine, continuous across chunks via ``start_sample``."""
    n = SAMPLE_RATE * duration_ms // 1000
    t = (np.arange(n) + start_sample) / SAMPLE_RATE
    return (np.sin(2 * math.pi * freq * t) * 0.3 * 32767).astype("<i2").tobytes()


class RealtimeAPIError(Exception):
    """A client event the real service would refuse; becomes an ``error`` event."""

    def __init__(
        self,
        message: str,
        *,
        code: str | None,
        param: str | None = None,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.body = {"type": type_, "code": code, "message": message, "param": param}


def _invalid_audio() -> RealtimeAPIError:
    return RealtimeAPIError(
        "Invalid 'audio'. Expected base64-encoded audio bytes (mono PCM16 at 24kHz) "
        "but got an invalid value.",
        code="invalid_value",
        param="audio",
    )


def _http_error(status: HTTPStatus, error: dict[str, Any]) -> Response:
    body = json.dumps({"error": error}).encode()
    headers = Headers({"Content-Type": "application/json", "Content-Length": str(len(body))})
    return Response(status.value, status.phrase, headers, body)


def _deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def default_session(model: str) -> dict[str, Any]:
    """The session the service reports in ``session.created`` (GA defaults)."""
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": new_id("sess"),
        "model": model,
        "output_modalities": ["audio"],
        "instructions": "You are a helpful assistant.",
        "tools": [],
        "tool_choice": "auto",
        "max_output_tokens": "inf",
        "tracing": None,
        "truncation": "auto",
        "prompt": None,
        "expires_at": int(time.time()) + 3600,
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": SAMPLE_RATE},
                "transcription": None,
                "noise_reduction": None,
                "turn_detection": {
                    "type": "server_vad",
                    "threshold": 0.5,
                    "prefix_padding_ms": 300,
                    "silence_duration_ms": 200,
                    "idle_timeout_ms": None,
                    "create_response": True,
                    "interrupt_response": True,
                },
            },
            "output": {
                "format": {"type": "audio/pcm", "rate": SAMPLE_RATE},
                "voice": "marin",
                "speed": 1.0,
            },
        },
        "include": None,
    }


def validate_session(session: dict[str, Any]) -> None:
    """Refuse what the real service refuses in ``session.update`` (the parts we model)."""
    if "type" not in session:
        raise RealtimeAPIError(
            "Missing required parameter: 'session.type'.",
            code="missing_required_parameter",
            param="session.type",
        )
    if session["type"] != "realtime":
        raise RealtimeAPIError(
            f"Invalid value: '{session['type']}'. This fake supports only 'realtime'.",
            code="invalid_value",
            param="session.type",
        )
    for key in session:
        if key not in _SESSION_KEYS:
            raise RealtimeAPIError(
                f"Unknown parameter: 'session.{key}'.",
                code="unknown_parameter",
                param=f"session.{key}",
            )
    modalities = session.get("output_modalities")
    if modalities is not None and modalities not in (["audio"], ["text"]):
        raise RealtimeAPIError(
            f"Invalid value: {modalities!r}. Supported values are: ['audio'] and ['text'].",
            code="invalid_value",
            param="session.output_modalities",
        )
    audio = session.get("audio") or {}
    for direction in ("input", "output"):
        fmt = (audio.get(direction) or {}).get("format")
        if fmt is None:
            continue
        param = f"session.audio.{direction}.format"
        if fmt.get("type") not in _AUDIO_TYPES:
            raise RealtimeAPIError(
                f"Invalid value: '{fmt.get('type')}'. Supported values are: "
                "'audio/pcm', 'audio/pcmu', and 'audio/pcma'.",
                code="invalid_value",
                param=f"{param}.type",
            )
        if fmt["type"] == "audio/pcm":
            if "rate" not in fmt:
                raise RealtimeAPIError(
                    f"Missing required parameter: '{param}.rate'.",
                    code="missing_required_parameter",
                    param=f"{param}.rate",
                )
            if fmt["rate"] != SAMPLE_RATE:
                raise RealtimeAPIError(
                    f"Invalid value: {fmt['rate']}. Supported values are: {SAMPLE_RATE}.",
                    code="invalid_value",
                    param=f"{param}.rate",
                )
    speed = (audio.get("output") or {}).get("speed")
    if speed is not None and not 0.25 <= speed <= 1.5:
        above = speed > 1.5
        raise RealtimeAPIError(
            "Invalid 'session.audio.output.speed': decimal "
            + (
                "above maximum value. Expected a value <= 1.5"
                if above
                else "below minimum value. Expected a value >= 0.25"
            )
            + f", but got {speed} instead.",
            code="decimal_above_max_value" if above else "decimal_below_min_value",
            param="session.audio.output.speed",
        )
    td_key = "turn_detection"
    if td_key in (audio.get("input") or {}):
        td = audio["input"][td_key]
        if td is not None:
            kind = td.get("type")
            if kind not in _TURN_DETECTION_KEYS:
                raise RealtimeAPIError(
                    f"Invalid value: '{kind}'. Supported values are: 'server_vad' and "
                    "'semantic_vad'.",
                    code="invalid_value",
                    param="session.audio.input.turn_detection.type",
                )
            for key in td:
                if key not in _TURN_DETECTION_KEYS[kind]:
                    raise RealtimeAPIError(
                        f"Unknown parameter: 'session.audio.input.turn_detection.{key}'.",
                        code="unknown_parameter",
                        param=f"session.audio.input.turn_detection.{key}",
                    )
    for i, tool in enumerate(session.get("tools") or []):
        if tool.get("type") != "function" or not tool.get("name"):
            raise RealtimeAPIError(
                "Each tool needs type 'function' and a name.",
                code="invalid_value",
                param=f"session.tools[{i}]",
            )


@dataclass
class FakeConnection:
    """What one client connection did; tests assert on ``received``."""

    index: int
    path: str
    model: str
    headers: dict[str, str]
    scenario: str
    received: list[dict[str, Any]] = field(default_factory=list)
    sent: list[dict[str, Any]] = field(default_factory=list)
    timeline: list[tuple[float, str, str]] = field(default_factory=list)
    session: dict[str, Any] = field(default_factory=dict)
    closed: bool = False
    ws: ServerConnection | None = field(default=None, repr=False)

    def received_of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.received if e.get("type") == kind]

    def sent_of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.sent if e.get("type") == kind]

    def received_types(self) -> list[str]:
        return [str(e.get("type")) for e in self.received]


@dataclass
class _Response:
    id: str
    trigger_at: float
    first_delta_at: float | None = None
    item_id: str | None = None
    reason: str | None = None
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    def cancel(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            self.cancelled.set()


class FakeOpenAIRealtime:
    """The fake service; use as ``async with FakeOpenAIRealtime(...) as fake``."""

    def __init__(
        self,
        *,
        api_key: str = "sk-test-duplex-fake",
        scenario: Scenario = "conversation",
        transcript: str = "What is the weather in Paris?",
        reply_text: str = "It is sunny in Paris today.",
        reply_audio_ms: int = 600,
        chunk_ms: int = 100,
        chunk_interval: float = 0.0,
        response_delay: float = 0.0,
        speech_level: float = 0.02,
        tool_name: str = "get_weather",
        tool_arguments: str = '{"city": "Paris", "unit": "celsius"}',
        tool_argument_deltas: int = 4,
        drop_after_chunks: int = 2,
        reject_after_drop: int = 0,
        error: dict[str, Any] | None = None,
        error_count: int = 1,
        auth_failure: Literal["handshake", "event"] = "handshake",
        event_names: Literal["ga", "beta"] = "ga",
        host: str = "127.0.0.1",
    ) -> None:
        if scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {scenario!r}")
        self.api_key = api_key
        self.scenario = scenario
        self.transcript = transcript
        self.reply_text = reply_text
        self.reply_audio_ms = reply_audio_ms
        self.chunk_ms = chunk_ms
        self.chunk_interval = chunk_interval
        self.response_delay = response_delay
        self.speech_level = speech_level
        self.tool_name = tool_name
        self.tool_arguments = tool_arguments
        self.tool_argument_deltas = tool_argument_deltas
        self.drop_after_chunks = drop_after_chunks
        self.reject_after_drop = reject_after_drop
        self.error = dict(error or _SERVER_ERROR)
        self.auth_failure = auth_failure
        self.event_names = event_names
        self.host = host
        self.connections: list[FakeConnection] = []
        self.rejected_handshakes: list[tuple[int, str]] = []
        self.responses: list[_Response] = []
        self._errors_left = error_count
        self._drops_left = 1
        self._rejects_left = 0
        self._server: Server | None = None
        self._changed = asyncio.Condition()

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> FakeOpenAIRealtime:
        self._server = await serve(
            self._handle,
            self.host,
            0,
            process_request=self._check_request,
            max_size=16 * 2**20,
        )
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FakeOpenAIRealtime:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return int(next(iter(self._server.sockets)).getsockname()[1])

    @property
    def base_url(self) -> str:
        """What to pass as a provider's ``base_url`` or the SDK's ``websocket_base_url``."""
        return f"ws://{self.host}:{self.port}/v1"

    # -- waiting and measuring -----------------------------------------------------------

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait until ``predicate()`` holds; re-checked whenever the fake sees traffic."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(predicate)

    async def wait_received(
        self, kind: str, *, count: int = 1, connection: int = -1, timeout: float = 5.0
    ) -> dict[str, Any]:
        """The ``count``-th client event of ``kind`` on a connection, once it has arrived."""

        def arrived() -> bool:
            conns = self.connections
            return bool(conns) and len(conns[connection].received_of(kind)) >= count

        await self.wait_for(arrived, timeout)
        return self.connections[connection].received_of(kind)[count - 1]

    def turn_latencies(self) -> list[float]:
        """Seconds from each turn's end (VAD stop or ``response.create``) to its first delta.

        This is the fake's own share of a round trip; a relay benchmark subtracts
        it from what its client measured.
        """
        return [r.first_delta_at - r.trigger_at for r in self.responses if r.first_delta_at]

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- handshake -----------------------------------------------------------------------

    def _check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if url.path.rstrip("/") != "/v1/realtime":
            self.rejected_handshakes.append((404, request.path))
            return _http_error(
                HTTPStatus.NOT_FOUND,
                {
                    "message": f"Invalid URL (GET {url.path})",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                },
            )
        auth = request.headers.get("Authorization")
        if auth is None and self.auth_failure == "handshake":
            self.rejected_handshakes.append((401, request.path))
            return _http_error(
                HTTPStatus.UNAUTHORIZED,
                {
                    "message": "You didn't provide an API key. You need to provide your API key "
                    "in an Authorization header using Bearer auth (i.e. Authorization: Bearer "
                    "YOUR_KEY).",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                },
            )
        if auth != f"Bearer {self.api_key}" and self.auth_failure == "handshake":
            self.rejected_handshakes.append((401, request.path))
            return _http_error(HTTPStatus.UNAUTHORIZED, self._invalid_key_error(auth))
        if not parse_qs(url.query).get("model"):
            self.rejected_handshakes.append((400, request.path))
            return _http_error(
                HTTPStatus.BAD_REQUEST,
                {
                    "message": "Missing required parameter: 'model'.",
                    "type": "invalid_request_error",
                    "param": "model",
                    "code": "missing_required_parameter",
                },
            )
        if self._rejects_left > 0:
            self._rejects_left -= 1
            self.rejected_handshakes.append((503, request.path))
            return _http_error(
                HTTPStatus.SERVICE_UNAVAILABLE,
                {
                    "message": "The server is overloaded or not ready yet.",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                },
            )
        return None

    @staticmethod
    def _invalid_key_error(auth: str | None) -> dict[str, Any]:
        key = (auth or "").removeprefix("Bearer ")
        shown = f"{key[:3]}*********{key[-4:]}" if len(key) > 8 else key
        return {
            "message": f"Incorrect API key provided: {shown}. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }

    # -- connections -------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        url = urlsplit(ws.request.path)
        model = parse_qs(url.query)["model"][0]
        conn = FakeConnection(
            index=len(self.connections),
            path=ws.request.path,
            model=model,
            headers={k.lower(): v for k, v in ws.request.headers.raw_items()},
            scenario=self.scenario,
            session=default_session(model),
            ws=ws,
        )
        self.connections.append(conn)
        try:
            await _FakeSession(self, conn, ws).run()
        finally:
            conn.closed = True
            await self._notify()

    def drop_current(self) -> None:
        """Cut the newest connection without a close frame, as a network failure does."""
        ws = self.connections[-1].ws
        assert ws is not None
        ws.transport.abort()

    def _take_error(self) -> bool:
        if self._errors_left > 0:
            self._errors_left -= 1
            return True
        return False

    def _take_drop(self) -> bool:
        if self._drops_left > 0:
            self._drops_left -= 1
            self._rejects_left = self.reject_after_drop
            return True
        return False


class _FakeSession:
    """Protocol state of one connection: audio buffer, VAD, items, the active response."""

    def __init__(self, fake: FakeOpenAIRealtime, conn: FakeConnection, ws: ServerConnection):
        self.fake = fake
        self.conn = conn
        self.ws = ws
        self.buffer = bytearray()
        self.items: list[dict[str, Any]] = []
        self.audio_ms: dict[str, int] = {}
        self.response: _Response | None = None
        self.tasks: asyncio.TaskGroup | None = None
        self.response_tasks: set[asyncio.Task[None]] = set()
        self.vad_rest = b""
        self.vad_pos_ms = 0
        self.speaking = False
        self.silence_ms = 0
        self.speech_item: str | None = None
        self.dropped = False

    async def run(self) -> None:
        auth = self.ws.request.headers.get("Authorization") if self.ws.request else None
        if auth != f"Bearer {self.fake.api_key}":
            # Post-handshake auth failure, as the service has done for unknown keys.
            await self.send({"type": "error", "error": self.fake._invalid_key_error(auth)})
            await self.ws.close(1008, "invalid_api_key")
            return
        await self.send({"type": "session.created", "session": self.conn.session})
        async with asyncio.TaskGroup() as tasks:
            self.tasks = tasks
            try:
                async for raw in self.ws:
                    await self.on_message(raw)
            except ConnectionClosed:
                pass
            finally:
                # The socket is gone: stop scripted output instead of finishing it.
                for task in self.response_tasks:
                    task.cancel()

    # -- io ----------------------------------------------------------------------------

    async def send(self, event: dict[str, Any]) -> None:
        event = {"event_id": new_id("event"), **event}
        if self.fake.event_names == "beta":
            event["type"] = _BETA_NAMES.get(event["type"], event["type"])
        await self.ws.send(json.dumps(event))
        self.conn.sent.append(event)
        self.conn.timeline.append((time.perf_counter(), "out", event["type"]))

    async def send_error(self, error: dict[str, Any], client_event_id: str | None) -> None:
        await self.send({"type": "error", "error": {**error, "event_id": client_event_id}})

    async def on_message(self, raw: str | bytes) -> None:
        try:
            event = json.loads(raw)
        except ValueError:
            self.conn.received.append({"type": None, "raw": raw})
            await self.send_error(
                {
                    "type": "invalid_request_error",
                    "code": "invalid_json",
                    "message": "The server could not parse the JSON body of your message.",
                    "param": None,
                },
                None,
            )
            return
        if not isinstance(event, dict):
            event = {"type": None, "raw": event}
        self.conn.received.append(event)
        self.conn.timeline.append((time.perf_counter(), "in", str(event.get("type"))))
        try:
            handler = {
                "session.update": self.on_session_update,
                "input_audio_buffer.append": self.on_append,
                "input_audio_buffer.commit": self.on_commit,
                "input_audio_buffer.clear": self.on_clear,
                "conversation.item.create": self.on_item_create,
                "conversation.item.delete": self.on_item_delete,
                "conversation.item.truncate": self.on_truncate,
                "response.create": self.on_response_create,
                "response.cancel": self.on_response_cancel,
            }.get(str(event.get("type")))
            if handler is None:
                raise RealtimeAPIError(
                    f"Invalid value: '{event.get('type')}'. Supported values are: "
                    + ", ".join(f"'{t}'" for t in _CLIENT_EVENTS)
                    + ".",
                    code="invalid_value",
                    param="type",
                )
            await handler(event)
        except RealtimeAPIError as exc:
            await self.send_error(exc.body, event.get("event_id"))
        finally:
            await self.fake._notify()

    # -- session -----------------------------------------------------------------------

    async def on_session_update(self, event: dict[str, Any]) -> None:
        session = event.get("session")
        if not isinstance(session, dict):
            raise RealtimeAPIError(
                "Missing required parameter: 'session'.",
                code="missing_required_parameter",
                param="session",
            )
        validate_session(session)
        self.conn.session = _deep_merge(self.conn.session, session)
        if "tools" in session:
            self.conn.session["tools"] = session["tools"]
        tag = _SCENARIO_TAG.search(str(session.get("instructions") or ""))
        if tag and tag.group(1) in SCENARIOS:
            self.conn.scenario = tag.group(1)
        await self.send({"type": "session.updated", "session": self.conn.session})

    def turn_detection(self) -> dict[str, Any] | None:
        return self.conn.session["audio"]["input"].get("turn_detection")

    def input_is_pcm(self) -> bool:
        return self.conn.session["audio"]["input"]["format"].get("type") == "audio/pcm"

    # -- input audio -------------------------------------------------------------------

    async def on_append(self, event: dict[str, Any]) -> None:
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise _invalid_audio()
        try:
            pcm = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise _invalid_audio() from None
        if self.input_is_pcm() and len(pcm) % 2:
            raise _invalid_audio()
        self.buffer += pcm
        if self.input_is_pcm() and self.turn_detection() is not None:
            await self.run_vad(pcm)

    async def run_vad(self, pcm: bytes) -> None:
        td = self.turn_detection() or {}
        semantic = td.get("type") == "semantic_vad"
        padding = 300 if semantic else int(td.get("prefix_padding_ms", 300))
        silence_needed = 500 if semantic else int(td.get("silence_duration_ms", 500))
        data = self.vad_rest + pcm
        frames = len(data) // FRAME_BYTES
        for i in range(frames):
            frame = np.frombuffer(data[i * FRAME_BYTES : (i + 1) * FRAME_BYTES], dtype="<i2")
            start_ms = self.vad_pos_ms
            self.vad_pos_ms += FRAME_MS
            rms = float(np.sqrt(np.mean(frame.astype(np.float64) ** 2))) / 32768.0
            loud = rms >= self.fake.speech_level
            if not self.speaking:
                if loud:
                    self.speaking = True
                    self.silence_ms = 0
                    self.speech_item = new_id("item")
                    await self.send(
                        {
                            "type": "input_audio_buffer.speech_started",
                            "audio_start_ms": max(0, start_ms - padding),
                            "item_id": self.speech_item,
                        }
                    )
                    if td.get("interrupt_response", True) and self.response is not None:
                        self.response.cancel("turn_detected")
            elif loud:
                self.silence_ms = 0
            else:
                self.silence_ms += FRAME_MS
                if self.silence_ms >= silence_needed:
                    self.speaking = False
                    item_id = self.speech_item or new_id("item")
                    await self.send(
                        {
                            "type": "input_audio_buffer.speech_stopped",
                            "audio_end_ms": start_ms + FRAME_MS,
                            "item_id": item_id,
                        }
                    )
                    await self.commit(item_id)
                    if td.get("create_response", True):
                        await self.start_response()
        self.vad_rest = data[frames * FRAME_BYTES :]

    async def commit(self, item_id: str) -> None:
        previous = self.items[-1]["id"] if self.items else None
        seconds = len(self.buffer) / 2 / SAMPLE_RATE
        self.buffer.clear()
        item = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "role": "user",
            "status": "completed",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        self.items.append(item)
        await self.send(
            {
                "type": "input_audio_buffer.committed",
                "item_id": item_id,
                "previous_item_id": previous,
            }
        )
        await self.send(
            {"type": "conversation.item.created", "previous_item_id": previous, "item": item}
        )
        if self.conn.session["audio"]["input"].get("transcription"):
            text = self.fake.transcript
            half = len(text) // 2
            for piece in (text[:half], text[half:]):
                await self.send(
                    {
                        "type": "conversation.item.input_audio_transcription.delta",
                        "item_id": item_id,
                        "content_index": 0,
                        "delta": piece,
                    }
                )
            await self.send(
                {
                    "type": "conversation.item.input_audio_transcription.completed",
                    "item_id": item_id,
                    "content_index": 0,
                    "transcript": text,
                    "usage": {"type": "duration", "seconds": round(seconds, 3)},
                }
            )

    async def on_commit(self, event: dict[str, Any]) -> None:
        ms = len(self.buffer) / 2 / SAMPLE_RATE * 1000
        if ms < MIN_COMMIT_MS:
            raise RealtimeAPIError(
                "Error committing input audio buffer: buffer too small. Expected at least "
                f"100ms of audio, but buffer only has {ms:.2f}ms of audio.",
                code="input_audio_buffer_commit_empty",
            )
        item_id = self.speech_item if self.speaking and self.speech_item else new_id("item")
        self.speaking = False
        await self.commit(item_id)

    async def on_clear(self, event: dict[str, Any]) -> None:
        self.buffer.clear()
        self.vad_rest = b""
        await self.send({"type": "input_audio_buffer.cleared"})

    # -- conversation ------------------------------------------------------------------

    async def on_item_create(self, event: dict[str, Any]) -> None:
        item = event.get("item")
        if not isinstance(item, dict):
            raise RealtimeAPIError(
                "Missing required parameter: 'item'.",
                code="missing_required_parameter",
                param="item",
            )
        kind = item.get("type")
        if kind == "message":
            self.check_message(item)
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str) or not isinstance(item.get("output"), str):
                raise RealtimeAPIError(
                    "function_call_output items need a string 'call_id' and 'output'.",
                    code="invalid_value",
                    param="item",
                )
        elif kind == "function_call":
            if not item.get("name") or not isinstance(item.get("arguments"), str):
                raise RealtimeAPIError(
                    "function_call items need 'name' and string 'arguments'.",
                    code="invalid_value",
                    param="item",
                )
        else:
            raise RealtimeAPIError(
                f"Invalid value: '{kind}'. Supported values are: 'message', 'function_call', "
                "and 'function_call_output'.",
                code="invalid_value",
                param="item.type",
            )
        previous = self.items[-1]["id"] if self.items else None
        stored = {
            **item,
            "id": item.get("id") or new_id("item"),
            "object": "realtime.item",
            "status": "completed",
        }
        self.items.append(stored)
        await self.send(
            {"type": "conversation.item.created", "previous_item_id": previous, "item": stored}
        )

    @staticmethod
    def check_message(item: dict[str, Any]) -> None:
        allowed = {
            "user": {"input_text", "input_audio", "input_image"},
            "system": {"input_text"},
            "assistant": {"output_text", "output_audio"},
        }
        role = item.get("role")
        if role not in allowed:
            raise RealtimeAPIError(
                f"Invalid value: '{role}'. Supported values are: 'user', 'system', and "
                "'assistant'.",
                code="invalid_value",
                param="item.role",
            )
        content = item.get("content")
        if not isinstance(content, list) or not content:
            raise RealtimeAPIError(
                "Missing required parameter: 'item.content'.",
                code="missing_required_parameter",
                param="item.content",
            )
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in allowed[role]:
                raise RealtimeAPIError(
                    f"Invalid value: '{kind}'. Supported values are: "
                    + ", ".join(f"'{k}'" for k in sorted(allowed[role]))
                    + ".",
                    code="invalid_value",
                    param=f"item.content[{i}].type",
                )
            if kind == "input_image":
                match = _DATA_URL.match(str(part.get("image_url") or ""))
                try:
                    ok = match is not None and bool(base64.b64decode(match.group(2), validate=True))
                except (binascii.Error, ValueError):
                    ok = False
                if not ok:
                    raise RealtimeAPIError(
                        "Invalid 'image_url'. Expected a base64-encoded data URL with an "
                        "image/png or image/jpeg MIME type.",
                        code="invalid_value",
                        param=f"item.content[{i}].image_url",
                    )

    async def on_item_delete(self, event: dict[str, Any]) -> None:
        item_id = event.get("item_id")
        for i, item in enumerate(self.items):
            if item["id"] == item_id:
                del self.items[i]
                await self.send({"type": "conversation.item.deleted", "item_id": item_id})
                return
        raise RealtimeAPIError(
            f"Conversation item '{item_id}' not found.", code="invalid_value", param="item_id"
        )

    async def on_truncate(self, event: dict[str, Any]) -> None:
        for key in ("item_id", "content_index", "audio_end_ms"):
            if key not in event:
                raise RealtimeAPIError(
                    f"Missing required parameter: '{key}'.",
                    code="missing_required_parameter",
                    param=key,
                )
        item_id, end_ms = event["item_id"], event["audio_end_ms"]
        item = next((i for i in self.items if i["id"] == item_id), None)
        if item is None or item_id not in self.audio_ms:
            raise RealtimeAPIError(
                f"Only assistant messages with audio can be truncated; '{item_id}' is not one.",
                code="invalid_value",
                param="item_id",
            )
        if event["content_index"] != 0:
            raise RealtimeAPIError(
                "Invalid 'content_index': this item has a single audio part at index 0.",
                code="invalid_value",
                param="content_index",
            )
        if not isinstance(end_ms, int) or isinstance(end_ms, bool) or end_ms < 0:
            raise RealtimeAPIError(
                "Invalid 'audio_end_ms': expected a non-negative integer.",
                code="invalid_value",
                param="audio_end_ms",
            )
        if end_ms > self.audio_ms[item_id]:
            raise RealtimeAPIError(
                f"Audio content of {self.audio_ms[item_id]}ms is already shorter than {end_ms}ms",
                code="invalid_value",
                param="audio_end_ms",
            )
        item["content"] = [{"type": "output_audio", "transcript": ""}]
        await self.send(
            {
                "type": "conversation.item.truncated",
                "item_id": item_id,
                "content_index": 0,
                "audio_end_ms": end_ms,
            }
        )

    # -- responses ---------------------------------------------------------------------

    async def on_response_create(self, event: dict[str, Any]) -> None:
        if self.response is not None:
            raise RealtimeAPIError(
                f"Conversation already has an active response in progress: {self.response.id}. "
                "Wait until the response is finished before creating a new one.",
                code="conversation_already_has_active_response",
            )
        if self.conn.scenario == "error" and self.fake._take_error():
            await self.send_error(self.fake.error, event.get("event_id"))
            return
        await self.start_response()

    async def on_response_cancel(self, event: dict[str, Any]) -> None:
        wanted = event.get("response_id")
        if self.response is None or (wanted and wanted != self.response.id):
            raise RealtimeAPIError(
                "Cancellation failed: no active response found",
                code="response_cancel_not_active",
            )
        self.response.cancel("client_cancelled")

    async def start_response(self) -> None:
        assert self.tasks is not None
        response = _Response(id=new_id("resp"), trigger_at=time.perf_counter())
        self.response = response
        self.fake.responses.append(response)
        task = self.tasks.create_task(self.respond(response))
        self.response_tasks.add(task)
        task.add_done_callback(self.response_tasks.discard)

    async def respond(self, r: _Response) -> None:
        try:
            if self.fake.response_delay:
                await asyncio.sleep(self.fake.response_delay)
            last = self.items[-1] if self.items else {}
            scenario = self.conn.scenario
            if scenario == "failed":
                await self.failed_response(r)
            elif scenario == "tool_call" and last.get("type") != "function_call_output":
                await self.function_call_response(r)
            elif scenario == "tool_loop" and not _is_error_output(last):
                # A model that calls its tool again after every result, until one fails.
                await self.function_call_response(r)
            else:
                text = self.fake.reply_text
                if last.get("type") == "function_call_output":
                    text = f"{text} The tool said: {last['output']}"
                await self.message_response(r, text)
        except ConnectionClosed:
            pass
        finally:
            if self.response is r:
                self.response = None
            await self.fake._notify()

    def response_object(
        self, r: _Response, status: str, output: list[dict[str, Any]], details: Any = None
    ) -> dict[str, Any]:
        done = status != "in_progress"
        out_tokens = 12 * len(output)
        return {
            "object": "realtime.response",
            "id": r.id,
            "status": status,
            "status_details": details,
            "output": output,
            "conversation_id": "conv_" + self.conn.session["id"][5:],
            "output_modalities": self.conn.session.get("output_modalities", ["audio"]),
            "max_output_tokens": self.conn.session.get("max_output_tokens", "inf"),
            "audio": {"output": self.conn.session["audio"]["output"]},
            "metadata": None,
            "usage": {
                "total_tokens": 100 + out_tokens,
                "input_tokens": 100,
                "output_tokens": out_tokens,
                "input_token_details": {"text_tokens": 40, "audio_tokens": 60, "cached_tokens": 0},
                "output_token_details": {"text_tokens": out_tokens // 3, "audio_tokens": 0},
            }
            if done
            else None,
        }

    async def begin(self, r: _Response, item: dict[str, Any]) -> None:
        previous = self.items[-1]["id"] if self.items else None
        self.items.append(item)
        await self.send(
            {"type": "response.created", "response": self.response_object(r, "in_progress", [])}
        )
        await self.send(
            {
                "type": "rate_limits.updated",
                "rate_limits": [
                    {"name": "requests", "limit": 5000, "remaining": 4999, "reset_seconds": 0.01},
                    {"name": "tokens", "limit": 400000, "remaining": 399000, "reset_seconds": 0.2},
                ],
            }
        )
        await self.send(
            {
                "type": "response.output_item.added",
                "response_id": r.id,
                "output_index": 0,
                "item": item,
            }
        )
        await self.send(
            {"type": "conversation.item.created", "previous_item_id": previous, "item": item}
        )

    async def pace(self) -> None:
        await asyncio.sleep(self.fake.chunk_interval)

    def mark_delta(self, r: _Response) -> None:
        if r.first_delta_at is None:
            r.first_delta_at = time.perf_counter()

    async def message_response(self, r: _Response, text: str) -> None:
        audio = self.conn.session.get("output_modalities", ["audio"]) == ["audio"]
        item_id = new_id("item")
        r.item_id = item_id
        item: dict[str, Any] = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "role": "assistant",
            "status": "in_progress",
            "content": [],
        }
        await self.begin(r, item)
        ids = {"response_id": r.id, "item_id": item_id, "output_index": 0, "content_index": 0}
        part = {"type": "audio", "transcript": ""} if audio else {"type": "text", "text": ""}
        await self.send({"type": "response.content_part.added", **ids, "part": part})
        n = max(1, self.fake.reply_audio_ms // self.fake.chunk_ms) if audio else 4
        words = text.split(" ")
        pieces = [
            " ".join(words[i * len(words) // n : (i + 1) * len(words) // n]) for i in range(n)
        ]
        said = ""
        if audio:
            self.audio_ms[item_id] = 0
        for i, piece in enumerate(pieces):
            if r.cancelled.is_set():
                break
            if self.conn.scenario == "drop" and i == self.fake.drop_after_chunks:
                if self.fake._take_drop():
                    self.ws.transport.abort()  # no close frame: a network failure
                    return
            delta = (" " if said and piece else "") + piece
            said += delta
            self.mark_delta(r)
            if audio:
                pcm = sine_pcm(
                    self.fake.chunk_ms, start_sample=i * SAMPLE_RATE * self.fake.chunk_ms // 1000
                )
                await self.send(
                    {
                        "type": "response.output_audio.delta",
                        **ids,
                        "delta": base64.b64encode(pcm).decode("ascii"),
                    }
                )
                self.audio_ms[item_id] += self.fake.chunk_ms
                await self.send(
                    {"type": "response.output_audio_transcript.delta", **ids, "delta": delta}
                )
            else:
                await self.send({"type": "response.output_text.delta", **ids, "delta": delta})
            await self.pace()
        if self.conn.scenario == "long_response":
            await r.cancelled.wait()
        if audio:
            await self.send({"type": "response.output_audio.done", **ids})
            await self.send(
                {"type": "response.output_audio_transcript.done", **ids, "transcript": said}
            )
            content = {"type": "output_audio", "transcript": said}
        else:
            await self.send({"type": "response.output_text.done", **ids, "text": said})
            content = {"type": "output_text", "text": said}
        part = {"type": "audio", "transcript": said} if audio else {"type": "text", "text": said}
        await self.send({"type": "response.content_part.done", **ids, "part": part})
        status = "cancelled" if r.reason else "completed"
        item.update(status="incomplete" if r.reason else "completed", content=[content])
        await self.send(
            {
                "type": "response.output_item.done",
                "response_id": r.id,
                "output_index": 0,
                "item": item,
            }
        )
        details = {"type": "cancelled", "reason": r.reason} if r.reason else None
        await self.send(
            {"type": "response.done", "response": self.response_object(r, status, [item], details)}
        )

    async def function_call_response(self, r: _Response) -> None:
        call_id, item_id = new_id("call"), new_id("item")
        item: dict[str, Any] = {
            "id": item_id,
            "object": "realtime.item",
            "type": "function_call",
            "status": "in_progress",
            "name": self.fake.tool_name,
            "call_id": call_id,
            "arguments": "",
        }
        await self.begin(r, item)
        args = self.fake.tool_arguments
        n = max(1, self.fake.tool_argument_deltas)
        ids = {"response_id": r.id, "item_id": item_id, "output_index": 0, "call_id": call_id}
        for i in range(n):
            piece = args[i * len(args) // n : (i + 1) * len(args) // n]
            self.mark_delta(r)
            await self.send(
                {"type": "response.function_call_arguments.delta", **ids, "delta": piece}
            )
            await self.pace()
        await self.send(
            {
                "type": "response.function_call_arguments.done",
                **ids,
                "name": self.fake.tool_name,
                "arguments": args,
            }
        )
        item.update(status="completed", arguments=args)
        await self.send(
            {
                "type": "response.output_item.done",
                "response_id": r.id,
                "output_index": 0,
                "item": item,
            }
        )
        await self.send(
            {"type": "response.done", "response": self.response_object(r, "completed", [item])}
        )

    async def failed_response(self, r: _Response) -> None:
        await self.send(
            {"type": "response.created", "response": self.response_object(r, "in_progress", [])}
        )
        details = {"type": "failed", "error": dict(self.fake.error)}
        await self.send(
            {"type": "response.done", "response": self.response_object(r, "failed", [], details)}
        )


def _is_error_output(item: dict[str, Any]) -> bool:
    """A ``function_call_output`` whose output is a JSON object with an ``error``."""
    if item.get("type") != "function_call_output":
        return False
    try:
        value = json.loads(item.get("output") or "")
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and "error" in value
