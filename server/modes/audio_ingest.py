"""Client audio -> VAD-rate frames -> turn events, on the session's input-audio clock.

Decoding (Opus, G.711), resampling, framing and detection are the plain
libraries' work; this class only strings them together per session.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from media.audio import PcmFramer, make_decoder
from server.protocol import InputAudioConfig, TurnDetectionConfig
from vad.detector import DetectorConfig, SpeechDetector
from vad.turns import TurnConfig, TurnDetector, TurnEnded, TurnEvent

VAD_RATE = 16000
FRAME_MS = 20


@dataclass
class IngestResult:
    frames: list[np.ndarray] = field(default_factory=list)
    events: list[TurnEvent] = field(default_factory=list)


class AudioIngest:
    """One per session; rebuilt when the input format or turn settings change."""

    def __init__(self, audio: InputAudioConfig, turns: TurnDetectionConfig) -> None:
        self.manual = turns.type == "manual"
        self.decoder = make_decoder(audio.format, audio.sample_rate, audio.channels)
        rate = self.decoder.sample_rate if self.decoder else audio.sample_rate
        channels = self.decoder.channels if self.decoder else audio.channels
        self.framer = PcmFramer(rate, channels, target_rate=VAD_RATE, frame_ms=FRAME_MS)
        self.detector = TurnDetector(
            TurnConfig(
                start_ms=turns.start_ms,
                stop_ms=turns.stop_ms,
                pre_roll_ms=turns.pre_roll_ms,
                min_speech_ms=turns.min_speech_ms,
                max_turn_ms=turns.max_turn_ms,
            ),
            SpeechDetector(
                DetectorConfig(
                    sample_rate=VAD_RATE, frame_ms=FRAME_MS, aggressiveness=turns.aggressiveness
                )
            ),
        )
        # Manual turns (push-to-talk) keep everything since the last commit, bounded.
        self._manual_frames: deque[np.ndarray] = deque(maxlen=turns.max_turn_ms // FRAME_MS)
        self._frames_seen = 0

    @property
    def clock_ms(self) -> float:
        """Milliseconds of audio received, on the session's input clock."""
        return self._frames_seen * FRAME_MS

    def push(self, data: bytes, *, detect: bool = True) -> IngestResult:
        """Raises MediaError for undecodable or misaligned input; nothing earlier is lost."""
        if self.decoder is not None:
            frames = self.framer.push_pcm(self.decoder.push(data))
        else:
            frames = self.framer.push(data)
        self._frames_seen += len(frames)
        if self.manual:
            self._manual_frames.extend(frames)
            return IngestResult(frames)
        if not detect:
            return IngestResult(frames)
        return IngestResult(frames, self.detector.push_many(frames))

    def commit(self) -> TurnEnded | None:
        """End the user's turn now (``input.commit``)."""
        if not self.manual:
            return self.detector.commit()
        if not self._manual_frames:
            return None
        audio = np.concatenate(list(self._manual_frames))
        end_ms = self.clock_ms
        start_ms = end_ms - len(audio) / VAD_RATE * 1000
        self._manual_frames.clear()
        return TurnEnded(turn_id=-1, start_ms=start_ms, end_ms=end_ms, audio=audio, forced=True)
