"""Turn-taking state machine: frame decisions in, turn events out.

    quiet -> starting -> speaking <-> stopping -> quiet

* quiet: no speech. A voiced frame moves to *starting* and marks the onset.
* starting: voiced time is counted, and `start_ms` of it opens the turn. SpeechStarted
  is dated at the onset, not at the moment of decision. A pause gives the candidate up
  (back to quiet, no event) after `start_ms`, or after `stop_ms` once it holds 100 ms of
  speech. So a noise blip dies quickly, but "What | time" survives its stop closure.
* speaking: a non-voiced frame moves to *stopping*.
* stopping: a voiced frame returns to *speaking* with no event, so pauses shorter than
  `stop_ms` never split a turn. `stop_ms` of non-speech ends the turn: SpeechStopped,
  then TurnEnded, or TurnDiscarded if it held less than `min_speech_ms` of speech.

When a turn opens and when it ends, its edges are moved outward over adjacent frames that
stand out from the noise in some frequency band (`SpeechDetector.speech_run`). This
catches the weak fricatives that the per-frame gate loses under noise.

Time is counted in samples of whole frames. Times are exact (float ms since the first
frame), and results do not depend on how the caller chunked the audio. Audio lives in one
ring buffer, sized for `pre_roll_ms + max_turn_ms` plus a little history, which bounds
memory and every turn's audio.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from vad.detector import SpeechDetector

_MAX_MS = 600_000  # ten minutes: a larger setting is a unit mistake, not a use case
_BLOCK_FRAMES = 50  # push_many classifies and buffers at most this many frames at a time
_SUBSTANTIAL_MS = 100  # a starting candidate with this much speech survives longer pauses
_BLIP_GAP_MS = 40  # a short leading run this far from the next one may be a noise blip
_EDGE_MS = 300  # how far a turn edge may move outward
_NOISE_REF_MS = 500  # audio before that, used as the noise reference for the edges
_MIN_REF_FRAMES = 5  # fewer frames make no usable noise statistics


@dataclass(frozen=True)
class TurnConfig:
    """Turn-taking timings in ms; see docs/turn-taking.md for the defaults' rationale."""

    start_ms: int = 200
    stop_ms: int = 800
    pre_roll_ms: int = 300
    min_speech_ms: int = 200
    max_turn_ms: int = 30_000

    def __post_init__(self) -> None:
        for name in ("start_ms", "stop_ms", "pre_roll_ms", "min_speech_ms", "max_turn_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int (ms), got {value!r}")
            if not 0 <= value <= _MAX_MS:
                raise ValueError(f"{name} must be within 0..{_MAX_MS} ms, got {value}")
        if self.stop_ms == 0:
            raise ValueError("stop_ms must be > 0, or every pause would end the turn")
        if self.max_turn_ms <= max(self.start_ms, self.min_speech_ms, self.stop_ms):
            raise ValueError(
                f"max_turn_ms ({self.max_turn_ms}) must exceed start_ms ({self.start_ms}), "
                f"min_speech_ms ({self.min_speech_ms}) and stop_ms ({self.stop_ms})"
            )


class TurnState(enum.StrEnum):
    QUIET = "quiet"
    STARTING = "starting"
    SPEAKING = "speaking"
    STOPPING = "stopping"


@dataclass(frozen=True)
class SpeechStarted:
    """A turn opened. start_ms: its onset (start of its first speech frame)."""

    start_ms: float


@dataclass(frozen=True)
class SpeechStopped:
    """The open turn ended. end_ms: end of its last speech frame, not when we noticed."""

    end_ms: float


