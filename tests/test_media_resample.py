"""media/resample.py: a stream's memory, exact lengths, continuity across chunk edges, and
quality (a sine's SNR and level) for the rate pairs Duplex uses.

The behaviour shared with the ingest path (chunk invariance, restart, passthrough,
channels) is tested with `PcmFramer` in tests/test_media_audio.py."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from media.resample import StreamResampler, filter_bank

PAIRS = [(16000, 24000), (24000, 16000), (24000, 48000), (48000, 16000), (8000, 16000)]
# Rates whose ratio has many phases: 44.1 kHz (160 exact phases), and 8001 Hz (16000
# phases: the interpolated table).
ODD_PAIRS = [(44100, 16000), (8001, 16000), (96000, 11025)]


def sine(rate: int, seconds: float, freq: float, dbfs: float = -12.0) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return np.round(np.sin(2 * np.pi * freq * t) * 32767 * 10 ** (dbfs / 20)).astype(np.int16)


def pushed(r: StreamResampler, pcm: np.ndarray, step: int) -> np.ndarray:
    parts = [r.push(pcm[i : i + step]) for i in range(0, pcm.size, step)]
    return np.concatenate([*parts, r.flush()])


def sine_fit(y: np.ndarray, rate: int, freq: float) -> tuple[float, float]:
    """SNR (dB) of ``y`` against the best-fitting sine at ``freq``, and that sine's RMS."""
    t = np.arange(y.size) / rate
    basis = np.stack([np.sin(2 * np.pi * freq * t), np.cos(2 * np.pi * freq * t)], axis=1)
    coef, *_ = np.linalg.lstsq(basis, y, rcond=None)
    fit = basis @ coef
    snr = 10 * math.log10(np.sum(fit**2) / np.sum((y - fit) ** 2))
    return snr, float(np.hypot(*coef) / math.sqrt(2))


