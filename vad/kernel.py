"""The per-frame work of `SpeechDetector`, compiled: energies, floor, webrtcvad, gate;
and the statistics of a turn's edges, after the FFT.

Why compiled: a 20 ms frame is 320 samples. In Python with numpy every step of it is a
call with a fixed cost of 0.1-0.8 µs (the cast, the dot product, the shift, the webrtcvad
wrapper, the bookkeeping), and together they cost more than webrtcvad itself. Compiled
with numba, the whole frame, webrtcvad's C entry point included, is one call whose cost
is about webrtcvad's own; so is the once-per-block work (the sliding minimum, the
fluctuation estimate, new thresholds), which cost ~8 µs a block in Python.
`SpeechDetector` explains what the numbers mean; this module only computes them.

webrtcvad is called through its C API (`WebRtcVad_Process`), which the `_webrtcvad`
extension exports; the instance is the one a `webrtcvad.Vad` owns. The functions are
compiled for fixed signatures when this module is imported and cached on disk, so no
session ever waits for a compile.

State lives in one float64 array per detector (the slots below), written only here;
`SpeechDetector` sets it up and reads the floor from it.
"""

from __future__ import annotations

import ctypes
import math

import _webrtcvad  # type: ignore[import-not-found]
import llvmlite.binding
import numpy as np
import webrtcvad
from numba import njit, types

# Slots of the state array. Per energy feature (full band at F0, first difference at
# F1), at these offsets: the noise floor, the energies a frame must beat (gate if
# webrtcvad says speech, loud if not), those two as factors of the floor, and the
# fluctuation estimate in dB.
FLOOR, GATE, LOUD, GATE_F, LOUD_F, SPREAD = range(6)
F0, F1 = 0, 6
# Shared slots.
S_SHIFT = 12  # right shift applied to frames for webrtcvad
S_FILLED = 13  # frames in the block being filled
S_BLOCKS = 14  # block minima held (up to the window)
S_RING = 15  # where the next block minimum goes
# Settings, set once.
S_TARGET = 16  # floor energy that needs no shift
S_MIN_ENERGY = 17  # quieter frames are never speech
S_RATE = 18  # sample rate
S_MARGIN_DB, S_SPREAD_FACTOR, S_OVERRIDE_DB = 19, 20, 21  # DetectorConfig's
S_ALPHA = 22  # smoothing of the fluctuation estimate, per block
S_SPREAD_CAP = 23  # frames above floor x this are not noise
S_SPAN = 24  # samples in 10 ms: the energy leaves out each such span's trend
S_SUB = 25  # samples in 2.5 ms
S_CLICKS = 28  # 1: frames with 80% of their energy in 5 ms are clicks (frames >= 20 ms)
S_LAST = 26  # the previous frame's last sample
S_EMPHASIS = 27  # 1: webrtcvad hears the frame's first difference, 0: the frame
# The background's peaks: what noise that is not steady (babble, music) reaches.
S_BG_GATE = 29  # full-band energy a frame must beat: S_BG_PEAK where it is rough, else 0
S_BG_PEAK = 40  # the background's typical peak (x the margin)
S_BG_ROUGH = 41  # the background is rough when its peak is over the floor x this
S_BG_CAP = 30  # ... but never more than the floor x this: 10^((3 + 2 x spread) / 10), at
# most S_BG_CAP_MAX. Steady noise has a small spread: a window of the user's own speech
# (a long turn) cannot lift the gate there, while babble's spread leaves it room.
S_BG_CAP_MAX = 35
S_BG_MARGIN = 31  # factor over the background's peak
S_FLOOR_BLOCKS = 32  # blocks in the floor's window (ring row 0 and 1 use that many)
S_PEAKS_HELD = 33  # block peaks held (ring row 2, up to its length)
S_PEAKS_AT = 34  # where the next block peak goes
S_BG_CAP_DB, S_BG_CAP_SPREADS = 36, 37  # the cap: these dB + these x the spread
S_BG_SKIP = 38  # a block peak over the background gate x this is left out ...
S_BG_SKIPPED = 39  # ... unless this many in a row were (see `_close_block`)
S_BLOCK_LEN = 42  # frames per block (the columns of `blk`)
S_N_PEAKS = 43  # block peaks held at most (the columns of `ring`)
# The user's own level: what a frame that begins or resumes speech in a rough background
# must reach (see `_near_level`). Levels in dB of the full-band energy.
S_LEVEL = 44  # running mean of the levels of frames that passed; 0: none yet
S_LEVEL_ALPHA = 45  # its weight per frame
S_SINCE = 46  # frames since the last frame within S_STRONG_DB of S_LEVEL
S_STRONG_DB = 47
S_PAUSE_FRAMES = 48  # a frame this many frames after one begins or resumes speech
S_LEVEL_FRAC = 49  # it must reach this fraction of the way from S_BG_DB to S_LEVEL ...
S_LEVEL_MIN_DB = 50  # ... but never more than S_LEVEL minus this
S_BG_DB = 51  # S_BG_PEAK in dB (set once per block)
S_LEVEL_OVER_DB = 52  # ... and only where S_LEVEL stands this far over S_BG_DB
STATE_SIZE = 53
# A detector's memory is one float64 array (fewer arguments: each costs the call ~50 ns):
# the state slots, then `blk` (2 x S_BLOCK_LEN), then `ring` (3 x S_N_PEAKS), row-major.
# Noise whose first-difference floor is this far below its full-band floor (dB) falls
# with frequency: webrtcvad hears it pre-emphasised. White noise is at +3 dB.
EMPHASIS_ON_DB, EMPHASIS_OFF_DB = -3.0, -2.0

