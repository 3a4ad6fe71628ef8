"""The realtime providers' documented settings are real DUPLEX_* environment variables."""

from __future__ import annotations

import pytest

from server.config import Settings
from server.providers.catalog import ProviderCatalog

ENV = {
    "DUPLEX_OPENAI_REALTIME_CONNECT_TIMEOUT_S": "3",
    "DUPLEX_OPENAI_REALTIME_SEND_TIMEOUT_S": "4",
    "DUPLEX_OPENAI_REALTIME_RECONNECT_ATTEMPTS": "7",
    "DUPLEX_OPENAI_REALTIME_RECONNECT_BASE_S": "0.1",
    "DUPLEX_OPENAI_REALTIME_RECONNECT_MAX_S": "2",
    "DUPLEX_GEMINI_API_VERSION": "v1alpha",
    "DUPLEX_GEMINI_CONNECT_TIMEOUT_S": "6",
    "DUPLEX_GEMINI_RECONNECT_ATTEMPTS": "2",
    "DUPLEX_GEMINI_RECONNECT_BASE_S": "0.5",
    "DUPLEX_GEMINI_RECONNECT_MAX_S": "3",
    "DUPLEX_GEMINI_REPLAY_MAX_MESSAGES": "100",
    "DUPLEX_GEMINI_REPLAY_MAX_BYTES": "4096",
    "DUPLEX_GEMINI_REPLAY_MARGIN_S": "1.5",
}


async def test_documented_realtime_settings_reach_the_providers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    catalog = ProviderCatalog.from_settings(Settings())
    try:
        openai = catalog.realtime["openai-realtime"]()
        gemini = catalog.realtime["gemini-live"]()
    finally:
        assert catalog.http is not None
        await catalog.http.aclose()
    assert (openai.connect_timeout, openai.send_timeout) == (3, 4)
    policy = openai.reconnect
    assert (policy.max_attempts, policy.base_delay, policy.max_delay) == (7, 0.1, 2)
    assert gemini.api_version == "v1alpha" and "v1alpha" in gemini._url()
    assert gemini.connect_timeout_s == 6
    assert (gemini.max_reconnect_attempts, gemini.reconnect_backoff_s) == (2, 0.5)
    assert gemini.max_reconnect_backoff_s == 3
    assert (gemini.replay_max_messages, gemini.replay_max_bytes) == (100, 4096)
    assert gemini.replay_margin_s == 1.5
