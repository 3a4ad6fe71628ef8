"""Wire protocol v1: every message a client may send, every message the server sends.

This module is the single place that parses client messages and serialises
server messages; it imports nothing from the rest of the project so that
clients, providers and tests can share it.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticSerializationError, from_json


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
CONFLICT = 409  # the session belongs to another endpoint (/v1/realtime)
RESUME_GAP = 410  # a resume asked for messages the outbox no longer holds (not fatal)
TOO_LARGE = 413
UNSUPPORTED_MEDIA = 415
RATE_LIMITED = 429
INTERNAL = 500
PROVIDER_FAILED = 502
UNAVAILABLE = 503
#: The same code, when the cause is the state store.
STORE_UNAVAILABLE = UNAVAILABLE


class ProtocolError(Exception):
    """A client message that cannot be accepted; becomes an ``error`` message."""

    def __init__(
        self, code: int, message: str, *, fatal: bool = False, id: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal
        #: The ``id`` of the client message that caused it, echoed on the ``error``.
        self.id = id


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
    #: The last chunk of a recording or file: decode what is left now (docs/media.md).
    final: bool = False


# --------------------------------------------------------------------------------------
# Session configuration


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


#: Input sample rates accepted (Hz): any integer in this range; libswresample converts.
MIN_INPUT_RATE, MAX_INPUT_RATE = 8000, 96000


class InputAudioConfig(_Strict):
    format: Literal["pcm16", "opus", "mulaw", "alaw"] = "pcm16"
    sample_rate: int = Field(16000, ge=MIN_INPUT_RATE, le=MAX_INPUT_RATE)
    channels: Literal[1, 2] = 1
    #: Whether the client cancels the echo of the reply it plays (browsers do). false:
    #: the server discounts the reply's echo before barge-in (docs/turn-taking.md);
    #: unset: false for "mulaw"/"alaw" (telephony), true otherwise.
    echo_cancellation: bool | None = None


class OutputAudioConfig(_Strict):
    sample_rate: Literal[8000, 16000, 24000, 32000, 44100, 48000] = 24000


class TurnDetectionConfig(_Strict):
    type: Literal["vad", "manual"] = "vad"
    aggressiveness: int = Field(3, ge=0, le=3)
    start_ms: int = Field(200, ge=10, le=5000)
    #: Silence that ends a turn, or "auto": learn the session's pauses inside turns and
    #: end turns after 1.25 x the longest + 100 ms, within min_stop_ms..max_stop_ms
    #: (from 800; lowered once three pauses are known). See docs/turn-taking.md.
    stop_ms: Annotated[int, Field(ge=100, le=10000)] | Literal["auto"] = 800
    min_stop_ms: int = Field(300, ge=100, le=10000)
    max_stop_ms: int = Field(1500, ge=100, le=10000)
    pre_roll_ms: int = Field(300, ge=0, le=2000)
    min_speech_ms: int = Field(200, ge=0, le=5000)
    max_turn_ms: int = Field(30000, ge=1000, le=300000)
    interrupt: bool = True
    #: VAD mode: answer each turn as it ends. False: a turn that ends is announced
    #: (``turn.ended``) and held unanswered; the next turn the client ends itself (an
    #: ``input.text`` with ``final``, or an ``input.commit`` with no speech open) takes
    #: the held turns and is answered.
    respond: bool = True
    min_barge_in_ms: int = Field(300, ge=0, le=5000)
    #: For realtime providers (ASM mode): use the provider's own turn detection
    #: ("server_vad" / "semantic_vad") or drive commits with ours ("duplex").
    provider_vad: Literal["server_vad", "semantic_vad", "duplex", "none"] = "server_vad"

    @property
    def fixed_stop_ms(self) -> int:
        """`stop_ms` as a number: 800 (where "auto" starts) for "auto". For providers'
        own turn detection, which has no adaptive mode."""
        return 800 if self.stop_ms == "auto" else self.stop_ms

    @model_validator(mode="after")
    def _stop_bounds(self) -> TurnDetectionConfig:
        if self.min_stop_ms > self.max_stop_ms:
            raise ValueError("min_stop_ms must not exceed max_stop_ms")
        longest = self.max_stop_ms if self.stop_ms == "auto" else self.stop_ms
        if self.max_turn_ms <= longest:
            raise ValueError('max_turn_ms must exceed stop_ms (max_stop_ms with "auto")')
        return self


class VideoConfig(_Strict):
    fps_speaking: float = Field(1.0, gt=0, le=30)
    fps_idle: float = Field(0.2, ge=0, le=30)
    max_dimension: int = Field(1024, ge=64, le=4096)


class ToolSpec(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


@dataclass(frozen=True, slots=True)
class ConfigLimits:
    """Caps on what a client can make the server keep (settings ``DUPLEX_MAX_*``).

    Checked when a client sets a config (``SessionConfig.merged(patch, limits)``), not
    when a stored one loads, so lowering a limit never locks a session out.
    """

    max_instructions_chars: int = 65_536
    max_variables: int = 256
    max_variable_name_chars: int = 64
    max_variable_value_chars: int = 8_192
    max_tools: int = 128
    max_tool_schema_bytes: int = 16_384
    max_option_depth: int = 8
    max_voice_chars: int = 128
    max_name_chars: int = 256

    def check_name(self, field: str, value: str | None) -> None:
        if value is not None and len(value) > self.max_name_chars:
            raise ValueError(f"{field}: {_over(len(value), self.max_name_chars)} characters")

    def check_variables(self, variables: dict[str, str]) -> None:
        """Raise ValueError when ``variables`` (all a session would keep) break a cap."""
        if len(variables) > self.max_variables:
            raise ValueError(f"variables: {_over(len(variables), self.max_variables)} variables")
        for name, value in variables.items():
            if len(name) > self.max_variable_name_chars:
                raise ValueError(
                    f"variables: a name of {_over(len(name), self.max_variable_name_chars)}"
                    " characters"
                )
            if len(value) > self.max_variable_value_chars:
                raise ValueError(
                    f"variables.{name[:32]}: {_over(len(value), self.max_variable_value_chars)}"
                    " characters"
                )

    def check(self, config: SessionConfig) -> None:
        """Raise ValueError naming the first cap ``config`` breaks."""
        if len(config.instructions) > self.max_instructions_chars:
            raise ValueError(
                f"instructions: {_over(len(config.instructions), self.max_instructions_chars)}"
                " characters"
            )
        self.check_variables(config.variables)
        if len(config.tools) > self.max_tools:
            raise ValueError(f"tools: {_over(len(config.tools), self.max_tools)} tools")
        for i, tool in enumerate(config.tools):
            size = len(tool.model_dump_json().encode())
            if size > self.max_tool_schema_bytes:
                raise ValueError(f"tools.{i}: {_over(size, self.max_tool_schema_bytes)} bytes")
        depth = json_depth(config.provider_options)
        if depth > self.max_option_depth:
            raise ValueError(
                f"provider_options: nested {_over(depth, self.max_option_depth)} levels deep"
            )
        if config.voice is not None and len(config.voice) > self.max_voice_chars:
            raise ValueError(f"voice: {_over(len(config.voice), self.max_voice_chars)} characters")
        self.check_name("model", config.model)
        self.check_name("provider", config.provider)


def _over(value: int, limit: int) -> str:
    return f"{value}, over the limit of {limit}"


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

    @model_validator(mode="after")
    def _within_limits(self, info: ValidationInfo) -> SessionConfig:
        limits = (info.context or {}).get("limits")
        if limits is not None:
            limits.check(self)
        return self

    def merged(self, patch: dict[str, Any], limits: ConfigLimits | None = None) -> SessionConfig:
        """A new config with ``patch`` deep-merged in; raises ValidationError on bad values
        (and on breaking ``limits``, when given)."""
        return SessionConfig.model_validate(
            _deep_merge(self.model_dump(), patch), context={"limits": limits}
        )


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
    mime_type: str = Field(max_length=128)
    width: int | None = Field(None, gt=0)
    height: int | None = Field(None, gt=0)
    frame_num: int | None = None
    timestamp: float | None = None


class InputVideo(_ClientMessage):
    type: Literal["input.video"]
    data: Base64
    mime_type: str = Field(max_length=128)
    chunk_index: int = Field(ge=0)
    is_key_frame: bool | None = None
    timestamp: float | None = None
    duration_ms: float | None = None
    width: int | None = Field(None, gt=0)
    height: int | None = Field(None, gt=0)
    final: bool = False


class InputCommit(_ClientMessage):
    type: Literal["input.commit"]
    request_id: str | None = Field(None, max_length=128)


class ResponseCancel(_ClientMessage):
    type: Literal["response.cancel"]


class Playback(_ClientMessage):
    type: Literal["playback"]
    response_id: str = Field(max_length=256)
    played_ms: float = Field(ge=0)


class ToolResult(_ClientMessage):
    type: Literal["tool.result"]
    call_id: str = Field(max_length=256)
    output: Any


class Ping(_ClientMessage):
    type: Literal["ping"]


class SessionResume(_ClientMessage):
    """Continue a live session after a dropped socket (the first message of a connection)."""

    type: Literal["session.resume"]
    session_id: str = Field(max_length=128)
    last_seq: int = Field(ge=0)


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
    | Ping
    | SessionResume,
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
        "session.resume",
    }
)

_client_adapter: TypeAdapter[ClientMessage] = TypeAdapter(ClientMessage)


@dataclass(frozen=True, slots=True)
class JsonLimits:
    """Bounds on one JSON message, checked at the parse point (docs/protocol.md "Limits").

    The parser (jiter, in Rust) stops at 200 levels and 4,300-digit numbers before
    Python sees anything; these tighter bounds are then checked on the parsed value.
    """

    #: Containers inside containers, the message itself being level 1 (at most 200).
    max_depth: int = 32
    #: Integers have at most this many digits.
    max_int_digits: int = 40


def parse_json(raw: str | bytes, limits: JsonLimits | None = None) -> Any:
    """Parse one JSON text within ``limits``; raise ProtocolError(400) naming the problem.

    The result holds only finite numbers within the bounds and strings that encode to
    UTF-8 (no unpaired surrogates), so whatever is kept can be written out again.
    """
    limits = limits or JsonLimits()
    try:
        value = from_json(raw, allow_inf_nan=False)
    except ValueError as exc:  # pydantic_core reports every JSON error as ValueError
        problem = _json_problem(str(exc), limits)
        raise ProtocolError(BAD_REQUEST, f"invalid JSON: {problem}") from None
    except UnicodeError:  # a str holding a lone surrogate (not possible from a text frame)
        raise ProtocolError(BAD_REQUEST, "invalid JSON: unpaired UTF-16 surrogate") from None
    check_json_value(value, limits)
    return value


def _json_problem(message: str, limits: JsonLimits) -> str:
    if message.startswith("recursion limit exceeded"):
        return f"nested deeper than {limits.max_depth} levels"
    if message.startswith("number out of range"):
        return f"number too long (integers have at most {limits.max_int_digits} digits)"
    if "surrogate" in message or "hex escape" in message:
        return f"unpaired UTF-16 surrogate or bad \\u escape ({message})"
    return message


def check_json_value(value: Any, limits: JsonLimits | None = None) -> None:
    """Raise ProtocolError(400) if ``value`` (parsed JSON) breaks ``limits``, holds a
    non-finite number or a string with an unpaired surrogate. For values parsed
    elsewhere (HTTP bodies); `parse_json` calls it."""
    limits = limits or JsonLimits()
    int_bound = 10**limits.max_int_digits
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        kind = type(item)
        if kind is dict or kind is list:
            if depth > limits.max_depth:
                raise ProtocolError(
                    BAD_REQUEST, f"invalid JSON: nested deeper than {limits.max_depth} levels"
                )
            if kind is dict:
                for key, child in item.items():
                    _check_text(key)
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)
        elif kind is str:
            _check_text(item)
        elif kind is int:
            if not -int_bound < item < int_bound:
                raise ProtocolError(
                    BAD_REQUEST,
                    f"invalid JSON: number too long (integers have at most "
                    f"{limits.max_int_digits} digits)",
                )
        elif kind is float and not math.isfinite(item):
            raise ProtocolError(BAD_REQUEST, "invalid JSON: number out of range (not finite)")


def _check_text(text: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ProtocolError(
                BAD_REQUEST, "invalid JSON: unpaired UTF-16 surrogate in a string"
            ) from None


def json_depth(value: Any) -> int:
    """How deeply lists and dicts nest in ``value`` (0 for a scalar, 1 for ``{}``)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_client_message(raw: str | bytes, limits: JsonLimits | None = None) -> ClientMessage:
    """Parse and validate one JSON text frame; raise ProtocolError(400) with a readable reason.

    This is the one place client JSON is parsed: `parse_json` bounds it, then the
    ``type`` is checked before the message is validated and dispatched.
    """
    obj = parse_json(raw, limits)
    if not isinstance(obj, dict):
        raise ProtocolError(BAD_REQUEST, "a message must be a JSON object")
    msg_id = obj.get("id")
    # Echoed on the error below only when it is a valid id (a string of up to 128 chars).
    msg_id = msg_id if isinstance(msg_id, str) and len(msg_id) <= MAX_ID_CHARS else None
    kind = obj.get("type")
    if not isinstance(kind, str):
        if "type" not in obj:
            raise ProtocolError(BAD_REQUEST, "a message needs a `type`", id=msg_id)
        raise ProtocolError(
            BAD_REQUEST, f"`type` must be a string, not {_json_type(kind)}", id=msg_id
        )
    if kind not in CLIENT_MESSAGE_TYPES:
        raise ProtocolError(BAD_REQUEST, f"unknown message type: {_short(kind)}", id=msg_id)
    try:
        return _client_adapter.validate_python(obj)
    except ValidationError as exc:
        raise ProtocolError(BAD_REQUEST, f"invalid {kind}: {_describe(exc)}", id=msg_id) from None


