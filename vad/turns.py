"""Turn-taking state machine: frame decisions in, turn events out.

    quiet -> starting -> speaking <-> stopping -> quiet

* quiet: no speech. A voiced frame moves to *starting* and marks the onset.
* starting: voiced time is counted, and `start_ms` of it opens the turn. SpeechStart
  is dated at the onset, not at the moment of decision. A pause gives the candidate up
  (back to quiet, no event) after `start_ms`, or after `stop_ms` once it holds 80 ms of
  speech. So a noise blip dies quickly, but "What | time" survives its stop closure.
* speaking: a non-voiced frame moves to *stopping*.
* stopping: a voiced frame returns to *speaking* with no event, so pauses shorter than
  `stop_ms` never split a turn. `stop_ms` of non-speech ends the turn: SpeechEnd,
  then TurnEnd, or TurnDiscard if it held less than `min_speech_ms` of speech. In a
  rough background, speech that begins well under the turn's own level and near the
  background's peaks is the background: it counts as non-speech here (`_under_turn`).
  With `adaptive_stop`, each return to *speaking* after a pause of 200 ms or more
  records that pause, and the silence that ends a turn follows the pauses recorded
  (`TurnConfig`); the silence that ends a turn is never recorded.

When a turn opens, leading noise blips are dropped from it. Then both edges move outward
over adjacent frames that stand out from the noise before the turn in some frequency band
(`SpeechDetector.band_levels`, `edge_threshold`). This catches the weak fricatives that
the per-frame gate loses under noise. In a rough background (babble, music:
`SpeechDetector.background_rough`) the onset is not moved back: what stands out there
is as often the noise itself. There, when the turn ends, its onset is re-dated by the
turn's own level instead (`_redate_onset`): `TurnEnd.start_ms` may then differ from
`SpeechStart.start_ms`, which was sent before the user's level was known.

Time is counted in samples of whole frames. Times are exact (float ms since the first
frame), and results do not depend on how the caller chunked the audio. At most
`pre_roll_ms + max_turn_ms` of audio (plus a little history) is kept, which bounds
memory and every turn's audio.

Cost: `push_pcm` takes frames as bytes, as they come off the network; one frame takes a
fast path with no numpy beyond the detector's. Audio is kept as the pushed bytes, joined
into blocks of about 200 ms, so a turn's audio is copied out with one join, and history
is dropped to within a block of what a turn may still read (blocks of a second kept up
to a second more, ~32 KB a stream between turns). Each turn
edge costs one small FFT (~0.1-0.3 ms). For pushes of up to 100 ms the end's runs one
push early, when the next push may end the turn, so the push that does end it (and
delays turn.ended) is cheap.
"""

from __future__ import annotations

import enum
import itertools
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from vad import kernel
from vad.detector import SpeechDetector
from vad.kernel import VOICED

# Frames' sums of squares, compiled, called past numba's dispatcher (the arguments' types
# are fixed): ~0.2 µs a frame, where numpy's calls take ~2 µs for one.
_energies = kernel.energies.get_overload(kernel.energies.signatures[0])

_MAX_MS = 600_000  # ten minutes: a larger setting is a unit mistake, not a use case
_BLOCK_FRAMES = 50  # push_pcm classifies and buffers at most this many frames at a time
_SEAL_FRAMES = 10  # buffered audio is kept in bytes blocks of about this many frames
_SUBSTANTIAL_MS = 80  # a starting candidate with this much speech survives longer pauses
_RESUME_MS = 40  # in *stopping*, a turn resumes on this much speech (one gap allowed)
# (until it is known, the silence goes on counting, and the turn cannot end)
_EDGE_MS = 300  # how far a turn edge may move outward
_NOISE_REF_MS = 200  # audio before that: the noise reference for the edges
_MIN_NOISE_FRAMES = 5  # fewer make no usable noise statistics for the edges
_PREPARE_MAX_MS = 100  # pushes up to this long refine a turn's end one push early
# Re-dating a finished turn's onset in a rough background (`_redate_onset`).
_LEVEL_MS = 3000  # the turn's level: over its first 3 s ...
_LEVEL_PCT = 90  # ... this percentile of its frame levels
_LEVEL_STRIDE = 2  # (of every other frame: the cost is in measuring frames)
_SEARCH_FRAMES = 25  # the onset is sought in this many frames first
_LEVEL_OVER_DB = 4.0  # a level less far over the background's peak tells nothing
_STRONG_FRAC = 0.5  # a strong frame: this fraction of the way from the peak to the level
_LOOK_MS = 300  # strong frames this far before the onset (at most the pre-roll) ...
_LOOK_RUN = 2  # ... this many in a row: the user's first syllable, dropped by the gate
_BACK_MS = 60  # before the first strong frame, this much of frames that reach
_BACK_UNDER_DB = 3.0  # the background's peak less this (the user's first sounds under
_BACK_SPAN_DB = 30.0  # its peaks), and the turn's level less this, belong to the turn
# Adaptive end of turn (`TurnConfig.adaptive_stop`).
_PAUSE_MIN_MS = 200  # shorter silences: dips within words and noise, not pauses
_PAUSES_KEPT = 30  # the latest pauses learned from: old habits fade
_PAUSES_NEEDED = 3  # fewer: the setting may grow, but not shrink
_PAUSE_MARGIN_MS = 100  # the end-of-turn silence is the longest pause kept, plus a
_PAUSE_MARGIN = 0.25  # quarter, plus this
_CAUTIOUS_STOP_MS = 1200  # until pauses are known: slow talkers are not cut off
# The background, not the user (`_under_turn`): in a rough background, speech that
# begins this far under the open turn's own level (a quantile of its speech frames) and
# no more than this over the background's typical peak does not resume the turn; within
# the reach below after the turn's last speech, it still moves the turn's end.
_UNDER_DB = 6.5
_UNDER_BG_DB = 3.0
_UNDER_QUANTILE = 90
_UNDER_MIN_FRAMES = 5  # fewer speech frames in the turn: no level to compare with
_UNDER_BATCH_MS = 500  # the turn's level is measured again after this much more speech
_UNDER_TAIL_MS = 300


