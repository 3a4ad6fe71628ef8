"""Turn-taking state machine: frame decisions in, turn events out.

    quiet -> starting -> speaking <-> stopping -> quiet

* quiet: no speech. A voiced frame moves to *starting* and marks the onset.
* starting: voiced time is counted, and `start_ms` of it opens the turn. SpeechStarted
  is dated at the onset, not at the moment of decision. A pause gives the candidate up
  (back to quiet, no event) after `start_ms`, or after `stop_ms` once it holds 80 ms of
  speech. So a noise blip dies quickly, but "What | time" survives its stop closure.
* speaking: a non-voiced frame moves to *stopping*.
* stopping: a voiced frame returns to *speaking* with no event, so pauses shorter than
  `stop_ms` never split a turn. `stop_ms` of non-speech ends the turn: SpeechStopped,
  then TurnEnded, or TurnDiscarded if it held less than `min_speech_ms` of speech.

When a turn opens, leading noise blips are dropped from it. Then both edges move outward
over adjacent frames that stand out from the noise before the turn in some frequency band
(`SpeechDetector.band_levels`, `edge_threshold`). This catches the weak fricatives that
the per-frame gate loses under noise.

Time is counted in samples of whole frames. Times are exact (float ms since the first
frame), and results do not depend on how the caller chunked the audio. At most
`pre_roll_ms + max_turn_ms` of audio (plus a little history) is kept, which bounds
memory and every turn's audio.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from vad.detector import SpeechDetector

_MAX_MS = 600_000  # ten minutes: a larger setting is a unit mistake, not a use case
_BLOCK_FRAMES = 50  # push_many classifies and buffers at most this many frames at a time
_SUBSTANTIAL_MS = 80  # a starting candidate with this much speech survives longer pauses
_EDGE_MS = 300  # how far a turn edge may move outward
_NOISE_REF_MS = 200  # audio before that: the noise reference for the edges
_MIN_NOISE_FRAMES = 5  # fewer make no usable noise statistics for the edges


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
    """Where the state machine is; the values are the names used in the docs."""

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
        self._edge_frames = max(1, samples(_EDGE_MS) // fs)
        self._ref_frames = max(1, samples(_NOISE_REF_MS) // fs)
        # `_keep` bounds any turn's audio. The buffer also holds the history the turn edges
        # look at, and the block being decided, which is written before its frames step.
        self._keep = self._pre + self._max_turn + fs
        self._cap = self._keep + (self._edge_frames + self._ref_frames + _BLOCK_FRAMES) * fs
        # Recent audio as the pushed blocks, as bytes, oldest first: no big ring buffer to
        # allocate and fault in, and cheaper to copy than arrays.
        self._blocks: deque[bytes] = deque()
        self._blocks_start = 0  # sample index of the first sample of `_blocks[0]`
        self._pos = 0  # samples consumed
        self._state = TurnState.QUIET
        self._onset = 0  # first sample of the turn
        self._voiced = 0  # speech samples in the turn (or candidate)
        self._silence = 0  # current run of non-speech samples
        self._last_voiced_end = 0
        self._last_audio_end = 0  # where the previous turn's audio ended
        self._edge_threshold: np.ndarray | None = None  # per band, from before the turn
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
        if not isinstance(frame, np.ndarray) or frame.dtype != np.int16 or frame.ndim != 1:
            got = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else frame
            raise ValueError(
                f"frame must be a 1-D int16 array of {self._fs} samples, got {got!r:.60}"
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
        if len(frames) == 0:
            return []
        if len(frames) <= _BLOCK_FRAMES:
            return self._push_block(frames)
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
        self._write(frames)
        # Steady states, the bulk of any stream, skip the per-frame loop.
        fs, state = self._fs, self._state
        if state is TurnState.QUIET and True not in decisions:
            return []
        span = len(decisions) * fs
        if self._pos - self._onset < self._max_turn:
            if state is TurnState.SPEAKING and False not in decisions:
                self._voiced += span
                self._last_voiced_end = self._pos
                return []
            if (
                state is TurnState.STOPPING
                and True not in decisions
                and self._silence + span < self._stop
            ):
                self._silence += span
                return []
        events: list[TurnEvent] = []
        speaking, stopping = TurnState.SPEAKING, TurnState.STOPPING
        for voiced in decisions:
            end = pos + fs
            state = self._state
            # The common cases of `_step`, inlined: no state change, no event.
            if state is speaking and voiced and end - self._onset < self._max_turn:
                self._voiced += fs
                self._last_voiced_end = end
            elif (
                state is stopping
                and not voiced
                and self._silence + fs < self._stop
                and end - self._onset < self._max_turn
            ):
                self._silence += fs
            else:
                events += self._step(voiced, pos)
            pos = end
        return events

    def _write(self, frames: np.ndarray) -> None:
        block = frames.tobytes()  # an immutable copy: the caller may reuse its buffer
        self._blocks.append(block)
        self._pos += len(block) // 2
        while self._pos - self._blocks_start - len(self._blocks[0]) // 2 >= self._cap:
            self._blocks_start += len(self._blocks.popleft()) // 2

    def _read(self, start: int, end: int) -> np.ndarray:
        """Samples [start, end), which must lie within the last `_cap` samples."""
        pieces = []
        block_end = self._pos
        for block in reversed(self._blocks):  # reads are mostly of recent audio
            block_start = block_end - len(block) // 2
            if block_start < end:
                samples = np.frombuffer(block, dtype=np.int16)
                pieces.append(samples[max(start - block_start, 0) : end - block_start])
            if block_start <= start:
                break
            block_end = block_start
        if not pieces:
            return np.zeros(0, dtype=np.int16)
        return pieces[0].copy() if len(pieces) == 1 else np.concatenate(pieces[::-1])

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
        if state is TurnState.QUIET:
            return []
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

    def _hot(self, start: int, n: int) -> list[bool]:
        """Which of `n` frames from sample `start` stand out of the noise in some band."""
        levels = self.detector.band_levels(self._frames(start, n))
        return (levels > self._edge_threshold).any(axis=1).tolist()

    def _refine_onset(self) -> None:
        """Learn the noise before the turn, drop leading blips, then move the onset back
        over weak speech the gate missed. One FFT covers all the frames involved."""
        fs, runs = self._fs, self._runs
        earliest = max(self._pos - self._cap, self._last_audio_end, 0)
        ref_end = self._onset - min(self._edge_frames, (self._onset - earliest) // fs) * fs
        n_ref = min(self._ref_frames, (ref_end - earliest) // fs)
        self._edge_threshold = None
        if n_ref < _MIN_NOISE_FRAMES:
            return  # too close to the stream start or the previous turn to know the noise
        # Noise, then everything up to the first run that is surely speech.
        first_real = next((r for r in runs if r[1] - r[0] >= self._substantial), runs[-1])
        n_rest = (first_real[0] - ref_end) // fs
        levels = self.detector.band_levels(self._frames(ref_end - n_ref * fs, n_ref + n_rest))
        self._edge_threshold = threshold = self.detector.edge_threshold(levels[:n_ref])
        hot = (levels[n_ref:] > threshold).any(axis=1).tolist()  # frames from `ref_end`
        # Leading blips: short runs (a gap follows, by definition) with no band standing
        # out. Pink noise swings through the gate now and then; without this they would
        # date the onset up to `start_ms` early.
        while runs[0] is not first_real:
            if any(hot[(runs[0][0] - ref_end) // fs : (runs[0][1] - ref_end) // fs]):
                break
            runs.pop(0)
        onset = runs[0][0]
        i = (onset - ref_end) // fs
        lookback = hot[max(0, i - self._edge_frames) : i][::-1]  # nearest to the onset first
        self._onset = onset - _run_length(lookback) * fs

    def _refined_end(self, now: int) -> int:
        """End of speech, moved forward over weak speech (a final /s/) the gate missed."""
        end = self._last_voiced_end
        n = min(self._edge_frames, (now - end) // self._fs)
        if self._edge_threshold is None or n <= 0:
            return end
        return end + _run_length(self._hot(end, n)) * self._fs

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
        self._edge_threshold = None


def _run_length(hot: list[bool]) -> int:
    """Length of the leading run of True in `hot`, which may hold one False inside (a stop
    closure between a fricative and its vowel)."""
    run = 0
    for i, h in enumerate(hot):
        if h:
            run = i + 1
        elif i > run:  # a second False in a row
            break
    return run
