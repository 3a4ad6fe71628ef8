"""Wire protocol v1: every message a client may send, every message the server sends.

This module is the single place that parses client messages and serialises
server messages; it imports nothing from the rest of the project so that
clients, providers and tests can share it.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    TypeAdapter,
    ValidationError,
)


def _b64decode(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise ValueError("expected a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"invalid base64: {exc}") from None


Base64 = Annotated[
    bytes,
    BeforeValidator(_b64decode),
    PlainSerializer(lambda b: base64.b64encode(b).decode("ascii"), return_type=str),
]


def new_id(prefix: str) -> str:
    """Short random ids with a readable prefix (``sess_``, ``resp_``, ``msg_``)."""
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


# --------------------------------------------------------------------------------------
# Error codes (documented in docs/protocol.md)

BAD_REQUEST = 400
UNAUTHORIZED = 401
NOT_FOUND = 404
TOO_LARGE = 413
UNSUPPORTED_MEDIA = 415
RATE_LIMITED = 429
INTERNAL = 500
PROVIDER_FAILED = 502


class ProtocolError(Exception):
    """A client message that cannot be accepted; becomes an ``error`` message."""

    def __init__(self, code: int, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal


# --------------------------------------------------------------------------------------
# In-process input chunks (what the session consumes, whatever the transport). Audio is
# plain bytes in the session's input format (``SessionConfig.input_audio``).


@dataclass(frozen=True, slots=True)
class TextChunk:
    text: str
    final: bool = False
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class ImageFrame:
    data: bytes
    mime_type: str = "image/jpeg"
    width: int | None = None
    height: int | None = None
    frame_num: int | None = None
    timestamp: float | None = None


@dataclass(frozen=True, slots=True)
class VideoChunk:
    """A piece of an encoded recording. The wire's ``is_key_frame`` and ``duration_ms``
    are not carried: keyframes are read from the bitstream (docs/media.md)."""

    data: bytes
    mime_type: str
    chunk_index: int
    timestamp: float | None = None
    width: int | None = None
    height: int | None = None


# --------------------------------------------------------------------------------------
# Session configuration


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputAudioConfig(_Strict):
    format: Literal["pcm16", "opus", "mulaw", "alaw"] = "pcm16"
    sample_rate: Literal[8000, 16000, 24000, 32000, 44100, 48000] = 16000
    channels: Literal[1, 2] = 1


class OutputAudioConfig(_Strict):
    sample_rate: Literal[8000, 16000, 24000, 32000, 44100, 48000] = 24000


class TurnDetectionConfig(_Strict):
    type: Literal["vad", "manual"] = "vad"
    aggressiveness: int = Field(3, ge=0, le=3)
    start_ms: int = Field(200, ge=10, le=5000)
    stop_ms: int = Field(800, ge=100, le=10000)
    pre_roll_ms: int = Field(300, ge=0, le=2000)
    min_speech_ms: int = Field(200, ge=0, le=5000)
    max_turn_ms: int = Field(30000, ge=1000, le=300000)
    interrupt: bool = True
    min_barge_in_ms: int = Field(300, ge=0, le=5000)
    #: For realtime providers (ASM mode): use the provider's own turn detection
    #: ("server_vad" / "semantic_vad") or drive commits with ours ("duplex").
    provider_vad: Literal["server_vad", "semantic_vad", "duplex", "none"] = "server_vad"


class VideoConfig(_Strict):
    fps_speaking: float = Field(1.0, gt=0, le=30)
    fps_idle: float = Field(0.2, ge=0, le=30)
    max_dimension: int = Field(1024, ge=64, le=4096)


class ToolSpec(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class SessionConfig(_Strict):
    #: "vad": the server finds turns and calls a per-turn provider; "asm": ASM (Audio
    #: Streaming Model) mode, audio streams into a realtime provider.
    mode: Literal["vad", "asm"] = "vad"
    provider: str = "echo"
    model: str | None = None
    voice: str | None = None
    instructions: str = ""
    variables: dict[str, str] = Field(default_factory=dict)
    input_audio: InputAudioConfig = Field(default_factory=InputAudioConfig)
    output_audio: OutputAudioConfig = Field(default_factory=OutputAudioConfig)
    turn_detection: TurnDetectionConfig = Field(default_factory=TurnDetectionConfig)
    video: VideoConfig = Field(default_factory=VideoConfig)
    tools: list[ToolSpec] = Field(default_factory=list)
    #: VAD mode: transcribe each spoken turn first (the transcript is the user's text).
    stt: bool = False
    #: VAD mode: speak the reply text (sentence by sentence, while it streams).
    tts: bool = False
    #: Pass-through options for the provider (e.g. temperature); documented per provider.
    provider_options: dict[str, Any] = Field(default_factory=dict)

    def merged(self, patch: dict[str, Any]) -> SessionConfig:
        """A new config with ``patch`` deep-merged in; raises ValidationError on bad values."""
        return SessionConfig.model_validate(_deep_merge(self.model_dump(), patch))


def _deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "variables":
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------------------
# Client -> server messages


class _ClientMessage(_Strict):
    id: str | None = Field(None, max_length=128)


class SessionUpdate(_ClientMessage):
    type: Literal["session.update"]
    config: dict[str, Any]


class InputText(_ClientMessage):
    type: Literal["input.text"]
    text: str
    final: bool = False
    request_id: str | None = Field(None, max_length=128)


class InputAudio(_ClientMessage):
    type: Literal["input.audio"]
    audio: Base64


class InputImage(_ClientMessage):
    type: Literal["input.image"]
    data: Base64
    mime_type: str
    width: int | None = Field(None, gt=0)
    height: int | None = Field(None, gt=0)
    frame_num: int | None = None
    timestamp: float | None = None


class InputVideo(_ClientMessage):
    type: Literal["input.video"]
    data: Base64
    mime_type: str
    chunk_index: int = Field(ge=0)
    is_key_frame: bool | None = None
    timestamp: float | None = None
    duration_ms: float | None = None
    width: int | None = Field(None, gt=0)
    height: int | None = Field(None, gt=0)


class InputCommit(_ClientMessage):
    type: Literal["input.commit"]
    request_id: str | None = Field(None, max_length=128)


class ResponseCancel(_ClientMessage):
    type: Literal["response.cancel"]


class Playback(_ClientMessage):
    type: Literal["playback"]
    response_id: str
    played_ms: float = Field(ge=0)


class ToolResult(_ClientMessage):
    type: Literal["tool.result"]
    call_id: str
    output: Any


class Ping(_ClientMessage):
    type: Literal["ping"]


ClientMessage = Annotated[
    SessionUpdate
    | InputText
    | InputAudio
    | InputImage
    | InputVideo
    | InputCommit
    | ResponseCancel
    | Playback
    | ToolResult
    | Ping,
    Field(discriminator="type"),
]

CLIENT_MESSAGE_TYPES = frozenset(
    {
        "session.update",
        "input.text",
        "input.audio",
        "input.image",
        "input.video",
        "input.commit",
        "response.cancel",
        "playback",
        "tool.result",
        "ping",
    }
)

_client_adapter: TypeAdapter[ClientMessage] = TypeAdapter(ClientMessage)


def parse_client_message(raw: str | bytes) -> ClientMessage:
    """Parse and validate one JSON text frame; raise ProtocolError(400) with a readable reason."""
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProtocolError(BAD_REQUEST, f"invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(BAD_REQUEST, "a message must be a JSON object")
    kind = obj.get("type")
    if kind not in CLIENT_MESSAGE_TYPES:
        raise ProtocolError(BAD_REQUEST, f"unknown message type: {kind!r}")
    try:
        return _client_adapter.validate_python(obj)
    except ValidationError as exc:
        raise ProtocolError(BAD_REQUEST, f"invalid {kind}: {_describe(exc)}") from None


def _describe(exc: ValidationError) -> str:
    # The first location element is the union tag (the message type): drop it.
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc'][1:]) or 'message'}: {err['msg']}"
        for err in exc.errors()[:3]
    )


def describe_validation_error(exc: ValidationError) -> str:
    """A one-line description of a pydantic error, for ``error`` messages."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg']}"
        for err in exc.errors()[:3]
    )