@dataclass(frozen=True)
class TurnConfig:
    """Turn-taking timings in ms; see docs/turn-taking.md for the defaults' rationale.

    adaptive_stop: learn this stream's pauses inside turns (silences of at least 200 ms
        that more speech of the same turn followed; the latest 30) and end turns after
        the longest of them plus a quarter plus 100 ms, bounded by
        min_stop_ms..max_stop_ms. It starts cautious, at the larger of `stop_ms` and
        1200 ms (at most max_stop_ms), so a slow talker's first long pauses do not cut
        their first turns; a longer pause raises it at once, and it is lowered only
        once 3 pauses are known. A silence that ended a
        turn is never learned from, so turn ends cannot teach it to wait longer.
    """

    start_ms: int = 200
    stop_ms: int = 800
    pre_roll_ms: int = 300
    min_speech_ms: int = 200
    max_turn_ms: int = 30_000
    #: Audio kept while no turn is open, for `commit` (beyond the little the turn edges
    #: need). None: up to `pre_roll_ms + max_turn_ms`, so a commit holds everything since
    #: the previous turn. A small value keeps a stream that is mostly quiet small: a
    #: server holds ~1 MB per session otherwise (30 s of 16 kHz audio).
    idle_history_ms: int | None = None
    adaptive_stop: bool = False
    min_stop_ms: int = 300
    max_stop_ms: int = 1500

    def __post_init__(self) -> None:
        names = [
            "start_ms",
            "stop_ms",
            "pre_roll_ms",
            "min_speech_ms",
            "max_turn_ms",
            "min_stop_ms",
            "max_stop_ms",
        ]
        if self.idle_history_ms is not None:
            names.append("idle_history_ms")
        for name in names:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int (ms), got {value!r}")
            if not 0 <= value <= _MAX_MS:
                raise ValueError(f"{name} must be within 0..{_MAX_MS} ms, got {value}")
        if not isinstance(self.adaptive_stop, bool):
            raise ValueError(f"adaptive_stop must be a bool, got {self.adaptive_stop!r}")
        if self.stop_ms == 0:
            raise ValueError("stop_ms must be > 0, or every pause would end the turn")
        if self.min_stop_ms == 0 or self.min_stop_ms > self.max_stop_ms:
            raise ValueError(
                f"need 0 < min_stop_ms ({self.min_stop_ms}) <= max_stop_ms ({self.max_stop_ms})"
            )
        longest_stop = max(self.stop_ms, self.max_stop_ms if self.adaptive_stop else 0)
        if self.max_turn_ms <= max(self.start_ms, self.min_speech_ms, longest_stop):
            raise ValueError(
                f"max_turn_ms ({self.max_turn_ms}) must exceed start_ms ({self.start_ms}), "
                f"min_speech_ms ({self.min_speech_ms}) and stop_ms ({longest_stop})"
            )


class TurnState(enum.StrEnum):
    """Where the state machine is; the values are the names used in the docs."""

    QUIET = "quiet"
    STARTING = "starting"
    SPEAKING = "speaking"
    STOPPING = "stopping"


# Module-level aliases: a global lookup is cheaper than an attribute of the enum class.
_QUIET, _STARTING, _SPEAKING, _STOPPING = (
    TurnState.QUIET,
    TurnState.STARTING,
    TurnState.SPEAKING,
    TurnState.STOPPING,
)


@dataclass(frozen=True)
class SpeechStart:
    """A turn opened. start_ms: its onset (start of its first speech frame)."""

    start_ms: float


