"""Realtime model names -> the Duplex session config each one opens (settings)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from duplex.protocol import SessionConfig
from server.config import Settings


@dataclass(frozen=True)
class RealtimeModel:
    name: str
    #: The Duplex config patch this model opens with (mode, provider, stt, tts, ...).
    config: dict[str, Any]

    @property
    def mode(self) -> str:
        return str(self.config.get("mode", "vad"))

    @property
    def speaks(self) -> bool:
        """VAD mode: whether answers to text get audio (a TTS stage is configured)."""
        return bool(self.config.get("tts", False))


class RealtimeModels:
    """The models the operator offers through ``/v1/realtime`` (``GET /v1/models``)."""

    def __init__(self, models: dict[str, RealtimeModel], default: str) -> None:
        self._models = models
        self.default = default

    @classmethod
    def from_settings(cls, settings: Settings) -> RealtimeModels:
        models: dict[str, RealtimeModel] = {}
        for name, patch in settings.realtime_models.items():
            try:
                SessionConfig().merged(patch)
            except ValidationError as exc:
                raise ValueError(
                    f"realtime model {name!r}: invalid session config: {exc}"
                ) from None
            models[name] = RealtimeModel(name, dict(patch))
        if settings.realtime_default_model not in models:
            raise ValueError(
                f"realtime_default_model {settings.realtime_default_model!r} is not one of "
                f"realtime_models ({', '.join(sorted(models)) or 'none'})"
            )
        return cls(models, settings.realtime_default_model)

    def get(self, name: str | None) -> RealtimeModel | None:
        return self._models.get(name or self.default)

    def names(self) -> list[str]:
        return sorted(self._models)
