"""Settings: DUPLEX_* environment variables, overridable by `duplex serve` flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DUPLEX_", extra="ignore", populate_by_name=True)

    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"

    # Auth: "token" or "token:tenant", comma separated; or a file with one such entry a line.
    api_tokens: str = ""
    tokens_file: Path | None = None
    #: Accept connections without a token (tenant "anonymous"). Only by explicit choice.
    allow_anonymous: bool = False
    #: Signs short-lived client tokens and the realtime door's client secrets (one
    #: mechanism, server/client_tokens.py); random per process when unset. Set it, the
    #: same on every replica, behind a load balancer.
    client_secret_key: str | None = None
    #: Default lifetime of a client token (a mint request may ask for 10 s to 1 h).
    client_token_ttl_s: float = Field(600, ge=10, le=3600)

    # Operations (docs/operations.md)
    #: ``text`` or ``json`` (one JSON object a line, with session, tenant, turn, response ids).
    log_format: Literal["text", "json"] = "text"
    #: Prometheus metrics: ``off``; ``on`` (``/metrics`` on the main port, behind
    #: ``metrics_token``); ``port`` (its own listener on metrics_host:metrics_port, no token).
    metrics: Literal["off", "on", "port"] = "off"
    metrics_token: str | None = None
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(9464, ge=0, le=65535)
    #: Serve the OpenAPI explorer at /docs (from local assets; nothing loads from a CDN).
    api_docs: bool = False

    # State
    store_url: str = "memory://"
    store_ttl_s: float = 24 * 3600
    store_max_sessions: int = 10_000
    store_max_messages: int = 1_000
    #: Longest wait for one store call; a close waits at most about twice this.
    store_timeout_s: float = 5.0
    #: Writes kept in memory while the store is unreachable (oldest dropped beyond either).
    store_backlog_max_writes: int = 10_000
    store_backlog_max_bytes: int = 16 * 1024 * 1024

    # Replicas (docs/deploy.md): leases need a shared store (Redis, or SQLite on one machine)
    #: This process's name in leases and logs (default: host-pid-random).
    replica_id: str = ""
    #: A session's lease: expires when not renewed for `lease_ttl_ms` (the failover time
    #: after a crash), renewed every `lease_renew_ms`; a connect waits up to
    #: `lease_wait_ms` for another replica's lease to end.
    lease_ttl_ms: int = Field(2000, ge=100)
    lease_renew_ms: int = Field(500, ge=10)
    lease_wait_ms: int = Field(3000, ge=0)
    #: SIGTERM: responses in flight may finish for this long before sockets close (1012).
    drain_timeout_s: float = Field(30.0, ge=0)
    #: The retry hint in `session.reconnect` (clients wait about this long, with jitter).
    drain_retry_after_ms: int = Field(500, ge=0)
    #: Server processes on one port (`duplex serve --workers N`); needs a shared store.
    workers: int = Field(1, ge=1)

    # Limits
    max_message_bytes: int = 4 * 1024 * 1024
    output_queue_size: int = 256
    output_stall_timeout_s: float = 30.0
    max_pending_turns: int = 4
    max_image_pixels: int = 40_000_000
    #: Image pixels decoded at once across the server (at least ``max_image_pixels``).
    max_decode_pixels: int = 40_000_000
    decode_wait_s: float = 10.0
    #: Audio a VAD session keeps while no turn is open (0: the 0.6-1 s turn detection needs).
    vad_idle_history_ms: int = Field(0, ge=0, le=600_000)
    ws_per_message_deflate: bool = False

    # Abuse limits (docs/protocol.md "Limits"; 0 turns a cap off)
    #: A connection must finish its request headers within this long (else 408, closed).
    header_timeout_s: float = 10.0
    #: Open connections (HTTP and WebSocket) across the server, and per client address.
    max_connections: int = 10_000
    max_connections_per_client: int = 1_000
    #: Audio is read at most this many times faster than real time, after a burst of
    #: `audio_burst_s` seconds of audio; faster input waits (the socket is not read).
    audio_rate_limit: float = 10.0
    audio_burst_s: float = 60.0
    #: Other messages per second per session, after a burst; faster ones wait (error 429).
    message_rate_limit: float = 200.0
    message_burst: int = 400

    # Providers
    #: Echo provider pacing: 1.0 streams reply audio at real time, 0 as fast as possible.
    echo_pace: float = 1.0
    openai_api_key: str | None = Field(
        None, validation_alias=AliasChoices("DUPLEX_OPENAI_API_KEY", "OPENAI_API_KEY")
    )
    openai_base_url: str = "https://api.openai.com/v1"
    openai_chat_model: str = "gpt-4o-mini"
    openai_audio_input: bool = False
    openai_realtime_url: str = "wss://api.openai.com/v1"
    openai_realtime_model: str = "gpt-realtime"
    openai_realtime_connect_timeout_s: float = 10.0
    openai_realtime_send_timeout_s: float = 10.0
    openai_realtime_reconnect_attempts: int = 3
    openai_realtime_reconnect_base_s: float = 0.5
    openai_realtime_reconnect_max_s: float = 5.0
    gemini_api_key: str | None = Field(
        None, validation_alias=AliasChoices("DUPLEX_GEMINI_API_KEY", "GEMINI_API_KEY")
    )
    gemini_base_url: str = "wss://generativelanguage.googleapis.com"
    gemini_model: str = "models/gemini-2.5-flash-native-audio-preview-12-2025"
    gemini_api_version: str = "v1beta"
    gemini_connect_timeout_s: float = 10.0
    gemini_reconnect_attempts: int = 5
    gemini_reconnect_base_s: float = 0.25
    gemini_reconnect_max_s: float = 5.0
    gemini_replay_max_messages: int = 6000
    gemini_replay_max_bytes: int = 16 * 1024 * 1024
    gemini_replay_margin_s: float = 2.0
    stt_base_url: str | None = None
    stt_model: str = "gpt-4o-mini-transcribe"
    tts_base_url: str | None = None
    tts_model: str = "gpt-4o-mini-tts"

    # OpenAI Realtime door (/v1/realtime, docs/openai-realtime.md)
    #: Realtime model names -> the Duplex session config each one opens (JSON in the env).
    realtime_models: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {"duplex-echo": {"provider": "echo"}}
    )
    realtime_default_model: str = "duplex-echo"
    #: (``client_secret_key`` above signs these too: one mechanism, server/client_tokens.py)
    client_secret_ttl_s: float = Field(600, ge=10, le=7200)

    persist_interval_ms: int = 200
    persist_min_chars: int = 1024

    # Resume after reconnect (docs/protocol.md "Resuming a session")
    outbox_max_messages: int = 2000
    outbox_max_bytes: int = 2 * 1024 * 1024
    outbox_max_age_s: float = 60.0
    outbox_flush_ms: int = 150
    #: Ping this often while sent messages are not acknowledged; the pong lets them go
    #: from the outbox (server/ws_protocol.py; 0: off)
    outbox_ack_interval_s: float = Field(1.0, ge=0)
    resume_grace_s: float = 30.0

    # Memory (docs/limits.md): give freed heap pages back to the system this often (s; 0: off)
    malloc_trim_s: float = 30.0
    #: ... and this long after sessions stop ending (s; 0: only periodically); trims stay
    #: at least 5 s apart (server/allocator.py)
    malloc_trim_after_close_s: float = 1.0

    # Tools
    #: Server-side tools: ``module:attribute`` entry points, comma separated (see load_tools).
    tools: str = ""
    tool_hop_limit: int = 5
    client_tool_timeout_s: float = 30.0

    # Input limits (docs/protocol.md "Limits"): what one message may hold ...
    #: JSON nesting depth of a client message or request body (at most 200).
    max_json_depth: int = Field(32, ge=2, le=200)
    # ... and what a client can make the server keep (session config, REST sessions).
    max_instructions_chars: int = Field(65_536, ge=0)
    max_variables: int = Field(256, ge=0)
    max_variable_name_chars: int = Field(64, ge=1)
    max_variable_value_chars: int = Field(8_192, ge=0)
    max_tools: int = Field(128, ge=0)
    max_tool_schema_bytes: int = Field(16_384, ge=64)
    max_option_depth: int = Field(8, ge=1)
    max_voice_chars: int = Field(128, ge=1)
    #: Session name, model and provider names.
    max_name_chars: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _metrics_token_needed(self) -> Settings:
        if self.metrics == "on" and not self.metrics_token:
            raise ValueError(
                "DUPLEX_METRICS=on serves /metrics on the main port and needs "
                "DUPLEX_METRICS_TOKEN (or use DUPLEX_METRICS=port for a separate listener)"
            )
        return self
