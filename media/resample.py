"""Streaming int16 resampling: a polyphase windowed-sinc filter, compiled with numba.

Why not libswresample (PyAV) or python-soxr: both build a filter per stream and keep
buffers sized for the largest chunk they were given. Measured (``python -m
bench.bench_audio --resamplers``, 20 ms to 1 s chunks): a libswresample graph 77-142 KB
per stream, python-soxr 1.1 32-106 KB even at its low quality. Here the filter bank is
built once per rate pair and shared (read-only) by every stream; what a stream owns is
the last few input samples and where the next output falls: under 1 KB. The filter
follows libswresample's defaults at ``filter_size=16``: a Kaiser-windowed sinc (beta 9,
cutoff 0.97 of the lower Nyquist), 16 taps per output at or above the input rate and
16 x the ratio below it. Coefficients are Q15 integers and the sums exact integers: the output does
not depend on how the input was chunked, and the compiler may vectorise the sums.
Every phase of the filter sums to exactly 1.0 (no gain ripple between phases).

Exact phases for rate pairs whose reduced ratio has few phases (all the common ones:
16/24/48 kHz, 8 kHz telephony, 44.1 kHz families); otherwise (rates like 8001 Hz) a
table of fewer phases with linear interpolation between neighbours.

Plain library code (arrays and bytes in, values out; no asyncio).
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import njit, types

#: Taps per output at or above the input rate (libswresample's ``filter_size``); below
#: it, the filter is stretched by the ratio (in/out) to cut at the output's Nyquist.
HALF_TAPS = 8
CUTOFF = 0.97  # of the lower rate's Nyquist frequency
KAISER_BETA = 9.0
#: Coefficients per filter bank at most (int16): 128 KB. Rate pairs needing more exact
#: phases use fewer phases, interpolated.
MAX_BANK = 65536
_Q = 15  # coefficients are Q15

# The state of a stream: one int64 array with these slots (its history is a second array).
_POS = 0  # index into [history, new input] of the next output's first tap (may pass the end)
_FRAC = 1  # the next output's phase, in 1/up of an input sample
_HELD = 2  # history samples held
_UP, _DOWN = 3, 4  # out_rate / g, in_rate / g
_TAPS = 5
_PHASES = 6  # rows of the bank: up (exact), or the interpolated table's rows less one
_MIX = 7  # 1: stereo input averaged to mono
_OUT_CH = 8
_STATE_SIZE = 9

_CACHE_ERRORS = (RuntimeError, OSError)  # no writable cache directory: compile each run


def _compile(signature: object):  # type: ignore[no-untyped-def]
    def decorate(func):  # type: ignore[no-untyped-def]
        try:
            return njit(signature, cache=True)(func)
        except _CACHE_ERRORS:
            return njit(signature)(func)

    return decorate


@njit(inline="always")
def _dot(line, start, bank, r, taps):  # type: ignore[no-untyped-def]
    # int32 with wrap-around: the true sum fits (`filter_bank` bounds each row's sum of
    # magnitudes), so it is exact in any order, which lets the compiler vectorise it.
    # Unsigned indices: no negative-index wrap-around checks in the loop.
    acc = np.int32(0)
    s = np.uint64(start)
    row = np.uint64(r)
    for j in range(np.uint64(taps)):
        acc = np.int32(acc + bank[row, j] * line[s + j])
    return np.int64(acc)


@_compile(
    types.Array(types.int16, 1, "C")(
        types.Array(types.int16, 1, "C", readonly=True),
        types.int64[::1],
        types.int16[:, ::1],
        types.Array(types.int16, 2, "C", readonly=True),
    )
)
def _run(x, st, hist, bank):  # type: ignore[no-untyped-def]
    """Resample interleaved ``x``; update the state in place; return interleaved output."""
    up, down, taps, phases = st[_UP], st[_DOWN], st[_TAPS], st[_PHASES]
    ch = hist.shape[0]
    mix = st[_MIX]
    in_ch = 2 if mix or ch == 2 else 1
    out_ch = st[_OUT_CH]
    held = st[_HELD]
    n = x.size // in_ch
    total = held + n
    # [history, new input] per channel.
    ext = np.empty((ch, total), np.int16)
    ext[:, :held] = hist[:, :held]
    if mix:
        for i in range(n):
            ext[0, held + i] = (np.int32(x[2 * i]) + np.int32(x[2 * i + 1])) >> 1
    elif ch == 1:
        ext[0, held:] = x
    else:
        for c in range(ch):
            for i in range(n):
                ext[c, held + i] = x[2 * i + c]
    pos, frac = st[_POS], st[_FRAC]
    count = 0
    if pos + taps <= total:  # outputs whose last tap has arrived
        count = ((total - taps - pos + 1) * up - frac - 1) // down + 1
    out = np.empty(count * max(ch, out_ch), np.int16)
    res = out if ch == out_ch == 1 else np.empty(count, np.int16)
    step, fstep = down // up, down % up
    p, f = pos, frac
    for c in range(ch):
        line = ext[c]
        p, f = pos, frac
        exact = phases == up
        for k in range(count):
            if exact:
                acc = _dot(line, p, bank, f, taps)
            else:  # between two rows of the table
                scaled = f * phases
                r = scaled // up
                lo = _dot(line, p, bank, r, taps)
                acc = lo + (_dot(line, p, bank, r + 1, taps) - lo) * (scaled - r * up) // up
            res[k] = min(max((acc + (1 << (_Q - 1))) >> _Q, -32768), 32767)
            p += step
            f += fstep
            if f >= up:
                f -= up
                p += 1
        if ch == 2:
            out[c::2] = res
        elif out_ch == 2:  # mono copied to both channels
            out[0::2] = res
            out[1::2] = res
    # Keep what the next outputs need: from `p` on (nothing if `p` is past the end).
    keep = max(0, total - p)
    hist[:, :keep] = ext[:, total - keep :]
    st[_HELD] = keep
    st[_POS] = p - (total - keep)
    st[_FRAC] = f
    return out


def _kaiser(d: np.ndarray, half: float) -> np.ndarray:
    inside = np.abs(d) < half
    r = np.where(inside, d / half, 1.0)
    return np.where(inside, np.i0(KAISER_BETA * np.sqrt(1.0 - r * r)) / np.i0(KAISER_BETA), 0.0)


@functools.lru_cache(maxsize=32)
def filter_bank(in_rate: int, out_rate: int) -> np.ndarray:
    """The shared, read-only Q15 filter bank for ``in_rate -> out_rate``: one row per
    phase (a fraction of an input sample), ``taps`` columns. Rows sum to 1 << 15.

    Memoised: every stream of a rate pair reads the same bank (at most ``MAX_BANK``
    coefficients, 128 KB; common pairs a few hundred bytes)."""
    g = math.gcd(in_rate, out_rate)
    up, down = out_rate // g, in_rate // g
    half = math.ceil(HALF_TAPS * max(1.0, down / up))
    taps = 2 * half
    exact = up * taps <= MAX_BANK
    rows = up if exact else max(2, MAX_BANK // taps - 1) + 1
    steps = up if exact else rows - 1
    cutoff = CUTOFF * min(1.0, up / down)
    # Row p: the output at p/steps of an input sample past the tap at index half - 1.
    d = (half - 1 - np.arange(taps))[None, :] + (np.arange(rows) / steps)[:, None]
    h = cutoff * np.sinc(cutoff * d) * _kaiser(d, half)
    h /= h.sum(axis=1, keepdims=True)
    q = np.round(h * (1 << _Q)).astype(np.int64)
    # Exactly unity gain per phase: the rounding residue goes to the largest tap.
    q[np.arange(rows), np.argmax(np.abs(q), axis=1)] += (1 << _Q) - q.sum(axis=1)
    # int32 sums in `_dot` are exact while |sum| < 2**31: |x| <= 32768 times this.
    assert np.abs(q).sum(axis=1).max() < 65536 and np.abs(q).max() < 32768
    bank = q.astype(np.int16)
    bank.flags.writeable = False
    return bank


class StreamResampler:
    """Stateful int16 resampler/remixer for continuous streams (stereo in -> mono out is
    the average; mono in -> stereo out duplicates).

    Continuous state (the filter's history) means chunk boundaries leave no clicks and
    the concatenated output is bit-identical however the input was chunked (see
    tests). Output lags input by half the filter (0.5 ms at 16 kHz, 1 ms at 8 kHz)
    until :meth:`flush`, which emits the rest: over a stream, exactly
    ``ceil(samples_in * out_rate / in_rate)`` samples per channel come out.

    A stream owns only its state (under 1 KB); the filter bank is shared
    (:func:`filter_bank`), so streams are cheap to make, keep and drop.
    """

    __slots__ = (
        "_bank",
        "_hist",
        "_in_block",
        "_in_total",
        "_out_block",
        "_out_total",
        "_st",
        "in_channels",
        "in_rate",
        "out_channels",
        "out_rate",
        "passthrough",
        "remix_only",
    )

    def __init__(self, in_rate: int, in_channels: int, out_rate: int, out_channels: int = 1):
        for name, ch in (("in_channels", in_channels), ("out_channels", out_channels)):
            if ch not in (1, 2):
                raise ValueError(f"{name} must be 1 or 2, not {ch!r}")
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"rates must be positive, got {in_rate} -> {out_rate}")
        self.in_rate = in_rate
        self.in_channels = in_channels
        self.out_rate = out_rate
        self.out_channels = out_channels
        self._in_block = 2 * in_channels
        self._out_block = 2 * out_channels
        self.passthrough = in_rate == out_rate and in_channels == out_channels
        # Same rate, other channel count: no filter (and no delay), as libswresample did.
        self.remix_only = in_rate == out_rate and not self.passthrough
        self._in_total = 0
        self._out_total = 0
        if in_rate == out_rate:
            return
        self._bank = bank = filter_bank(in_rate, out_rate)
        g = math.gcd(in_rate, out_rate)
        work_ch = 2 if in_channels == out_channels == 2 else 1
        st = self._st = np.zeros(_STATE_SIZE, np.int64)
        st[_UP], st[_DOWN] = out_rate // g, in_rate // g
        st[_TAPS] = bank.shape[1]
        st[_PHASES] = st[_UP] if bank.shape[0] == st[_UP] else bank.shape[0] - 1
        st[_MIX] = int(in_channels == 2 and out_channels == 1)
        st[_OUT_CH] = out_channels
        self._hist = np.zeros((work_ch, bank.shape[1]), np.int16)
        self.restart()

    def restart(self) -> None:
        """Begin a new stream: nothing of the old one comes out (no allocation)."""
        self._in_total = self._out_total = 0
        if self.in_rate == self.out_rate:
            return
        # The first output is centred on the first input sample: the taps before it
        # read silence.
        self._hist.fill(0)
        self._st[_HELD] = self._bank.shape[1] // 2 - 1
        self._st[_POS] = self._st[_FRAC] = 0

    def push(self, pcm: np.ndarray) -> np.ndarray:
        """Convert int16 interleaved samples; returns what is ready (int16 interleaved)."""
        if pcm.dtype != np.int16:
            raise ValueError(f"expected int16 PCM, got {pcm.dtype}")
        data = memoryview(np.ascontiguousarray(pcm)).cast("B")
        return np.frombuffer(self.push_bytes(data), dtype=np.int16)

    def push_bytes(self, data: bytes | bytearray | memoryview) -> bytes:
        """Like :meth:`push` on raw s16le bytes (no array round-trips on the ingest path)."""
        n = len(data) // self._in_block
        if n * self._in_block != len(data):
            raise ValueError(
                f"{len(data)} bytes is not a whole number of {self._in_block}-byte samples"
            )
        if n == 0:
            return b""
        self._in_total += n
        if self.passthrough:
            return bytes(data)
        if self.remix_only:
            x = np.frombuffer(data, np.int16)
            if self.in_channels == 2:  # the average, as `_run` downmixes
                return ((x[0::2].astype(np.int32) + x[1::2]) >> 1).astype(np.int16).tobytes()
            return np.repeat(x, 2).tobytes()
        out = _run(np.frombuffer(data, np.int16), self._st, self._hist, self._bank)
        self._out_total += out.size // self.out_channels
        return out.tobytes()

    def flush(self) -> np.ndarray:
        """Emit the filter's tail (end of stream) and reset, ready for a new stream."""
        if self.in_rate == self.out_rate:
            self.restart()
            return np.empty(0, dtype=np.int16)
        st = self._st
        due = -(-self._in_total * int(st[_UP]) // int(st[_DOWN])) - self._out_total
        tail = np.empty(0, np.int16)
        if due > 0:
            silence = np.zeros(self._bank.shape[1] // 2 * self.in_channels, np.int16)
            tail = _run(silence, st, self._hist, self._bank)[: due * self.out_channels]
        self.restart()
        return tail
