"""Per-session input rates: token buckets that pace a client instead of dropping its input.

Audio is budgeted in seconds of audio: it refills at ``audio_rate`` seconds per wall
second (10: ten times real time) up to ``audio_burst_s``, so a file sent as fast as
possible starts at once and then streams at the rate. Every audio message costs at
least ``MIN_AUDIO_CHARGE_S``, so tiny messages cannot flood either. Other messages
cost one token each, refilled at ``message_rate`` a second up to ``message_burst``.

A message over budget waits for its tokens; the server does not read the socket in
the meantime (backpressure: TCP slows the client down). Nothing is dropped. The
checks are a clock read and a few float operations, cheap enough for the per-message
audio path.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from time import monotonic

from duplex.protocol import InputAudioConfig

#: The least an audio message costs, in seconds of audio.
MIN_AUDIO_CHARGE_S = 0.005

#: A client over its message rate is told so (error 429) at most this often.
NOTICE_EVERY_S = 1.0

#: Compressed audio (opus) is charged as if at this many bytes a second (128 kbit/s).
COMPRESSED_BYTES_PER_S = 16_000


_SAMPLE_BYTES = {"pcm16": 2, "mulaw": 1, "alaw": 1}


def audio_bytes_per_second(fmt: InputAudioConfig) -> float:
    """How many bytes of input make one second of audio, for the budget."""
    width = _SAMPLE_BYTES.get(fmt.format)
    if width is None:
        return COMPRESSED_BYTES_PER_S
    return float(fmt.sample_rate * fmt.channels * width)


@dataclass
class Bucket:
    """A token bucket; ``rate`` <= 0 means unlimited."""

    rate: float
    capacity: float
    tokens: float = field(init=False)
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.tokens = self.capacity

    def refund(self, cost: float) -> None:
        if self.rate > 0:
            self.tokens = min(self.capacity, self.tokens + cost)

    def take(self, cost: float) -> float:
        """Take ``cost`` tokens, going into debt if needed: the seconds to wait first."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens = tokens - cost
        return max(0.0, -self.tokens / self.rate)


@dataclass
class InputBudget:
    """One session's input budget (see the module docstring)."""

    audio: Bucket
    messages: Bucket
    _noticed_at: float = -NOTICE_EVERY_S
    #: Messages admitted so far (the metrics read it in bulk: one increment per message).
    received: int = 0

    @classmethod
    def of(
        cls, audio_rate: float, audio_burst_s: float, message_rate: float, message_burst: int
    ) -> InputBudget:
        return cls(
            Bucket(audio_rate, max(audio_burst_s, MIN_AUDIO_CHARGE_S)),
            Bucket(message_rate, max(1.0, float(message_burst))),
        )

    def try_audio(self, size: int, bytes_per_s: float) -> bool:
        """Take a binary audio message's cost if the budget has it now (`Bucket.try_take`
        inlined: this runs for every audio message on the direct path)."""
        bucket = self.audio
        rate = bucket.rate
        if rate <= 0:
            self.received += 1
            return True
        cost = size / bytes_per_s
        if cost < MIN_AUDIO_CHARGE_S:
            cost = MIN_AUDIO_CHARGE_S
        now = monotonic()
        tokens = bucket.tokens + (now - bucket.stamp) * rate
        if tokens > bucket.capacity:
            tokens = bucket.capacity
        bucket.stamp = now
        if tokens < cost:
            bucket.tokens = tokens
            return False
        bucket.tokens = tokens - cost
        self.received += 1
        return True

    def refund_audio(self, size: int, bytes_per_s: float) -> None:
        self.received -= 1  # it takes the usual path, and is counted there
        self.audio.refund(max(MIN_AUDIO_CHARGE_S, size / bytes_per_s))

    async def pace_audio(self, size: int, bytes_per_s: float) -> None:
        """Wait until the budget covers ``size`` bytes of audio, then take them."""
        self.received += 1
        delay = self.audio.take(max(MIN_AUDIO_CHARGE_S, size / bytes_per_s))
        if delay > 0:
            await asyncio.sleep(delay)

    def message_delay(self) -> float:
        """Take one message's token: the seconds the caller must wait first."""
        self.received += 1
        return self.messages.take(1.0)

    def notice_due(self) -> bool:
        """Whether to tell the client it is being slowed down (once a second at most)."""
        now = time.monotonic()
        if now - self._noticed_at < NOTICE_EVERY_S:
            return False
        self._noticed_at = now
        return True
