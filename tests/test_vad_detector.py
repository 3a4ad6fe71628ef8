"""SpeechDetector: config validation, frame checks, noise rejection, speech detection."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import webrtcvad
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.speech import (
    NOISES,
    SAMPLE_RATE,
    frames_of,
    make_conversation,
    make_noise,
    resample,
    rms,
    synth,
)
from vad import kernel
from vad.detector import DetectorConfig, SpeechDetector

FULL_SCALE = 32768


@pytest.fixture(scope="session")
def speech_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("speech")


def noise_at(kind: str, level_dbfs: float, seconds: float, seed: int = 1) -> np.ndarray:
    x = make_noise(kind, int(SAMPLE_RATE * seconds), np.random.default_rng(seed))
    x = x / rms(x) * FULL_SCALE * 10 ** (level_dbfs / 20)
    return np.clip(np.round(x), -32768, 32767).astype(np.int16)


def voiced_mask(n_frames: int, spans: list[tuple[float, float]], frame_ms: int = 20) -> np.ndarray:
    centres = np.arange(n_frames) * frame_ms + frame_ms / 2
    mask = np.zeros(n_frames, dtype=bool)
    for start, end in spans:
        mask |= (centres >= start) & (centres < end)
    return mask


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sample_rate": 44100}, "sample_rate"),
        ({"frame_ms": 25}, "frame_ms"),
        ({"aggressiveness": 4}, "aggressiveness"),
        ({"aggressiveness": -1}, "aggressiveness"),
        ({"margin_db": -1.0}, "margin_db"),
        ({"spread_factor": 11.0}, "spread_factor"),
        ({"override_db": -3.0}, "override_db"),
        ({"floor_window_ms": 100}, "floor_window_ms"),
        ({"noise_target_dbfs": 6.0}, "noise_target_dbfs"),
        ({"min_level_dbfs": -120.0}, "min_level_dbfs"),
    ],
)
def test_config_rejects_nonsense(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DetectorConfig(**kwargs)


def test_detector_rejects_non_config() -> None:
    with pytest.raises(ValueError, match="DetectorConfig"):
        SpeechDetector({"sample_rate": 16000})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("rate", "frame_ms", "samples"), [(8000, 10, 80), (16000, 20, 320), (48000, 30, 1440)]
)
def test_frame_samples(rate: int, frame_ms: int, samples: int) -> None:
    det = SpeechDetector(DetectorConfig(sample_rate=rate, frame_ms=frame_ms))
    assert det.frame_samples == samples == det.config.frame_samples


@pytest.mark.parametrize(
    "frame",
    [
        np.zeros(319, dtype=np.int16),
        np.zeros(321, dtype=np.int16),
        np.zeros(320, dtype=np.float32),
        np.zeros((1, 320), dtype=np.int16),
        bytes(640),
        [0] * 320,
    ],
    ids=["short", "long", "float32", "2-D", "bytes", "list"],
)
def test_is_speech_rejects_bad_frames(frame: object) -> None:
    with pytest.raises(ValueError, match="320"):
        SpeechDetector().is_speech(frame)  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [0, 638, 642, 1280])
def test_is_speech_pcm_rejects_other_lengths(size: int) -> None:
    with pytest.raises(ValueError, match="320"):
        SpeechDetector().is_speech_pcm(bytes(size))


@pytest.mark.parametrize("size", [2, 639, 1282])
def test_classify_pcm_rejects_partial_frames(size: int) -> None:
    with pytest.raises(ValueError, match="320"):
        SpeechDetector().classify_pcm(bytes(size))
    assert SpeechDetector().classify_pcm(b"") == []


@pytest.mark.parametrize(
    "frames",
    [np.zeros((3, 160), dtype=np.int16), np.zeros(320, dtype=np.int16), np.zeros((2, 320))],
    ids=["wrong width", "1-D", "float64"],
)
def test_classify_rejects_bad_blocks(frames: np.ndarray) -> None:
    with pytest.raises(ValueError, match="320"):
        SpeechDetector().classify(frames)


def test_digital_silence_is_never_speech() -> None:
    det = SpeechDetector()
    assert det.noise_floor_db == -np.inf
    assert not any(det.classify(np.zeros((100, 320), dtype=np.int16)))
    assert det.noise_floor_db < -85


@pytest.mark.parametrize("kind", NOISES)
def test_loud_stationary_noise_is_rejected(kind: str) -> None:
    """At -25 dBFS webrtcvad alone calls most of these frames speech; we call almost none."""
    frames = frames_of(noise_at(kind, -25.0, 10.0), 320)
    vad = webrtcvad.Vad(DetectorConfig().aggressiveness)
    bare = np.mean([vad.is_speech(f.tobytes(), SAMPLE_RATE) for f in frames])
    ours = np.mean(SpeechDetector().classify(frames))
    assert bare > 0.7
    assert ours < 0.02


@pytest.mark.parametrize("level", [-50.0, -35.0, -20.0])
def test_noise_floor_tracks_noise_level(level: float) -> None:
    det = SpeechDetector()
    det.classify(frames_of(noise_at("white", level, 3.0), 320))
    # Minimum statistics sit a little below the mean level of the noise.
    assert level - 3.0 < det.noise_floor_db <= level


def test_noise_floor_falls_at_once_and_rises_within_a_window() -> None:
    det = SpeechDetector()
    det.classify(frames_of(noise_at("white", -30.0, 3.0), 320))
    det.classify(frames_of(noise_at("white", -50.0, 0.1, seed=2), 320))
    assert det.noise_floor_db < -49  # fast down: a few frames suffice
    louder = frames_of(noise_at("white", -30.0, 3.0, seed=3), 320)
    decisions = det.classify(louder)
    # Slow up: a 20 dB louder noise passes for speech until the quiet minimum leaves the
    # floor window (2 s, moving in 0.4 s blocks), then no more.
    assert det.noise_floor_db > -33
    assert any(decisions[:50])
    assert not any(decisions[125:])


def test_speech_frames_are_detected(speech_cache: Path) -> None:
    conv = make_conversation(3, n_turns=2, cache_dir=speech_cache)
    frames = frames_of(conv.audio, 320)
    decisions = np.array(SpeechDetector().classify(frames))
    voiced = voiced_mask(len(frames), conv.phrases)
    silent = ~voiced_mask(len(frames), [(a - 300, b + 300) for a, b in conv.turns])
    assert decisions[voiced].mean() > 0.75
    assert not decisions[silent].any()


@pytest.mark.parametrize("kind", NOISES)
def test_speech_in_5db_noise(kind: str, speech_cache: Path) -> None:
    conv = make_conversation(4, n_turns=2, noise=kind, snr_db=5.0, cache_dir=speech_cache)
    frames = frames_of(conv.audio, 320)
    decisions = np.array(SpeechDetector().classify(frames))
    voiced = voiced_mask(len(frames), conv.phrases)
    gaps = ~voiced_mask(len(frames), [(a - 300, b + 300) for a, b in conv.turns])
    assert decisions[voiced].mean() > 0.4  # turn logic bridges the rest
    assert decisions[gaps].mean() < 0.05  # isolated frames, which never open a turn


@pytest.mark.parametrize(("rate", "frame_ms"), [(8000, 10), (32000, 30), (48000, 20)])
def test_other_rates_and_frame_lengths(rate: int, frame_ms: int, speech_cache: Path) -> None:
    speech = resample(
        synth("Could you tell me the weather for tomorrow?", "en", 165, speech_cache),
        SAMPLE_RATE,
        rate,
    )
    pad = np.zeros(rate // 2, dtype=np.int16)
    audio = np.concatenate([pad, speech, pad])
    det = SpeechDetector(DetectorConfig(sample_rate=rate, frame_ms=frame_ms))
    decisions = np.array(det.classify(frames_of(audio, det.frame_samples)))
    per_s = 1000 // frame_ms
    speech_part = decisions[per_s // 2 : per_s // 2 + len(speech) * per_s // rate]
    assert speech_part.mean() > 0.6
    assert not decisions[: per_s // 2].any()


@pytest.fixture(scope="session")
def noisy_frames(speech_cache: Path) -> np.ndarray:
    audio = make_conversation(7, n_turns=2, noise="pink", snr_db=10.0, cache_dir=speech_cache)
    return frames_of(audio.audio, 320)[:600]


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=60))
def test_classify_is_independent_of_chunking(noisy_frames: np.ndarray, sizes: list[int]) -> None:
    """Decisions depend on the frames only, not on how they were grouped into calls."""
    frames = noisy_frames
    expected = SpeechDetector().classify(frames)
    det, got, i = SpeechDetector(), [], 0
    for size in sizes * (len(frames) // sum(sizes) + 1):
        if i >= len(frames):
            break
        got += det.classify(frames[i : i + size])
        i += size
    single, from_bytes, in_bytes, i = SpeechDetector(), SpeechDetector(), SpeechDetector(), 0
    got_bytes: list[bool] = []
    for size in sizes * (len(frames) // sum(sizes) + 1):
        if i >= len(frames):
            break
        got_bytes += in_bytes.classify_pcm(frames[i : i + size].tobytes())
        i += size
    assert got == expected == [single.is_speech(f) for f in frames] == got_bytes
    assert expected == [from_bytes.is_speech_pcm(f.tobytes()) for f in frames]


@settings(max_examples=20, deadline=None)
@given(
    level_dbfs=st.floats(min_value=-70.0, max_value=0.0),
    seed=st.integers(0, 2**16),
    clip=st.booleans(),
)
def test_one_frame_and_block_paths_agree_exactly(level_dbfs: float, seed: int, clip: bool) -> None:
    """The one-frame entry (`is_speech_pcm`) and the many-frame entry (`classify`, one
    kernel call for all the frames) leave the same state: floors, thresholds and
    decisions match bit for bit, at any level (loud noise is bit-shifted
    before webrtcvad) and with full-scale samples."""
    audio = noise_at("pink", level_dbfs, 2.0, seed)
    if clip:  # the extremes of int16, where an inexact sum would show first
        audio[::7] = -32768
        audio[3::7] = 32767
    frames = frames_of(audio, 320)
    block, single = SpeechDetector(), SpeechDetector()
    assert block.classify(frames) == [single.is_speech_pcm(f.tobytes()) for f in frames]
    assert block.noise_floor_db == single.noise_floor_db
    assert np.array_equal(block._st, single._st)


def detrended_energy(frame: np.ndarray, span: int = 160, sub: int = 40) -> float:
    """The full-band energy as defined, in plain Python: sum(x**2) less, in each 10 ms
    span, its projection on a constant and on a ramp stepping once per 2.5 ms piece
    (weights 2q - 3), plus one per sample. The same floating-point operations in the
    same order as the kernel, so the results are equal."""
    pieces = span // sub
    ramp_norm = sub * pieces * (pieces * pieces - 1) / 3.0
    full, trend = 0, 0.0
    for j in range(0, len(frame), span):
        part = [int(v) for v in frame[j : j + span]]
        full += sum(v * v for v in part)
        level = sum(part)
        slope = sum(
            (2 * q - (pieces - 1)) * sum(part[q * sub : (q + 1) * sub]) for q in range(pieces)
        )
        trend += float(level * level) / span + float(slope) * float(slope) / ramp_norm
    return max(float(full) - trend, 0.0) + len(frame)


@pytest.mark.parametrize(
    ("hz", "lo", "hi"),
    [
        (5, -40, -28),
        (10, -32, -22),
        (25, -21, -14),
        (100, -5, -2),
        (300, -1, 0.1),
        (3000, -0.1, 0.1),
    ],
)
def test_full_band_energy_ignores_rumble(hz: float, lo: float, hi: float) -> None:
    """Leaving out each 10 ms span's trend acts as a high-pass near 100 Hz: rumble below
    the speech band barely counts, speech frequencies count fully."""
    t = np.arange(20 * 320) / SAMPLE_RATE
    frames = np.round(8000 * np.sin(2 * np.pi * hz * t + 0.3)).astype(np.int16).reshape(20, 320)
    det = SpeechDetector()
    det.classify(frames)
    plain = float((frames.astype(np.int64) ** 2).sum())
    assert lo < 10 * np.log10(det._blk[0, :20].sum() / plain) < hi


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), level_dbfs=st.floats(min_value=-90.0, max_value=0.0))
def test_kernel_energies_are_exact_sums(seed: int, level_dbfs: float) -> None:
    """The compiled kernel's two energies are what the gate is defined on: the detrended
    full-band energy (`detrended_energy`) and sum(diff(x)**2) + n, exact integer sums,
    here with extreme samples mixed in."""
    audio = (
        noise_at("brown", level_dbfs, 0.2, seed) // 2
        + noise_at("white", level_dbfs, 0.2, seed) // 2
    )
    audio[5::11] = -32768
    audio[7::13] = 32767
    frames = frames_of(audio, 320)[:9]  # fewer than a block: all still held
    detector = SpeechDetector()
    detector.classify(frames)
    assert detector._blk[0, :9].tolist() == [detrended_energy(f) for f in frames]
    x = frames.astype(np.int64)
    diff = np.diff(x, axis=1)
    assert detector._blk[1, :9].tolist() == [float(v) for v in (diff**2).sum(axis=1) + 320]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), n_frames=st.integers(5, 40))
def test_edge_statistics_match_their_numpy_definitions(seed: int, n_frames: int) -> None:
    """The compiled turn-edge statistics compute what their docstrings define, written
    here in plain numpy: band levels of the Hann-windowed rfft, mean + max(2 dB,
    3 sigma) per band, and "some band above"."""
    rng = np.random.default_rng(seed)
    frames = (rng.standard_normal((n_frames, 320)) * rng.uniform(1, 3000)).astype(np.int16)
    detector = SpeechDetector()
    levels = detector.band_levels(frames)
    power = np.abs(np.fft.rfft(frames * np.hanning(320), axis=1)) ** 2
    freqs = np.fft.rfftfreq(320, 1 / 16000)
    bands = [(250, 1000), (1000, 2000), (2000, 4000), (4000, 8001)]
    want = np.stack(
        [10 * np.log10(power[:, (freqs >= lo) & (freqs < hi)].sum(axis=1) + 1) for lo, hi in bands],
        axis=1,
    )
    np.testing.assert_allclose(levels, want, rtol=1e-12)
    noise = levels[:5]
    threshold = SpeechDetector.edge_threshold(noise)
    assert threshold is not None
    want_t = noise.mean(axis=0) + np.maximum(2.0, 3.0 * noise.std(axis=0))
    np.testing.assert_allclose(threshold, want_t, rtol=1e-12)
    assert SpeechDetector.above(levels, threshold) == (levels > threshold).any(axis=1).tolist()
    assert SpeechDetector.edge_threshold(levels[:4]) is None  # too few noise frames


# -- the user's own level (rough backgrounds) --------------------------------------------


def level_state(bg_db: float, level_db: float, since: int, rough: bool = True) -> np.ndarray:
    """Kernel state with the detector's level settings and a background at `bg_db`."""
    st = SpeechDetector()._st.copy()
    st[kernel.S_BG_GATE] = 10 ** (bg_db / 10) if rough else 0.0
    st[kernel.S_BG_DB] = bg_db
    st[kernel.S_LEVEL] = level_db
    st[kernel.S_SINCE] = since
    return st


