"""The Realtime ``session`` object <-> the Duplex session config.

`RealtimeSessionState` keeps what a Realtime client set (formats, modalities, turn
detection as OpenAI names them); `duplex_patch` derives the Duplex config from it, and
`render` writes the GA session object for ``session.created`` / ``session.updated``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from server.realtime_door.errors import DoorError
from server.realtime_door.models import RealtimeModel

#: GA audio formats -> (Duplex input format, sample rate).
AUDIO_FORMATS: dict[str, tuple[str, int]] = {
    "audio/pcm": ("pcm16", 24000),
    "audio/pcmu": ("mulaw", 8000),
    "audio/pcma": ("alaw", 8000),
}
#: Beta names accepted as aliases.
_FORMAT_ALIASES = {"pcm16": "audio/pcm", "g711_ulaw": "audio/pcmu", "g711_alaw": "audio/pcma"}

DEFAULT_SERVER_VAD: dict[str, Any] = {
    "type": "server_vad",
    "threshold": 0.5,
    "prefix_padding_ms": 300,
    "silence_duration_ms": 500,
    "idle_timeout_ms": None,
    "create_response": True,
    "interrupt_response": True,
}
#: semantic_vad runs as Duplex's adaptive end of turn (``stop_ms: "auto"``: the silence
#: that ends a turn is learnt from the user's pauses) within these bounds (min, max ms).
SEMANTIC_STOP_MS = {
    "low": (800, 4000),
    "medium": (300, 1500),
    "auto": (300, 1500),
    "high": (200, 800),
}

_SESSION_KEYS = {
    "type",
    "model",
    "instructions",
    "output_modalities",
    "modalities",
    "audio",
    "tools",
    "tool_choice",
    "voice",
    "input_audio_format",
    "output_audio_format",
    "turn_detection",
    "input_audio_transcription",
    "temperature",
    "max_output_tokens",
    "max_response_output_tokens",
    "tracing",
    "truncation",
    "prompt",
    "include",
    "id",
    "object",
    "expires_at",
}


@dataclass
class RealtimeSessionState:
    model: RealtimeModel
    instructions: str = ""
    output_modalities: list[str] = field(default_factory=lambda: ["audio"])
    input_format: str = "audio/pcm"
    output_format: str = "audio/pcm"
    turn_detection: dict[str, Any] | None = field(default_factory=lambda: dict(DEFAULT_SERVER_VAD))
    transcription: dict[str, Any] | None = None
    voice: str = "alloy"
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: Any = "auto"
    max_output_tokens: int | str = "inf"

    @property
    def manual(self) -> bool:
        return self.turn_detection is None

    @property
    def holds_turns(self) -> bool:
        """Server VAD with ``create_response: false``: detected turns wait for
        ``response.create``."""
        td = self.turn_detection
        return td is not None and td.get("create_response") is False

    @property
    def audio_out(self) -> bool:
        return "audio" in self.output_modalities

    def updated(self, session: Any) -> RealtimeSessionState:
        """A copy with a ``session.update``'s ``session`` applied; DoorError on bad fields."""
        if not isinstance(session, dict):
            raise DoorError("invalid_type", "`session` must be an object", "session")
        state = copy.deepcopy(self)
        for key in session:
            if key not in _SESSION_KEYS:
                raise DoorError(
                    "unknown_parameter", f"Unknown parameter: 'session.{key}'.", f"session.{key}"
                )
        kind = session.get("type", "realtime")
        if kind != "realtime":
            raise DoorError(
                "invalid_value",
                f"session.type {kind!r} is not supported here (only 'realtime')",
                "session.type",
            )
        model = session.get("model")
        if model is not None and model != self.model.name:
            raise DoorError(
                "invalid_value",
                "the model is chosen when connecting (?model=) and cannot change",
                "session.model",
            )
        if "instructions" in session:
            state.instructions = _str(session["instructions"], "session.instructions")
        for key in ("output_modalities", "modalities"):
            if key in session:
                state.output_modalities = parse_modalities(session[key], f"session.{key}")
        audio = session.get("audio")
        if audio is not None and not isinstance(audio, dict):
            raise DoorError("invalid_type", "`session.audio` must be an object", "session.audio")
        audio_in = _obj((audio or {}).get("input"), "session.audio.input")
        audio_out = _obj((audio or {}).get("output"), "session.audio.output")
        # Beta names, accepted as aliases.
        if "input_audio_format" in session:
            audio_in.setdefault("format", session["input_audio_format"])
        if "output_audio_format" in session:
            audio_out.setdefault("format", session["output_audio_format"])
        if "turn_detection" in session:
            audio_in.setdefault("turn_detection", session["turn_detection"])
        if "input_audio_transcription" in session:
            audio_in.setdefault("transcription", session["input_audio_transcription"])
        if "voice" in session:
            audio_out.setdefault("voice", session["voice"])
        if "format" in audio_in:
            state.input_format = _format(audio_in["format"], "session.audio.input.format")
        if "format" in audio_out:
            state.output_format = _format(audio_out["format"], "session.audio.output.format")
        if "turn_detection" in audio_in:
            state.turn_detection = _turn_detection(audio_in["turn_detection"])
            if state.holds_turns and self.model.mode != "vad":
                raise DoorError(
                    "unsupported_value",
                    "create_response: false is not supported with a realtime provider's "
                    "turn detection (use turn_detection: null and response.create)",
                    "session.audio.input.turn_detection.create_response",
                )
        if "transcription" in audio_in:
            value = audio_in["transcription"]
            if value is not None and not isinstance(value, dict):
                raise DoorError(
                    "invalid_type",
                    "transcription must be an object or null",
                    "session.audio.input.transcription",
                )
            state.transcription = value
        if "voice" in audio_out:
            state.voice = _str(audio_out["voice"], "session.audio.output.voice")
        if "tools" in session:
            state.tools = _tools(session["tools"])
        if "tool_choice" in session:
            state.tool_choice = session["tool_choice"]
        for key in ("max_output_tokens", "max_response_output_tokens"):
            if key in session:
                state.max_output_tokens = session[key]
        return state

    def duplex_patch(self) -> dict[str, Any]:
        """The Duplex config this state means (merged over the model's own config)."""
        in_fmt, in_rate = AUDIO_FORMATS[self.input_format]
        _, out_rate = AUDIO_FORMATS[self.output_format]
        patch: dict[str, Any] = {
            "instructions": self.instructions,
            "voice": self.voice,
            "input_audio": {"format": in_fmt, "sample_rate": in_rate, "channels": 1},
            "output_audio": {"sample_rate": out_rate},
            "tools": [] if self.tool_choice == "none" else [_duplex_tool(t) for t in self.tools],
        }
        td = self.turn_detection
        if td is None:
            patch["turn_detection"] = {"type": "manual"}
        else:
            silence = td.get("silence_duration_ms")
            threshold = td.get("threshold")
            patch["turn_detection"] = {
                "type": "vad",
                "stop_ms": max(100, int(silence if silence is not None else 500)),
                "pre_roll_ms": int(td.get("prefix_padding_ms") or 300),
                "aggressiveness": _aggressiveness(threshold if threshold is not None else 0.5),
                "interrupt": td.get("interrupt_response", True) is not False,
            }
            if td["type"] == "semantic_vad":
                low, high = SEMANTIC_STOP_MS[td.get("eagerness") or "auto"]
                patch["turn_detection"] |= {
                    "stop_ms": "auto",
                    "min_stop_ms": low,
                    "max_stop_ms": high,
                }
            if self.model.mode == "asm":
                patch["turn_detection"]["provider_vad"] = td["type"]
            else:
                patch["turn_detection"]["respond"] = td.get("create_response") is not False
        if self.model.mode == "vad":
            patch["stt"] = self.transcription is not None or bool(self.model.config.get("stt"))
            patch["tts"] = self.model.speaks and self.audio_out
        return patch

    def render(self, session_id: str) -> dict[str, Any]:
        """The GA ``session`` object (``realtime.session``)."""
        return {
            "type": "realtime",
            "object": "realtime.session",
            "id": session_id,
            "model": self.model.name,
            "output_modalities": list(self.output_modalities),
            "instructions": self.instructions,
            "tools": copy.deepcopy(self.tools),
            "tool_choice": self.tool_choice,
            "max_output_tokens": self.max_output_tokens,
            "tracing": None,
            "truncation": "auto",
            "prompt": None,
            "expires_at": 0,
            "include": None,
            "audio": {
                "input": {
                    "format": format_object(self.input_format),
                    "transcription": self.transcription,
                    "noise_reduction": None,
                    "turn_detection": self.turn_detection,
                },
                "output": {
                    "format": format_object(self.output_format),
                    "voice": self.voice,
                    "speed": 1.0,
                },
            },
        }