#: Bytes of an oversize message searched for its ``id`` (docs/protocol.md "Errors").
ID_PEEK_BYTES = 1024
MAX_ID_CHARS = 128


def peek_id(head: str) -> str | None:
    """The top-level ``"id"`` of a JSON object whose first bytes are ``head``, if it is
    a plain string there (no escapes); for messages too large to parse.

    A small scanner: it follows strings and nesting, so an ``"id"`` inside ``data``
    or a nested object is never taken for the message's own.
    """
    depth, i, n = 0, 0, len(head)
    expect_key = False
    while i < n:
        c = head[i]
        if c == '"':
            end = head.find('"', i + 1)
            while end != -1 and _escaped(head, end):
                end = head.find('"', end + 1)
            if end == -1:
                return None
            if depth == 1 and expect_key and head[i + 1 : end] == "id":
                rest = head[end + 1 :].lstrip()
                if not rest.startswith(":"):
                    return None
                value = rest[1:].lstrip()
                close = value.find('"', 1)
                if not value.startswith('"') or close == -1:
                    return None
                found = value[1:close]
                if "\\" in found or len(found) > MAX_ID_CHARS:
                    return None
                return found
            expect_key = False
            i = end + 1
            continue
        if c in "{[":
            depth += 1
            expect_key = c == "{" and depth == 1
        elif c in "}]":
            depth -= 1
        elif c == "," and depth == 1:
            expect_key = True
        i += 1
    return None


