"""Gemini Live (``BidiGenerateContent`` over WebSocket): a realtime provider for ASM
(Audio Streaming Model) mode.

One :class:`GeminiLiveSession` is one Gemini *session*, which may span several
WebSocket *connections*: the service ends every connection after about ten
minutes (announced by ``goAway``) and networks drop, so the session resumes
with the latest ``sessionResumptionUpdate.newHandle`` and replays the client
input the handle does not cover. Everything the user said or showed since the
last covered message is kept in a bounded replay buffer until a handle covers
it; see "Resumption and replay" in docs/providers.md for the exact rules.

Wire facts (camelCase JSON, as the WebSocket API takes it): the first client
message is ``setup`` and the server answers ``setupComplete``; input audio is
16 kHz s16le (``audio/pcm;rate=16000``), output audio 24 kHz s16le; the server
sends its messages as binary frames carrying JSON; faults arrive as close
frames (``1007`` invalid argument or a rejected API key, ``1008`` policy,
``1011`` internal error or exhausted quota).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import json
import logging
import re
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI, WebSocketException

from duplex.protocol import (
    ErrorEvent,
    FinishReason,
    ImageFrame,
    Media,
    Message,
    ResponseDone,
    ResponseStarted,
    SpeechStarted,
    SpeechStopped,
    StreamChunk,
    ToolCall,
    ToolCancelled,
    ToolOutput,
    ToolSpec,
    Transcript,
    new_id,
)
from server.logs import SessionLog
from server.providers.base import (
    Capabilities,
    ProviderError,
    RealtimeEvent,
    RealtimeProvider,
    RealtimeSetup,
)
from server.providers.realtime_link import (
    LinkEnded,
    RealtimeLink,
    ReconnectPolicy,
    reseed_turns,
)

logger = logging.getLogger(__name__)

#: The Live API endpoint path; ``{version}`` is ``v1beta`` (default) or ``v1alpha``.
SERVICE_PATH = "/ws/google.ai.generativelanguage.{version}.GenerativeService.BidiGenerateContent"
#: ``gemini-live-2.5-flash-preview`` was shut down on 2025-12-09; this is its successor.
DEFAULT_MODEL = "models/gemini-2.5-flash-native-audio-preview-12-2025"
INPUT_SAMPLE_RATE = 16000
INPUT_AUDIO_MIME = f"audio/pcm;rate={INPUT_SAMPLE_RATE}"
OUTPUT_SAMPLE_RATE = 24000

#: Close codes that mean *our request* was refused: resuming would only send it again.
_REFUSED_CLOSE_CODES = frozenset({1002, 1003, 1007, 1008, 1009, 1010})
#: Leave a connection this long before its ``goAway`` deadline even mid-response.
_GO_AWAY_MARGIN_S = 0.5
_API_KEY_INVALID = "API_KEY_INVALID"
_QUOTA_EXHAUSTED = "RESOURCE_EXHAUSTED"


# --------------------------------------------------------------------------------------
# Setup message


def build_setup(setup: RealtimeSetup, *, model: str, handle: str | None = None) -> dict[str, Any]:
    """The ``setup`` body for this Duplex session (``handle`` set when resuming).

    Options come from ``config.provider_options`` overridden by ``setup.options``;
    the keys are documented in docs/providers.md ("Gemini Live", "Settings").
    """
    cfg = setup.config
    opts: dict[str, Any] = {**cfg.provider_options, **setup.options}
    modality = response_modality(setup)

    generation: dict[str, Any] = {"responseModalities": [modality]}
    speech: dict[str, Any] = {}
    if cfg.voice and modality == "AUDIO":
        speech["voiceConfig"] = {"prebuiltVoiceConfig": {"voiceName": cfg.voice}}
    if opts.get("language_code"):
        speech["languageCode"] = str(opts["language_code"])
    if speech:
        generation["speechConfig"] = speech
    for key, wire in (
        ("temperature", "temperature"),
        ("top_p", "topP"),
        ("top_k", "topK"),
        ("max_output_tokens", "maxOutputTokens"),
        ("media_resolution", "mediaResolution"),
    ):
        if opts.get(key) is not None:
            generation[wire] = opts[key]
    if opts.get("thinking_budget") is not None:
        generation["thinkingConfig"] = {"thinkingBudget": int(opts["thinking_budget"])}

    body: dict[str, Any] = {"model": _model_name(model), "generationConfig": generation}
    if setup.instructions:
        body["systemInstruction"] = {"parts": [{"text": setup.instructions}]}
    if setup.tools:
        body["tools"] = [{"functionDeclarations": [_function_declaration(t) for t in setup.tools]}]

    td = cfg.turn_detection
    manual = manual_activity(setup)
    detection: dict[str, Any] = {"disabled": manual}
    if not manual:
        # Gemini has one server VAD; "semantic_vad" maps to it as well.
        detection["prefixPaddingMs"] = td.pre_roll_ms
        detection["silenceDurationMs"] = td.fixed_stop_ms
        if opts.get("start_of_speech_sensitivity"):
            detection["startOfSpeechSensitivity"] = str(opts["start_of_speech_sensitivity"])
        if opts.get("end_of_speech_sensitivity"):
            detection["endOfSpeechSensitivity"] = str(opts["end_of_speech_sensitivity"])
    # With our own VAD deciding turns (duplex/none) the mode decides barge-in too, so
    # Gemini must not cut its answer just because the next activity window opened.
    interrupts = td.interrupt and not manual
    handling = opts.get("activity_handling") or (
        "START_OF_ACTIVITY_INTERRUPTS" if interrupts else "NO_INTERRUPTION"
    )
    body["realtimeInputConfig"] = {
        "automaticActivityDetection": detection,
        "activityHandling": handling,
    }

    resumption: dict[str, Any] = {}
    if handle:
        resumption["handle"] = handle
    if opts.get("transparent_resumption"):
        resumption["transparent"] = True
    body["sessionResumption"] = resumption

    compression = opts.get("context_window_compression", {"slidingWindow": {}})
    if compression:
        body["contextWindowCompression"] = compression
    body["inputAudioTranscription"] = {}
    if modality == "AUDIO":
        body["outputAudioTranscription"] = {}
    return body


def response_modality(setup: RealtimeSetup) -> str:
    """``AUDIO`` unless the provider options ask for ``TEXT`` (one modality per session)."""
    opts = {**setup.config.provider_options, **setup.options}
    value = str(opts.get("response_modality", "AUDIO")).upper()
    if value not in ("AUDIO", "TEXT"):
        raise ProviderError(
            f"provider_options.response_modality must be AUDIO or TEXT, not {value!r}",
            code=400,
            fatal=True,
        )
    return value


def manual_activity(setup: RealtimeSetup) -> bool:
    """True when Duplex (or the client) decides turns and Gemini's own detection is off."""
    return setup.config.turn_detection.provider_vad in ("duplex", "none")


