"""Frame-level speech detection: webrtcvad behind an adaptive noise floor.

webrtcvad alone fails in steady noise. Its noise model only works near its expected levels,
so loud white, pink or hum noise (-25 dBFS) counts as speech 80-100% of the time. And it
has no idea what "louder than the room" means. So we track the room ourselves:

* Noise floor: the lowest frame energy over the last `floor_window_ms`. This is the
  "minimum statistics" method. Speech always has dips (pauses, stop closures) down to the
  noise, so the minimum follows the noise even while someone talks. It falls at once when
  the noise does ("fast down"), and rises block by block as quiet frames leave the window
  ("slow up": within `floor_window_ms` of the noise getting louder).
* Normalisation: frames reach webrtcvad attenuated by whole bit shifts, so the floor lands
  near `noise_target_dbfs`, where webrtcvad's noise model behaves. This is exact, costs
  next to nothing, and keeps the SNR.
* Energy gate: a frame is speech only if webrtcvad says so *and* it stands a margin above
  the floor. The margin grows with how much this noise fluctuates (pink noise swings
  several dB from frame to frame, white noise or hum well under 1 dB), so steady noise is
  never let through, and quiet speech in steady noise still is.
* Override: a frame far above the floor is speech even if webrtcvad disagrees. Under
  heavy noise webrtcvad rejects stretches of plainly loud vowels.

Two energies are gated: the full band, and the first difference (+6 dB/octave). The second
ignores hum and pink noise's low-frequency swing, and favours fricatives. The full band
leaves out, in every 10 ms, a least-squares fit of a level and a slope (a ramp stepping
every 2.5 ms, so it costs one sum per piece): energy that changes more slowly than
speech (1/f and brown noise below the speech band: wind, HVAC and traffic rumble,
handling, DC) is not heard. It acts as a high-pass near 100 Hz (-4 dB at 100 Hz, -17 dB
at 25 Hz, -27 dB at 10 Hz, within 1 dB from 150 Hz up). Without it such rumble kept the
floor and gate swinging, and turns merged across gaps.

Four more guards, for noise that is not steady:

* Background peaks (babble, music, rumble swells). Other voices and music are voiced and
  stand well over the floor (which sits in their dips), so webrtcvad and the gate pass
  them. But their level is steady on a scale of seconds, and the user is louder than
  their own background: a frame must also beat the background's typical peak, the
  lowest 400 ms block peak over the last 12 s (+1.5 dB). Blocks 6 dB over it are the
  user talking and stay out of the window (up to a window's worth in a row, so a
  background that got louder is learned), so a long turn does not lift it. It only acts
  where these peaks stand 6 dB or more over the floor (steady noise peaks 2-4 dB over
  it), and never above a cap over the floor: while the window fills (the first 12 s,
  which may hold nothing but the user's first turn), 3 dB + 4x the noise's fluctuation;
  after that, 20 dB.
* The user's own level (babble, music). Other voices and music that beat the
  background's typical peak now and then are still under the user, who is nearer the
  microphone. The level is a running mean (~400 ms of speech, in dB) of the frames that
  passed. In a rough background, a frame that begins or resumes speech (100 ms after the
  last frame within 6 dB of the level) must reach 40% of the way from the background's
  peak to that level (at most the level - 2 dB); within a run of speech, weak frames
  pass. A level not over the background's peak was learned from the background: no
  rule then. At 20 dB SNR babble stays ~12 dB under the user, so it no longer resumes
  turns in the user's pauses or bridges gaps between turns (bench_vad babble merges
  8 / 8 / 12 -> 0 / 1 / 6 at 20 / 10 / 5 dB).

* Pre-emphasis for webrtcvad. When the noise falls with frequency (its first-difference
  floor 3 dB or more below its full-band floor; white noise is +3 dB), webrtcvad hears
  the frame's first difference: rumble swelling in its 80-250 Hz band otherwise passes
  for speech. On flat noise it hears the frame as is (pre-emphasis would lift the noise
  where speech is weak).
* Clicks. A frame (of 20 ms or more) with 80% of its energy in 5 ms is a key, a tap or a
  click, never speech; a plosive burst lost this way is one frame of a word.

Cost: every frame must reach webrtcvad, since its noise model needs the noise too. All
the rest (two energies, the floor, the shift, the gate, and once per block the window
and the fluctuation estimate) is compiled into the same call as webrtcvad (`vad.kernel`),
which costs about as much as webrtcvad's own Python wrapper. This class sets the state
up and checks its inputs. Energies are sums of int16 squares, so they are exact integers
in float64 (the detrending is a fixed sequence of float operations on them): neither
chunking nor the call path can change a decision.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import webrtcvad

from vad import kernel
from vad.kernel import F0, F1, FLOOR, SPREAD, VAD_ERROR, VOICED, one_frame, set_thresholds
from vad.kernel import frames as classify_frames


def _compiled(dispatcher):  # type: ignore[no-untyped-def]
    """The kernel function compiled for its one signature, called without numba's
    dispatcher: the dispatcher's type checks cost ~0.1 µs a call (~5% of a 20 ms frame's
    whole path). The arguments' types are fixed here (the detector's own arrays), so the
    checks can be skipped."""
    (signature,) = dispatcher.signatures
    return dispatcher.get_overload(signature)


_one_frame = _compiled(one_frame)
_classify_frames = _compiled(classify_frames)

SAMPLE_RATES = (8000, 16000, 32000, 48000)
FRAME_MS = (10, 20, 30)
_FULL_SCALE_DB = 20 * math.log10(32768)  # dB re 1 LSB of an int16 full-scale square wave
_BLOCK_MS = 400  # the sliding minimum moves (and thresholds update) once per block
_SPREAD_MS = 1000  # time constant of the noise-fluctuation estimate
_SPREAD_PRIOR_DB = 3.0  # before the first block is measured: cautious, as for pink noise
_SPREAD_CAP_DB = 6.0  # frames further above the floor are not noise; keep them out of it
_SPREAD_CAP = 10 ** (_SPREAD_CAP_DB / 10)
_HPK = 4
# Background peaks (babble, music): a frame must beat the lowest block peak of the last
# 12 s plus a margin, unless it is far above the floor (kernel.S_BG_CAP).
_BG_WINDOW_MS = 12000
_BG_MARGIN_DB = 1.5
_BG_CAP_DB = 20.0
_BG_CAP_BASE_DB, _BG_CAP_SPREADS = 3.0, 4.0
_BG_SKIP_DB = 6.0
_BG_ROUGH_DB = 6.0  # `background_rough`: peaks this far over the floor
# The user's own level (see the module docstring, kernel `_near_level`): its time
# constant, the fraction of the way from the background's peak, the most it asks (the
# level minus this), "near the level", the pause after which a frame begins or resumes
# speech, and how far over the background's peak the level must stand to be the user's.
_LEVEL_MS = 400
_LEVEL_OVER_DB = 1.0
_LEVEL_FRAC = 0.4
_LEVEL_MIN_DB = 2.0
_STRONG_DB = 6.0
_PAUSE_MS = 100
# Turn-edge refinement (see `band_levels`, `edge_threshold`).
_EDGE_BANDS_HZ = (250, 1000, 2000, 4000, 8000)
_EDGE_MARGIN_DB = 2.0
_EDGE_SIGMAS = 3.0
_EDGE_MIN_NOISE_FRAMES = 5


@dataclass(frozen=True)
class DetectorConfig:
    """Settings for `SpeechDetector`. Invalid values raise ValueError on construction.

    aggressiveness: webrtcvad mode 0-3. Default 3. Behind the noise gate, modes 1-3 score
        alike on stationary noise (benchmark F1 within 0.001), so the default is the mode
        that rejects most of what the gate cannot judge: sounds that are not steady
        (keyboard, music, a door).
    margin_db: least excess over the noise floor a speech frame needs.
    spread_factor: the margin is max(margin_db, spread_factor x the mean excess of noise
        frames over the floor). Frames webrtcvad rejects need twice that margin.
    override_db: frames webrtcvad rejects still count as speech above
        max(override_db, 2 x margin).
    floor_window_ms: the noise floor is the minimum over this window. It must be longer
        than any stretch of speech without a dip, and short enough to follow noise that
        gets louder.
    noise_target_dbfs: webrtcvad sees the noise floor attenuated to about this level.
    min_level_dbfs: quieter frames are never speech. Digital silence has no floor to beat.
    """

    sample_rate: int = 16000
    frame_ms: int = 20
    aggressiveness: int = 3
    margin_db: float = 1.0
    spread_factor: float = 1.25
    override_db: float = 5.0
    floor_window_ms: int = 2000
    noise_target_dbfs: float = -45.0
    min_level_dbfs: float = -60.0

    def __post_init__(self) -> None:
        if self.sample_rate not in SAMPLE_RATES:
            raise ValueError(f"sample_rate must be one of {SAMPLE_RATES}, got {self.sample_rate}")
        if self.frame_ms not in FRAME_MS:
            raise ValueError(f"frame_ms must be one of {FRAME_MS}, got {self.frame_ms}")
        if self.aggressiveness not in (0, 1, 2, 3):
            raise ValueError(f"aggressiveness must be 0, 1, 2 or 3, got {self.aggressiveness}")
        for name, lo, hi in (
            ("margin_db", 0.0, 40.0),
            ("spread_factor", 0.0, 10.0),
            ("override_db", 0.0, 96.0),
            ("noise_target_dbfs", -90.0, 0.0),
            ("min_level_dbfs", -96.0, 0.0),
        ):
            value = getattr(self, name)
            if not lo <= value <= hi:
                raise ValueError(f"{name} must be within {lo:g}..{hi:g}, got {value}")
        if not _BLOCK_MS <= self.floor_window_ms <= 60_000:
            raise ValueError(
                f"floor_window_ms must be within {_BLOCK_MS}..60000, got {self.floor_window_ms}"
            )

    @property
    def frame_samples(self) -> int:
        return self.sample_rate * self.frame_ms // 1000


class SpeechDetector:
    """Stateful per-frame speech classifier for one audio stream of int16 mono frames."""

    def __init__(self, config: DetectorConfig | None = None) -> None:
        config = DetectorConfig() if config is None else config
        if not isinstance(config, DetectorConfig):
            raise ValueError(f"config must be a DetectorConfig, got {type(config).__name__}")
        self.config = config
        n = self._n = config.frame_samples
        self._nbytes = 2 * n
        self._vad = webrtcvad.Vad(config.aggressiveness)  # owns the C instance
        self._ptr = kernel.vad_pointer(self._vad)
        block = max(1, round(_BLOCK_MS / config.frame_ms))
        n_blocks = max(1, round(config.floor_window_ms / (block * config.frame_ms)))
        n_peaks = max(n_blocks, round(_BG_WINDOW_MS / (block * config.frame_ms)))
        mem = self._mem = np.zeros(kernel.memory_size(block, n_peaks))
        st = self._st = mem[: kernel.STATE_SIZE]
        st[kernel.S_BLOCK_LEN] = block
        st[kernel.S_N_PEAKS] = n_peaks
        for f in (F0, F1):
            st[f + FLOOR] = math.inf  # before the first frame: no floor, nothing passes
            st[f + SPREAD] = _SPREAD_PRIOR_DB
        # Energies are sums of squares plus one per sample (digital silence is not zero).
        st[kernel.S_MIN_ENERGY] = n * 10 ** ((config.min_level_dbfs + _FULL_SCALE_DB) / 10)
        st[kernel.S_TARGET] = n * 10 ** ((config.noise_target_dbfs + _FULL_SCALE_DB) / 10)
        st[kernel.S_RATE] = config.sample_rate
        st[kernel.S_MARGIN_DB] = config.margin_db
        st[kernel.S_SPREAD_FACTOR] = config.spread_factor
        st[kernel.S_OVERRIDE_DB] = config.override_db
        st[kernel.S_ALPHA] = 1.0 - math.exp(-block * config.frame_ms / _SPREAD_MS)
        st[kernel.S_SPREAD_CAP] = _SPREAD_CAP
        st[kernel.S_SPAN] = config.sample_rate // 100
        st[kernel.S_SUB] = config.sample_rate // 400
        st[kernel.S_CLICKS] = config.frame_ms >= 20  # in 10 ms, 5 ms is no click's mark
        for f in (F0, F1):
            set_thresholds(st, f)
        st[kernel.S_FLOOR_BLOCKS] = n_blocks
        st[kernel.S_BG_GATE] = math.inf  # the first block: only the cap applies
        st[kernel.S_BG_PEAK] = math.inf
        st[kernel.S_BG_ROUGH] = 10 ** (_BG_ROUGH_DB / 10)
        st[kernel.S_BG_CAP] = st[kernel.S_BG_CAP_MAX] = 10 ** (_BG_CAP_DB / 10)
        st[kernel.S_BG_CAP_DB] = _BG_CAP_BASE_DB
        st[kernel.S_BG_CAP_SPREADS] = _BG_CAP_SPREADS
        st[kernel.S_BG_SKIP] = 10 ** (_BG_SKIP_DB / 10)
        st[kernel.S_BG_MARGIN] = 10 ** (_BG_MARGIN_DB / 10)
        st[kernel.S_LEVEL_ALPHA] = 1.0 - math.exp(-config.frame_ms / _LEVEL_MS)
        st[kernel.S_SINCE] = 1e9  # no speech yet
        st[kernel.S_STRONG_DB] = _STRONG_DB
        st[kernel.S_PAUSE_FRAMES] = math.ceil(_PAUSE_MS / config.frame_ms)
        st[kernel.S_LEVEL_FRAC] = _LEVEL_FRAC
        st[kernel.S_LEVEL_MIN_DB] = _LEVEL_MIN_DB
        st[kernel.S_LEVEL_OVER_DB] = _LEVEL_OVER_DB
        # Views of `mem`, which the kernel reads as the same. `_blk`: energies of the
        # block being filled, per feature. `_ring`: rows 0, 1: minima of the blocks in the
        # floor's window, per feature (the first n_blocks columns); row 2: peaks of the
        # full-band energy over the long window.
        at = kernel.STATE_SIZE + 2 * block
        self._blk = mem[kernel.STATE_SIZE : at].reshape(2, block)
        self._ring = mem[at:].reshape(3, n_peaks)
        self._shifted = np.zeros(n, np.int16)  # kernel scratch: the frame, shifted

    @property
    def frame_samples(self) -> int:
        """Samples per frame that `is_speech` accepts."""
        return self._n

    @property
    def noise_floor_db(self) -> float:
        """Current full-band noise floor in dBFS (-inf before the first frame)."""
        floor = float(self._st[F0 + FLOOR])
        if floor == math.inf:
            return -math.inf
        return 10 * math.log10(floor / self._n) - _FULL_SCALE_DB

    @property
    def background_rough(self) -> bool:
        """Whether the background has peaks far above its floor (babble, music, rumble
        swells): `_BG_ROUGH_DB` or more. Bands standing out of such noise for a moment
        say little about speech, so turn edges are not moved over them."""
        return bool(self._st[kernel.S_BG_GATE] > 0.0)

    def frames_in_state(self) -> int:
        """How many frames the next classification may take while `background_rough` and
        `background_peak_db` stay what they will be after its last frame: the frames up
        to (not including) the one that closes the current block, or, when the next frame
        closes it, a whole block. A caller that reads those between frames (the turn
        machine, at turn edges) classifies pushes in such runs, so it reads what it would
        read frame by frame: the same events however the audio was chunked."""
        block = int(self._st[kernel.S_BLOCK_LEN])
        before = block - 1 - int(self._st[kernel.S_FILLED])
        return before or block

    @property
    def background_peak_db(self) -> float | None:
        """The background's typical peak (see `background_rough`), in the units of
        `frame_levels`; None where the background is not rough."""
        if self._st[kernel.S_BG_GATE] <= 0.0:
            return None
        return float(self._st[kernel.S_BG_DB])

    def frame_levels(self, frames: np.ndarray) -> np.ndarray:
        """Per frame of an (n, frame_samples) int16 array, its full-band level in dB as
        the per-frame gate measures it (energy less each 10 ms span's level and slope),
        in the units of `background_peak_db`. For turn edges: one call per turn."""
        out = np.empty(len(frames))
        rate = self.config.sample_rate
        kernel.levels(np.ascontiguousarray(frames, np.int16), rate // 100, rate // 400, out)
        return out

    def is_speech(self, frame: np.ndarray) -> bool:
        """Classify one frame: `frame_samples` int16 samples, oldest first."""
        if (
            not isinstance(frame, np.ndarray)
            or frame.shape != (self._n,)
            or frame.dtype != np.int16
        ):
            raise ValueError(
                f"frame must be a 1-D int16 array of {self._n} samples, got {_describe(frame)}"
            )
        return self.is_speech_pcm(frame.tobytes())

    def is_speech_pcm(self, pcm: bytes) -> bool:
        """Classify one frame given as bytes: `frame_samples` native-endian int16 samples.

        The fast path for one 20 ms network message; same decision as `is_speech`.
        """
        if len(pcm) != self._nbytes:
            raise ValueError(f"pcm must hold {self._n} int16 samples, got {len(pcm)} bytes")
        code = _one_frame(
            pcm if type(pcm) is bytes else bytes(pcm), self._mem, self._shifted, self._ptr
        )
        if code & VAD_ERROR:
            _vad_failed()
        return code & VOICED == VOICED

    def frame_kernel(self) -> tuple[Callable[..., int], tuple[object, ...]]:
        """For a caller classifying one frame per call on its hot path (`TurnDetector`):
        ``(fn, args)``, where ``fn(pcm, *args)`` classifies one frame like
        `is_speech_pcm` but returns the result bits (`vad.kernel.VOICED`, ``VAD_ERROR``),
        with no Python frame of its own. ``pcm`` must be ``bytes`` of exactly
        `frame_samples` samples: that is not checked."""
        return _one_frame, (self._mem, self._shifted, self._ptr)

    def classify(self, frames: np.ndarray) -> list[bool]:
        """Classify consecutive frames, given as an (n, frame_samples) int16 array.

        Gives the same decisions as calling `is_speech` on each row.
        """
        if (
            not isinstance(frames, np.ndarray)
            or frames.dtype != np.int16
            or frames.ndim != 2
            or frames.shape[1] != self._n
        ):
            raise ValueError(
                f"frames must be an (n, {self._n}) int16 array, got {_describe(frames)}"
            )
        return self.classify_pcm(frames.tobytes())

    def classify_pcm(self, pcm: bytes) -> list[bool]:
        """Classify consecutive frames given as bytes of native-endian int16 samples, a
        whole number of frames. Same decisions as `classify`."""
        return [bit == VOICED for bit in self.voiced_bits(pcm)]

    def voiced_bits(self, pcm: bytes) -> list[int]:
        """`classify_pcm` as 1 (speech) or 0 per frame: for the turn detector, which
        takes a few frames per call, no bools or numpy calls to make (those cost as much
        as the frames' own work at 100 ms a call)."""
        rows, rest = divmod(len(pcm), self._nbytes)
        if rest:
            raise ValueError(
                f"pcm must hold whole frames of {self._n} int16 samples, got {len(pcm)} bytes"
            )
        if type(pcm) is not bytes:
            pcm = bytes(pcm)
        out = np.empty(rows, np.uint8)
        _classify_frames(pcm, self._mem, self._shifted, self._ptr, out)
        bits = out.tolist()
        if rows and max(bits) > VOICED:
            _vad_failed()
        return bits

    def band_levels(self, frames: np.ndarray) -> np.ndarray:
        """(n, bands) Hann-windowed band levels in dB of an (n, frame_samples) array."""
        window, edges = _edge_tables(self._n, self.config.sample_rate)
        spec = np.fft.rfft(frames * window, axis=1)  # int16 x float64: float64, exact
        levels = np.empty((len(spec), edges.size - 1))
        kernel.band_levels(np.ascontiguousarray(spec), edges, levels)
        return levels

    @staticmethod
    def edge_threshold(noise_levels: np.ndarray) -> np.ndarray | None:
        """Per-band levels that mark speech at a turn edge, from `band_levels` of noise.

        Turn edges are refined once per turn, so an FFT is affordable there. Under noise
        the per-frame gate misses weak onsets and codas (/f/, /θ/, /s/, /h/), but they
        still stand out in some band: 2 dB and 3 sigma above that band's noise.
        Returns None if there are too few noise frames for usable statistics.
        """
        if len(noise_levels) < _EDGE_MIN_NOISE_FRAMES:
            return None
        threshold = np.empty(noise_levels.shape[1])
        noise = np.ascontiguousarray(noise_levels, np.float64)
        kernel.edge_threshold(noise, _EDGE_MARGIN_DB, _EDGE_SIGMAS, threshold)
        return threshold

    @staticmethod
    def above(levels: np.ndarray, threshold: np.ndarray) -> list[bool]:
        """Per frame of `band_levels`: whether some band is above `edge_threshold`."""
        hot = np.empty(len(levels), np.bool_)
        kernel.above(np.ascontiguousarray(levels), threshold, hot)
        return hot.tolist()


@functools.cache
def _edge_tables(n: int, rate: int) -> tuple[np.ndarray, np.ndarray]:
    """Hann window of `n` samples, and the first rfft bin of each `_EDGE_BANDS_HZ` band
    (plus the end of the last). Shared by every detector, read-only: each session
    building its own cost as much as the FFT it serves."""
    freqs = np.fft.rfftfreq(n, 1.0 / rate)
    bands = [f for f in _EDGE_BANDS_HZ if f < rate / 2] + [rate / 2 + 1]
    window, edges = np.hanning(n), np.searchsorted(freqs, bands).astype(np.int64)
    window.flags.writeable = edges.flags.writeable = False
    return window, edges


def _vad_failed() -> None:
    raise RuntimeError("webrtcvad rejected a frame")  # the config is validated: a bug


def _describe(x: object) -> str:
    if isinstance(x, np.ndarray):
        return f"{x.dtype} array of shape {x.shape}"
    return type(x).__name__