@pytest.mark.parametrize(
    ("bg_db", "level_db", "since", "rough", "frame_db", "passes"),
    [
        # After a pause (100 ms: 5 frames), a frame must reach 40% of the way from the
        # background's peak (60) to the user's level (80): 68 dB.
        (60.0, 80.0, 5, True, 67.0, False),
        (60.0, 80.0, 5, True, 69.0, True),
        (60.0, 80.0, 50, True, 67.0, False),
        # Within a run of speech, weak frames pass.
        (60.0, 80.0, 4, True, 61.0, True),
        # Steady noise (no background gate): no rule.
        (60.0, 80.0, 50, False, 61.0, True),
        # A level that is not over the background's peak was learned from it: no rule.
        (79.5, 80.0, 50, True, 61.0, True),
        # Near the background, 40% of the way (71.2) would be under the level by less
        # than 2 dB; the level minus 2 dB (71) is all that is asked.
        (70.0, 73.0, 50, True, 71.1, True),
        (70.0, 73.0, 50, True, 70.9, False),
    ],
)
def test_level_rule(
    bg_db: float, level_db: float, since: int, rough: bool, frame_db: float, passes: bool
) -> None:
    st = level_state(bg_db, level_db, since, rough)
    assert kernel._near_level(st, 10 ** (frame_db / 10)) is passes
    alpha = st[kernel.S_LEVEL_ALPHA]
    if passes:  # the level follows the frames that pass, and a near one ends the pause
        assert st[kernel.S_LEVEL] == pytest.approx(level_db + alpha * (frame_db - level_db))
        near = frame_db >= st[kernel.S_LEVEL] - 6.0
        assert st[kernel.S_SINCE] == (0 if near else since + 1)
    else:  # a rejected frame teaches nothing, and the pause goes on
        assert st[kernel.S_LEVEL] == level_db
        assert st[kernel.S_SINCE] == since + 1