# A frame's result: bit 0 voiced, bit 1 webrtcvad failed.
VOICED, VAD_ERROR = 1, 2

llvmlite.binding.load_library_permanently(_webrtcvad.__file__)
_process = types.ExternalFunction(
    "WebRtcVad_Process",  # (VadInst*, int fs, const int16_t* frame, size_t length) -> int
    types.intc(types.uintp, types.intc, types.uintp, types.uintp),
)

_PCM = types.Bytes(types.uint8, 1, "C", readonly=True)
_STATE = types.float64[::1]
_ENERGIES = types.float64[:, ::1]
_SCRATCH = types.int16[::1]
_CACHE_ERRORS = (RuntimeError, OSError)  # no writable cache directory: compile each run


def _compile(signature: str | tuple, **options: object):  # type: ignore[no-untyped-def]
    def decorate(func):  # type: ignore[no-untyped-def]
        try:
            return njit(signature, cache=True, **options)(func)
        except _CACHE_ERRORS:
            return njit(signature, **options)(func)

    return decorate


@njit(inline="always")
def _frame(x, st, blk, ring, shifted, vad):  # type: ignore[no-untyped-def]
    n = x.size
    span = int(st[S_SPAN])
    sub = int(st[S_SUB])
    pieces = span // sub  # 2.5 ms pieces per 10 ms span: 4
    # The trend of a span: its projection on a constant and on a ramp that steps once
    # per piece (weights 2q - (pieces - 1), odd and centred). Exact integer sums.
    ramp_norm = sub * pieces * (pieces * pieces - 1) / 3.0  # the ramp's squared length
    full = np.int64(0)
    diff = np.int64(0)
    trend = 0.0
    prev = np.int64(x[0])
    peak = np.int64(0)  # energy of the loudest 5 ms (two adjacent 2.5 ms pieces)
    before = np.int64(0)  # energy of the previous 2.5 ms piece
    for j in range(0, n, span):
        level = np.int64(0)
        slope = np.int64(0)
        for q in range(pieces):
            part = np.int64(0)
            total = np.int64(0)
            for i in range(j + q * sub, j + (q + 1) * sub):
                v = np.int64(x[i])
                part += v * v
                total += v
                d = v - prev
                diff += d * d
                prev = v
            full += part
            level += total
            slope += (2 * q - (pieces - 1)) * total
            peak = max(peak, part + before)
            before = part
        trend += float(level * level) / span + float(slope) * float(slope) / ramp_norm
    # The full-band energy leaves out each 10 ms span's trend (a least-squares fit of
    # a level and a slope): what changes more slowly than speech (1/f and brown rumble,
    # wind, handling, DC; about a 2nd-order high-pass near 100 Hz) is not heard. The
    # same operations in the same order on every call path: the same decisions. One
    # more per sample keeps digital silence above zero.
    e0 = max(float(full) - trend, 0.0) + n
    e1 = float(diff) + n
    k = int(st[S_FILLED])
    blk[0, k] = e0
    blk[1, k] = e1
    st[S_FILLED] = k + 1
    if e0 < st[F0 + FLOOR] or e1 < st[F1 + FLOOR]:  # a new minimum: the floor falls at once
        _lower(st, F0, e0)
        _lower(st, F1, e1)
        st[S_SHIFT] = shift_for(st[F1 + FLOOR] if st[S_EMPHASIS] else st[F0 + FLOOR], st[S_TARGET])
    shift = int(st[S_SHIFT])
    if st[S_EMPHASIS]:  # webrtcvad hears the first difference (see `_close_block`)
        last = np.int64(st[S_LAST])
        for i in range(n):
            v = np.int64(x[i])
            shifted[i] = min(32767, max(-32768, (v - last) >> shift))
            last = v
        r = _process(vad, int(st[S_RATE]), shifted.ctypes.data, n)
    elif shift:
        for i in range(n):
            shifted[i] = x[i] >> shift
        r = _process(vad, int(st[S_RATE]), shifted.ctypes.data, n)
    else:
        r = _process(vad, int(st[S_RATE]), x.ctypes.data, n)
    st[S_LAST] = x[n - 1]
    if st[S_CLICKS] and 5 * peak > 4 * full:  # 80% of it in 5 ms: a click, a key, a tap
        voiced = False
    elif e0 <= min(st[S_BG_GATE], st[F0 + FLOOR] * st[S_BG_CAP]):  # not above the babble
        voiced = False
    elif r == 1:
        voiced = e0 >= st[S_MIN_ENERGY] and (e0 > st[F0 + GATE] or e1 > st[F1 + GATE])
    else:  # overruled only by a plainly loud frame
        voiced = e0 >= st[S_MIN_ENERGY] and (
            (e0 > st[F0 + LOUD] and e1 > st[F1 + GATE]) or e1 > st[F1 + LOUD]
        )
    if voiced:
        voiced = _near_level(st, e0)
    else:
        st[S_SINCE] += 1
    if k + 1 == blk.shape[1]:
        _close_block(st, blk, ring)
    return (VOICED if voiced else 0) | (VAD_ERROR if r < 0 else 0)


