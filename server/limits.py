"""SessionLimits: the per-session bounds the app configures (queues, sizes, timeouts)."""

from __future__ import annotations

from dataclasses import dataclass, field

from duplex.protocol import ConfigLimits, JsonLimits


@dataclass
class SessionLimits:
    output_queue_size: int = 256
    output_stall_timeout_s: float = 30.0
    max_pending_turns: int = 4
    max_image_pixels: int = 40_000_000
    #: How long an image may wait for the app's decode budget before it is refused (429).
    decode_wait_s: float = 10.0
    #: Audio a VAD session keeps while no turn is open: what `input.commit` then holds.
    vad_idle_history_ms: int = 0
    tool_hop_limit: int = 5
    client_tool_timeout_s: float = 30.0
    #: Streamed answers are persisted in batches: at least this often, or this many chars.
    persist_interval_ms: int = 200
    persist_min_chars: int = 1024
    #: Bounds on client JSON (every door parses with them) and on what a config may keep.
    json: JsonLimits = field(default_factory=JsonLimits)
    config: ConfigLimits = field(default_factory=ConfigLimits)
    #: Longest wait for a session's work to stop at close (storing the last answer included).
    close_timeout_s: float = 11.0
    #: The outbox (recent server messages kept for resume, server/outbox.py): bounded by
    #: count, by bytes (JSON text plus raw reply audio) and by age; written to the store
    #: in batches this often.
    outbox_max_messages: int = 2000
    outbox_max_bytes: int = 2 * 1024 * 1024
    outbox_max_age_s: float = 60.0
    outbox_flush_ms: int = 150
    #: How long a session outlives its dropped socket, waiting for a resume (0: closes at once).
    resume_grace_s: float = 30.0