# --------------------------------------------------------------------------------------
# Output: StreamChunk and lifecycle events


class Media(BaseModel):
    mime_type: str
    data: Base64
    sample_rate: int | None = None
    channels: int | None = None
    width: int | None = None
    height: int | None = None


class ToolCall(BaseModel):
    id: str
    name: str
    arguments: str = ""


FinishReason = Literal[
    "stop", "length", "tool_calls", "interrupted", "cancelled", "error", "tool_limit_reached"
]


class StreamChunk(BaseModel):
    """One piece of a streamed response: text delta, audio, tool calls, or an ending."""

    response_id: str = ""
    delta: str | None = None
    content: str | None = None
    media: Media | None = None
    tool_calls: list[ToolCall] | None = None
    finish_reason: FinishReason | None = None
    interrupted: bool | None = None
    error: str | None = None
    #: True when ``delta`` is the transcript of the reply's own audio (realtime
    #: providers in ASM mode), not text the model wrote.
    transcript: bool | None = None
    #: Free-form extras (usage, hops, provider warnings list); never a sub-event.
    metadata: dict[str, Any] | None = None


class Message(BaseModel):
    """A conversation message as stored and as returned by the REST API."""

    id: str = Field(default_factory=lambda: new_id("msg"))
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    created_at: float = Field(default_factory=time.time)
    metadata: dict[str, Any] = Field(default_factory=dict)