def format_object(name: str) -> dict[str, Any]:
    return {"type": name, "rate": 24000} if name == "audio/pcm" else {"type": name}


def _aggressiveness(threshold: float) -> int:
    """OpenAI's threshold (0-1, higher needs louder speech) -> webrtcvad's 0-3."""
    return min(3, max(0, int(threshold * 4)))


def _str(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise DoorError("invalid_type", f"`{param}` must be a string", param)
    return value


def _obj(value: Any, param: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise DoorError("invalid_type", f"`{param}` must be an object", param)
    return dict(value)


def parse_modalities(value: Any, param: str) -> list[str]:
    if not isinstance(value, list) or not value or any(m not in ("text", "audio") for m in value):
        raise DoorError("invalid_value", f"`{param}` must be ['audio'] or ['text']", param)
    return ["audio"] if "audio" in value else ["text"]


def _format(value: Any, param: str) -> str:
    if isinstance(value, str):
        name = _FORMAT_ALIASES.get(value, value)
        rate = None
    elif isinstance(value, dict):
        name = value.get("type")
        rate = value.get("rate")
    else:
        raise DoorError("invalid_type", f"`{param}` must be an object", param)
    if name not in AUDIO_FORMATS:
        raise DoorError(
            "invalid_value",
            f"unsupported audio format {name!r} (supported: {', '.join(AUDIO_FORMATS)})",
            f"{param}.type",
        )
    if rate is not None and (name != "audio/pcm" or rate != 24000):
        raise DoorError("invalid_value", "audio/pcm is 24000 Hz only", f"{param}.rate")
    return str(name)


def _turn_detection(value: Any) -> dict[str, Any] | None:
    param = "session.audio.input.turn_detection"
    if value is None:
        return None
    if not isinstance(value, dict):
        raise DoorError("invalid_type", f"`{param}` must be an object or null", param)
    kind = value.get("type")
    if kind == "server_vad":
        td = dict(DEFAULT_SERVER_VAD) | value
        _number(td, "threshold", 0.0, 1.0)
        _number(td, "prefix_padding_ms", 0, 2000)
        _number(td, "silence_duration_ms", 0, 10000)
    elif kind == "semantic_vad":
        td = {"type": "semantic_vad", "eagerness": "auto", "create_response": True}
        td |= {"interrupt_response": True} | value
        if td["eagerness"] not in SEMANTIC_STOP_MS:
            raise DoorError(
                "invalid_value", "eagerness must be low, medium, high or auto", f"{param}.eagerness"
            )
    else:
        raise DoorError(
            "invalid_value",
            "turn_detection.type must be server_vad or semantic_vad",
            f"{param}.type",
        )
    for key in ("create_response", "interrupt_response"):
        if not isinstance(td.get(key), bool):
            raise DoorError("invalid_type", f"`{key}` must be a boolean", f"{param}.{key}")
    if td.get("idle_timeout_ms") is not None:
        raise DoorError(
            "unsupported_value", "idle_timeout_ms is not supported", f"{param}.idle_timeout_ms"
        )
    return td


def _number(td: dict[str, Any], key: str, low: float, high: float) -> None:
    value = td.get(key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise DoorError(
            "invalid_value",
            f"{key} must be a number from {low:g} to {high:g}",
            f"session.audio.input.turn_detection.{key}",
        )


def _tools(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise DoorError("invalid_type", "`session.tools` must be an array", "session.tools")
    tools = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise DoorError(
                "invalid_value",
                "only function tools are supported",
                f"session.tools[{i}].type",
            )
        if not isinstance(tool.get("name"), str):
            raise DoorError("invalid_value", "a function tool needs a name", f"session.tools[{i}]")
        tools.append({"type": "function"} | tool)
    return tools


def _duplex_tool(tool: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"name": tool["name"], "description": tool.get("description") or ""}
    if isinstance(tool.get("parameters"), dict):
        out["parameters"] = tool["parameters"]
    return out