def _model_name(model: str) -> str:
    return model if model.startswith(("models/", "tunedModels/")) else f"models/{model}"


def _function_declaration(tool: ToolSpec) -> dict[str, Any]:
    decl: dict[str, Any] = {"name": tool.name, "description": tool.description}
    params = tool.parameters
    # Gemini refuses an OBJECT schema with no properties ("should be non-empty for
    # OBJECT type"); a function without arguments simply omits the schema.
    if params and not (params.get("type") == "object" and not params.get("properties")):
        decl["parameters"] = params
    return decl


def _tool_response_body(output: str) -> dict[str, Any]:
    """Gemini wants an object: a JSON object result is passed as is, anything else as ``output``."""
    try:
        value = json.loads(output)
    except (json.JSONDecodeError, TypeError):
        return {"output": output}
    return value if isinstance(value, dict) else {"output": value}


# --------------------------------------------------------------------------------------
# Small parsers


def _parse_duration(value: Any) -> float | None:
    """Protobuf JSON durations look like ``"12.5s"``."""
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)s\s*", value)
        if match:
            return float(match.group(1))
    return None


def _rate_of(mime: str, default: int) -> int:
    match = re.search(r"rate=(\d+)", mime)
    return int(match.group(1)) if match else default


def _usage(raw: dict[str, Any] | None) -> dict[str, Any] | None:
    if not raw:
        return None
    usage = {
        "input_tokens": raw.get("promptTokenCount"),
        "output_tokens": raw.get("responseTokenCount"),
        "total_tokens": raw.get("totalTokenCount"),
    }
    out: dict[str, Any] = {k: v for k, v in usage.items() if v is not None}
    out["gemini"] = raw
    return out


def _classify_close(exc: ConnectionClosed) -> LinkEnded:
    frame = exc.rcvd
    if frame is None:
        return LinkEnded("connection dropped without a close frame (1006)", code=1006)
    code, reason = frame.code, frame.reason
    text = f"close {code}" + (f": {reason}" if reason else "")
    lowered = reason.lower()
    if "api key" in lowered or "api_key" in lowered:
        return LinkEnded(
            f"Gemini Live rejected the API key ({text}); check GEMINI_API_KEY",
            retryable=False,
            code=code,
            upstream_code=_API_KEY_INVALID,
        )
    if "quota" in lowered or "resource_exhausted" in lowered or "resource exhausted" in lowered:
        return LinkEnded(
            f"Gemini Live quota exhausted ({text})",
            retryable=False,
            code=code,
            upstream_code=_QUOTA_EXHAUSTED,
        )
    if code in _REFUSED_CLOSE_CODES:
        return LinkEnded(f"Gemini Live refused the session ({text})", retryable=False, code=code)
    return LinkEnded(f"Gemini Live connection closed ({text})", code=code)


# --------------------------------------------------------------------------------------
# Replay buffer


