"""The per-frame work of `SpeechDetector`, compiled: energies, floor, webrtcvad, gate.

Why compiled: a 20 ms frame is 320 samples. In Python with numpy every step of it is a
call with a fixed cost of 0.1-0.8 µs (the cast, the dot product, the shift, the webrtcvad
wrapper, the bookkeeping), and together they cost more than webrtcvad itself. Compiled
with numba, the whole frame, webrtcvad's C entry point included, is one call whose cost
is about webrtcvad's own. The rare work (once per 400 ms block: the sliding minimum, the
fluctuation estimate, new thresholds) stays in Python in `SpeechDetector`.

webrtcvad is called through its C API (`WebRtcVad_Process`), which the `_webrtcvad`
extension exports; the instance is the one a `webrtcvad.Vad` owns. The functions are
compiled for fixed signatures when this module is imported and cached on disk, so no
session ever waits for a compile.

State lives in one float64 array per detector (the `S_*` slots below): the kernel and
`SpeechDetector` both read and write it, and nothing else holds a copy.
"""

from __future__ import annotations

import ctypes
import math

import _webrtcvad  # type: ignore[import-not-found]
import llvmlite.binding
import numpy as np
import webrtcvad
from numba import njit, types

# Slots of the state array.
S_FLOOR0, S_GATE0, S_LOUD0 = 0, 1, 2  # full band: noise floor and the energies to beat
S_FLOOR1, S_GATE1, S_LOUD1 = 3, 4, 5  # first difference, likewise
S_GATE_F0, S_LOUD_F0, S_GATE_F1, S_LOUD_F1 = 6, 7, 8, 9  # threshold / floor, per feature
S_SHIFT = 10  # right shift applied to frames for webrtcvad
S_TARGET = 11  # floor energy that needs no shift
S_MIN_ENERGY = 12  # quieter frames are never speech
S_FILLED = 13  # frames in the block being filled
S_RATE = 14  # sample rate
STATE_SIZE = 15

# A frame's result: bit 0 voiced, bit 1 the block is full, bit 2 webrtcvad failed.
VOICED, BLOCK_FULL, VAD_ERROR = 1, 2, 4

llvmlite.binding.load_library_permanently(_webrtcvad.__file__)
_process = types.ExternalFunction(
    "WebRtcVad_Process",  # (VadInst*, int fs, const int16_t* frame, size_t length) -> int
    types.intc(types.uintp, types.intc, types.uintp, types.uintp),
)

_PCM = types.Bytes(types.uint8, 1, "C", readonly=True)
_STATE = types.float64[::1]
_BLOCK = types.float64[:, ::1]
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
def _frame(x, st, blk, shifted, vad):  # type: ignore[no-untyped-def]
    n = x.size
    prev = np.int64(x[0])
    full = prev * prev
    diff = np.int64(0)
    for i in range(1, n):
        v = np.int64(x[i])
        full += v * v
        d = v - prev
        diff += d * d
        prev = v
    # Sums of int16 squares are exact integers in float64. One more per sample keeps
    # digital silence above zero.
    e0 = float(full) + n
    e1 = float(diff) + n
    k = int(st[S_FILLED])
    blk[0, k] = e0
    blk[1, k] = e1
    k += 1
    st[S_FILLED] = k
    if e0 < st[S_FLOOR0] or e1 < st[S_FLOOR1]:  # a new minimum: the floor falls at once
        if e0 < st[S_FLOOR0]:
            st[S_FLOOR0] = e0
            st[S_GATE0] = e0 * st[S_GATE_F0]
            st[S_LOUD0] = e0 * st[S_LOUD_F0]
        if e1 < st[S_FLOOR1]:
            st[S_FLOOR1] = e1
            st[S_GATE1] = e1 * st[S_GATE_F1]
            st[S_LOUD1] = e1 * st[S_LOUD_F1]
        st[S_SHIFT] = shift_for(st[S_FLOOR0], st[S_TARGET])
    shift = int(st[S_SHIFT])
    if shift:
        for i in range(n):
            shifted[i] = x[i] >> shift
        r = _process(vad, int(st[S_RATE]), shifted.ctypes.data, n)
    else:
        r = _process(vad, int(st[S_RATE]), x.ctypes.data, n)
    if r == 1:
        voiced = e0 >= st[S_MIN_ENERGY] and (e0 > st[S_GATE0] or e1 > st[S_GATE1])
    else:  # overruled only by a plainly loud frame
        voiced = e0 >= st[S_MIN_ENERGY] and (e0 > st[S_LOUD0] or e1 > st[S_LOUD1])
    code = VOICED if voiced else 0
    if k == blk.shape[1]:
        code |= BLOCK_FULL
    if r < 0:
        code |= VAD_ERROR
    return code


@_compile(types.int64(types.float64, types.float64))
def shift_for(floor: float, target: float) -> int:
    """Bit shift that brings the noise floor down to about the target level."""
    if floor <= target:
        return 0
    return min(15, int(math.log(floor / target) / math.log(4.0) + 0.5))


@_compile(types.int64(_PCM, _STATE, _BLOCK, _SCRATCH, types.uintp))
def one_frame(pcm, st, blk, shifted, vad):  # type: ignore[no-untyped-def]
    """Classify one frame given as bytes; returns the frame's result bits."""
    return _frame(np.frombuffer(pcm, np.int16), st, blk, shifted, vad)


@_compile(types.int64(_PCM, types.int64, _STATE, _BLOCK, _SCRATCH, types.uintp, types.uint8[::1]))
def frames(pcm, first, st, blk, shifted, vad, out):  # type: ignore[no-untyped-def]
    """Classify frames from index `first` on, writing each one's result bits to `out`,
    until the block is full, webrtcvad fails or the frames run out; returns how many
    were done."""
    x = np.frombuffer(pcm, np.int16)
    n = shifted.size
    count = x.size // n
    i = first
    while i < count:
        code = _frame(x[i * n : (i + 1) * n], st, blk, shifted, vad)
        out[i] = code
        i += 1
        if code & (BLOCK_FULL | VAD_ERROR):
            break
    return i - first


_capsule_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi)
)


def vad_pointer(vad: webrtcvad.Vad) -> int:
    """The `VadInst*` a `webrtcvad.Vad` owns (it stays owned, and freed, by `vad`)."""
    return int(_capsule_pointer(vad._vad, b"WebRtcVadPtr"))