@dataclass(frozen=True, eq=False)
class TurnEnded:
    """A finished turn and its audio.

    start_ms/end_ms: onset and end of speech. For `commit`, the committed audio's extent.
    audio: int16 at the detector's rate, starting at audio_start_ms. It begins up to
        `pre_roll_ms` before the onset, but never inside the previous turn's audio. It
        runs to end_ms plus up to `pre_roll_ms` of what followed, so ASR gets context on
        both edges.
    forced: cut at `max_turn_ms` while the turn was still open.
    """

    turn_id: int
    start_ms: float
    end_ms: float
    audio: np.ndarray
    forced: bool = False
    audio_start_ms: float = 0.0

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TurnEnded):
            return NotImplemented
        mine = (self.turn_id, self.start_ms, self.end_ms, self.forced, self.audio_start_ms)
        theirs = (other.turn_id, other.start_ms, other.end_ms, other.forced, other.audio_start_ms)
        return mine == theirs and np.array_equal(self.audio, other.audio)

    __hash__ = None  # type: ignore[assignment]  # holds an array


@dataclass(frozen=True)
class TurnDiscarded:
    """An ended turn with less than `min_speech_ms` of speech (cough, click, door)."""

    start_ms: float
    end_ms: float


TurnEvent = SpeechStarted | SpeechStopped | TurnEnded | TurnDiscarded


