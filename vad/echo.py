"""Echo-aware suppression: keep the reply's own echo from reading as the user's speech.

A client without echo cancellation (a phone on speaker, a kiosk, a telephone line) plays
the reply through a speaker next to its microphone. The echo reaches the VAD, which hears
speech and interrupts the reply (or answers it). The server knows what it played, so it
can predict the echo and take it out before the turn detector sees the audio.

The method is a reference-based residual echo suppressor in the band-energy domain (no
sample-exact adaptive filter: the server only knows roughly when the client played each
piece, and a speaker, a codec or the client's resampler are not linear):

* Bands: each 20 ms frame of microphone and reference is cut into ~Bark-spaced bands
  (one FFT each).
* Delay: the normalised cross-correlation of the two log band-energy envelopes over the
  last `window_ms`, for every lag in 0..`max_delay_ms`, re-estimated every 100 ms. A lag
  is trusted once its correlation passes `min_correlation` over at least a second of
  active reference.
* Echo estimate per band: the reference energy at that lag (the largest of lag-1..lag+1,
  to absorb jitter) plus an exponential tail for the room's reverberation (`tail_ms`,
  RT60), times a per-band echo gain. The gain is a high percentile (95th) of the
  microphone-to-reference ratios seen in frames without near-end speech (their median
  is the *typical* echo, for double talk); a band with too few of them (its echo under
  the room's noise) counts the frames of room alone as bounds. Before the
  delay is trusted, the estimate is the loudest reference band energy over the whole lag
  range at `prior_gain_db`: cautious, so the reply's first second cannot interrupt it.
* Decision: a band is the user's if the microphone exceeds the echo estimate by
  `margin_db`; a frame is the user's if `_MIN_BANDS` bands are (above the room's noise
  too) in it and in the frame before: an echo frame the estimate misses is mostly
  alone. The user's bands pass unchanged; every other band becomes comfort noise at the
  room's noise level, measured between replies and in the reply's pauses (scaled echo
  would keep the reply's harmonics; holes, or noise under the room's level, would make
  the room read as speech to the detector when the echo ends). The frames go on to the
  turn detector, which decides on speech and barge-in as it always does.
* Double talk: once the user has held `_HOLD_AFTER` frames in a row (100 ms), the next
  frames stay the user's while the microphone stands `_HOLD_DB` over the *typical* echo
  (the median gain; averaged in dB over the bands with echo). With the echo as loud as
  the user, their quieter syllables do not beat the cautious estimate, and a barge-in
  needs 300 ms of their speech counted; the echo's own excursions over the estimate come
  in short runs that do not reach the hold. The user's frames, and the 200 ms after
  them, teach no gain: a 95th percentile of 100 ratios moves with five of double talk.
* Onset credit: the user's first frame over loud echo comes a median 80 ms after their
  onset (the attack is under the estimate), which leaves the first word short of the
  barge-in's 300 ms. When a run of the user's frames starts, the frames just before it
  that stood over the typical echo (up to 120 ms) are counted back as
  `onset_credit_ms`; the caller adds it to the detector's speech for the barge-in
  decision. None while the delay is in doubt (below).
* Moves: the echo can move against the reference (the caller re-anchors it on a
  playback report that may be wrong, or the client's playout stalls unreported). The
  estimate at the old lag then misses the echo, which passes as the user's. After
  `reference_moved` (the caller's hint) the echo is predicted at both the old delay and
  the one the move implies, with the same gains (the room did not change), until the
  delay search run on the frames after the move alone settles; the newest half second
  of the search is also checked alone every 100 ms, and a lag that fits it clearly
  better is predicted too until the whole window follows.

Cost: two 320-point FFTs, one inverse FFT and a few dozen small numpy operations per
20 ms frame while a reply (or its echo tail) is playing, and the delay search every
100 ms (one einsum over all lags): about 10 ms CPU per audio-second. Nothing otherwise
(the frames pass through untouched). Memory: ~4 s of band energies (~100 KB).
See docs/turn-taking.md for figures and limits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_BAND_EDGES_HZ = (
    0, 200, 300, 400, 510, 630, 770, 920, 1080, 1270, 1480, 1720, 2000,
    2320, 2700, 3150, 3700, 4400, 5300, 6400, 7700,
)  # fmt: skip
_DELAY_EVERY = 5  # frames between delay estimates (100 ms)
_GAIN_SAMPLES = 100  # per band: microphone/reference ratios kept for the echo gain
_GAIN_MIN_SAMPLES = 50  # fewer: the prior gain still holds
_GAIN_PERCENTILE = 95.0
_FLOOR_RISE_DB_S = 3.0  # the noise floor follows a louder room at this rate
_NOISE_MS = 1000  # time constant of the room's noise level
_NOISE_GATE = 10.0  # frames 10 dB over the floor are not noise
_MIN_BANDS = 3  # bands a frame of the user's speech must stand out in
_TINY = 1e-3  # energies are sums of int16 squares; this keeps logs finite
_HOLD_AFTER = 5  # the user's frames in a row before they hold (100 ms)
_HOLD_DB = 1.0  # ...while a frame stands this far over the typical echo (dB, band mean)
_FREEZE_FRAMES = 10  # frames this soon after the user's teach no echo gain (200 ms)
_EXCESS_MIN_BANDS = 4  # bands with echo the excess is measured over, at least
_CREDIT_MAX = 6  # frames over the typical echo counted back before the user's (120 ms)
_EPISODE_GAP = 25  # frames without the user's that end their credit (500 ms)
_SHORT_MS = 500  # the quick delay check looks at the newest half second alone...
_QUICK_MARGIN = 0.35  # ...and raises a second lag that fits it this much better...
_QUICK_EPISODE = 50  # ...in the first second of the user's frames after a quiet spell


@dataclass(frozen=True)
class EchoConfig:
    """Settings for `EchoSuppressor`; invalid values raise ValueError.

    max_delay_ms: how late after its reference frame the echo may arrive (playout
        buffering, network, the acoustic path).
    margin_db: a band counts as the user's if the microphone exceeds the echo estimate
        by this much.
    tail_ms: assumed reverberation time (RT60) of the room; longer tails need more.
    prior_gain_db: echo gain assumed until the delay is found and enough is measured.
    min_correlation: least envelope correlation at which a delay is trusted.
    window_ms: how much history the delay estimate looks at.
    """

    sample_rate: int = 16000
    frame_ms: int = 20
    max_delay_ms: int = 1000
    margin_db: float = 4.0
    tail_ms: int = 500
    prior_gain_db: float = 6.0
    min_correlation: float = 0.4
    window_ms: int = 3000

    def __post_init__(self) -> None:
        if self.sample_rate not in (8000, 16000, 32000, 48000):
            raise ValueError(f"sample_rate must be 8000/16000/32000/48000, got {self.sample_rate}")
        if self.frame_ms not in (10, 20, 30):
            raise ValueError(f"frame_ms must be 10, 20 or 30, got {self.frame_ms}")
        for name, lo, hi in (
            ("max_delay_ms", 0, 5000),
            ("margin_db", 0.0, 40.0),
            ("tail_ms", 0, 5000),
            ("prior_gain_db", -40.0, 40.0),
            ("min_correlation", 0.0, 1.0),
            ("window_ms", 500, 30000),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not lo <= value <= hi:
                raise ValueError(f"{name} must be within {lo}..{hi}, got {value!r}")

    @property
    def frame_samples(self) -> int:
        return self.sample_rate * self.frame_ms // 1000


class EchoSuppressor:
    """One per microphone stream. Feed microphone frames with the reference frames the
    client was (by the caller's reckoning) playing at the same time; get the microphone
    frames back with the reply's echo taken out."""

    def __init__(self, config: EchoConfig | None = None) -> None:
        config = EchoConfig() if config is None else config
        if not isinstance(config, EchoConfig):
            raise ValueError(f"config must be an EchoConfig, got {type(config).__name__}")
        self.config = config
        n = self._n = config.frame_samples
        self._nbytes = 2 * n
        freqs = np.fft.rfftfreq(n, 1.0 / config.sample_rate)
        edges = [e for e in _BAND_EDGES_HZ if e < config.sample_rate / 2]
        idx = np.searchsorted(freqs, [*edges, config.sample_rate / 2 + 1])
        self._starts = idx[:-1]
        self._band_of_bin = np.searchsorted(idx, np.arange(len(freqs)), "right") - 1
        self._bins = np.diff(idx).astype(np.float64)
        self._rng = np.random.default_rng(0)  # comfort noise; seeded, so runs repeat
        nb = self._nb = len(edges)
        fms = config.frame_ms
        self._lags = config.max_delay_ms // fms + 1  # candidate lags 0..lags-1 frames
        self._window = config.window_ms // fms
        hist = self._hist = self._window + self._lags + 1
        self._ref = np.zeros((hist, nb))  # reference band energies, newest last
        self._ref_log = np.zeros((hist, nb))
        self._mic_log = np.zeros((hist, nb))
        self._ref_active = np.zeros(hist, bool)
        self._rho = 10 ** (-60.0 * fms / max(config.tail_ms, fms) / 10) if config.tail_ms else 0.0
        self._tail = np.zeros(nb)  # echo estimate before the gain, with its tail
        self._margin = 10 ** (config.margin_db / 10)
        self._rise = 10 ** (_FLOOR_RISE_DB_S * fms / 1000 / 10)
        self._floor = np.full(nb, np.inf)
        self._everywhere = np.ones(nb, bool)
        self._noise = np.full(nb, np.inf)
        self._noise_alpha = 1 - math.exp(-fms / _NOISE_MS)
        self._gains_db = np.full((_GAIN_SAMPLES, nb), np.nan)
        self._gain_count = np.zeros(nb, np.int64)
        self._bounds_db = np.full((_GAIN_SAMPLES, nb), np.nan)  # see `_learn_gain`
        self._bound_count = np.zeros(nb, np.int64)
        self._gain_db = np.full(nb, config.prior_gain_db)
        self._typical_db = np.full(nb, config.prior_gain_db)  # the median ratio
        self._prior = 10 ** (config.prior_gain_db / 10)
        self._active_level = n * 10 ** ((-60.0 + 20 * math.log10(32768)) / 10) / nb
        self._idle_after = self._lags + 2 * max(config.tail_ms, fms) // fms
        self._idle = self._idle_after  # frames since the reference was last active
        self._since_delay = 0
        self._short = max(_SHORT_MS // fms, 2)  # frames of the quick delay check
        self._candidate: int | None = None  # a second lag the echo may sit at (frames)
        self._candidate_left = 0  # frames it is still predicted at
        self._since_move = self._hist  # frames since the reference was moved
        self._loud = self._user = False
        self._since_user = max(_FREEZE_FRAMES, _EPISODE_GAP)  # frames since a user frame
        self._run = 0  # user frames in a row
        self._weak_run = 0  # frames in a row over the echo estimate, short of the user's
        self._credit = 0  # see `onset_credit_ms`
        self._episode = _QUICK_EPISODE + 1  # frames since the user's frames began anew
        self.excess_db = 0.0  # the last frame's microphone over its typical echo (dB)
        self.delay_ms: float | None = None  # the trusted echo delay, if any
        self.correlation = 0.0  # its envelope correlation
        self.frames = 0  # frames processed (not passed through idle)
        self.near_frames = 0  # of which held near-end (user) speech

    @property
    def frame_samples(self) -> int:
        return self._n

    @property
    def active(self) -> bool:
        """Whether reference audio (or its echo tail) is still in play."""
        return self._idle < self._idle_after

    @property
    def gain_db(self) -> np.ndarray:
        """Per-band echo gain in dB (reference to microphone) currently assumed."""
        return self._gain_db.copy()

    @property
    def onset_credit_ms(self) -> float:
        """The user's speech the echo hid at their onset (0-120 ms): while the user talks
        over the echo, the frames just before each run of theirs that stood over the
        typical echo (but not out of the cautious estimate), counted back. A barge-in
        decision adds it to the turn detector's speech (VAD mode does); 0 once the user
        has been quiet for 500 ms."""
        return float(self._credit * self.config.frame_ms)

    @property
    def candidate_ms(self) -> float | None:
        """A second delay the echo is also predicted at, until the delay estimate settles
        between it and `delay_ms` (after the reference moved, or the echo did)."""
        if self._candidate is None:
            return None
        return float(self._candidate * self.config.frame_ms)

    def reference_moved(self, ms: float) -> None:
        """The caller laid the reference `ms` later on the microphone clock than before
        (negative: earlier), e.g. on a playback report. If the sound moved with it, the
        echo delay is unchanged; if the report was wrong, the echo now comes `ms` earlier
        after its reference. Both are predicted until the delay estimate tells them apart
        (at most `window_ms`), so neither can pass the echo off as the user."""
        if self.delay_ms is None:  # the cautious prior covers every lag
            return
        self._raise_candidate(round((self.delay_ms - ms) / self.config.frame_ms))
        self._since_move = 0  # the delay is estimated anew on the frames from now on

    def process(self, mic: bytes, ref: bytes | None) -> bytes:
        """Microphone frames (whole frames of native-endian int16) and the reference played
        meanwhile (same length; None or b"" for silence). Returns the microphone frames
        with the echo suppressed: the same bytes object when no reference is in play."""
        size = len(mic)
        if size % self._nbytes:
            raise ValueError(
                f"mic must hold whole frames of {self._n} int16 samples, got {size} bytes"
            )
        if ref and len(ref) != size:
            raise ValueError(f"ref must be as long as mic ({size} bytes), got {len(ref)}")
        m = np.frombuffer(mic, np.int16).reshape(-1, self._n)
        r = np.frombuffer(ref, np.int16).reshape(-1, self._n) if ref else None
        if not self.active and (r is None or not r.any()):  # zeros are no reference
            self._observe(m)  # the room's noise, for when the next reply plays
            return mic
        if r is None:
            r = np.zeros_like(m)
        out = np.empty_like(m)
        for i in range(len(m)):
            out[i] = self._frame(m[i], r[i])
        return out.tobytes()

    # -- internals ---------------------------------------------------------------------

    def _bands(self, spec: np.ndarray) -> np.ndarray:
        power = spec.real**2 + spec.imag**2
        return np.add.reduceat(power, self._starts)[: self._nb] + _TINY

    def _frame(self, mic: np.ndarray, ref: np.ndarray) -> np.ndarray:
        ref_spec = np.fft.rfft(ref)
        ref_bands = self._bands(ref_spec)
        ref_on = bool(ref_bands.sum() > self._active_level * self._nb)
        spec = np.fft.rfft(mic)
        bands = self._bands(spec)
        if not self.active:
            if not ref_on:  # a silent reference is no reference: the room, as in `_observe`
                self._track_noise(bands, self._everywhere)
                return mic
            self._wake(bands)  # waking up: the past holds no reference
        self._idle = 0 if ref_on else self._idle + 1
        self._since_move += 1
        self.frames += 1
        # Histories, newest last.
        for arr, row in (
            (self._ref, ref_bands),
            (self._ref_log, np.log10(ref_bands)),
            (self._mic_log, np.log10(bands)),
        ):
            arr[:-1] = arr[1:]
            arr[-1] = row
        self._ref_active[:-1] = self._ref_active[1:]
        self._ref_active[-1] = ref_on
        # The room is measured only where no echo is expected: the echo is not the room.
        self._track_noise(bands, self._tail * 10 ** (self._gain_db / 10) < self._noise)
        self._since_delay += 1
        if self._since_delay >= _DELAY_EVERY:
            self._since_delay = 0
            self._estimate_delay()
        # Echo estimate.
        if self.delay_ms is None:
            direct = self._ref[-self._lags :].max(axis=0) * self._prior
            self._tail = direct + self._rho * self._tail
            echo = self._tail
        else:
            direct = self._at(round(self.delay_ms / self.config.frame_ms))
            if self._candidate is not None:
                # The echo may have moved: predicted at both lags until the estimate
                # settles (the path did not change, so the gains hold at either).
                direct = np.maximum(direct, self._at(self._candidate))
                self._candidate_left -= 1
                if self._candidate_left <= 0:
                    self._candidate = None
            self._tail = direct + self._rho * self._tail
            echo = self._tail * 10 ** (self._gain_db / 10)
        near = bands > self._margin * echo
        above_floor = bands > self._margin * self._noise
        # The user's speech lasts: a frame counts once it and the one before stand out
        # in `_MIN_BANDS` bands (an echo frame the estimate misses is mostly alone).
        loud = int(np.count_nonzero(near & above_floor)) >= _MIN_BANDS
        user = loud and (self._loud or self._user)
        # Double talk: the microphone over the typical echo, averaged in dB over the bands
        # where echo is expected. The user as loud as the echo adds 3 dB; echo alone
        # scatters around 0 (the 95th-percentile gains sit several dB above it).
        excess = self._excess(bands) if self.delay_ms is not None else 0.0
        self.excess_db = excess
        hold = not user and self._run >= _HOLD_AFTER and excess > _HOLD_DB
        if hold:
            # After 100 ms of the user's frames, a frame stays the user's while it holds
            # more than the echo: at 0 dB the user's quieter syllables do not beat the
            # cautious estimate, and barge-in needs them counted. Its bands over the
            # typical echo pass.
            user = True
            near = bands > echo * 10 ** ((self._typical_db - self._gain_db) / 10)
        self._loud, self._user = loud, user
        # Onset credit: the frames just before a run of the user's that stood over the
        # typical echo, but not out of the cautious estimate, were most likely the
        # word's attack (the first user frame comes a median 80 ms after the onset).
        fresh = self._since_user >= _EPISODE_GAP  # the user's first frame in a while
        self._episode = 0 if user and fresh else self._episode + 1
        doubt = self._candidate is not None or self._since_move < self._lags
        if doubt:
            # Not while the delay is in doubt: for up to a second after a move the echo
            # comes from reference laid before it, and its misses would earn credit.
            self._credit = 0
        elif user and self._run == 0:
            back = min(self._weak_run, _CREDIT_MAX)
            self._credit = back if fresh else max(self._credit, back)
        elif not user and self._since_user >= _EPISODE_GAP:
            self._credit = 0
        self._weak_run = self._weak_run + 1 if excess > 0 and not (user or doubt) else 0
        self._since_user = 0 if user else self._since_user + 1
        self._run = self._run + 1 if user else 0
        if user:
            self.near_frames += 1
            if near.all():
                return mic
        else:
            near[:] = False
            # Gains learn from echo alone: not in double talk, where the user would lift
            # them and hide the rest of the barge-in.
            if (
                self.delay_ms is not None
                and self._candidate is None  # two lags' prediction is no echo's ratio
                and not loud
                and self._since_user >= _FREEZE_FRAMES
            ):
                self._learn_gain(bands, above_floor)
        # Echo bands become comfort noise at the floor: scaled echo would keep the reply's
        # harmonics, and a quiet voice is still a voice to the detector after us.
        keep = near[self._band_of_bin]
        level = np.sqrt(np.minimum(self._noise, bands) / self._bins)[self._band_of_bin]
        noise = self._rng.standard_normal((2, len(spec)))
        comfort = (noise[0] + 1j * noise[1]) * (level * math.sqrt(0.5))
        out = np.fft.irfft(np.where(keep, spec, comfort), self._n)
        return np.clip(np.round(out), -32768, 32767).astype(np.int16)

    def _at(self, lag: int) -> np.ndarray:
        """Reference band energies `lag` frames back: the largest of lag-1..lag+1."""
        lo, hi = max(0, lag - 1), min(self._lags - 1, lag + 1)
        return self._ref[self._hist - 1 - hi : self._hist - lo].max(axis=0)

    def _raise_candidate(self, lag: int) -> bool:
        if self.delay_ms is None or not 0 <= lag < self._lags:
            return False
        if abs(lag - round(self.delay_ms / self.config.frame_ms)) <= 1:
            return False
        self._candidate = lag
        self._candidate_left = self._window
        return True

    def _excess(self, bands: np.ndarray) -> float:
        typical = self._tail * 10 ** (self._typical_db / 10)
        where = typical > self._margin * self._noise
        if np.count_nonzero(where) < _EXCESS_MIN_BANDS:
            return 0.0
        return float(10 * np.mean(np.log10(bands[where] / typical[where])))

    def _wake(self, bands: np.ndarray) -> None:
        # The echo cannot be here yet: a band 10 dB over the noise level learned so far
        # (a microphone that sent digital silence until now) is taken as the room.
        noise = self._noise
        louder = ~np.isfinite(noise) | (bands > 10 * noise)
        self._noise = np.where(louder, bands, noise)
        self._floor = np.where(louder, bands / 4, np.minimum(self._floor, self._noise))
        self._ref[:] = 0.0
        self._ref_log[:] = math.log10(_TINY)
        self._ref_active[:] = False
        self._tail[:] = 0.0
        self._candidate = None
        self._since_move = self._hist
        self._weak_run = self._credit = 0
        self._run = 0  # a hold is earned anew in each reply

    def _observe(self, frames: np.ndarray) -> None:
        """Noise tracking alone, for frames with no reply in play (one FFT call)."""
        spec = np.fft.rfft(frames, axis=1)
        power = spec.real**2 + spec.imag**2
        bands = np.add.reduceat(power, self._starts, axis=1)[:, : self._nb] + _TINY
        for row in bands:
            self._track_noise(row, self._everywhere)

    def _track_noise(self, bands: np.ndarray, quiet: np.ndarray) -> None:
        """Per band: the floor (minimum statistics: fast down, slow up) and the noise level
        (a 1 s average of frames near the floor). Comfort noise is made at the level, not
        the floor: the minimum of a band's energy lies several dB under its mean, and
        noise that steps up when the echo ends reads as speech to the detector."""
        self._floor = np.minimum(bands, np.where(quiet, self._floor * self._rise, self._floor))
        noise = self._noise
        if not np.isfinite(noise).all():
            noise = np.where(np.isfinite(noise), noise, bands)
        near_floor = quiet & (bands < _NOISE_GATE * self._floor)  # speech stays out
        noise = np.where(near_floor, noise + self._noise_alpha * (bands - noise), noise)
        # Between the floor and 10 dB over it: a level learned from speech, or from a room
        # that has gone quiet, falls with the floor.
        self._noise = np.clip(noise, self._floor, 10 * self._floor)

    def _learn_gain(self, bands: np.ndarray, above_floor: np.ndarray) -> None:
        tail = self._tail
        playing = tail > self._active_level
        usable = above_floor & playing
        ratio_db = 10 * np.log10(bands / tail)
        if usable.any():
            for b in np.flatnonzero(usable):
                self._gains_db[self._gain_count[b] % _GAIN_SAMPLES, b] = ratio_db[b]
                self._gain_count[b] += 1
            idx = np.flatnonzero(usable & (self._gain_count >= _GAIN_MIN_SAMPLES))
            if idx.size:
                count = np.minimum(self._gain_count[idx], _GAIN_SAMPLES)
                high, mid = _percentiles(self._gains_db[:, idx], count)
                self._gain_db[idx], self._typical_db[idx] = high, mid
        # A band whose echo stays under the room's noise gets no measured gain for a long
        # time (or never), and the prior (+6 dB over the reply) would hide the user there.
        # The microphone bounds the echo, so the frames where the band heard only the room
        # count too, as ratios no lower than the echo's, until enough are measured.
        bound = ~above_floor & playing & (self._gain_count < _GAIN_MIN_SAMPLES)
        if bound.any():
            for b in np.flatnonzero(bound):
                self._bounds_db[self._bound_count[b] % _GAIN_SAMPLES, b] = ratio_db[b]
                self._bound_count[b] += 1
        idx = np.flatnonzero(
            (bound | usable)
            & (self._gain_count < _GAIN_MIN_SAMPLES)
            & (self._gain_count + self._bound_count >= _GAIN_MIN_SAMPLES)
        )
        if idx.size:
            both = np.concatenate([self._gains_db[:, idx], self._bounds_db[:, idx]])
            count = np.minimum(self._gain_count[idx], _GAIN_SAMPLES) + np.minimum(
                self._bound_count[idx], _GAIN_SAMPLES
            )
            high, mid = _percentiles(both, count)
            self._gain_db[idx] = np.minimum(high, self.config.prior_gain_db)
            self._typical_db[idx] = np.minimum(mid, self._gain_db[idx])

    def _estimate_delay(self) -> None:
        w, lags, ws = self._window, self._lags, self._short
        active = self._ref_active
        min_frames = 1000 // self.config.frame_ms
        if np.count_nonzero(active) < min_frames:
            return
        # Per lag, only the frames where the reference (at that lag) was active count: a
        # silent reference fits nothing, and its on/off steps (a reply starting, a pause)
        # would otherwise line up with any step in the microphone, wrong lags included.
        mic = self._mic_log[-w:]  # (w, bands)
        on = active.astype(np.float64)
        moved = self._since_move < w
        if moved:  # after a move, the frames before it fit the old lag: left out
            on[: self._hist - self._since_move] = 0.0
        ref = self._ref_log * on[:, None]  # silent frames count as nothing
        # Window sums from running sums, newest window (lag 0) first: frames, sum, sum
        # of squares of the active reference.
        run = np.zeros((len(ref) + 1, ref.shape[1], 3))
        np.cumsum(np.stack([np.broadcast_to(on[:, None], ref.shape), ref, ref * ref], 2),
                  axis=0, out=run[1:])  # fmt: skip
        mask = np.lib.stride_tricks.sliding_window_view(on, w)[::-1][:lags]  # (lags, w)
        windows = np.lib.stride_tricks.sliding_window_view(ref, w, axis=0)[::-1][:lags]
        # A moved echo shows as frames passing as the user's after a quiet spell: in the
        # first second of such a spell the quick check below runs too, on the window's
        # newest `ws` frames apart (the same work, split).
        quick = not moved and self._episode <= _QUICK_EPISODE
        parts = []
        for part in (slice(0, w - ws), slice(w - ws, w)) if quick else (slice(0, w),):
            m = mic[part]
            parts.append(
                (
                    mask[:, part] @ m,  # (lags, bands)
                    mask[:, part] @ (m * m),
                    np.einsum("wb,lbw->lb", m, windows[:, :, part]),
                )
            )
        recent = parts[-1]
        whole = tuple(sum(sums) for sums in zip(*parts, strict=True)) if quick else parts[0]
        corr = _correlation(run, w, lags, min_frames, whole)
        best_lag = int(np.argmax(corr))
        best = float(corr[best_lag])
        self.correlation = best
        if best >= self.config.min_correlation:
            new_ms = best_lag * self.config.frame_ms
            if self.delay_ms is not None and abs(new_ms - self.delay_ms) > self.config.frame_ms:
                if self._candidate is not None and abs(best_lag - self._candidate) <= 1:
                    self._candidate = None  # the move foreseen: the path, and gains, hold
                else:
                    self._reset_gains()  # ratios measured at the old lag no longer hold
            elif moved:
                self._candidate = None  # the old delay confirmed on the frames since
            if moved:
                self._since_move = self._hist  # settled
            self.delay_ms = float(new_ms)
        if self.delay_ms is None or not quick:
            return
        # Quick check: the echo can move (a client's playout stalled, or its reference was
        # laid elsewhere), and the whole window takes 1.5-2 s to follow while the echo
        # passes as the user at the old lag. If the newest half second alone fits another
        # lag clearly better, the echo is predicted there too until the window decides.
        quick = _correlation(run, ws, lags, ws // 2, recent)
        lag = round(self.delay_ms / self.config.frame_ms)
        other = int(np.argmax(quick))
        if (
            abs(other - lag) > 1
            and quick[other] >= self.config.min_correlation
            and quick[other] - quick[lag] >= _QUICK_MARGIN
        ):
            self._raise_candidate(other)

    def _reset_gains(self) -> None:
        self._gain_count[:] = 0
        self._gains_db[:] = np.nan
        self._bound_count[:] = 0
        self._bounds_db[:] = np.nan
        self._gain_db[:] = self.config.prior_gain_db
        self._typical_db[:] = self.config.prior_gain_db


def _correlation(
    run: np.ndarray,
    w: int,
    lags: int,
    min_frames: int,
    sums: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> np.ndarray:
    """Per lag: the envelope correlation over the newest `w` frames (-1 where fewer than
    `min_frames` of them had the reference active, or nothing varies). `run` holds the
    reference's running sums, `sums` the microphone's (sum, sum of squares, product)."""
    end = len(run) - 1  # sums over frames [end - w - lag, end - lag), lag 0 first
    span = (run[end - lags + 1 :] - run[end - w - lags + 1 : end - w + 1])[::-1]
    n = span[:, 0, 0]
    usable = n >= min_frames
    n = np.maximum(n, 1.0)[:, None]
    s_r, s_rr = span[:, :, 1], span[:, :, 2]
    s_m, s_mm, s_mr = sums
    cov = (s_mr - s_m * s_r / n).sum(axis=1)
    var_m = (s_mm - s_m * s_m / n).sum(axis=1)
    var_r = (s_rr - s_r * s_r / n).sum(axis=1)
    flat = ~usable | (var_m < 1e-6) | (var_r < 1e-6)  # nothing to fit
    return np.where(flat, -1.0, cov / np.sqrt(np.where(flat, 1.0, var_m * var_r)))


def _percentiles(history: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column: np.percentile (linear) at `_GAIN_PERCENTILE` and at 50 of its first
    `count` rows, in one sort (unused slots are NaN, which sorts last)."""
    ordered = np.sort(history, axis=0)
    cols = np.arange(history.shape[1])
    out = []
    for pct in (_GAIN_PERCENTILE, 50.0):
        rank = (count - 1) * (pct / 100)
        lo = rank.astype(np.int64)
        hi = np.minimum(lo + 1, count - 1)
        below, above = ordered[lo, cols], ordered[hi, cols]
        out.append(below + (rank - lo) * (above - below))
    return out[0], out[1]