def _escaped(text: str, quote: int) -> bool:
    """Whether the quote at ``quote`` is escaped (an odd run of backslashes before it)."""
    run = 0
    while quote - run - 1 >= 0 and text[quote - run - 1] == "\\":
        run += 1
    return run % 2 == 1


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _short(text: str, limit: int = 64) -> str:
    """``repr`` of client text for an error message, cut to ``limit`` characters."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def _describe(exc: ValidationError) -> str:
    # The first location element is the union tag (the message type): drop it.
    return "; ".join(
        f"{_loc(err['loc'][1:]) or 'message'}: {err['msg']}" for err in exc.errors()[:3]
    )


def describe_validation_error(exc: ValidationError) -> str:
    """A one-line description of a pydantic error, for ``error`` messages."""
    return "; ".join(f"{_loc(err['loc']) or 'value'}: {err['msg']}" for err in exc.errors()[:3])


def _loc(parts: tuple[int | str, ...]) -> str:
    # Keys come from the client: each is cut short, so an error never echoes much input.
    return ".".join(str(p) if len(str(p)) <= 64 else f"{str(p)[:64]}..." for p in parts)


# --------------------------------------------------------------------------------------
# Output: StreamChunk and lifecycle events


class Media(BaseModel):
    mime_type: str
    data: Base64
    sample_rate: int | None = None
    channels: int | None = None
    width: int | None = None
    height: int | None = None


_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """``text`` with every lone UTF-16 surrogate replaced by U+FFFD.

    JSON allows ``"\\ud800"``, so an upstream provider can hand us a string that UTF-8
    cannot encode: it would fail when sent or stored. Client input with one is refused
    at parse time instead (see `parse_json`).
    """
    if text.isascii():
        return text
    try:
        text.encode()
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


#: Text that may come from a provider: always encodable (see `clean_text`).
CleanText = Annotated[str, AfterValidator(clean_text)]


class ToolCall(BaseModel):
    id: str
    name: str
    arguments: CleanText = ""


FinishReason = Literal[
    "stop", "length", "tool_calls", "interrupted", "cancelled", "error", "tool_limit_reached"
]


class StreamChunk(BaseModel):
    """One piece of a streamed response: text delta, audio, tool calls, or an ending."""

    response_id: str = ""
    delta: CleanText | None = None
    content: CleanText | None = None
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
    content: CleanText = ""
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


class SessionResumed(_Event):
    """The answer to a resume. Not numbered (``seq`` 0): the replayed messages follow with
    their own ``seq``, from ``first_seq`` (the next live one when nothing is replayed)."""

    type: Literal["session.resumed"] = "session.resumed"
    session: SessionInfo
    last_seq: int
    first_seq: int
    #: How many client messages the session has received (docs/protocol.md "Resending
    #: input"); absent when the server cannot tell (the replica that ran it died).
    input_received: int | None = None


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
    #: The server tools among ``call_ids`` that were running and have been stopped.
    stopped: list[str] = Field(default_factory=list)


class WarningEvent(_Event):
    """Something went wrong without ending the response (e.g. ``tool_limit_reached``)."""

    type: Literal["warning"] = "warning"
    response_id: str = ""
    code: str
    message: str
    #: Tool names concerned, when the warning is about tool calls.
    calls: list[str] | None = None


class ProviderReconnect(_Event):
    """The realtime provider's connection was lost and has been reopened.

    ``response_id`` is the response cut by it (its ``chunk.interrupted`` and
    ``response.done`` came first), if one was in progress; ``attempt`` the
    reconnect attempt that worked; ``context_kept`` whether the model still has
    the conversation.
    """

    type: Literal["provider.reconnect"] = "provider.reconnect"
    response_id: str | None = None
    attempt: int = 1
    reason: str = ""
    context_kept: bool = False


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


class SessionReconnect(_Event):
    """Reconnect soon, with ``session_id`` (and ``last_seq``): this server is draining
    (a deploy, ``reason: "draining"``) or another replica now runs the session
    (``"moved"``). Responses in flight still finish; then the server closes the socket
    with 1012. Wait about ``retry_after_ms`` (with jitter) before reconnecting.
    ``deadline_ms``: the longest the server keeps this connection open from now."""

    type: Literal["session.reconnect"] = "session.reconnect"
    reason: Literal["draining", "moved"]
    retry_after_ms: int = 0
    deadline_ms: int | None = None


class Pong(_Event):
    type: Literal["pong"] = "pong"
    id: str | None = None


ServerMessage = Annotated[
    SessionCreated
    | SessionUpdated
    | SessionResumed
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
    | SessionReconnect
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
    try:
        return msg.model_dump_json(exclude_none=True)
    except PydanticSerializationError:  # a lone surrogate in a free-form field
        data = _cleaned(msg.model_dump(mode="json", exclude_none=True))
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def _cleaned(value: Any) -> Any:
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, dict):
        return {clean_text(k): _cleaned(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_cleaned(v) for v in value]
    return value


def parse_server_message(raw: str | bytes) -> ServerMessage:
    """Parse a server message (used by the client SDK and tests)."""
    return server_message_adapter.validate_json(raw)