def test_the_first_frame_sets_the_level() -> None:
    st = level_state(60.0, 0.0, 10**9)  # no level yet: nothing to compare with
    assert kernel._near_level(st, 10**6.1)
    assert st[kernel.S_LEVEL] == pytest.approx(61.0)
    assert st[kernel.S_SINCE] == 0


@pytest.mark.parametrize("seed", [1, 4, 6, 7])
def test_background_voices_under_the_user_stay_out_of_the_gaps(
    seed: int, speech_cache: Path
) -> None:
    """Babble 20 dB under the user: voiced, and over the background gate now and then
    (1-48 gap frames per file before the level rule), but under the user's own level.
    From 100 ms after a turn to 100 ms before the next, no frame passes."""
    conv = make_conversation(seed, n_turns=3, noise="babble", snr_db=20.0, cache_dir=speech_cache)
    frames = frames_of(conv.audio, 320)
    decisions = np.array(SpeechDetector().classify(frames))
    spans = [(b + 100, c - 100) for (_, b), (c, _) in itertools.pairwise(conv.turns)]
    gaps = voiced_mask(len(frames), spans)
    assert not decisions[gaps].any()
    assert decisions[voiced_mask(len(frames), conv.phrases)].mean() > 0.7


@pytest.mark.parametrize("sample_rate", [8000, 16000, 48000])
def test_frame_levels_are_the_gates_own_energies(sample_rate: int) -> None:
    """`frame_levels` (re-dating a turn's onset) measures frames as the per-frame gate
    does: the same numbers as the energies the kernel keeps for its block statistics."""
    detector = SpeechDetector(DetectorConfig(sample_rate=sample_rate))
    n = detector.frame_samples
    rng = np.random.default_rng(3)
    ramp = np.linspace(-8000, 8000, 30 * n)  # a slow trend that the gate leaves out
    audio = np.round(rng.normal(0, 300, 30 * n) + ramp).astype(np.int16)
    frames = audio.reshape(30, n)
    gate = []
    for frame in frames:
        k = int(detector._st[kernel.S_FILLED])
        detector.is_speech(frame)
        gate.append(10 * math.log10(detector._blk[0, k]))
    assert np.array_equal(SpeechDetector(detector.config).frame_levels(frames), gate)


def test_background_peak_is_known_only_where_the_background_is_rough(
    speech_cache: Path,
) -> None:
    rng = np.random.default_rng(5)
    for noise, rough in (("pink", False), ("music", True)):
        detector = SpeechDetector()
        audio = np.round(make_noise(noise, 3 * SAMPLE_RATE, rng) * 300).astype(np.int16)
        detector.classify(frames_of(audio, detector.frame_samples))
        assert detector.background_rough == rough
        assert (detector.background_peak_db is not None) == rough