@dataclass(slots=True)
class _Entry:
    seq: int
    frame: str
    size: int
    conn_id: int | None = None  # the connection it was last sent on
    sent_at: float | None = None  # monotonic time of that send


class _ReplayBuffer:
    """Client messages not yet covered by a resumption handle, oldest first.

    Bounded by count and bytes: past either bound the oldest entries go (and a
    later resumption can lose them), which beats unbounded memory on a session
    that never gets a handle.
    """

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self._entries: deque[_Entry] = deque()
        self._bytes = 0
        self._next_seq = 0
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self.evicted = 0

    def add(self, frame: str) -> _Entry:
        entry = _Entry(self._next_seq, frame, len(frame))
        self._next_seq += 1
        self._entries.append(entry)
        self._bytes += entry.size
        while len(self._entries) > 1 and (
            len(self._entries) > self._max_messages or self._bytes > self._max_bytes
        ):
            self._pop()
            self.evicted += 1
        return entry

    @property
    def last_seq(self) -> int:
        """The seq of the newest message ever added (-1 before the first)."""
        return self._next_seq - 1

    def drop_through(self, seq: int) -> int:
        """Forget every entry up to ``seq``: a handle covers them."""
        dropped = 0
        while self._entries and self._entries[0].seq <= seq:
            self._pop()
            dropped += 1
        return dropped

    def drop_sent_before(self, conn_id: int, cutoff: float) -> int:
        """Forget the prefix sent on ``conn_id`` before ``cutoff`` (no index from the server)."""
        dropped = 0
        while self._entries:
            head = self._entries[0]
            if head.conn_id != conn_id or head.sent_at is None or head.sent_at >= cutoff:
                break
            self._pop()
            dropped += 1
        return dropped

    def _pop(self) -> None:
        self._bytes -= self._entries.popleft().size

    def __iter__(self) -> Iterator[_Entry]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(eq=False)
class _Conn:
    """One WebSocket connection of the session; ``sent[i]`` is the seq of client message i."""

    id: int
    ws: ClientConnection
    sent: list[int | None] = field(default_factory=lambda: [None])  # index 0 is ``setup``
    go_away_deadline: float | None = None
    reopen: str | None = None  # why we closed it ourselves to resume with new settings


# --------------------------------------------------------------------------------------
# Provider


class GeminiLiveProvider(RealtimeProvider):
    """Opens Gemini Live sessions; one provider instance serves many sessions."""

    input_sample_rate = INPUT_SAMPLE_RATE
    capabilities = Capabilities(
        can_truncate=False,  # the model keeps the whole reply in its context
        can_cancel=False,  # emulated: the rest of the reply is dropped, generation goes on
        own_turn_detection=True,
        images=True,
        video=True,
        can_resume=True,
        live_config=False,  # settings go in ``setup``: a change resumes on a new connection
    )

    def __init__(
        self,
        api_key: str | None,
        base_url: str = "wss://generativelanguage.googleapis.com",
        model: str = DEFAULT_MODEL,
        *,
        api_version: str = "v1beta",
        connect_timeout_s: float = 10.0,
        close_timeout_s: float = 2.0,
        max_reconnect_attempts: int = 5,
        reconnect_backoff_s: float = 0.25,
        max_reconnect_backoff_s: float = 5.0,
        replay_max_messages: int = 6000,
        replay_max_bytes: int = 16 * 1024 * 1024,
        replay_margin_s: float = 2.0,
        event_queue_size: int = 1024,
    ) -> None:
        self._api_key = api_key
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_version = api_version
        self.connect_timeout_s = connect_timeout_s
        self.close_timeout_s = close_timeout_s
        self.max_reconnect_attempts = max_reconnect_attempts
        self.reconnect_backoff_s = reconnect_backoff_s
        self.max_reconnect_backoff_s = max_reconnect_backoff_s
        self.replay_max_messages = replay_max_messages
        self.replay_max_bytes = replay_max_bytes
        self.replay_margin_s = replay_margin_s
        self.event_queue_size = event_queue_size

    def _url(self) -> str:
        path = SERVICE_PATH.format(version=self.api_version)
        return f"{self.base_url}{path}?key={quote(self._api_key or '', safe='')}"

    def _redact(self, text: str) -> str:
        """Error texts may quote the URL; the key never leaves this object."""
        if self._api_key:
            text = text.replace(self._api_key, "***").replace(quote(self._api_key, safe=""), "***")
        return text

    async def connect(self, setup: RealtimeSetup) -> GeminiLiveSession:
        """Open the first connection and wait for ``setupComplete``, else raise ProviderError."""
        if not self._api_key:
            raise ProviderError(
                "Gemini Live needs an API key: set GEMINI_API_KEY", code=502, fatal=True
            )
        session = GeminiLiveSession(self, setup)
        await session._start()
        return session


# --------------------------------------------------------------------------------------
# Session