@njit(inline="always")
def _near_level(st, e0):  # type: ignore[no-untyped-def]
    """Whether a frame that passed the other gates is the user; updates the user's level.

    In a rough background, babble and music that pass every other gate are still under
    the user, who is nearer the microphone: a frame that begins or resumes speech (no
    frame near the level for S_PAUSE_FRAMES) must reach S_LEVEL_FRAC of the way (in dB)
    from the background's typical peak to the user's level. Within a run of speech, weak
    frames (codas, unvoiced consonants) pass as before. Where the level is not over the
    background's peak, it was learned from the background: no rule. One log per voiced
    frame; the background's peak in dB is taken once per block."""
    level = st[S_LEVEL]
    db = 10.0 * math.log10(e0)
    bg = st[S_BG_DB]
    if (
        st[S_BG_GATE] > 0.0
        and bg < level - st[S_LEVEL_OVER_DB]
        and st[S_SINCE] >= st[S_PAUSE_FRAMES]
        and db < min(level - st[S_LEVEL_MIN_DB], bg + st[S_LEVEL_FRAC] * (level - bg))
    ):
        st[S_SINCE] += 1
        return False
    level = db if level == 0.0 else level + st[S_LEVEL_ALPHA] * (db - level)
    st[S_LEVEL] = level
    st[S_SINCE] = 0.0 if db >= level - st[S_STRONG_DB] else st[S_SINCE] + 1
    return True