class TurnDetector:
    """Turns out of one stream of fixed-size int16 frames (one instance per stream)."""

    def __init__(self, config: TurnConfig, detector: SpeechDetector) -> None:
        if not isinstance(config, TurnConfig):
            raise ValueError(f"config must be a TurnConfig, got {type(config).__name__}")
        if not isinstance(detector, SpeechDetector):
            raise ValueError(f"detector must be a SpeechDetector, got {type(detector).__name__}")
        self.config = config
        self.detector = detector
        fs = self._fs = detector.frame_samples
        rate = detector.config.sample_rate
        self._ms_per_sample = 1000.0 / rate

        def samples(ms: int) -> int:
            return math.ceil(ms * rate / 1000)

        self._start = max(samples(config.start_ms), 1)  # the onset frame itself counts
        self._stop = samples(config.stop_ms)
        self._pre = samples(config.pre_roll_ms)
        self._min_speech = samples(config.min_speech_ms)
        self._max_turn = samples(config.max_turn_ms)
        self._substantial = samples(_SUBSTANTIAL_MS)
        self._blip_gap = samples(_BLIP_GAP_MS)
        self._edge_frames = max(1, samples(_EDGE_MS) // fs)
        self._ref_frames = max(1, samples(_NOISE_REF_MS) // fs)
        # `_keep` bounds any turn's audio; the ring also holds the edge history and room
        # to write one block ahead of the frame being decided.
        self._keep = self._pre + self._max_turn + fs
        history = (self._edge_frames + self._ref_frames + _BLOCK_FRAMES) * fs
        self._cap = self._keep + history
        self._ring = np.zeros(self._cap, dtype=np.int16)
        self._pos = 0  # samples consumed
        self._state = TurnState.QUIET
        self._onset = 0  # first sample of the turn
        self._voiced = 0  # speech samples in the turn (or candidate)
        self._silence = 0  # current run of non-speech samples
        self._last_voiced_end = 0
        self._last_audio_end = 0  # where the previous turn's audio ended
        self._noise_ref: np.ndarray | None = None  # frames before the open turn
        self._runs: list[list[int]] = []
        self._next_id = 1

    @property
    def state(self) -> TurnState:
        return self._state

    @property
    def clock_ms(self) -> float:
        """Duration of all audio consumed so far, in ms."""
        return self._pos * self._ms_per_sample

    @property
    def speech_ms(self) -> float:
        """Speech ms in the current turn or candidate (0 when quiet), e.g. for barge-in."""
        return 0.0 if self._state is TurnState.QUIET else self._voiced * self._ms_per_sample

    def push(self, frame: np.ndarray) -> list[TurnEvent]:
        """Consume one frame of `detector.frame_samples` int16 samples."""
        if not isinstance(frame, np.ndarray) or frame.ndim != 1:
            raise ValueError(
                f"frame must be a 1-D int16 array of {self._fs} samples, "
                f"got {getattr(frame, 'shape', type(frame).__name__)}"
            )
        return self._push_block(frame.reshape(1, -1))

    def push_many(self, frames: Iterable[np.ndarray] | np.ndarray) -> list[TurnEvent]:
        """Consume consecutive frames: an (n, frame_samples) int16 array or 1-D frames.

        Same events as pushing the frames one by one, with less overhead.
        """
        if not isinstance(frames, np.ndarray):
            frames = list(frames)
            if not frames:
                return []
            if any(not isinstance(f, np.ndarray) or f.shape != (self._fs,) for f in frames):
                raise ValueError(f"every frame must be a 1-D int16 array of {self._fs} samples")
            frames = np.stack(frames)
        if frames.ndim != 2:
            raise ValueError(f"frames must be an (n, {self._fs}) int16 array")
        events: list[TurnEvent] = []
        for i in range(0, len(frames), _BLOCK_FRAMES):
            events += self._push_block(frames[i : i + _BLOCK_FRAMES])
        return events

    def flush(self) -> list[TurnEvent]:
        """End of stream or manual end: close an open turn now; [] if none is open.

        A candidate still in *starting* is dropped, since SpeechStarted was never sent.
        """
        if self._state in (TurnState.SPEAKING, TurnState.STOPPING):
            return self._end(forced=False, now=self._pos)
        self._reset()
        return []

    def commit(self) -> TurnEnded | None:
        """Manual turn (push-to-talk): all audio since the previous turn's audio, now.

        Ignores the VAD, since the user decided the turn is over. start_ms and
        audio_start_ms mark the start of the committed audio, end_ms the current clock.
        Keeps at most the latest `pre_roll_ms + max_turn_ms` (plus a frame). Returns None
        if there is no new audio. Emits no SpeechStopped: a server that sent
        speech.started should close it.
        """
        start = max(self._last_audio_end, self._pos - self._keep)
        if start >= self._pos:
            return None
        start_ms = start * self._ms_per_sample
        turn = TurnEnded(
            turn_id=self._take_id(),
            start_ms=start_ms,
            end_ms=self.clock_ms,
            audio=self._read(start, self._pos),
            audio_start_ms=start_ms,
        )
        self._last_audio_end = self._pos
        self._reset()
        return turn

    # -- internals ---------------------------------------------------------------------

    def _push_block(self, frames: np.ndarray) -> list[TurnEvent]:
        decisions = self.detector.classify(frames)  # validates dtype and shape
        pos = self._pos
        self._write(frames.reshape(-1))
        events: list[TurnEvent] = []
        fs = self._fs
        for voiced in decisions:
            if voiced or self._state is not TurnState.QUIET:
                events += self._step(voiced, pos)
            pos += fs
        return events

    def _write(self, samples: np.ndarray) -> None:
        n = len(samples)
        i = self._pos % self._cap
        head = min(n, self._cap - i)
        self._ring[i : i + head] = samples[:head]
        self._ring[: n - head] = samples[head:]
        self._pos += n

    def _read(self, start: int, end: int) -> np.ndarray:
        if end <= start:
            return np.zeros(0, dtype=np.int16)
        i, j = start % self._cap, end % self._cap
        if i < j:
            return self._ring[i:j].copy()
        return np.concatenate((self._ring[i:], self._ring[:j]))

    def _step(self, voiced: bool, start: int) -> list[TurnEvent]:
        """Advance by one frame that starts at sample `start`."""
        end = start + self._fs
        state = self._state
        if voiced:
            self._silence = 0
            self._last_voiced_end = end
            self._voiced += self._fs
            if state is TurnState.QUIET:
                state = self._state = TurnState.STARTING
                self._onset = start
                self._voiced = self._fs
                self._runs = []
            if state is TurnState.STARTING:
                if self._runs and self._runs[-1][1] == start:
                    self._runs[-1][1] = end
                else:
                    self._runs.append([start, end])
                if self._voiced < self._start:
                    return []
                self._state = TurnState.SPEAKING
                self._refine_onset()
                return [SpeechStarted(self._onset * self._ms_per_sample), *self._check_max(end)]
            self._state = TurnState.SPEAKING
            return self._check_max(end)
        self._silence += self._fs
        if state is TurnState.STARTING:
            patience = self._stop if self._voiced >= self._substantial else self._start
            if self._silence >= patience:
                self._reset()
            return []
        self._state = TurnState.STOPPING
        if self._silence >= self._stop:
            return self._end(forced=False, now=end)
        return self._check_max(end)

    def _check_max(self, now: int) -> list[TurnEvent]:
        if now - self._onset >= self._max_turn:
            return self._end(forced=True, now=now)
        return []

    def _frames(self, start: int, n: int) -> np.ndarray:
        return self._read(start, start + n * self._fs).reshape(n, self._fs)

    def _refine_onset(self) -> None:
        """Set the noise reference, drop leading blips, then move the onset back over weak
        speech the gate missed."""
        fs = self._fs
        earliest = max(self._pos - self._cap, self._last_audio_end, 0)
        ref_end = self._onset - min(self._edge_frames, (self._onset - earliest) // fs) * fs
        n_ref = min(self._ref_frames, (ref_end - earliest) // fs)
        if n_ref < _MIN_REF_FRAMES:
            self._noise_ref = None  # too close to the stream start or the previous turn
            return
        self._noise_ref = self._frames(ref_end - n_ref * fs, n_ref)
        onset = self._skip_blips()
        n_edge = min(self._edge_frames, (onset - earliest) // fs)
        before = self._frames(onset - n_edge * fs, n_edge)[::-1]  # nearest to the onset first
        self._onset = onset - self.detector.speech_run(before, self._noise_ref) * fs

    def _skip_blips(self) -> int:
        """Onset without leading noise blips: short runs, apart from the next run, in which
        no band stands out of the noise. Needed in pink noise, whose swings pass the gate
        now and then and would otherwise date the onset up to `start_ms` early."""
        runs, fs = self._runs, self._fs
        while (
            len(runs) > 1
            and runs[0][1] - runs[0][0] < self._substantial
            and runs[1][0] - runs[0][1] >= self._blip_gap
        ):
            blip = self._frames(runs[0][0], (runs[0][1] - runs[0][0]) // fs)
            if self.detector.speech_run(blip, self._noise_ref):
                break
            runs.pop(0)
        return runs[0][0]

    def _refined_end(self, now: int) -> int:
        """End of speech, moved forward over weak speech (a final /s/) the gate missed."""
        end = self._last_voiced_end
        n = min(self._edge_frames, (now - end) // self._fs)
        if self._noise_ref is None or n <= 0:
            return end
        return end + self.detector.speech_run(self._frames(end, n), self._noise_ref) * self._fs

    def _end(self, forced: bool, now: int) -> list[TurnEvent]:
        end = self._refined_end(now)
        start_ms, end_ms = self._onset * self._ms_per_sample, end * self._ms_per_sample
        events: list[TurnEvent] = [SpeechStopped(end_ms)]
        if self._voiced < self._min_speech:
            events.append(TurnDiscarded(start_ms, end_ms))
        else:
            audio_start = max(self._onset - self._pre, self._last_audio_end, now - self._keep, 0)
            audio_end = min(end + self._pre, now)
            events.append(
                TurnEnded(
                    turn_id=self._take_id(),
                    start_ms=start_ms,
                    end_ms=end_ms,
                    audio=self._read(audio_start, audio_end),
                    forced=forced,
                    audio_start_ms=audio_start * self._ms_per_sample,
                )
            )
            self._last_audio_end = audio_end
        self._reset()
        return events

    def _take_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def _reset(self) -> None:
        self._state = TurnState.QUIET
        self._voiced = 0
        self._silence = 0
        self._noise_ref = None
