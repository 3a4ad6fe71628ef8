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
