"""Client audio -> VAD-rate frames -> turn events, on the session's input-audio clock.

Decoding (Opus, G.711), resampling, framing and detection are the plain
libraries' work; this class only strings them together per session. Frames travel
as bytes: a 20 ms message of 16 kHz mono (the usual one) goes from the socket to the
turn detector, and to webrtcvad, with no copy and no call between (`_fast_size`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from duplex.protocol import InputAudioConfig, TurnDetectionConfig
from media.audio import AudioDecoder, PcmFramer, make_decoder
from vad.detector import DetectorConfig, SpeechDetector
from vad.turns import TurnConfig, TurnDetector, TurnEnd, TurnEvent

VAD_RATE = 16000
FRAME_MS = 20
_FRAME_BYTES = VAD_RATE * FRAME_MS // 1000 * 2


@dataclass(slots=True)
class IngestResult:
    #: The frames this message completed: int16 samples at VAD_RATE (native-endian),
    #: a whole number of FRAME_MS frames; b"" if none.
    pcm: bytes
    events: list[TurnEvent]


class AudioIngest:
    """One per session; rebuilt when the input format or turn settings change."""

    def __init__(
        self, audio: InputAudioConfig, turns: TurnDetectionConfig, *, idle_history_ms: int = 0
    ) -> None:
        self.manual = turns.type == "manual"
        self.decoder = make_decoder(audio.format, audio.sample_rate, audio.channels)
        rate = self.decoder.sample_rate if self.decoder else audio.sample_rate
        channels = self.decoder.channels if self.decoder else audio.channels
        self.framer = PcmFramer(rate, channels, target_rate=VAD_RATE, frame_ms=FRAME_MS)
        self.detector = TurnDetector(
            TurnConfig(
                start_ms=turns.start_ms,
                stop_ms=turns.fixed_stop_ms,
                adaptive_stop=turns.stop_ms == "auto",
                min_stop_ms=turns.min_stop_ms,
                max_stop_ms=turns.max_stop_ms,
                pre_roll_ms=turns.pre_roll_ms,
                min_speech_ms=turns.min_speech_ms,
                max_turn_ms=turns.max_turn_ms,
                # A commit with no turn open holds this much (at least the 0.6-1 s turn
                # detection keeps), not 30 s kept for it in every session (~1 MB each):
                # docs/limits.md.
                idle_history_ms=min(idle_history_ms, turns.max_turn_ms),
            ),
            SpeechDetector(
                DetectorConfig(
                    sample_rate=VAD_RATE, frame_ms=FRAME_MS, aggressiveness=turns.aggressiveness
                )
            ),
        )
        self._to_frames: Callable[[bytes], bytes] = (
            self.framer.push_bytes
            if self.decoder is None
            else partial(_decode_and_frame, self.decoder, self.framer)
        )
        self._detect = self.detector.push_pcm
        self._filter: Callable[[bytes], bytes] | None = None
        # Manual turns (push-to-talk) keep everything since the last commit, bounded.
        self._manual_limit = turns.max_turn_ms // FRAME_MS * _FRAME_BYTES
        self._manual: deque[bytes] = deque()
        self._manual_bytes = 0
        # The usual message, one frame of 16 kHz mono PCM16 (20 ms), skips the framer
        # while nothing is pending in it (the framer would hand the bytes back as they
        # are): `_fast_size` is that message's size then, else -1. It is counted here.
        self._plain = self.decoder is None and rate == VAD_RATE and channels == 1
        self._framer_rest = 0  # bytes pending in the framer (plain input only)
        self._fast_frames = 0
        self._fast_size = -1
        self._update_fast()

    @property
    def clock_ms(self) -> float:
        """Milliseconds of audio received, on the session's input clock."""
        return (self.framer.frames_out + self._fast_frames) * FRAME_MS

    @property
    def filter(self) -> Callable[[bytes], bytes] | None:
        """Applied to the VAD-rate frames before detection (echo-aware barge-in)."""
        return self._filter

    @filter.setter
    def filter(self, value: Callable[[bytes], bytes] | None) -> None:
        self._filter = value
        self._update_fast()

    def push(self, data: bytes, *, detect: bool = True) -> IngestResult:
        """Raises MediaError for undecodable or misaligned input; nothing earlier is lost."""
        if len(data) == self._fast_size and detect and type(data) is bytes:
            self._fast_frames += 1
            return IngestResult(data, self._detect(data))
        pcm = self._frames(data)
        return IngestResult(pcm, self._turn_events(pcm, detect))

    def events(self, data: bytes) -> list[TurnEvent]:
        """`push` for a caller that needs only the turn events (VAD mode, per message)."""
        if len(data) == self._fast_size and type(data) is bytes:
            self._fast_frames += 1
            return self._detect(data)
        return self._turn_events(self._frames(data), True)

    def _frames(self, data: bytes) -> bytes:
        pcm = self._to_frames(data)
        if self._plain:  # the framer cuts the bytes as they come: what it keeps is this
            self._framer_rest = (self._framer_rest + len(data)) % _FRAME_BYTES
            self._update_fast()
        return pcm

    def _update_fast(self) -> None:
        fast = self._plain and not self.manual and self._filter is None and not self._framer_rest
        self._fast_size = _FRAME_BYTES if fast else -1

    def _turn_events(self, pcm: bytes, detect: bool) -> list[TurnEvent]:
        if self.manual:
            if pcm:
                self._keep_manual(pcm)
            return []
        if not (detect and pcm):
            return []
        return self._detect(pcm if self._filter is None else self._filter(pcm))

    def commit(self) -> TurnEnd | None:
        """End the user's turn now (``input.commit``)."""
        if not self.manual:
            return self.detector.commit()
        if not self._manual:
            return None
        pcm = b"".join(self._manual)
        if len(pcm) > self._manual_limit:
            pcm = pcm[len(pcm) - self._manual_limit :]
        end_ms = self.clock_ms
        start_ms = end_ms - len(pcm) / 2 / VAD_RATE * 1000
        self._manual.clear()
        self._manual_bytes = 0
        return TurnEnd(turn_id=-1, start_ms=start_ms, end_ms=end_ms, pcm=pcm, forced=True)

    def _keep_manual(self, pcm: bytes) -> None:
        """Keep at most the latest `_manual_limit` bytes (and less than one message more)."""
        self._manual.append(pcm)
        self._manual_bytes += len(pcm)
        while self._manual_bytes - len(self._manual[0]) >= self._manual_limit:
            self._manual_bytes -= len(self._manual.popleft())


def _decode_and_frame(decoder: AudioDecoder, framer: PcmFramer, data: bytes) -> bytes:
    return framer.push_bytes(decoder.push(data).tobytes())