@dataclass(frozen=True)
class SpeechEnd:
    """The open turn ended. end_ms: end of its last speech frame, not when we noticed."""

    end_ms: float


@dataclass(frozen=True)
class TurnEnd:
    """A finished turn and its audio.

    start_ms/end_ms: onset and end of speech. For `commit`, the committed audio's extent.
        In a rough background the onset is re-dated at the turn's end, so start_ms may
        differ from the SpeechStart's.
    pcm: the turn's audio, native-endian int16 at the detector's rate, starting at
        audio_start_ms (`audio` is the same samples as a read-only array). It begins up
        to `pre_roll_ms` before the onset, but never inside the previous turn's audio.
        It runs to end_ms plus up to `pre_roll_ms` of what followed, so ASR gets
        context on both edges.
    forced: cut at `max_turn_ms` while the turn was still open.
    """

    turn_id: int
    start_ms: float
    end_ms: float
    pcm: bytes
    forced: bool = False
    audio_start_ms: float = 0.0

    @property
    def audio(self) -> np.ndarray:
        return np.frombuffer(self.pcm, np.int16)


@dataclass(frozen=True)
class TurnDiscard:
    """An ended turn with less than `min_speech_ms` of speech (cough, click, door)."""

    start_ms: float
    end_ms: float


TurnEvent = SpeechStart | SpeechEnd | TurnEnd | TurnDiscard