class GeminiLiveSession(RealtimeLink):
    """One Gemini session across as many connections as resumption needs, on the
    realtime chassis (``RealtimeLink``)."""

    label = "Gemini Live"

    def __init__(self, provider: GeminiLiveProvider, setup: RealtimeSetup) -> None:
        super().__init__(
            SessionLog(logger, setup.session_id),
            policy=ReconnectPolicy(
                max_attempts=provider.max_reconnect_attempts,
                base_delay=provider.reconnect_backoff_s,
                max_delay=provider.max_reconnect_backoff_s,
            ),
            queue_size=provider.event_queue_size,
            task_name=f"gemini-live:{setup.session_id}",
        )
        self._provider = provider
        self._setup = setup
        self._model = setup.config.model or provider.model
        self._manual = manual_activity(setup)
        self._modality = response_modality(setup)
        self._out: list[RealtimeEvent] = []  # mapped, not yet queued (see ``_flush``)
        self._flush_lock = asyncio.Lock()
        self._send_lock = asyncio.Lock()  # one writer; replay and live sends keep seq order
        self._input_lock = asyncio.Lock()  # activityStart/audio/activityEnd stay together
        self._buffer = _ReplayBuffer(provider.replay_max_messages, provider.replay_max_bytes)
        self._conn: _Conn | None = None
        self._conn_count = 0
        self._handle: str | None = None
        self._attached = asyncio.Event()  # set whenever a connection takes live sends

        # Input state
        self._pcm_carry = b""
        self._activity_open = False
        self._audio_ms = 0.0

        # Output state
        self._response_id: str | None = None
        self._last_response_id: str | None = None
        self._suppress = False  # output of a cancelled generation is dropped until it ends
        #: What tool calls get while ``_suppress`` holds after declined calls (else a cancel).
        self._declined: dict[str, Any] | None = None
        self._usage_raw: dict[str, Any] | None = None
        self._user_speaking = False
        self._input_transcript: list[str] = []
        self._tool_names: dict[str, str] = {}
        #: The newest client message sent before the latest answer began: what came up to
        #: it is in the stored conversation (the user's text or transcript, and the answer).
        self._answered_seq = -1

    # -- lifecycle ------------------------------------------------------------------

    async def _start(self) -> None:
        self._conn = await self._open(handle=None)
        self._attached.set()
        self._start_reader()

    def _failed(self) -> None:
        self._attached.set()  # wake a reconfigure waiting for a connection that won't come

    async def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._close_ws(conn.ws)

    # -- input ----------------------------------------------------------------------

    async def send_audio(self, pcm: bytes) -> None:
        async with self._input_lock:
            data = self._pcm_carry + pcm
            # Gemini closes the session (1007) on a half sample; keep the odd byte for later.
            cut = len(data) - (len(data) % 2)
            data, self._pcm_carry = data[:cut], data[cut:]
            if not data:
                return
            if self._manual and not self._activity_open:
                await self._submit({"realtimeInput": {"activityStart": {}}})
                self._activity_open = True
            await self._submit(
                {
                    "realtimeInput": {
                        "audio": {
                            "data": base64.b64encode(data).decode("ascii"),
                            "mimeType": INPUT_AUDIO_MIME,
                        }
                    }
                }
            )
            self._audio_ms += len(data) / 2 / INPUT_SAMPLE_RATE * 1000.0

    async def send_image(self, frame: ImageFrame) -> None:
        await self._submit(
            {
                "realtimeInput": {
                    "video": {
                        "data": base64.b64encode(frame.data).decode("ascii"),
                        "mimeType": frame.mime_type,
                    }
                }
            }
        )

    async def send_text(self, text: str) -> None:
        """A user text turn as ``realtimeInput.text``.

        Not ``clientContent``: text on the realtime path takes part in activity
        handling like speech (it can barge in), and the 3.x Live models refuse
        ``clientContent`` after the first turn (1007; it only seeds history).
        With manual activity the text is framed as one activity.
        """
        async with self._input_lock:
            if self._manual and not self._activity_open:
                await self._submit({"realtimeInput": {"activityStart": {}}})
                self._activity_open = True
            await self._submit({"realtimeInput": {"text": text}})
            if self._manual:
                await self._submit({"realtimeInput": {"activityEnd": {}}})
                self._activity_open = False

    async def commit(self) -> None:
        """End the user's turn now.

        Manual activity: ``activityEnd`` closes the window the first audio chunk
        opened. Automatic detection: ``audioStreamEnd`` flushes Gemini's audio
        buffer so its VAD decides at once (more audio reopens the stream).
        """
        async with self._input_lock:
            if self._manual:
                if not self._activity_open:
                    self._log.debug("commit with no open activity: nothing to end")
                    return
                await self._submit({"realtimeInput": {"activityEnd": {}}})
                self._activity_open = False
            else:
                await self._submit({"realtimeInput": {"audioStreamEnd": True}})

    async def cancel_response(self) -> None:
        """Gemini has no cancel: report the response cancelled and drop its output until it ends."""
        if self._response_id is None:
            return
        self._log.info("response %s cancelled locally", self._response_id)
        self._suppress = True
        self._declined = None
        self._end_response("cancelled")
        await self._flush()

    async def truncate(self, response_id: str, audio_end_ms: float) -> None:
        """Gemini has no truncate: its context keeps the whole response; nothing to send."""
        self._log.debug(
            "truncate(%s, %.0f ms) has no Gemini equivalent; ignored", response_id, audio_end_ms
        )

    async def reconfigure(self, setup: RealtimeSetup) -> None:
        """Gemini takes its settings only in ``setup``: resume on a new connection with them.

        The model is part of the resumed session and cannot change (400).
        """
        model = setup.config.model or self._provider.model
        if _model_name(model) != _model_name(self._model):
            raise ProviderError(
                "Gemini Live cannot change the model of a running session; "
                "start a new session for another model",
                code=400,
            )
        modality = response_modality(setup)
        if build_setup(setup, model=model) == build_setup(self._setup, model=self._model):
            return
        self._check_usable()
        async with self._input_lock:
            self._setup, self._modality = setup, modality
            self._manual = manual_activity(setup)
            self._activity_open = False
            conn = self._conn
            self._attached.clear()
            if conn is not None:
                conn.reopen = "session configuration changed"
                await self._close_ws(conn.ws)
        try:
            async with asyncio.timeout(self._provider.connect_timeout_s * 2):
                await self._attached.wait()
        except TimeoutError:
            raise ProviderError("Gemini Live did not reopen with the new configuration") from None
        if self._failure is not None:
            raise ProviderError(self._failure, fatal=True)

    async def send_tool_results(self, outputs: list[ToolOutput], *, respond: bool = True) -> None:
        """One ``toolResponse`` with a ``functionResponses`` entry per call.

        Gemini blocks on its calls and always goes on generating once they are
        answered. ``respond=False`` (calls not run): the outputs still go, so the
        model is not left waiting, and the rest of that generation is dropped until
        it ends, as for a cancel (tool calls in it get the same output).
        """
        if not outputs:
            return
        responses = []
        for out in outputs:
            name = out.name or self._tool_names.get(out.call_id, "")
            self._tool_names.pop(out.call_id, None)
            body = _tool_response_body(out.output)
            responses.append({"id": out.call_id, "name": name, "response": body})
        if not respond:
            self._suppress = True
            self._declined = responses[0]["response"]
        await self._submit({"toolResponse": {"functionResponses": responses}})

    async def _submit(self, payload: dict[str, Any]) -> None:
        """Buffer one client message for replay and send it if a connection is up.

        While reconnecting the message is only buffered: the new connection
        replays the buffer in order before any later message goes out.
        """
        self._check_usable()
        frame = json.dumps(payload, separators=(",", ":"))
        async with self._send_lock:
            entry = self._buffer.add(frame)
            conn = self._conn
            if conn is None:
                return
            try:
                await self._send_entry(conn, entry)
            except ConnectionClosed:
                self._log.info("send failed on a closed connection; kept for replay")

    async def _send_entry(self, conn: _Conn, entry: _Entry) -> None:
        await conn.ws.send(entry.frame)
        conn.sent.append(entry.seq)
        entry.conn_id = conn.id
        entry.sent_at = time.monotonic()

    # -- connections ----------------------------------------------------------------

    async def _open(self, handle: str | None, *, seed: bool = False) -> _Conn:
        """Connect, send ``setup`` and wait for ``setupComplete``; ProviderError on failure.

        ``fatal`` on the error means retrying the same request cannot help. ``seed``: the
        setup announces an initial history (``historyConfig``), which must follow.
        """
        p = self._provider
        body = build_setup(self._setup, model=self._model, handle=handle)
        if seed:
            body["historyConfig"] = {"initialHistoryInClientContent": True}
        ws: ClientConnection | None = None
        try:
            async with asyncio.timeout(p.connect_timeout_s):
                ws = await ws_connect(
                    p._url(),
                    open_timeout=None,
                    close_timeout=p.close_timeout_s,
                    max_size=32 * 1024 * 1024,
                    compression=None,  # base64 audio barely compresses; deflate costs CPU
                )
                await ws.send(json.dumps({"setup": body}, separators=(",", ":")))
                while True:
                    msg = _decode(await ws.recv())
                    if msg is None:
                        continue
                    if "setupComplete" in msg:
                        break
                    if "error" in msg:
                        raise ProviderError(
                            p._redact(f"Gemini Live setup failed: {_error_text(msg['error'])}"),
                            fatal=True,
                        )
                    self._log.debug("ignoring %s before setupComplete", sorted(msg))
        except ConnectionClosed as exc:
            await self._abort(ws)
            ended = _classify_close(exc)
            raise ProviderError(
                p._redact(ended.reason),
                upstream_status=ended.code,
                upstream_code=ended.upstream_code,
                fatal=not ended.retryable,
            ) from None
        except InvalidStatus as exc:
            status = exc.response.status_code
            raise ProviderError(
                f"Gemini Live refused the WebSocket handshake: HTTP {status}",
                upstream_status=status,
                fatal=status in (400, 401, 403, 404),
            ) from None
        except InvalidURI:
            raise ProviderError(
                f"invalid Gemini Live base URL: {p.base_url!r}", fatal=True
            ) from None
        except TimeoutError:
            await self._abort(ws)
            raise ProviderError(
                f"Gemini Live did not complete setup within {p.connect_timeout_s:g} s"
            ) from None
        except (OSError, WebSocketException) as exc:
            await self._abort(ws)
            raise ProviderError(p._redact(f"could not connect to Gemini Live: {exc}")) from None
        except BaseException:
            await self._abort(ws)
            raise
        assert ws is not None  # setupComplete was read from it
        self._conn_count += 1
        conn = _Conn(id=self._conn_count, ws=ws)
        self._log.info(
            "connection %d ready (model %s%s)",
            conn.id,
            body["model"],
            ", resumed" if handle else "",
        )
        return conn

    async def _abort(self, ws: ClientConnection | None) -> None:
        if ws is not None:
            ws.transport.abort()
            with contextlib.suppress(Exception):
                await ws.wait_closed()

    async def _close_ws(self, ws: ClientConnection) -> None:
        try:
            async with asyncio.timeout(self._provider.close_timeout_s + 0.5):
                await ws.close()
        except (TimeoutError, OSError, WebSocketException):
            await self._abort(ws)

    async def _read(self) -> LinkEnded:
        conn = self._conn
        assert conn is not None
        ended = await self._read_connection(conn)
        await self._detach(conn)
        return dataclasses.replace(ended, reason=self._provider._redact(ended.reason))

    async def _lost(self, ended: LinkEnded) -> str | None:
        rid = None
        if ended.retryable:
            rid = self._cut_response_for_reconnect()
        elif self._response_id is not None:
            self._end_response("error")
        await self._flush()
        return rid

    async def _detach(self, conn: _Conn) -> None:
        async with self._send_lock:
            if self._conn is conn:
                self._conn = None
        await self._close_ws(conn.ws)

    async def _reopen(self, attempt: int) -> bool:
        """Resume with the latest handle; without one (or when Gemini refuses it) start a
        new session re-seeded with the stored conversation. True if the model kept its
        context: resumed, or re-seeded."""
        handle = self._handle
        if handle is not None:
            try:
                conn = await self._open(handle)
            except ProviderError as exc:
                if exc.upstream_code in (_API_KEY_INVALID, _QUOTA_EXHAUSTED) or not exc.fatal:
                    raise
                self._log.warning(
                    "resumption handle refused (%s); starting a new Gemini session "
                    "re-seeded with the stored conversation",
                    exc.message,
                )
                self._handle = None
            else:
                await self._attach(conn, resumed=True)
                return True
        turns = await self._history_turns()
        conn = await self._open(None, seed=bool(turns))
        if turns:
            # Input already answered is in the history: sent again, it would be answered
            # again. What came after the latest answer began is replayed.
            self._buffer.drop_through(self._answered_seq)
            try:
                await self._seed(conn, turns)
            except ConnectionClosed:
                self._log.info("connection closed while re-seeding; the reader will retry")
                await self._attach(conn, resumed=False)
                return False
        await self._attach(conn, resumed=False)
        return turns is not None

    async def _history_turns(self) -> list[Message] | None:
        """The stored conversation's newest text turns; None when there is none to read."""
        history = self._setup.history
        if history is None:
            return None
        try:
            return reseed_turns(await history())
        except Exception:  # the store failing must not stop the reconnection
            self._log.exception("could not read the stored conversation to re-seed")
            return None

    async def _seed(self, conn: _Conn, turns: list[Message]) -> None:
        """The initial history (the setup asked for ``historyConfig``): one
        ``clientContent`` with the turns and ``turnComplete``, which ends the history and
        starts no generation. Sent before the replay and any live input."""
        content = {
            "turns": [
                {"role": "user" if m.role == "user" else "model", "parts": [{"text": m.content}]}
                for m in turns
            ],
            "turnComplete": True,
        }
        await conn.ws.send(json.dumps({"clientContent": content}, separators=(",", ":")))
        conn.sent.append(None)  # a client message the replay buffer does not hold
        self._log.info("re-seeded %d conversation turn(s)", len(turns))

    async def _attach(self, conn: _Conn, *, resumed: bool) -> None:
        """Replay everything no handle covers, then let live sends through."""
        async with self._send_lock:
            replayed = 0
            try:
                for entry in self._buffer:
                    await self._send_entry(conn, entry)
                    replayed += 1
            except ConnectionClosed:
                self._log.info("connection closed during replay; the reader will retry")
            self._conn = conn
        self._attached.set()
        if self._buffer.evicted:
            self._log.warning(
                "replay buffer overflowed earlier: %d oldest messages could not be replayed",
                self._buffer.evicted,
            )
        self._log.info(
            "%s on connection %d; replayed %d client messages",
            "resumed" if resumed else "new session",
            conn.id,
            replayed,
        )

    async def _read_connection(self, conn: _Conn) -> LinkEnded:
        loop = asyncio.get_running_loop()
        while True:
            wait: float | None = None
            if conn.go_away_deadline is not None:
                # Leave now if nothing is being generated, else when it ends or time is up.
                if self._response_id is None and not self._suppress:
                    return LinkEnded("server sent goAway", immediate=True)
                wait = conn.go_away_deadline - _GO_AWAY_MARGIN_S - loop.time()
                if wait <= 0:
                    return LinkEnded("goAway deadline reached", immediate=True)
            try:
                async with asyncio.timeout(wait):
                    raw = await conn.ws.recv()
            except TimeoutError:
                return LinkEnded("goAway deadline reached", immediate=True)
            except ConnectionClosed as exc:
                if conn.reopen:
                    return LinkEnded(conn.reopen, immediate=True)
                return _classify_close(exc)
            msg = _decode(raw)
            if msg is None:
                self._log.warning("ignoring a server frame that is not a JSON object")
                continue
            self._alive()
            await self._on_message(conn, msg)
            await self._flush()

    # -- server messages ------------------------------------------------------------

    def _put(self, event: RealtimeEvent) -> None:
        """Map synchronously; the events go on the bounded queue at the next ``_flush``."""
        self._out.append(event)

    async def _flush(self) -> None:
        async with self._flush_lock:  # the reader and cancel_response keep their order
            out, self._out = self._out, []
            for event in out:
                await self._emit(event)

    async def _on_message(self, conn: _Conn, msg: dict[str, Any]) -> None:
        # usageMetadata first: it often rides on the message that completes the turn.
        if isinstance(msg.get("usageMetadata"), dict):
            self._usage_raw = msg["usageMetadata"]
        if isinstance(msg.get("sessionResumptionUpdate"), dict):
            self._on_resumption(conn, msg["sessionResumptionUpdate"])
        if isinstance(msg.get("serverContent"), dict):
            self._on_content(msg["serverContent"])
        if isinstance(msg.get("toolCall"), dict):
            await self._on_tool_call(msg["toolCall"])
        if isinstance(msg.get("toolCallCancellation"), dict):
            ids = [str(i) for i in msg["toolCallCancellation"].get("ids") or []]
            for call_id in ids:
                self._tool_names.pop(call_id, None)
            self._put(
                ToolCancelled(
                    response_id=self._response_id or self._last_response_id or "", call_ids=ids
                )
            )
        if isinstance(msg.get("goAway"), dict):
            left = _parse_duration(msg["goAway"].get("timeLeft"))
            left = 0.0 if left is None else max(left, 0.0)
            conn.go_away_deadline = asyncio.get_running_loop().time() + left
            self._log.info("goAway: connection %d ends in %.1f s", conn.id, left)
        if isinstance(msg.get("error"), dict):
            self._put(
                ErrorEvent(
                    code=502,
                    message=self._provider._redact(
                        f"Gemini Live error: {_error_text(msg['error'])}"
                    ),
                )
            )
        if "setupComplete" in msg:
            self._log.debug("extra setupComplete ignored")

    def _on_resumption(self, conn: _Conn, update: dict[str, Any]) -> None:
        handle = update.get("newHandle")
        if not (update.get("resumable") and handle):
            # Not resumable right now (generating, calling tools): keep the older handle
            # and everything sent after it.
            return
        self._handle = str(handle)
        index = update.get("lastConsumedClientMessageIndex")
        if index is not None:
            try:
                idx = int(index)  # int64: a JSON string on the wire
            except (TypeError, ValueError):
                idx = -1
            if 0 <= idx < len(conn.sent):
                covered = [s for s in conn.sent[: idx + 1] if s is not None]
                if covered:
                    self._buffer.drop_through(covered[-1])
                return
            self._log.warning(
                "lastConsumedClientMessageIndex %r outside the %d messages sent; "
                "trimming by time instead",
                index,
                len(conn.sent),
            )
        # No index (the Gemini API sends it only with transparent resumption): the
        # handle covers what reached the server before it; keep a margin for the
        # messages still in flight. Replaying a covered message beats losing one.
        self._buffer.drop_sent_before(conn.id, time.monotonic() - self._provider.replay_margin_s)

    def _on_content(self, sc: dict[str, Any]) -> None:
        transcription = sc.get("inputTranscription")
        if isinstance(transcription, dict) and transcription.get("text"):
            self._input_transcript.append(str(transcription["text"]))
            self._put(Transcript(text="".join(self._input_transcript).strip(), final=False))

        turn = sc.get("modelTurn")
        if isinstance(turn, dict) and not self._suppress:
            for part in turn.get("parts") or []:
                if isinstance(part, dict):
                    self._on_part(part)

        out = sc.get("outputTranscription")
        if isinstance(out, dict) and out.get("text") and not self._suppress:
            rid = self._begin_response()
            self._put(StreamChunk(response_id=rid, delta=str(out["text"]), transcript=True))

        if sc.get("generationComplete"):
            self._log.debug("generationComplete for %s", self._response_id)

        if sc.get("interrupted"):
            self._flush_transcript()
            if self._suppress:
                self._suppress = False
                self._declined = None
            elif self._response_id is not None:
                self._put(StreamChunk(response_id=self._response_id, interrupted=True))
                self._end_response("interrupted")
                if not self._manual and not self._user_speaking:
                    # Gemini's VAD heard the user start speaking over the answer.
                    self._user_speaking = True
                    self._put(SpeechStarted(audio_start_ms=self._audio_ms))

        if sc.get("turnComplete"):
            self._flush_transcript()
            if self._suppress:
                self._suppress = False
                self._declined = None
            else:
                self._end_response("stop")

    def _on_part(self, part: dict[str, Any]) -> None:
        if part.get("thought"):
            return  # thinking summaries are not the answer
        if part.get("text"):
            rid = self._begin_response()
            self._put(StreamChunk(response_id=rid, delta=str(part["text"])))
        blob = part.get("inlineData")
        if isinstance(blob, dict) and blob.get("data"):
            try:
                data = base64.b64decode(blob["data"], validate=True)
            except (binascii.Error, ValueError):
                self._log.warning("dropping inlineData with invalid base64")
                return
            mime = str(blob.get("mimeType") or "")
            rid = self._begin_response()
            if mime.startswith("audio/pcm") or mime.startswith("audio/l16"):
                media = Media(
                    mime_type="audio/pcm",
                    data=data,
                    sample_rate=_rate_of(mime, OUTPUT_SAMPLE_RATE),
                    channels=1,
                )
            else:
                media = Media(mime_type=mime or "application/octet-stream", data=data)
            self._put(StreamChunk(response_id=rid, media=media))

    async def _on_tool_call(self, call: dict[str, Any]) -> None:
        calls = [c for c in call.get("functionCalls") or [] if isinstance(c, dict)]
        if not calls:
            return
        if self._suppress:
            # The user cancelled this answer; Gemini still waits for results, so tell it.
            await self._submit(
                {
                    "toolResponse": {
                        "functionResponses": [
                            {
                                "id": c.get("id"),
                                "name": c.get("name", ""),
                                "response": self._declined or {"error": "cancelled by the user"},
                            }
                            for c in calls
                        ]
                    }
                }
            )
            return
        rid = self._begin_response()
        tool_calls: list[ToolCall] = []
        for c in calls:
            call_id = str(c.get("id") or new_id("call"))
            name = str(c.get("name") or "")
            self._tool_names[call_id] = name
            tool_calls.append(
                ToolCall(id=call_id, name=name, arguments=json.dumps(c.get("args") or {}))
            )
        self._put(StreamChunk(response_id=rid, tool_calls=tool_calls))
        self._flush_transcript()
        self._end_response("tool_calls")

    # -- response bookkeeping -------------------------------------------------------

    def _begin_response(self) -> str:
        if self._response_id is None:
            if self._user_speaking:
                # Gemini answers only after the user's activity ended.
                self._user_speaking = False
                self._put(SpeechStopped(audio_end_ms=self._audio_ms))
            self._response_id = new_id("resp")
            self._answered_seq = self._buffer.last_seq
            self._put(ResponseStarted(response_id=self._response_id))
        return self._response_id

    def _end_response(self, reason: FinishReason) -> None:
        if self._response_id is None:
            return
        rid, self._response_id = self._response_id, None
        self._last_response_id = rid
        usage, self._usage_raw = _usage(self._usage_raw), None
        self._put(ResponseDone(response_id=rid, finish_reason=reason, usage=usage))

    def _flush_transcript(self) -> None:
        text = "".join(self._input_transcript).strip()
        self._input_transcript.clear()
        if text:
            self._put(Transcript(text=text, final=True))

    def _cut_response_for_reconnect(self) -> str | None:
        """A response cut by a lost connection ends like a barge-in (queued output is
        dropped); returns its id."""
        self._suppress = False
        self._declined = None
        self._flush_transcript()
        rid = self._response_id
        if rid is not None:
            self._put(StreamChunk(response_id=rid, interrupted=True))
            self._end_response("interrupted")
        return rid


def _decode(raw: str | bytes) -> dict[str, Any] | None:
    """The service sends JSON in binary frames; accept text frames too."""
    try:
        msg = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return msg if isinstance(msg, dict) else None


def _error_text(err: dict[str, Any]) -> str:
    parts = [str(err[k]) for k in ("code", "status") if err.get(k) is not None]
    head = " ".join(parts)
    message = str(err.get("message") or "unknown error")
    return f"{head}: {message}" if head else message