@njit(inline="always")
def _lower(st, f, e):  # type: ignore[no-untyped-def]
    if e < st[f + FLOOR]:
        st[f + FLOOR] = e
        st[f + GATE] = e * st[f + GATE_F]
        st[f + LOUD] = e * st[f + LOUD_F]


@njit
def _close_block(st, blk, ring):  # type: ignore[no-untyped-def]
    """Once per block: slide the minimum window, update the fluctuation estimate."""
    held = int(st[S_BLOCKS])
    at = int(st[S_RING])
    filled = int(st[S_FILLED])
    n_floor = int(st[S_FLOOR_BLOCKS])
    for row, f in ((0, F0), (1, F1)):
        floor = st[f + FLOOR]
        # Noise that swings more (narrow-band rumble) has frames further above its
        # floor: the line between noise and not-noise moves out with the spread.
        cap = floor * max(st[S_SPREAD_CAP], 10.0 ** (min(2.0 * st[f + SPREAD], 10.0) / 10.0))
        lowest = np.inf
        total = 0.0  # exact: a sum of exact integers, in any order
        k = 0
        for j in range(filled):
            e = blk[row, j]
            lowest = min(lowest, e)
            if e < cap:  # noise-like
                total += e
                k += 1
        if k:  # mean excess of noise-like frames over the floor, in dB
            excess = 10.0 * math.log10(total / (k * floor))
            if held:
                st[f + SPREAD] += st[S_ALPHA] * (excess - st[f + SPREAD])
            else:  # the first measurement replaces the cautious prior
                st[f + SPREAD] = excess
        ring[row, at] = lowest
        st[f + FLOOR] = ring[row, : min(held + 1, n_floor)].min()
        set_thresholds(st, f)
    # The background's typical peak: the lowest block peak of the long window. Speech
    # is louder than its own background; babble and music reach their peaks in every
    # block, the user's gaps included. A block far louder than that is the user
    # talking, not the background: it is left out (up to a window's worth in a row,
    # so a background that got louder is learned all the same). So a long turn does
    # not lift the gate over the user's own voice.
    top = 0.0
    for j in range(filled):
        top = max(top, blk[0, j])
    n_peaks = ring.shape[1]
    peaks_held = int(st[S_PEAKS_HELD])
    skipped = int(st[S_BG_SKIPPED])
    if top > st[S_BG_PEAK] * st[S_BG_SKIP] and skipped < n_peaks:
        st[S_BG_SKIPPED] = skipped + 1
    else:
        st[S_BG_SKIPPED] = 0
        peaks_held = min(peaks_held + 1, n_peaks)
        ring[2, int(st[S_PEAKS_AT])] = top
        st[S_BG_PEAK] = st[S_BG_MARGIN] * ring[2, :peaks_held].min()
        st[S_PEAKS_HELD] = peaks_held
        st[S_PEAKS_AT] = (int(st[S_PEAKS_AT]) + 1) % n_peaks
    # Steady noise (white, pink, hum) peaks a few dB over its floor, and the energy gate
    # already handles it: the background gate only acts where the peaks stand far out.
    rough = st[S_BG_PEAK] >= st[F0 + FLOOR] * st[S_BG_ROUGH]
    st[S_BG_GATE] = st[S_BG_PEAK] if rough else 0.0
    # The cap. Until the window is full it may hold nothing but the user's first turn,
    # so the cap follows how much the noise swings (steady noise: a few dB); after
    # that, babble and music get the room they need.
    if peaks_held < n_peaks:
        st[S_BG_CAP] = min(
            st[S_BG_CAP_MAX],
            10.0 ** ((st[S_BG_CAP_DB] + st[S_BG_CAP_SPREADS] * st[F0 + SPREAD]) / 10.0),
        )
    else:
        st[S_BG_CAP] = st[S_BG_CAP_MAX]
    if rough:
        st[S_BG_DB] = 10.0 * math.log10(st[S_BG_PEAK])
    # Pre-emphasis whitens noise that falls with frequency (rumble, traffic, pink), so
    # webrtcvad's lowest bands stop taking its swings for speech; on flat (white) noise
    # it would only boost the noise where speech is weak. Hysteresis: no flapping.
    tilt = 10.0 * math.log10(st[F1 + FLOOR] / st[F0 + FLOOR])
    if tilt < EMPHASIS_ON_DB:
        st[S_EMPHASIS] = 1.0
    elif tilt > EMPHASIS_OFF_DB:
        st[S_EMPHASIS] = 0.0
    st[S_SHIFT] = shift_for(st[F1 + FLOOR] if st[S_EMPHASIS] else st[F0 + FLOOR], st[S_TARGET])
    st[S_BLOCKS] = min(held + 1, n_floor)
    st[S_RING] = (at + 1) % n_floor
    st[S_FILLED] = 0


