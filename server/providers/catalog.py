"""Provider names -> instances, built from settings once per app."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from server.config import Settings
from server.providers.base import RealtimeProvider, UnaryProvider
from server.providers.echo import EchoProvider


@dataclass
class ProviderCatalog:
    unary: dict[str, UnaryProvider] = field(default_factory=dict)
    realtime: dict[str, Callable[[], RealtimeProvider]] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> ProviderCatalog:
        from server.providers.openai_realtime import OpenAIRealtimeProvider

        catalog = cls()
        catalog.unary["echo"] = EchoProvider(pace=settings.echo_pace)
        catalog.realtime["openai-realtime"] = lambda: OpenAIRealtimeProvider(
            settings.openai_api_key, settings.openai_realtime_url, settings.openai_realtime_model
        )
        return catalog

    def names(self) -> list[str]:
        return sorted({*self.unary, *self.realtime})

    def get_unary(self, name: str) -> UnaryProvider | None:
        return self.unary.get(name)

    def get_realtime(self, name: str) -> RealtimeProvider | None:
        factory = self.realtime.get(name)
        return factory() if factory else None

    async def aclose(self) -> None:
        for provider in self.unary.values():
            await provider.aclose()
