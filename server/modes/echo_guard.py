"""Echo-aware barge-in for VAD mode: line the reply audio up with the microphone and let
`vad.echo.EchoSuppressor` take the reply's echo out before the turn detector hears it.

The reply audio is what the server sent, at the VAD rate. Where it sits on the microphone
clock is an estimate: its first sample is taken to play when it was sent (the microphone
clock then), and each ``playback`` report moves that anchor (the client has played
``played_ms`` of the reply by the time the report arrives). Whatever is left over
(network, playout buffer, the acoustic path: up to `EchoConfig.max_delay_ms`) the
suppressor measures itself, and its measured delay stays the authority: a report that
moves the anchor is only a hint (`EchoSuppressor.reference_moved`), since a report can
be wrong while the sound did not move.
"""

from __future__ import annotations

from collections import deque

from duplex.protocol import InputAudioConfig
from media.audio import StreamResampler
from vad.echo import EchoConfig, EchoSuppressor

#: Reply audio kept ahead of the microphone, in samples at the VAD rate (bounds memory:
#: 2 bytes a sample). A reply streamed further ahead than this loses its oldest audio.
_MAX_AHEAD_S = 60
#: A playback report moves the anchor only if it disagrees by more than this (ms): the
#: reports jitter with the network, and every move costs the suppressor its echo gains.
_REANCHOR_MS = 120.0


def echo_aware(audio: InputAudioConfig) -> bool:
    """On when the client says it has no echo cancellation, or does not say and sends
    a telephony codec (phone lines and SIP gateways rarely cancel echo)."""
    if audio.echo_cancellation is not None:
        return not audio.echo_cancellation
    return audio.format in ("mulaw", "alaw")


class EchoGuard:
    """One per VAD-mode session (while echo-aware barge-in is on)."""

    def __init__(self, vad_rate: int, frame_ms: int) -> None:
        self._rate = vad_rate
        self._suppressor = EchoSuppressor(EchoConfig(sample_rate=vad_rate, frame_ms=frame_ms))
        self._resampler: StreamResampler | None = None
        self._ref: deque[bytes] = deque()  # the current reply at the VAD rate
        self._ref_bytes = 0
        self._ref_start = 0  # sample index (in the reply) of `_ref[0][0]`
        self._anchor: int | None = None  # microphone sample at which the reply starts
        self._mic = 0  # microphone samples seen so far
        self._max = _MAX_AHEAD_S * vad_rate * 2

    @property
    def suppressor(self) -> EchoSuppressor:
        return self._suppressor

    def reply_started(self) -> None:
        """A new reply: its audio starts playing about now."""
        self._ref.clear()
        self._ref_bytes = 0
        self._ref_start = 0
        self._anchor = None
        self._resampler = None

    def reply_audio(self, pcm: bytes, rate: int) -> None:
        """A piece of reply audio as sent to the client (int16 mono at ``rate``)."""
        if self._anchor is None:
            self._anchor = self._mic
        if rate != self._rate:
            if self._resampler is None or self._resampler.in_rate != rate:
                self._resampler = StreamResampler(rate, 1, self._rate, 1)
            pcm = self._resampler.push_bytes(pcm)
        if not pcm:
            return
        self._ref.append(pcm)
        self._ref_bytes += len(pcm)
        while self._ref_bytes > self._max:
            dropped = self._ref.popleft()
            self._ref_bytes -= len(dropped)
            self._ref_start += len(dropped) // 2

    def played(self, played_ms: float) -> None:
        """The client reports it has played ``played_ms`` of the reply by now."""
        anchor = self._mic - round(played_ms * self._rate / 1000)
        if self._anchor is None:
            self._anchor = anchor
        elif abs(anchor - self._anchor) > _REANCHOR_MS * self._rate / 1000:
            # The report may be right (the client's playout stalled or skipped, and the
            # echo moved with it) or not (the sound did not move): the suppressor
            # predicts the echo at both delays until its own estimate tells them apart.
            self._suppressor.reference_moved((anchor - self._anchor) * 1000 / self._rate)
            self._anchor = anchor

    def reply_cut(self) -> None:
        """The reply was interrupted or cancelled: the client stops playing it now."""
        self._ref.clear()
        self._ref_bytes = 0

    def filter(self, pcm: bytes) -> bytes:
        """Microphone frames at the VAD rate, with the reply's echo taken out."""
        start = self._mic
        n = len(pcm) // 2
        self._mic += n
        ref = self._reference(start, n) if self._anchor is not None and self._ref else None
        return self._suppressor.process(pcm, ref)

    def _reference(self, mic_start: int, n: int) -> bytes | None:
        """The reply samples playing over microphone samples ``mic_start..+n``."""
        assert self._anchor is not None
        pos = mic_start - self._anchor  # reply sample playing at mic_start
        self._trim(pos)
        end = self._ref_start + self._ref_bytes // 2
        if pos + n <= self._ref_start or pos >= end:
            return None
        lo = max(pos, self._ref_start)
        hi = min(pos + n, end)
        parts, at = [], self._ref_start
        for chunk in self._ref:  # the first piece or two: trimmed as playback moves on
            size = len(chunk) // 2
            if at + size > lo:
                parts.append(chunk[2 * max(0, lo - at) : 2 * (min(hi, at + size) - at)])
            at += size
            if at >= hi:
                break
        piece = b"".join(parts)
        before = max(0, self._ref_start - pos)
        after = n - before - len(piece) // 2
        return b"\0" * (2 * before) + piece + b"\0" * (2 * after)

    def _trim(self, pos: int) -> None:
        """Forget reply audio before reply sample ``pos`` (it has played)."""
        while self._ref and self._ref_start + len(self._ref[0]) // 2 <= pos:
            dropped = self._ref.popleft()
            self._ref_bytes -= len(dropped)
            self._ref_start += len(dropped) // 2