class TurnDetector:
    """Turns out of one stream of fixed-size int16 frames (one instance per stream)."""

    def __init__(self, config: TurnConfig, detector: SpeechDetector) -> None:
        if not isinstance(config, TurnConfig):
            raise ValueError(f"config must be a TurnConfig, got {type(config).__name__}")
        if not isinstance(detector, SpeechDetector):
            raise ValueError(f"detector must be a SpeechDetector, got {type(detector).__name__}")
        self.config = config
        self.detector = detector
        self._classify_one, self._classify_args = detector.frame_kernel()
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
        self._prepare_span = samples(_PREPARE_MAX_MS)
        self._edge_frames = max(1, samples(_EDGE_MS) // fs)
        self._ref_frames = max(1, samples(_NOISE_REF_MS) // fs)
        self._level_frames = max(1, samples(_LEVEL_MS) // fs)
        self._look_frames = min(samples(_LOOK_MS), self._pre) // fs
        self._back_frames = samples(_BACK_MS) // fs
        # `_keep` bounds any turn's audio. The buffer also holds the history the turn edges
        # look at, and the block being decided, which is written before its frames step.
        self._keep = self._pre + self._max_turn + fs
        self._cap = self._keep + (self._edge_frames + self._ref_frames + _BLOCK_FRAMES) * fs
        # With `idle_history_ms`: history a turn may still need before its onset (the
        # pre-roll, the edges' reach and their noise reference), and what is kept with no
        # turn open. The onset lies in the push being written, which is not yet stepped.
        self._lookback = self._edge_frames * fs + max(self._ref_frames * fs, self._pre)
        self._idle = (
            None
            if config.idle_history_ms is None
            else max(self._lookback, samples(config.idle_history_ms))
        )
        self._frame_bytes = 2 * fs
        # Recent audio as bytes, oldest first: the latest pushes as they came (no copy),
        # and before them sealed blocks of about `_SEAL_FRAMES` frames each. No
        # big ring buffer to allocate and fault in, few pieces to join to copy a turn out.
        self._blocks: deque[bytes] = deque()
        self._blocks_start = 0  # sample index of the first sample of `_blocks[0]`
        self._tail: list[bytes] = []
        self._seal = _SEAL_FRAMES * fs
        self._seal_at = self._seal  # `_pos` at which `_tail` is sealed
        self._pos = 0  # samples consumed
        self._state = _QUIET
        self._onset = 0  # first sample of the turn
        self._voiced = 0  # speech samples in the turn (or candidate)
        self._silence = 0  # current run of non-speech samples
        # In *stopping*: speech samples of the current run (one frame without speech
        # allowed inside), from `_resume_start` to `_resume_end`; not yet a resumption.
        self._resume = self._resume_start = self._resume_end = 0
        self._resume_min = max(1, samples(_RESUME_MS) // fs) * fs
        self._last_voiced_end = 0
        self._last_audio_end = 0  # where the previous turn's audio ended
        self._edge_threshold: np.ndarray | None = None  # per band, from before the turn
        self._end_hot: tuple[int, list[bool]] | None = None  # see `_prepare_end`
        self._runs: list[list[int]] = []
        self._next_id = 1
        # The open turn's speech (for `_under_turn`; kept in rough backgrounds only, and
        # only while the turn is open): closed spans of frames in *starting* runs and
        # *speaking* not measured yet, where the open span began, the levels measured.
        self._spans: list[tuple[int, int]] = []
        self._span_start = 0
        self._levels: list[np.ndarray] = []
        self._unmeasured = 0  # samples in `_spans`
        self._turn_db = math.nan  # their `_UNDER_QUANTILE`, nan: too few
        self._under_end = 0  # end of a soft last word (see `_under_turn`)
        self._under_last = 0  # end of the last frame `_under_turn` took for silence
        self._under_tail = samples(_UNDER_TAIL_MS)
        self._stepping = 0, b""  # (first sample, bytes) of the push `_step` is stepping
        self._one = np.empty(1)  # a frame's energy, `_under_turn`'s scratch
        self._under_batch = samples(_UNDER_BATCH_MS)
        # Adaptive end of turn: the latest pauses inside turns, in samples.
        self._adaptive = config.adaptive_stop
        self._pauses: deque[int] = deque(maxlen=_PAUSES_KEPT)
        self._pause_min = samples(_PAUSE_MIN_MS)
        self._stop_bounds = (samples(config.min_stop_ms), samples(config.max_stop_ms))
        self._pause_margin = samples(_PAUSE_MARGIN_MS)
        if self._adaptive:  # cautious until this talker's pauses are known
            hi = self._stop_bounds[1]
            self._stop = max(self._stop, min(hi, samples(_CAUTIOUS_STOP_MS)))

    @property
    def state(self) -> TurnState:
        return self._state

    @property
    def clock_ms(self) -> float:
        """Duration of all audio consumed so far, in ms."""
        return self._pos * self._ms_per_sample

    @property
    def stop_ms(self) -> float:
        """The silence that ends a turn now: `stop_ms`, or what `adaptive_stop` learned."""
        return self._stop * self._ms_per_sample

    @property
    def pauses_ms(self) -> list[float]:
        """The pauses inside turns that `adaptive_stop` learns from, oldest first."""
        return [p * self._ms_per_sample for p in self._pauses]

    @property
    def speech_ms(self) -> float:
        """Speech ms in the current turn or candidate (0 when quiet), e.g. for barge-in."""
        return 0.0 if self._state is _QUIET else self._voiced * self._ms_per_sample

    def push(self, frame: np.ndarray) -> list[TurnEvent]:
        """Consume one frame of `detector.frame_samples` int16 samples."""
        if (
            not isinstance(frame, np.ndarray)
            or frame.dtype != np.int16
            or frame.shape != (self._fs,)
        ):
            got = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else frame
            raise ValueError(
                f"frame must be a 1-D int16 array of {self._fs} samples, got {got!r:.60}"
            )
        return self.push_pcm(frame.tobytes())

    def push_many(self, frames: Iterable[np.ndarray] | np.ndarray) -> list[TurnEvent]:
        """Consume consecutive frames: an (n, frame_samples) int16 array or 1-D frames.

        Same events as pushing the frames one by one, with less overhead.
        """
        if isinstance(frames, np.ndarray):
            if frames.ndim != 2 or frames.shape[1] != self._fs or frames.dtype != np.int16:
                raise ValueError(f"frames must be an (n, {self._fs}) int16 array")
            return self.push_pcm(frames.tobytes())
        frames = list(frames)
        if any(
            not isinstance(f, np.ndarray) or f.shape != (self._fs,) or f.dtype != np.int16
            for f in frames
        ):
            raise ValueError(f"every frame must be a 1-D int16 array of {self._fs} samples")
        return self.push_pcm(b"".join([f.tobytes() for f in frames]))

    def push_pcm(self, pcm: bytes) -> list[TurnEvent]:
        """Consume consecutive frames given as bytes: native-endian int16 samples (s16le on
        the usual machines), a whole number of frames.

        Same events as `push_many` on the same samples. One frame is the fast path.
        """
        if len(pcm) != self._frame_bytes:
            return self._push_frames(pcm)
        # One frame: `_push_block`'s work, with the detector's call, `_write` and `_step`'s
        # steady states inlined (each Python call here costs ~2% of the frame's path).
        if type(pcm) is not bytes:
            pcm = bytes(pcm)  # keep no caller buffer
        voiced = self._classify_one(pcm, *self._classify_args)
        if voiced > VOICED:
            raise RuntimeError("webrtcvad rejected a frame")  # the config is valid: a bug
        fs = self._fs
        pos = self._pos
        end = self._pos = pos + fs
        self._tail.append(pcm)
        if end >= self._seal_at:
            self._seal_tail(fs)
        state = self._state
        if state is _QUIET:
            return self._step(True, pos) if voiced else []
        if end - self._onset < self._max_turn:
            if voiced:
                if state is _SPEAKING:
                    self._voiced += fs
                    self._last_voiced_end = end
                    return []
            elif state is _STOPPING and self._silence + fs < self._stop and not self._resume:
                self._silence += fs
                if self._silence + fs >= self._stop:  # the next frame may end the turn
                    self._prepare_end()
                return []
        self._stepping = pos, pcm
        return self._step(voiced, pos)

    def flush(self) -> list[TurnEvent]:
        """End of stream or manual end: close an open turn now; [] if none is open.

        A candidate still in *starting* is dropped, since SpeechStart was never sent.
        """
        if self._state in (_SPEAKING, _STOPPING):
            return self._end(forced=False, now=self._pos)
        self._reset()
        return []

    def commit(self) -> TurnEnd | None:
        """Manual turn (push-to-talk): all audio since the previous turn's audio, now.

        Ignores the VAD, since the user decided the turn is over. start_ms and
        audio_start_ms mark the start of the committed audio, end_ms the current clock.
        Keeps at most the latest `pre_roll_ms + max_turn_ms` (plus a frame). Returns None
        if there is no new audio. Emits no SpeechEnd: a server that sent
        speech.started should close it.
        """
        start = max(self._last_audio_end, self._pos - self._keep, self._blocks_start)
        if start >= self._pos:
            return None
        start_ms = start * self._ms_per_sample
        turn = TurnEnd(
            turn_id=self._take_id(),
            start_ms=start_ms,
            end_ms=self.clock_ms,
            pcm=self._read_pcm(start, self._pos),
            audio_start_ms=start_ms,
        )
        self._last_audio_end = self._pos
        self._reset()
        return turn

    # -- internals ---------------------------------------------------------------------

    def _push_frames(self, pcm: bytes) -> list[TurnEvent]:
        """`push_pcm` for anything but one frame: blocks of at most `_BLOCK_FRAMES`."""
        size = len(pcm)
        if size % self._frame_bytes:
            raise ValueError(
                f"pcm must hold whole frames of {self._fs} int16 samples, got {size} bytes"
            )
        # Runs over which the detector's background state stays what a frame-by-frame
        # push would read (`frames_in_state`), of at most `_BLOCK_FRAMES`.
        fb = self._frame_bytes
        frames_in_state = self.detector.frames_in_state
        events: list[TurnEvent] = []
        i = 0
        while i < size:
            step = min(frames_in_state(), _BLOCK_FRAMES) * fb
            events += self._push_block(pcm[i : i + step])
            i += step
        return events

    def _push_block(self, pcm: bytes) -> list[TurnEvent]:
        events = self._step_block(pcm)
        span = len(pcm) // 2
        if (
            self._state is _STOPPING
            and self._silence + span >= self._stop  # a push like this one may end the turn
            and span <= self._prepare_span
        ):
            self._prepare_end()
        return events

    def _step_block(self, pcm: bytes) -> list[TurnEvent]:
        decisions = self.detector.voiced_bits(pcm)  # validates the length; 1 or 0
        pos = self._pos
        self._write(pcm)
        # Steady states, the bulk of any stream, skip the per-frame loop.
        fs, state = self._fs, self._state
        if state is _QUIET and 1 not in decisions:
            return []
        span = len(decisions) * fs
        if self._pos - self._onset < self._max_turn:
            if state is _SPEAKING and 0 not in decisions:
                self._voiced += span
                self._last_voiced_end = self._pos
                return []
            if (
                state is _STOPPING
                and 1 not in decisions
                and self._silence + span < self._stop
                and not self._resume
            ):
                self._silence += span
                return []
        self._stepping = pos, pcm
        events: list[TurnEvent] = []
        for voiced in decisions:
            end = pos + fs
            state = self._state
            # The common cases of `_step`, inlined: no state change, no event.
            if state is _SPEAKING and voiced and end - self._onset < self._max_turn:
                self._voiced += fs
                self._last_voiced_end = end
            elif (
                state is _STOPPING
                and not voiced
                and self._silence + fs < self._stop
                and end - self._onset < self._max_turn
                and not self._resume
            ):
                self._silence += fs
            else:
                events += self._step(voiced, pos)
            pos = end
        return events

    def _write(self, pcm: bytes) -> None:
        self._tail.append(pcm if type(pcm) is bytes else bytes(pcm))  # keep no caller buffer
        self._pos += len(pcm) // 2
        if self._pos >= self._seal_at:
            self._seal_tail(len(pcm) // 2)

    def _seal_tail(self, span: int) -> None:
        """Join `_tail` into one block; drop whole blocks older than what may be read:
        `_cap` samples, or with `idle_history_ms` what the open turn (its pre-roll once
        started, the edges' history while starting) or, with none open, a turn starting
        in the `span` samples just written could need."""
        self._blocks.append(b"".join(self._tail))
        self._tail = []
        pos = self._pos
        self._seal_at = pos + self._seal
        keep_from = pos - self._cap
        if self._idle is not None:
            if self._state is _QUIET:
                keep_from = max(keep_from, pos - span - self._idle)
            elif self._state is _STARTING:
                keep_from = max(keep_from, self._onset - self._lookback)
            else:  # the onset is refined: only the pre-roll before it is read again
                keep_from = max(keep_from, self._onset - self._pre)
        self._drop_before(keep_from)

    def _drop_before(self, keep_from: int) -> None:
        blocks = self._blocks
        while blocks and self._blocks_start + len(blocks[0]) // 2 <= keep_from:
            self._blocks_start += len(blocks.popleft()) // 2

    def _read_pcm(self, start: int, end: int) -> bytes:
        """Samples [start, end) as bytes; they must lie within the last `_cap`."""
        if len(self._tail) > 1:
            self._tail = [b"".join(self._tail)]  # fewer pieces to walk, now and later
        pieces: list[bytes | memoryview] = []
        block_end = self._pos
        for block in itertools.chain(reversed(self._tail), reversed(self._blocks)):
            block_start = block_end - len(block) // 2  # reads are mostly of recent audio
            if block_start < end:
                if start <= block_start and block_end <= end:
                    pieces.append(block)
                else:
                    lo, hi = max(start - block_start, 0) * 2, (end - block_start) * 2
                    pieces.append(memoryview(block)[lo:hi])
            if block_start <= start:
                break
            block_end = block_start
        pieces.reverse()
        return b"".join(pieces)

    def _step(self, voiced: bool, start: int) -> list[TurnEvent]:
        """Advance by one frame that starts at sample `start`."""
        end = start + self._fs
        state = self._state
        if voiced and state is _STOPPING and not self._resume and self._under_turn(start, end):
            voiced = False  # another voice under the user's: silence for the end of turn
        if voiced and state is _STOPPING:
            if not self._resume:
                self._resume_start = start
            self._resume += self._fs
            self._resume_end = end
            if self._resume < self._resume_min:  # one frame: noise, a click, or speech
                self._silence += self._fs  # the turn does not end while this is open
                return self._check_max(end)
            # Speech again: the pause ended where this run of speech began.
            pause = self._silence - (start - self._resume_start)
            if self._adaptive and pause >= self._pause_min:
                self._learn_pause(pause)
            self._voiced += self._resume - self._fs  # the run's earlier frames; this one below
            self._resume = 0
            self._span_start = self._resume_start
        if voiced:
            self._silence = 0
            self._last_voiced_end = end
            self._voiced += self._fs
            if state is _QUIET:
                state = self._state = _STARTING
                self._onset = start
                self._voiced = self._fs
                self._runs = []
            if state is _STARTING:
                if self._runs and self._runs[-1][1] == start:
                    self._runs[-1][1] = end
                else:
                    self._runs.append([start, end])
                if self._voiced < self._start:
                    return []
                self._state = _SPEAKING
                self._refine_onset()  # may drop leading blips from `_runs`
                self._spans = [(a, b) for a, b in self._runs[:-1]]
                self._unmeasured = sum(b - a for a, b in self._spans)
                self._span_start = self._runs[-1][0]
                return [SpeechStart(self._onset * self._ms_per_sample), *self._check_max(end)]
            self._state = _SPEAKING
            return self._check_max(end)
        if state is _QUIET:
            return []
        self._silence += self._fs
        if self._resume and end - self._resume_end > self._fs:  # a 2nd frame without speech
            self._resume = 0
        if state is _STARTING:
            patience = self._stop if self._voiced >= self._substantial else self._start
            if self._silence >= patience:
                self._reset()
            return []
        if state is _SPEAKING and self.detector.background_rough:
            self._spans.append((self._span_start, start))
            self._unmeasured += start - self._span_start
        self._state = _STOPPING
        if self._silence >= self._stop and not self._resume:
            return self._end(forced=False, now=end)
        return self._check_max(end)

    def _under_turn(self, start: int, end: int) -> bool:
        """Whether speech beginning at frame `start` in *stopping* is the background: in a
        rough background (babble, music), `_UNDER_DB` under the open turn's own level
        and within `_UNDER_BG_DB` of the background's typical peak.

        Babble and music that pass the detector in the user's gap otherwise resume the
        turn again and again, so it does not end (merged turns); the user is nearer the
        microphone. Such a frame counts as silence for the end of turn; onsets are not
        affected (a turn opens as before). Both bounds are needed: the user's own
        speech 8-15 dB softer after a pause (turning away, trailing off) stands over
        the background's peaks, and must keep the turn open. A run of such frames (as a
        resumption would need: two, one gap allowed) within `_UNDER_TAIL_MS` of the
        turn's last speech may be a soft last word: the turn's end moves over it.
        Cost: only in rough backgrounds, at the first frame of a run after a pause; each
        frame of the turn is measured once. Memory: the open turn's levels, 8 bytes a
        speech frame (at most ~12 KB at `max_turn_ms` 30 s), returned when it ends."""
        peak = self.detector.background_peak_db
        if peak is None:  # not a rough background
            return False
        at, pcm = self._stepping  # the push being stepped: no copy out of the buffer
        pcm = pcm[2 * (start - at) : 2 * (end - at)]
        _energies(pcm if type(pcm) is bytes else bytes(pcm), self._one)
        db = 10.0 * math.log10(self._one[0] + self._fs)
        if db >= peak + _UNDER_BG_DB:
            return False  # over the background's peaks: the user (the usual case, cheap)
        if not db < self._turn_level() - _UNDER_DB:  # nan: no level yet
            return False
        if start - self._under_last <= self._fs and end - self._last_voiced_end <= self._under_tail:
            self._under_end = end  # a run, as a resumption would need (one gap allowed)
        self._under_last = end
        return True

    def _turn_level(self) -> float:
        """`_UNDER_QUANTILE` of the open turn's speech frames' levels (dB); nan while it
        has too few. Frames are measured once each, and only once `_UNDER_BATCH` more
        are in: the quantile of a turn moves slowly, and measuring costs ~10 µs."""
        spans, fs = self._spans, self._fs
        if self._unmeasured < self._under_batch and self._turn_db == self._turn_db:  # not nan
            return self._turn_db
        if spans:  # one read and one pass over the new spans
            first = spans[0][0]
            pcm = self._read_pcm(first, spans[-1][1])
            energy = np.empty(len(pcm) // (2 * fs))
            _energies(pcm, energy)
            keep = np.zeros(len(energy), np.bool_)
            for a, b in spans:
                keep[(a - first) // fs : (b - first) // fs] = True
            self._levels.append(10.0 * np.log10(energy[keep] + fs))
            self._spans, self._unmeasured = [], 0
        levels = np.concatenate(self._levels) if self._levels else np.empty(0)
        self._levels = [levels]
        n = len(levels)
        if n >= _UNDER_MIN_FRAMES:  # the quantile, without np.percentile's overhead
            k = n * _UNDER_QUANTILE // 100
            self._turn_db = float(np.partition(levels, k)[k])
        return self._turn_db

    def _learn_pause(self, silence: int) -> None:
        """A pause inside a turn ended in speech: update the end-of-turn silence.

        It becomes the longest of the latest pauses plus a margin. Only pauses shorter
        than the current setting are ever seen (longer ones end the turn), so a pause
        near the setting is a near miss and raises it at once; lowering it waits until
        `_PAUSES_NEEDED` pauses are known."""
        self._pauses.append(silence)
        lo, hi = self._stop_bounds
        longest = max(self._pauses)
        stop = min(hi, max(lo, longest + int(_PAUSE_MARGIN * longest) + self._pause_margin))
        stop = -(-stop // self._fs) * self._fs  # whole frames
        if stop > self._stop or len(self._pauses) >= _PAUSES_NEEDED:
            self._stop = stop

    def _check_max(self, now: int) -> list[TurnEvent]:
        if now - self._onset >= self._max_turn:
            return self._end(forced=True, now=now)
        return []

    def _frames(self, start: int, n: int) -> np.ndarray:
        pcm = self._read_pcm(start, start + n * self._fs)
        return np.frombuffer(pcm, np.int16).reshape(n, self._fs)

    def _hot(self, start: int, n: int) -> list[bool]:
        """Which of `n` frames from sample `start` stand out of the noise in some band."""
        levels = self.detector.band_levels(self._frames(start, n))
        return self.detector.above(levels, self._edge_threshold)

    def _refine_onset(self) -> None:
        """Learn the noise before the turn, drop leading blips, then move the onset back
        over weak speech the gate missed. One FFT covers all the frames involved."""
        fs, runs = self._fs, self._runs
        earliest = max(self._pos - self._cap, self._last_audio_end, self._blocks_start)
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
        if threshold is None:
            return
        hot = self.detector.above(levels[n_ref:], threshold)  # frames from `ref_end`
        # Leading blips: short runs (a gap follows, by definition) with no band standing
        # out. Pink noise swings through the gate now and then; without this they would
        # date the onset up to `start_ms` early.
        while runs[0] is not first_real:
            if any(hot[(runs[0][0] - ref_end) // fs : (runs[0][1] - ref_end) // fs]):
                break
            runs.pop(0)
        onset = runs[0][0]
        if self.detector.background_rough:  # what stands out may be the noise itself
            self._onset = onset
            return
        i = (onset - ref_end) // fs
        lookback = hot[max(0, i - self._edge_frames) : i][::-1]  # nearest to the onset first
        self._onset = onset - _run_length(lookback) * fs

    def _redate_onset(self, end: int) -> None:
        """Re-date a finished turn's onset by the turn's own level (rough backgrounds).

        While a turn opens, the user's level is not known yet: a loud moment of babble
        or music just before the user opens it early, and the user's first syllable,
        under the background's peaks or too short to open a turn, opens it late. At its
        end, the turn's level is known (`_LEVEL_PCT` of its frame levels) and so is the
        background's typical peak. The onset becomes the first strong frame (`_STRONG_FRAC`
        of the way from that peak to the level) of the turn, or of `_LOOK_MS` before it
        (`_LOOK_RUN` in a row), moved back over up to `_BACK_MS` of frames near the
        peak. One pass over at most `_LOOK_MS + _LEVEL_MS` of audio per turn; nothing
        per frame."""
        bg = self.detector.background_peak_db
        fs = self._fs
        n = min((end - self._onset) // fs, self._level_frames)
        if bg is None or n <= 0:
            return
        earliest = max(self._blocks_start, self._last_audio_end, self._pos - self._cap)
        look = max(0, min(self._look_frames, (self._onset - earliest) // fs))
        start = self._onset - look * fs
        frames = self._frames(start, look + n)
        measure = self.detector.frame_levels
        own = measure(np.ascontiguousarray(frames[look::_LEVEL_STRIDE]))
        k = -(-len(own) * _LEVEL_PCT // 100) - 1  # the `_LEVEL_PCT` percentile, nearest rank
        level = float(np.partition(own, k)[k])
        if level < bg + _LEVEL_OVER_DB:  # the background reaches the user: no telling
            return
        head = min(look + n, look + _SEARCH_FRAMES)
        levels = measure(frames[:head])
        strong = (levels >= bg + _STRONG_FRAC * (level - bg)).tolist()
        if True not in strong[look:]:  # a weak start: the rest of the frames measured
            levels = np.concatenate([levels, measure(frames[head:])])
            strong = (levels >= bg + _STRONG_FRAC * (level - bg)).tolist()
        first = strong.index(True, look)  # the level's own frames are strong
        run = 0
        for i in range(look):
            run = run + 1 if strong[i] else 0
            if run == _LOOK_RUN:
                first = i + 1 - run
                break
        weak = max(bg - _BACK_UNDER_DB, level - _BACK_SPAN_DB)
        back = 0
        while back < self._back_frames and back < first and levels[first - back - 1] >= weak:
            back += 1
        self._onset = start + (first - back) * fs

    def _refined_end(self, now: int) -> int:
        """End of speech, moved forward over weak speech (a final /s/) the gate missed,
        and over a soft last word `_under_turn` kept."""
        end = max(self._last_voiced_end, self._under_end)
        n = min(self._edge_frames, (now - end) // self._fs)
        if self._edge_threshold is None or n <= 0:
            return end
        if self._end_hot is not None and self._end_hot[0] == end and n == self._edge_frames:
            hot = self._end_hot[1]  # from `_prepare_end`: the same frames, the same result
        else:
            hot = self._hot(end, n)
        return end + _run_length(hot) * self._fs

    def _prepare_end(self) -> None:
        """Run `_refined_end`'s FFT a push early, when the next push may end the turn: so
        the push that ends it, which delays turn.ended, does not pay for it. Only once the
        frames it looks at are all in, so the result is the one `_end` would compute."""
        end = self._last_voiced_end
        if (
            self._edge_threshold is not None
            and self._pos - end >= self._edge_frames * self._fs
            and (self._end_hot is None or self._end_hot[0] != end)
        ):
            self._end_hot = (end, self._hot(end, self._edge_frames))

    def _end(self, forced: bool, now: int) -> list[TurnEvent]:
        end = self._refined_end(now)
        opened = self._onset
        self._redate_onset(end)
        start_ms, end_ms = self._onset * self._ms_per_sample, end * self._ms_per_sample
        events: list[TurnEvent] = [SpeechEnd(end_ms)]
        if self._voiced < self._min_speech:
            events.append(TurnDiscard(start_ms, end_ms))
        else:
            # Re-dated earlier, the onset stays within the pre-roll of the onset first
            # found, the earliest audio kept (`_seal_tail`) while the turn was open.
            audio_from = max(self._onset, opened) - self._pre
            audio_start = max(audio_from, self._last_audio_end, now - self._keep, 0)
            audio_end = min(end + self._pre, now)
            events.append(
                TurnEnd(
                    turn_id=self._take_id(),
                    start_ms=start_ms,
                    end_ms=end_ms,
                    pcm=self._read_pcm(audio_start, audio_end),
                    forced=forced,
                    audio_start_ms=audio_start * self._ms_per_sample,
                )
            )
            self._last_audio_end = audio_end
        self._reset()
        if self._idle is not None:  # the turn's audio is out: keep what the next one needs
            self._drop_before(now - self._idle)
        return events

    def _take_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def _reset(self) -> None:
        self._state = _QUIET
        self._voiced = 0
        self._silence = 0
        self._resume = 0
        self._edge_threshold = None
        self._end_hot = None
        self._spans, self._levels, self._unmeasured = [], [], 0
        self._turn_db = math.nan
        self._under_end = self._under_last = 0


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
