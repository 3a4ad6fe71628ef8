"""OpenAI Realtime provider (GA protocol over WebSocket) for ASM (Audio Streaming Model) mode.

One Duplex session holds one upstream WebSocket. Input goes out as client
events as it arrives; a single reader task turns server events into protocol
types and queues them for ``events()``. The reader also owns reconnection, so
a dropped socket is noticed and repaired even while nobody is sending.

Beta event names (``response.audio.delta`` ...) are accepted as aliases of the
GA names so that proxies and older deployments still work.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from duplex.protocol import (
    PROVIDER_FAILED,
    UNSUPPORTED_MEDIA,
    ErrorEvent,
    FinishReason,
    ImageFrame,
    Media,
    Message,
    ResponseDone,
    ResponseStarted,
    SessionConfig,
    SpeechStarted,
    SpeechStopped,
    StreamChunk,
    ToolCall,
    ToolOutput,
    Transcript,
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

#: The only PCM rate the Realtime API accepts, in both directions.
SAMPLE_RATE: Final = 24000
DEFAULT_BASE_URL: Final = "wss://api.openai.com/v1"
DEFAULT_MODEL: Final = "gpt-realtime"
#: Input transcription is off upstream unless asked for; Duplex wants user transcripts.
DEFAULT_TRANSCRIPTION: Final[dict[str, Any]] = {"model": "gpt-4o-mini-transcribe"}
#: The service refuses to commit less audio than this (``input_audio_buffer_commit_empty``).
MIN_COMMIT_MS: Final = 100.0
_MAX_TRACKED_RESPONSES: Final = 32
_MAX_TRACKED_CLIENT_EVENTS: Final = 256
_IMAGE_TYPES: Final = frozenset({"image/jpeg", "image/png"})

#: Beta-era server event names and their GA equivalents.
BETA_EVENT_ALIASES: Final[dict[str, str]] = {
    "response.text.delta": "response.output_text.delta",
    "response.text.done": "response.output_text.done",
    "response.audio.delta": "response.output_audio.delta",
    "response.audio.done": "response.output_audio.done",
    "response.audio_transcript.delta": "response.output_audio_transcript.delta",
    "response.audio_transcript.done": "response.output_audio_transcript.done",
}


@dataclass
class _ToolCallState:
    name: str = ""
    arguments: list[str] = field(default_factory=list)


@dataclass
class _ResponseState:
    """What we need to remember about one upstream response."""

    audio_item_id: str | None = None
    audio_bytes: int = 0
    had_tool_call: bool = False
    tool_calls: dict[str, _ToolCallState] = field(default_factory=dict)

    @property
    def audio_ms(self) -> int:
        return self.audio_bytes * 1000 // (2 * SAMPLE_RATE)


# --------------------------------------------------------------------------------------
# Session configuration


def build_turn_detection(config: SessionConfig) -> dict[str, Any] | None:
    """The ``audio.input.turn_detection`` value for ``config``.

    ``duplex``/``none`` turn provider VAD off (``null``): our own VAD or the client
    decides turns and calls ``commit()``. ``provider_options["turn_detection"]`` is
    merged last so any documented upstream field can be set (but not ``type``).
    """
    td = config.turn_detection
    if td.provider_vad in ("duplex", "none"):
        return None
    out: dict[str, Any] = {"type": td.provider_vad, "interrupt_response": td.interrupt}
    if td.provider_vad == "server_vad":
        out["silence_duration_ms"] = td.fixed_stop_ms
        out["prefix_padding_ms"] = td.pre_roll_ms
    extra = config.provider_options.get("turn_detection") or {}
    if not isinstance(extra, dict):
        raise ProviderError(
            "provider_options.turn_detection must be an object", code=400, fatal=True
        )
    out.update({k: v for k, v in extra.items() if k != "type"})
    return out


def build_session_config(setup: RealtimeSetup) -> dict[str, Any]:
    """The ``session`` object of our ``session.update`` (GA shape)."""
    config = setup.config
    opts = config.provider_options
    audio_format = {"type": "audio/pcm", "rate": SAMPLE_RATE}
    audio_input: dict[str, Any] = {
        "format": dict(audio_format),
        "turn_detection": build_turn_detection(config),
        "transcription": opts.get("transcription", dict(DEFAULT_TRANSCRIPTION)),
    }
    if "noise_reduction" in opts:
        audio_input["noise_reduction"] = opts["noise_reduction"]
    audio_output: dict[str, Any] = {"format": dict(audio_format)}
    if config.voice:
        audio_output["voice"] = config.voice
    if "speed" in opts:
        audio_output["speed"] = opts["speed"]
    session: dict[str, Any] = {
        "type": "realtime",
        "instructions": setup.instructions,
        "output_modalities": list(opts.get("output_modalities", ["audio"])),
        "audio": {"input": audio_input, "output": audio_output},
        "tools": [
            {
                "type": "function",
                "name": tool.name,
                "description": tool.description,
                "parameters": tool.parameters,
            }
            for tool in setup.tools
        ],
    }
    if setup.tools:
        session["tool_choice"] = opts.get("tool_choice", "auto")
    if "max_output_tokens" in opts:
        session["max_output_tokens"] = opts["max_output_tokens"]
    return session


def reseed_items(history: list[Message]) -> list[dict[str, Any]]:
    """Conversation items for the newest text turns of ``history`` (oldest first)."""
    return [
        {
            "type": "message",
            "role": message.role,
            "content": [
                {
                    "type": "input_text" if message.role == "user" else "output_text",
                    "text": message.content,
                }
            ],
        }
        for message in reseed_turns(history)
    ]


# --------------------------------------------------------------------------------------
# Error translation


def _error_fields(error: Any) -> tuple[str | None, str | None, str, str | None]:
    if not isinstance(error, dict):
        return None, None, str(error), None
    return (
        error.get("code"),
        error.get("type"),
        str(error.get("message") or "no message"),
        error.get("param"),
    )


def _handshake_error(exc: InvalidStatus, url: str) -> ProviderError:
    """Turn a refused WebSocket upgrade into a ProviderError that says why."""
    response = exc.response
    status = response.status_code
    code: str | None = None
    detail = response.reason_phrase or ""
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        body = json.loads(bytes(response.body or b"").decode("utf-8"))
        if isinstance(body, dict):
            code, _type, detail, _param = _error_fields(body.get("error"))
    if status == 401:
        return ProviderError(
            f"OpenAI rejected the API key (HTTP 401{', ' + code if code else ''}): {detail}",
            code=PROVIDER_FAILED,
            upstream_status=401,
            upstream_code=code or "invalid_api_key",
            fatal=True,
        )
    retry_after: float | None = None
    with contextlib.suppress(TypeError, ValueError):
        retry_after = float(response.headers.get("Retry-After", ""))
    return ProviderError(
        f"OpenAI Realtime refused the connection to {url} (HTTP {status}"
        f"{', ' + code if code else ''}): {detail}",
        code=PROVIDER_FAILED,
        upstream_status=status,
        upstream_code=code,
        retry_after=retry_after,
        # Client errors (bad model, no access) will not fix themselves; 429/5xx may.
        fatal=400 <= status < 500 and status != 429,
    )


def _setup_error(error: Any) -> ProviderError:
    """An ``error`` event received before the session was usable."""
    code, etype, message, param = _error_fields(error)
    if code == "invalid_api_key":
        return ProviderError(
            f"OpenAI rejected the API key (invalid_api_key): {message}",
            code=PROVIDER_FAILED,
            upstream_status=401,
            upstream_code=code,
            fatal=True,
        )
    where = f" (param {param})" if param else ""
    return ProviderError(
        f"OpenAI Realtime refused the session setup: {code or etype}: {message}{where}",
        code=PROVIDER_FAILED,
        upstream_code=code,
        fatal=True,
    )


def _finish_reason(response: dict[str, Any], state: _ResponseState | None) -> FinishReason:
    status = response.get("status")
    details = response.get("status_details") or {}
    reason = details.get("reason") if isinstance(details, dict) else None
    if status == "completed":
        output = response.get("output") or []
        called = any(isinstance(i, dict) and i.get("type") == "function_call" for i in output)
        return "tool_calls" if called or (state is not None and state.had_tool_call) else "stop"
    if status == "cancelled":
        return "interrupted" if reason == "turn_detected" else "cancelled"
    if status == "incomplete" and reason == "max_output_tokens":
        return "length"
    # failed, incomplete for content_filter, or anything unknown: the answer is not whole.
    return "error"


# --------------------------------------------------------------------------------------
# Provider and session


class OpenAIRealtimeProvider(RealtimeProvider):
    """Factory for OpenAI Realtime sessions; holds only settings, no connections."""

    input_sample_rate = SAMPLE_RATE
    capabilities = Capabilities(
        can_truncate=True,
        can_cancel=True,
        own_turn_detection=True,
        images=True,
        video=True,  # as still frames, about one a second
        can_resume=False,  # a new upstream session, re-seeded from the stored conversation
        live_config=True,
    )

    def __init__(
        self,
        api_key: str | None,
        base_url: str = DEFAULT_BASE_URL,
        model: str = DEFAULT_MODEL,
        *,
        reconnect: ReconnectPolicy | None = None,
        connect_timeout: float = 10.0,
        send_timeout: float = 10.0,
        event_queue_size: int = 1024,
    ) -> None:
        self.api_key = api_key
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.reconnect = reconnect or ReconnectPolicy()
        self.connect_timeout = connect_timeout
        self.send_timeout = send_timeout
        self.event_queue_size = event_queue_size

    def url_for(self, model: str) -> str:
        return f"{self.base_url}/realtime?model={quote(model, safe='')}"

    async def connect(self, setup: RealtimeSetup) -> OpenAIRealtimeSession:
        """Open the socket, configure the session, and start reading; raises ProviderError."""
        if not self.api_key:
            raise ProviderError(
                "no OpenAI API key configured (set OPENAI_API_KEY)",
                code=PROVIDER_FAILED,
                fatal=True,
            )
        session = OpenAIRealtimeSession(
            url=self.url_for(setup.config.model or self.model),
            url_for=lambda model: self.url_for(model or self.model),
            api_key=self.api_key,
            setup=setup,
            reconnect=self.reconnect,
            connect_timeout=self.connect_timeout,
            send_timeout=self.send_timeout,
            event_queue_size=self.event_queue_size,
        )
        await session.start()
        return session


class OpenAIRealtimeSession(RealtimeLink):
    """One upstream Realtime session on the realtime chassis (``RealtimeLink``)."""

    label = "OpenAI Realtime"

    def __init__(
        self,
        *,
        url: str,
        url_for: Callable[[str | None], str],
        api_key: str,
        setup: RealtimeSetup,
        reconnect: ReconnectPolicy,
        connect_timeout: float,
        send_timeout: float,
        event_queue_size: int,
    ) -> None:
        super().__init__(
            SessionLog(logger, setup.session_id),
            policy=reconnect,
            queue_size=event_queue_size,
            task_name=f"openai-realtime-reader:{setup.session_id}",
        )
        self.session_id = setup.session_id
        self._url = url
        self._url_for = url_for
        self._reopen_reason: str | None = None  # set while a config change reopens the socket
        self._update_waiter: tuple[str, asyncio.Future[None]] | None = None
        self._audio_out = False  # the service refuses a new voice once it has spoken
        self._api_key = api_key
        self._session_config = build_session_config(setup)
        self._history = setup.history
        self._connect_timeout = connect_timeout
        self._send_timeout = send_timeout
        self._ws: ClientConnection | None = None
        self._connected = asyncio.Event()
        self._event_seq = 0
        self._sent_types: OrderedDict[str, str] = OrderedDict()
        self._responses: OrderedDict[str, _ResponseState] = OrderedDict()
        self._active: list[str] = []
        self._partial_transcripts: dict[str, str] = {}
        self._uncommitted_ms = 0.0
        self._dropped_audio_chunks = 0

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        self._ws = await self._open()
        self._connected.set()
        self._start_reader()
        self._log.info("connected to %s", self._url)

    def _failed(self) -> None:
        self._connected.set()  # wake senders waiting for a reconnect; they see why

    async def _close_connection(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(ConnectionClosed, OSError):
                await self._ws.close()

    # -- input -------------------------------------------------------------------------

    async def send_audio(self, pcm: bytes) -> None:
        """Append mono PCM16 at 24 kHz; dropped (and counted) while reconnecting."""
        if not pcm:
            return
        sent = await self._send(
            "input_audio_buffer.append",
            droppable=True,
            audio=base64.b64encode(pcm).decode("ascii"),
        )
        if sent:
            self._uncommitted_ms += len(pcm) / 2 / SAMPLE_RATE * 1000.0

    async def send_image(self, frame: ImageFrame) -> None:
        if frame.mime_type not in _IMAGE_TYPES:
            raise ProviderError(
                f"OpenAI Realtime accepts JPEG and PNG images, not {frame.mime_type}",
                code=UNSUPPORTED_MEDIA,
            )
        data_url = f"data:{frame.mime_type};base64,{base64.b64encode(frame.data).decode('ascii')}"
        await self._send(
            "conversation.item.create",
            item={
                "type": "message",
                "role": "user",
                "content": [{"type": "input_image", "image_url": data_url}],
            },
        )

    async def send_text(self, text: str) -> None:
        await self._send(
            "conversation.item.create",
            item={
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": text}],
            },
        )
        await self._send("response.create")

    async def commit(self) -> None:
        """Commit the audio buffer and ask for a response.

        Skipped when less than 100 ms is buffered: the service would answer
        ``input_audio_buffer_commit_empty`` (e.g. server VAD already committed it).
        """
        if self._uncommitted_ms < MIN_COMMIT_MS:
            self._log.debug("commit skipped: only %.0f ms buffered", self._uncommitted_ms)
            return
        await self._send("input_audio_buffer.commit")
        self._uncommitted_ms = 0.0
        await self._send("response.create")

    async def cancel_response(self) -> None:
        if not self._active:
            self._log.debug("cancel skipped: no response in progress")
            return
        await self._send("response.cancel", response_id=self._active[-1])

    async def truncate(self, response_id: str, audio_end_ms: float) -> None:
        """Tell the service how much of a response's audio was heard.

        ``audio_end_ms`` is clamped to the audio we received for that item: the
        service refuses a truncation point past the end of the audio.
        """
        state = self._responses.get(response_id)
        if state is None or state.audio_item_id is None:
            self._log.debug("truncate skipped: no audio item known for %s", response_id)
            return
        end_ms = max(0, min(int(audio_end_ms), state.audio_ms))
        await self._send(
            "conversation.item.truncate",
            item_id=state.audio_item_id,
            content_index=0,
            audio_end_ms=end_ms,
        )

    async def send_tool_results(self, outputs: list[ToolOutput], *, respond: bool = True) -> None:
        """One ``function_call_output`` item per call, then one ``response.create``.

        ``respond=False`` adds the items only: the service answers nothing until the
        next ``response.create`` (the user's next turn).
        """
        for out in outputs:
            # ``name`` is not part of OpenAI's function_call_output item: call_id links them.
            await self._send(
                "conversation.item.create",
                item={"type": "function_call_output", "call_id": out.call_id, "output": out.output},
            )
        if respond and outputs:
            await self._send("response.create")

    async def reconfigure(self, setup: RealtimeSetup) -> None:
        """Apply a changed session: ``session.update`` when the service can take it live,
        else a new upstream session (another model, or a voice after audio went out)
        re-seeded with the conversation. Returns once the change is in effect."""
        config = build_session_config(setup)
        url = self._url_for(setup.config.model)
        voice_changed = config["audio"]["output"].get("voice") != self._session_config["audio"][
            "output"
        ].get("voice")
        if url == self._url and config == self._session_config:
            return
        self._check_usable()
        if url != self._url or (voice_changed and self._audio_out):
            self._url, self._session_config = url, config
            await self._restart("session configuration changed")
            return
        waiter = asyncio.get_running_loop().create_future()
        event = self._client_event("session.update", {"session": config})
        self._update_waiter = (event["event_id"], waiter)
        try:
            ws = self._ws
            assert ws is not None
            try:
                await ws.send(json.dumps(event))
            except ConnectionClosed:
                raise ProviderError(
                    "OpenAI Realtime connection lost while updating the session",
                    code=PROVIDER_FAILED,
                ) from None
            async with asyncio.timeout(self._send_timeout):
                await waiter
        except TimeoutError:
            raise ProviderError(
                "OpenAI Realtime did not confirm the session update", code=PROVIDER_FAILED
            ) from None
        finally:
            self._update_waiter = None
        self._session_config = config

    async def _restart(self, reason: str) -> None:
        """Close the socket on purpose; the reader reconnects at once with the new settings."""
        self._reopen_reason = reason
        self._connected.clear()
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(ConnectionClosed, OSError):
                await ws.close()
        try:
            async with asyncio.timeout(self._connect_timeout * 2):
                await self._connected.wait()
        except TimeoutError:
            raise ProviderError(
                "OpenAI Realtime did not reopen with the new configuration", code=PROVIDER_FAILED
            ) from None
        self._check_usable()

    # -- connection --------------------------------------------------------------------

    async def _open(self) -> ClientConnection:
        """Connect, wait for ``session.created``, configure, wait for ``session.updated``."""
        try:
            ws = await ws_connect(
                self._url,
                additional_headers={"Authorization": f"Bearer {self._api_key}"},
                open_timeout=self._connect_timeout,
                max_size=16 * 2**20,
                close_timeout=2,
                compression=None,  # base64 audio barely compresses; deflate costs CPU
            )
        except InvalidStatus as exc:
            raise _handshake_error(exc, self._url) from None
        except (OSError, InvalidHandshake, InvalidURI) as exc:
            raise ProviderError(
                f"cannot connect to OpenAI Realtime at {self._url}: {exc!r}",
                code=PROVIDER_FAILED,
            ) from exc
        try:
            async with asyncio.timeout(self._connect_timeout):
                await self._expect(ws, "session.created")
                await ws.send(
                    json.dumps(
                        self._client_event("session.update", {"session": self._session_config})
                    )
                )
                await self._expect(ws, "session.updated")
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await ws.close()
            if isinstance(exc, TimeoutError):
                raise ProviderError(
                    f"OpenAI Realtime did not confirm the session within {self._connect_timeout}s",
                    code=PROVIDER_FAILED,
                ) from None
            if isinstance(exc, ConnectionClosed):
                raise ProviderError(
                    f"OpenAI Realtime closed the connection during setup: {exc}",
                    code=PROVIDER_FAILED,
                ) from None
            raise
        return ws

    async def _expect(self, ws: ClientConnection, wanted: str) -> None:
        while True:
            raw = await ws.recv()
            try:
                event = json.loads(raw)
            except ValueError:
                raise ProviderError(
                    f"OpenAI Realtime sent a non-JSON message during setup: {raw[:200]!r}",
                    code=PROVIDER_FAILED,
                ) from None
            kind = event.get("type") if isinstance(event, dict) else None
            if kind == wanted:
                return
            if kind == "error":
                raise _setup_error(event.get("error"))
            self._log.debug("ignoring %s while waiting for %s", kind, wanted)

    async def _read(self) -> LinkEnded:
        ws = self._ws
        assert ws is not None
        try:
            async for raw in ws:
                self._alive()
                await self._dispatch(raw)
            reason = f"closed by OpenAI ({ws.close_code} {ws.close_reason or ''})".strip()
        except ConnectionClosed as exc:
            reason = str(exc)
        self._connected.clear()
        planned, self._reopen_reason = self._reopen_reason, None
        if planned:
            return LinkEnded(planned, immediate=True)
        return LinkEnded(f"connection lost: {reason}")

    async def _reseed(self, ws: ClientConnection) -> bool:
        """Give the new upstream session the stored conversation, before any new input.

        Text turns become ``conversation.item.create`` messages (user ``input_text``,
        assistant ``output_text``, the answer as far as it was heard); the newest
        ones within ``RESEED_MAX_ITEMS`` / ``RESEED_MAX_CHARS`` (realtime_link). True when the
        conversation (possibly empty) was restored.
        """
        if self._history is None:
            return False
        try:
            history = await self._history()
        except Exception:  # the store failing must not stop the reconnection
            self._log.exception("could not read the stored conversation to re-seed")
            return False
        items = reseed_items(history)
        try:
            for item in items:
                await ws.send(
                    json.dumps(self._client_event("conversation.item.create", {"item": item}))
                )
        except ConnectionClosed:
            return False
        self._log.info("re-seeded %d conversation item(s)", len(items))
        return True

    async def _reopen(self, attempt: int) -> bool:
        ws = await self._open()
        self._ws = ws
        # A new upstream session: old items (for truncate) and buffers are gone.
        self._responses.clear()
        self._uncommitted_ms = 0.0
        self._partial_transcripts.clear()
        kept = await self._reseed(ws)
        self._connected.set()
        return kept

    async def _lost(self, ended: LinkEnded) -> str | None:
        """Responses cut by a lost connection will never get ``response.done``: they end
        like a barge-in (the client stops playing them)."""
        active, self._active = self._active, []
        for response_id in active:
            await self._emit(StreamChunk(response_id=response_id, interrupted=True))
            await self._emit(ResponseDone(response_id=response_id, finish_reason="interrupted"))
        return active[-1] if active else None

    # -- sending -----------------------------------------------------------------------

    def _client_event(self, kind: str, fields: dict[str, Any]) -> dict[str, Any]:
        self._event_seq += 1
        event_id = f"evt_dx{self._event_seq}"
        self._sent_types[event_id] = kind
        if len(self._sent_types) > _MAX_TRACKED_CLIENT_EVENTS:
            self._sent_types.popitem(last=False)
        return {"type": kind, "event_id": event_id, **fields}

    async def _send(self, kind: str, *, droppable: bool = False, **fields: Any) -> bool:
        """Send one client event; False if an audio chunk was dropped while reconnecting."""
        self._check_usable()
        if not self._connected.is_set():
            if droppable:
                self._count_drop()
                return False
            try:
                async with asyncio.timeout(self._send_timeout):
                    await self._connected.wait()
            except TimeoutError:
                raise ProviderError(
                    f"OpenAI Realtime is reconnecting; {kind} not sent", code=PROVIDER_FAILED
                ) from None
            self._check_usable()
        ws = self._ws
        assert ws is not None
        try:
            await ws.send(json.dumps(self._client_event(kind, fields)))
        except ConnectionClosed:
            if droppable:
                self._count_drop()
                return False
            raise ProviderError(
                f"OpenAI Realtime connection lost while sending {kind}", code=PROVIDER_FAILED
            ) from None
        return True

    def _count_drop(self) -> None:
        self._dropped_audio_chunks += 1
        if self._dropped_audio_chunks == 1 or self._dropped_audio_chunks % 50 == 0:
            self._log.info(
                "dropped %d audio chunk(s) while disconnected", self._dropped_audio_chunks
            )

    # -- receiving ---------------------------------------------------------------------

    async def _dispatch(self, raw: str | bytes) -> None:
        try:
            event = json.loads(raw)
            mapped = self._map(event)
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as exc:
            self._log.warning("ignoring malformed server event (%r): %.200r", exc, raw)
            return
        for item in mapped:
            await self._emit(item)

    def _response(self, response_id: str) -> _ResponseState:
        state = self._responses.get(response_id)
        if state is None:
            state = self._responses[response_id] = _ResponseState()
            while len(self._responses) > _MAX_TRACKED_RESPONSES:
                self._responses.popitem(last=False)
        return state

    def _map(self, event: dict[str, Any]) -> list[RealtimeEvent]:
        """Translate one server event into zero or more protocol events."""
        kind = BETA_EVENT_ALIASES.get(event["type"], event["type"])
        if kind == "response.created":
            response_id = event["response"]["id"]
            self._response(response_id)
            self._active.append(response_id)
            return [ResponseStarted(response_id=response_id)]
        if kind == "response.output_text.delta":
            return [StreamChunk(response_id=event["response_id"], delta=event["delta"])]
        if kind == "response.output_audio.delta":
            pcm = base64.b64decode(event["delta"])
            state = self._response(event["response_id"])
            self._audio_out = True
            state.audio_item_id = state.audio_item_id or event["item_id"]
            if state.audio_item_id == event["item_id"]:
                state.audio_bytes += len(pcm)
            media = Media(mime_type="audio/pcm", data=pcm, sample_rate=SAMPLE_RATE, channels=1)
            return [StreamChunk(response_id=event["response_id"], media=media)]
        if kind == "response.output_audio_transcript.delta":
            return [
                StreamChunk(response_id=event["response_id"], delta=event["delta"], transcript=True)
            ]
        if kind == "response.output_item.added":
            item = event["item"]
            if item.get("type") == "function_call":
                call = self._response(event["response_id"]).tool_calls.setdefault(
                    item["call_id"], _ToolCallState()
                )
                call.name = item.get("name") or call.name
            return []
        if kind == "response.function_call_arguments.delta":
            call = self._response(event["response_id"]).tool_calls.setdefault(
                event["call_id"], _ToolCallState()
            )
            call.arguments.append(event["delta"])
            return []
        if kind == "response.function_call_arguments.done":
            return self._tool_call_done(event)
        if kind == "response.done":
            return self._response_done(event["response"])
        if kind == "input_audio_buffer.speech_started":
            return [SpeechStarted(audio_start_ms=float(event.get("audio_start_ms", 0)))]
        if kind == "input_audio_buffer.speech_stopped":
            return [SpeechStopped(audio_end_ms=float(event.get("audio_end_ms", 0)))]
        if kind in ("input_audio_buffer.committed", "input_audio_buffer.cleared"):
            self._uncommitted_ms = 0.0
            return []
        if kind == "conversation.item.input_audio_transcription.delta":
            item_id = event.get("item_id", "")
            text = self._partial_transcripts.get(item_id, "") + event.get("delta", "")
            self._partial_transcripts[item_id] = text
            return [Transcript(text=text, final=False)]
        if kind == "conversation.item.input_audio_transcription.completed":
            self._partial_transcripts.pop(event.get("item_id", ""), None)
            return [Transcript(text=event["transcript"], final=True)]
        if kind == "conversation.item.input_audio_transcription.failed":
            code, _type, message, _param = _error_fields(event.get("error"))
            self._log.warning("input transcription failed: %s: %s", code, message)
            return []
        if kind == "session.updated":
            if self._update_waiter is not None and not self._update_waiter[1].done():
                self._update_waiter[1].set_result(None)
            return []
        if kind == "error":
            return self._error(event.get("error"))
        if kind == "rate_limits.updated":
            self._log.debug("rate limits: %s", event.get("rate_limits"))
            return []
        return []

    def _tool_call_done(self, event: dict[str, Any]) -> list[RealtimeEvent]:
        state = self._response(event["response_id"])
        call = state.tool_calls.pop(event["call_id"], _ToolCallState())
        accumulated = "".join(call.arguments)
        arguments = event.get("arguments")
        if arguments is None:
            arguments = accumulated
        elif accumulated and accumulated != arguments:
            self._log.warning(
                "tool call %s: streamed arguments differ from final", event["call_id"]
            )
        state.had_tool_call = True
        tool_call = ToolCall(
            id=event["call_id"], name=event.get("name") or call.name, arguments=arguments
        )
        return [StreamChunk(response_id=event["response_id"], tool_calls=[tool_call])]

    def _response_done(self, response: dict[str, Any]) -> list[RealtimeEvent]:
        response_id = response["id"]
        if response_id in self._active:
            self._active.remove(response_id)
        state = self._responses.get(response_id)
        finish = _finish_reason(response, state)
        out: list[RealtimeEvent] = []
        if response.get("status") == "failed":
            details = response.get("status_details") or {}
            code, etype, message, _param = _error_fields(details.get("error") or {})
            out.append(
                ErrorEvent(
                    code=PROVIDER_FAILED,
                    message=f"response failed: {code or etype or 'unknown'}: {message}",
                )
            )
        usage = response.get("usage")
        out.append(
            ResponseDone(
                response_id=response_id,
                finish_reason=finish,
                usage=usage if isinstance(usage, dict) else None,
            )
        )
        return out

    def _error(self, error: Any) -> list[RealtimeEvent]:
        code, etype, message, param = _error_fields(error)
        if code == "response_cancel_not_active":
            # A cancel racing the response's natural end: harmless, not worth a client error.
            self._log.debug("cancel arrived after the response ended")
            return []
        origin = None
        if isinstance(error, dict) and error.get("event_id"):
            origin = self._sent_types.get(error["event_id"])
            waiter = self._update_waiter
            if waiter is not None and waiter[0] == error["event_id"] and not waiter[1].done():
                # The service refused the session.update: the caller says so, not an event.
                waiter[1].set_exception(
                    ProviderError(f"OpenAI Realtime refused the change: {message}", code=400)
                )
                return []
        context = ", ".join(
            part
            for part in (
                etype,
                f"param {param}" if param else None,
                f"in reply to {origin}" if origin else None,
            )
            if part
        )
        text = f"{code or etype or 'error'}: {message}" + (f" ({context})" if context else "")
        self._log.warning("OpenAI error: %s", text)
        return [ErrorEvent(code=PROVIDER_FAILED, message=text)]