@_compile(types.void(_STATE, types.int64))
def set_thresholds(st, f):  # type: ignore[no-untyped-def]
    """The energies feature `f` must beat, from its floor and fluctuation."""
    margin = max(st[S_MARGIN_DB], st[S_SPREAD_FACTOR] * st[f + SPREAD])
    st[f + GATE_F] = 10.0 ** (margin / 10.0)
    st[f + LOUD_F] = 10.0 ** (max(st[S_OVERRIDE_DB], 2.0 * margin) / 10.0)
    st[f + GATE] = st[f + FLOOR] * st[f + GATE_F]
    st[f + LOUD] = st[f + FLOOR] * st[f + LOUD_F]


@_compile(types.int64(types.float64, types.float64))
def shift_for(floor: float, target: float) -> int:
    """Bit shift that brings the noise floor down to about the target level."""
    if floor <= target:
        return 0
    return min(15, int(math.log(floor / target) / math.log(4.0) + 0.5))


def memory_size(block: int, n_peaks: int) -> int:
    """Length of a detector's memory array (see STATE_SIZE)."""
    return STATE_SIZE + 2 * block + 3 * n_peaks


@njit(inline="always")
def _views(mem):  # type: ignore[no-untyped-def]
    block = int(mem[S_BLOCK_LEN])
    n_peaks = int(mem[S_N_PEAKS])
    at = STATE_SIZE + 2 * block
    blk = mem[STATE_SIZE:at].reshape((2, block))
    ring = mem[at : at + 3 * n_peaks].reshape((3, n_peaks))
    return mem[:STATE_SIZE], blk, ring


@_compile(types.int64(_PCM, _STATE, _SCRATCH, types.uintp))
def one_frame(pcm, mem, shifted, vad):  # type: ignore[no-untyped-def]
    """Classify one frame given as bytes; returns the frame's result bits."""
    st, blk, ring = _views(mem)
    return _frame(np.frombuffer(pcm, np.int16), st, blk, ring, shifted, vad)


@_compile(types.void(_PCM, _STATE, _SCRATCH, types.uintp, types.uint8[::1]))
def frames(pcm, mem, shifted, vad, out):  # type: ignore[no-untyped-def]
    """Classify consecutive frames, writing each one's result bits to `out`."""
    st, blk, ring = _views(mem)
    x = np.frombuffer(pcm, np.int16)
    n = shifted.size
    for i in range(out.size):
        out[i] = _frame(x[i * n : (i + 1) * n], st, blk, ring, shifted, vad)


# -- turn edges ------------------------------------------------------------------------
# Once per turn edge, over a few dozen frames. The FFT stays numpy's; what follows it,
# as numpy calls, cost ~4x the FFT itself (a dozen calls of fixed cost on tiny arrays).

