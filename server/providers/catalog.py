"""Provider names -> instances, built from settings once per app."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from server.config import Settings
from server.providers.base import RealtimeProvider, UnaryProvider
from server.providers.echo import EchoProvider
from server.providers.speech_stages import SpeechToText, TextToSpeech


@dataclass
class ProviderCatalog:
    unary: dict[str, UnaryProvider] = field(default_factory=dict)
    realtime: dict[str, Callable[[], RealtimeProvider]] = field(default_factory=dict)
    #: Optional STT/TTS stages for VAD mode (``stt``/``tts`` in the session config).
    stt: SpeechToText | None = None
    tts: Callable[[str | None], TextToSpeech] | None = None
    http: httpx.AsyncClient | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ProviderCatalog:
        from server.providers.gemini_live import GeminiLiveProvider
        from server.providers.openai_chat import OpenAIChatProvider
        from server.providers.openai_realtime import OpenAIRealtimeProvider
        from server.providers.realtime_link import ReconnectPolicy

        http = httpx.AsyncClient(timeout=httpx.Timeout(60, connect=10))
        catalog = cls(http=http)
        catalog.unary["echo"] = EchoProvider(pace=settings.echo_pace)
        catalog.unary["openai-chat"] = OpenAIChatProvider(
            base_url=settings.openai_base_url,
            api_key=settings.openai_api_key,
            model=settings.openai_chat_model,
            audio_input=settings.openai_audio_input,
            client=http,
        )
        catalog.realtime["openai-realtime"] = lambda: OpenAIRealtimeProvider(
            settings.openai_api_key,
            settings.openai_realtime_url,
            settings.openai_realtime_model,
            reconnect=ReconnectPolicy(
                max_attempts=settings.openai_realtime_reconnect_attempts,
                base_delay=settings.openai_realtime_reconnect_base_s,
                max_delay=settings.openai_realtime_reconnect_max_s,
            ),
            connect_timeout=settings.openai_realtime_connect_timeout_s,
            send_timeout=settings.openai_realtime_send_timeout_s,
        )
        catalog.realtime["gemini-live"] = lambda: GeminiLiveProvider(
            settings.gemini_api_key,
            settings.gemini_base_url,
            settings.gemini_model,
            api_version=settings.gemini_api_version,
            connect_timeout_s=settings.gemini_connect_timeout_s,
            max_reconnect_attempts=settings.gemini_reconnect_attempts,
            reconnect_backoff_s=settings.gemini_reconnect_base_s,
            max_reconnect_backoff_s=settings.gemini_reconnect_max_s,
            replay_max_messages=settings.gemini_replay_max_messages,
            replay_max_bytes=settings.gemini_replay_max_bytes,
            replay_margin_s=settings.gemini_replay_margin_s,
        )
        catalog.stt = SpeechToText(
            settings.stt_base_url or settings.openai_base_url,
            settings.openai_api_key,
            settings.stt_model,
            client=http,
        )

        def tts(voice: str | None) -> TextToSpeech:
            return TextToSpeech(
                settings.tts_base_url or settings.openai_base_url,
                settings.openai_api_key,
                settings.tts_model,
                voice or "alloy",
                client=http,
            )

        catalog.tts = tts
        return catalog

    def get_unary(self, name: str) -> UnaryProvider | None:
        return self.unary.get(name)

    def get_realtime(self, name: str) -> RealtimeProvider | None:
        factory = self.realtime.get(name)
        return factory() if factory else None

    async def aclose(self) -> None:
        for provider in self.unary.values():
            await provider.aclose()
        if self.http is not None:
            await self.http.aclose()