class _Event(BaseModel):
    seq: int = 0


class SessionInfo(BaseModel):
    id: str
    mode: str
    provider: str
    config: dict[str, Any]


class SessionCreated(_Event):
    type: Literal["session.created"] = "session.created"
    session: SessionInfo


class SessionUpdated(_Event):
    type: Literal["session.updated"] = "session.updated"
    session: SessionInfo


class SpeechStarted(_Event):
    type: Literal["speech.started"] = "speech.started"
    audio_start_ms: float


class SpeechStopped(_Event):
    type: Literal["speech.stopped"] = "speech.stopped"
    audio_end_ms: float


class TurnEnded(_Event):
    type: Literal["turn.ended"] = "turn.ended"
    turn_id: str
    request_id: str | None = None
    audio_start_ms: float | None = None
    audio_end_ms: float | None = None


class Transcript(_Event):
    """What the user said, when a provider or STT stage transcribed it."""

    type: Literal["transcript"] = "transcript"
    turn_id: str | None = None
    text: str
    final: bool = True


class ResponseStarted(_Event):
    type: Literal["response.started"] = "response.started"
    response_id: str
    turn_id: str | None = None
    request_id: str | None = None


class ChunkEvent(_Event, StreamChunk):
    type: Literal["chunk"] = "chunk"


class ToolExecution(_Event):
    """The server is running tool calls (VAD and ASM modes alike).

    ``calls`` and ``call_ids`` list every call of the round, in the model's order,
    whoever runs it (client calls went out just before in ``chunk.tool_calls``);
    ``hop`` counts the rounds of tools since the user's turn, from 1.
    """

    type: Literal["tool.execution"] = "tool.execution"
    response_id: str = ""
    calls: list[str]
    call_ids: list[str]
    hop: int


class ToolOutput(_Event):
    """The result of one tool call, as given to the model (a JSON text)."""

    type: Literal["tool.output"] = "tool.output"
    response_id: str = ""
    call_id: str
    name: str
    output: str


class ToolCancelled(_Event):
    """The provider withdrew tool calls (e.g. the user talked over them): do not answer."""

    type: Literal["tool.cancelled"] = "tool.cancelled"
    response_id: str = ""
    call_ids: list[str]


class WarningEvent(_Event):
    """Something went wrong without ending the response (e.g. ``tool_limit_reached``)."""

    type: Literal["warning"] = "warning"
    response_id: str = ""
    code: str
    message: str
    #: Tool names concerned, when the warning is about tool calls.
    calls: list[str] | None = None


class ProviderReconnect(_Event):
    """The realtime provider's connection was lost and is being reopened.

    ``response_id`` is the response cut by it (its ``chunk.interrupted`` and
    ``response.done`` follow), if one was in progress.
    """

    type: Literal["provider.reconnect"] = "provider.reconnect"
    response_id: str | None = None


#: Sub-events of a response that travel in a response's stream next to its chunks.
ToolEvent = ToolExecution | ToolOutput | ToolCancelled | WarningEvent