_RSS_PROBE = """
import sys
import numpy as np
from media.resample import StreamResampler
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1])
in_rate, out_rate, chunk_ms = (int(a) for a in sys.argv[1:])
rng = np.random.default_rng(1)
chunk = (rng.standard_normal(in_rate * chunk_ms // 1000) * 3000).astype(np.int16).tobytes()
warm = StreamResampler(in_rate, 1, out_rate, 1); warm.push_bytes(chunk); del warm
before = rss()
kept = [StreamResampler(in_rate, 1, out_rate, 1) for _ in range(200)]
for r in kept:
    for _ in range(3):
        r.push_bytes(chunk)
print((rss() - before) / 200)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads VmRSS from /proc")
@pytest.mark.parametrize(
    "in_rate,out_rate,chunk_ms", [(16000, 24000, 100), (24000, 48000, 100), (48000, 16000, 1000)]
)
def test_a_stream_holds_a_few_kb_however_large_its_chunks(in_rate, out_rate, chunk_ms):
    """200 streams, three pushes each, in a fresh process. A libswresample filter graph
    held 85-130 KB per stream fed 100 ms pieces (and ~200 KB after 1 s pieces at 48 kHz);
    python-soxr 40-97 KB. What a stream owns now is its filter's history: the filter
    bank is shared by all streams of a rate pair."""
    out = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(in_rate), str(out_rate), str(chunk_ms)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    per_stream_kb = float(out.stdout)
    assert per_stream_kb < 8, per_stream_kb


def test_streams_share_one_filter_bank_and_own_under_a_kilobyte():
    a = StreamResampler(48000, 2, 16000, 1)
    b = StreamResampler(48000, 2, 16000, 1)
    assert a._bank is b._bank is filter_bank(48000, 16000)
    assert not a._bank.flags.writeable
    a.push(np.ones(9600, np.int16))
    owned = a._st.nbytes + a._hist.nbytes
    assert owned < 1024, owned


@settings(max_examples=40, deadline=None)
@given(
    pair=st.sampled_from(PAIRS + ODD_PAIRS),
    channels=st.sampled_from([(1, 1), (2, 1), (1, 2), (2, 2)]),
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=30),
    seed=st.integers(0, 2**16),
)
def test_a_stream_gives_exactly_its_length_however_chunked(pair, channels, sizes, seed):
    """Over a stream (to flush), ceil(n * out_rate / in_rate) samples per channel come
    out, bit-identical to one push of the whole, and the next stream starts clean."""
    (in_rate, out_rate), (in_ch, out_ch) = pair, channels
    n = sum(sizes)
    pcm = (np.random.default_rng(seed).standard_normal(n * in_ch) * 8000).astype(np.int16)
    whole = StreamResampler(in_rate, in_ch, out_rate, out_ch)
    ref = np.concatenate([whole.push(pcm), whole.flush()])
    chunked = StreamResampler(in_rate, in_ch, out_rate, out_ch)
    parts, pos = [], 0
    for size in sizes:
        parts.append(chunked.push(pcm[pos : pos + size * in_ch]))
        pos += size * in_ch
    got = np.concatenate([*parts, chunked.flush()])
    assert got.size == -(-n * out_rate // in_rate) * out_ch
    assert np.array_equal(got, ref)
    assert np.array_equal(np.concatenate([chunked.push(pcm), chunked.flush()]), ref)


@pytest.mark.parametrize("in_rate,out_rate", PAIRS + ODD_PAIRS)
@pytest.mark.parametrize("freq", [440.0, 1000.0, 3000.0])
def test_a_sine_keeps_its_level_and_comes_out_clean(in_rate, out_rate, freq):
    """A -12 dBFS sine in 100 ms pieces (reply chunks): the output is the same sine at
    the new rate, with no click at the pieces' edges. libswresample at filter_size 16
    gave 80-90 dB SNR here; near the lower Nyquist (3 kHz at 8 kHz) both filters
    attenuate a little and image more."""
    x = sine(in_rate, 1.5, freq)
    y = pushed(StreamResampler(in_rate, 1, out_rate, 1), x, in_rate // 10).astype(np.float64)
    middle = y[out_rate // 10 : -out_rate // 10]  # the ends are a sine switched on/off
    snr, rms = sine_fit(middle, out_rate, freq)
    near_nyquist = freq > 0.35 * min(in_rate, out_rate)
    assert snr > (40 if near_nyquist else 75), snr
    level_db = 20 * math.log10(rms / np.sqrt(np.mean(x[in_rate // 10 : -in_rate // 10] ** 2.0)))
    assert abs(level_db) < (0.5 if near_nyquist else 0.02), level_db
    # No click at a piece's edge: the error next to every edge is as small as anywhere.
    t = np.arange(y.size) / out_rate
    ideal = np.sin(2 * np.pi * freq * t) * 32767 * 10 ** (-12 / 20)
    err = np.abs(y - ideal)[out_rate // 10 : -out_rate // 10]
    if not near_nyquist:
        assert err.max() < 8, err.max()


def test_same_rate_other_channels_is_a_remix_without_filter_or_delay():
    stereo = np.array([100, 300, -5, -6, 32767, 32767, -32768, -32768], np.int16)
    down = StreamResampler(16000, 2, 16000, 1)
    assert down.remix_only and not down.passthrough
    assert down.push(stereo).tolist() == [200, -6, 32767, -32768]
    assert down.flush().size == 0
    up = StreamResampler(16000, 1, 16000, 2)
    assert up.push(np.array([1, -2], np.int16)).tolist() == [1, 1, -2, -2]


def test_flush_then_restart_begin_new_streams_with_nothing_of_the_old():
    loud = (np.random.default_rng(2).standard_normal(2400) * 20000).astype(np.int16)
    for end in ("flush", "restart"):
        r = StreamResampler(24000, 1, 16000, 1)
        r.push(loud)
        getattr(r, end)()
        fresh = StreamResampler(24000, 1, 16000, 1)
        silence = np.zeros(2400, np.int16)
        assert np.array_equal(r.push(silence), fresh.push(silence))
        assert not r.push(silence).any()