_LEVELS = types.float64[:, ::1]
_VECTOR = types.float64[::1]


@_compile(types.void(_PCM, types.float64[::1]))
def energies(pcm, out):  # type: ignore[no-untyped-def]
    """out[i] = sum of squares of frame i of the int16 samples given as bytes, split into
    out.size frames (exact: integers under 2^53). For the turn machine's level checks in
    rough backgrounds (`vad.turns`), where numpy's calls cost ~5-10x this."""
    x = np.frombuffer(pcm, np.int16)
    n = x.size // out.size
    for f in range(out.size):
        total = np.int64(0)
        for i in range(f * n, (f + 1) * n):
            v = np.int64(x[i])
            total += v * v
        out[f] = float(total)


@_compile(
    types.void(types.complex128[:, ::1], types.Array(types.int64, 1, "C", readonly=True), _LEVELS)
)
def band_levels(spec, edges, out):  # type: ignore[no-untyped-def]
    """out[i, b] = 10 log10(1 + power of frame i's rfft bins edges[b]..edges[b+1])."""
    for i in range(spec.shape[0]):
        for b in range(edges.size - 1):
            power = 0.0
            for k in range(edges[b], edges[b + 1]):
                z = spec[i, k]
                power += z.real * z.real + z.imag * z.imag
            out[i, b] = 10.0 * math.log10(power + 1.0)


@_compile(types.void(_LEVELS, types.float64, types.float64, types.float64[::1]))
def edge_threshold(noise, margin_db, sigmas, out):  # type: ignore[no-untyped-def]
    """out[b] = mean + max(margin_db, sigmas x standard deviation) of noise[:, b]."""
    n = noise.shape[0]
    for b in range(noise.shape[1]):
        mean = 0.0
        for i in range(n):
            mean += noise[i, b]
        mean /= n
        var = 0.0
        for i in range(n):
            var += (noise[i, b] - mean) ** 2
        out[b] = mean + max(margin_db, sigmas * math.sqrt(var / n))


@_compile(types.void(_LEVELS, types.float64[::1], types.boolean[::1]))
def above(levels, threshold, out):  # type: ignore[no-untyped-def]
    """out[i]: some band of frame i is above its threshold."""
    for i in range(levels.shape[0]):
        hot = False
        for b in range(levels.shape[1]):
            if levels[i, b] > threshold[b]:
                hot = True
                break
        out[i] = hot


@_compile(
    types.void(types.Array(types.int16, 2, "C", readonly=True), types.int64, types.int64, _VECTOR)
)
def levels(frames, span, sub, out):  # type: ignore[no-untyped-def]
    """out[i] = 10 log10 of frame i's full-band energy as `_frame` computes it (less each
    span's level and slope): the same sums in the same order, so the same numbers. For
    re-dating a turn's onset, once per turn."""
    pieces = span // sub
    ramp_norm = sub * pieces * (pieces * pieces - 1) / 3.0
    for f in range(frames.shape[0]):
        full = np.int64(0)
        trend = 0.0
        for j in range(0, frames.shape[1], span):
            level = np.int64(0)
            slope = np.int64(0)
            for q in range(pieces):
                total = np.int64(0)
                for i in range(j + q * sub, j + (q + 1) * sub):
                    v = np.int64(frames[f, i])
                    full += v * v
                    total += v
                level += total
                slope += (2 * q - (pieces - 1)) * total
            trend += float(level * level) / span + float(slope) * float(slope) / ramp_norm
        out[f] = 10.0 * math.log10(max(float(full) - trend, 0.0) + frames.shape[1])


_capsule_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi)
)


def vad_pointer(vad: webrtcvad.Vad) -> int:
    """The `VadInst*` a `webrtcvad.Vad` owns (it stays owned, and freed, by `vad`)."""
    return int(_capsule_pointer(vad._vad, b"WebRtcVadPtr"))