class ResponseDone(_Event):
    type: Literal["response.done"] = "response.done"
    response_id: str
    finish_reason: FinishReason
    usage: dict[str, Any] | None = None


class ErrorEvent(_Event):
    type: Literal["error"] = "error"
    code: int
    message: str
    id: str | None = None
    fatal: bool = False


class Pong(_Event):
    type: Literal["pong"] = "pong"
    id: str | None = None


ServerMessage = Annotated[
    SessionCreated
    | SessionUpdated
    | SpeechStarted
    | SpeechStopped
    | TurnEnded
    | Transcript
    | ResponseStarted
    | ChunkEvent
    | ToolExecution
    | ToolOutput
    | ToolCancelled
    | WarningEvent
    | ProviderReconnect
    | ResponseDone
    | ErrorEvent
    | Pong,
    Field(discriminator="type"),
]

server_message_adapter: TypeAdapter[ServerMessage] = TypeAdapter(ServerMessage)

#: Every ``type`` a server message may have (read from the union above).
SERVER_MESSAGE_TYPES = frozenset(
    model.model_fields["type"].default for model in get_args(get_args(ServerMessage)[0])
)


def chunk_event(chunk: StreamChunk) -> ChunkEvent:
    """The chunk as a ``chunk`` server message (``seq`` is set when it is sent).

    Validating the chunk's ``__dict__`` in one call is ~3x cheaper than passing
    each field as a keyword; nested models (``media``) are kept, not copied.
    """
    return ChunkEvent.model_validate(chunk.__dict__)


#: StreamChunk fields that must all be None for an audio chunk to take the fast encoder.
_NOT_AUDIO = (
    "delta",
    "content",
    "tool_calls",
    "finish_reason",
    "interrupted",
    "error",
    "transcript",
    "metadata",
)


def _json_plain(value: object) -> bool:
    """A str that JSON writes as itself between quotes (printable ASCII, no ``"`` or ``\\``)."""
    return (
        type(value) is str
        and value.isascii()
        and value.isprintable()
        and '"' not in value
        and "\\" not in value
    )


def _encode_audio_chunk(msg: ChunkEvent) -> str | None:
    """The JSON of an audio-only ``chunk``, written directly; None for any other shape.

    Reply audio is most of the server's output, and pydantic takes ~15 µs for a
    100 ms 24 kHz chunk (base64 through a Python lambda, ``exclude_none`` over every
    field) against ~9 µs here, mostly the base64 itself. The text is byte-for-byte
    what ``model_dump_json(exclude_none=True)`` writes (same field order), which
    tests check for many shapes; anything unusual (other fields set, strings that
    need escapes, unexpected types) returns None and goes through pydantic.
    """
    fields = msg.__dict__
    media = fields["media"]
    seq = fields["seq"]
    if type(media) is not Media or type(seq) is not int or fields["type"] != "chunk":
        return None
    for name in _NOT_AUDIO:
        if fields[name] is not None:
            return None
    m = media.__dict__
    data, rate, channels = m["data"], m["sample_rate"], m["channels"]
    if (
        type(data) is not bytes
        or m["width"] is not None
        or m["height"] is not None
        or not (rate is None or type(rate) is int)
        or not (channels is None or type(channels) is int)
        or not _json_plain(fields["response_id"])
        or not _json_plain(m["mime_type"])
    ):
        return None
    tail = "" if rate is None else f',"sample_rate":{rate}'
    if channels is not None:
        tail += f',"channels":{channels}'
    return (
        f'{{"response_id":"{fields["response_id"]}","media":{{"mime_type":"{m["mime_type"]}",'
        f'"data":"{binascii.b2a_base64(data, newline=False).decode("ascii")}"{tail}}},'
        f'"seq":{seq},"type":"chunk"}}'
    )


def encode_server_message(msg: BaseModel) -> str:
    """Serialise a server message to its JSON text frame (unset optional fields omitted)."""
    if type(msg) is ChunkEvent:
        text = _encode_audio_chunk(msg)
        if text is not None:
            return text
    return msg.model_dump_json(exclude_none=True)


def parse_server_message(raw: str | bytes) -> ServerMessage:
    """Parse a server message (used by the client SDK and tests)."""
    return server_message_adapter.validate_json(raw)
