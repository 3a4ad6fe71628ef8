"""Synthetic speech and noise for VAD/turn-taking tests and benchmarks.

Speech comes from espeak-ng, so every run is reproducible and the ground truth is exact:
each phrase is trimmed to its audible extent *before* it is placed in a conversation, so
the truth times are known to the sample rather than hand-labelled.

A *conversation* is what one user says into the microphone: turns separated by long gaps
(1.5-2.5 s, which must end a turn), each turn made of 1-3 phrases separated by short pauses
(120-300 ms, which must not). Noise is mixed at an SNR measured against the speech RMS over
the voiced phrase extents only, so pauses and gaps do not flatter the SNR.

Everything is deterministic for a given seed. Synthesis results can be cached in a directory
(``cache_dir``), e.g. a pytest session temp dir; caching is optional because espeak-ng is fast.

API: ``synth(text, voice, speed) -> int16 16 kHz``; ``make_conversation(seed, n_turns,
voices, speeds, noise, snr_db) -> Conversation(audio, turns, phrases, texts, speakers)``;
``make_noise``/``mix_at_snr`` for noise alone; ``resample``, ``trim``, ``frames_of``.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tempfile
import wave
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

SAMPLE_RATE = 16000
TRIM_DB = -40.0  # a phrase starts/ends where |x| first/last reaches this level re its peak
ACTIVE_LEVEL_DBFS = -26.0  # speech active level (ITU-T P.56 style nominal level)

ENGLISH_VOICES: tuple[str, ...] = ("en", "en-us", "en+f3", "en-us+m3", "en+f4")
VOICES: tuple[str, ...] = (*ENGLISH_VOICES, "de")
SPEEDS: tuple[int, ...] = (130, 165, 200)
NOISES: tuple[str, ...] = ("white", "pink", "hum")
#: Real-room noises beyond the stationary three: 1/f ("pink-full") and 1/f^2 ("brown")
#: noise whose spectrum continues below 20 Hz (wind, HVAC, traffic, handling; the SNR is
#: still measured over the full band), low-frequency "rumble" whose level swings slowly,
#: "babble" (several quiet voices), "music" (chords and a melody) and "keyboard" clicks.
WIDE_NOISES: tuple[str, ...] = ("pink-full", "brown", "rumble", "babble", "music", "keyboard")
ALL_NOISES: tuple[str, ...] = (*NOISES, *WIDE_NOISES)

PHRASES_EN: tuple[str, ...] = (
    "Hello there, how are you today?",
    "Could you tell me the weather for tomorrow?",
    "I would like to book a table for two.",
    "So, shall we start the meeting now?",
    "Please turn the lights off in the kitchen.",
    "What time does the train leave?",
    "Seven thirty would be perfect.",
    "Remind me to call my sister tonight.",
    "Fine, thanks.",
    "That sounds like a good plan.",
    "Can you play some quiet music?",
    "Set a timer for fifteen minutes.",
    "How far is it to the nearest station?",
    "Yes, exactly.",
    "Send the report to the whole team.",
    "Thursday works better for me.",
    "Add milk and bread to the shopping list.",
    "Why is the sky blue?",
    "Let me think about it for a second.",
    "Show me pictures of the mountains.",
    "Actually, make that three people.",
    "No, the other one.",
    "Translate this sentence into French.",
    "How many kilometres is a marathon?",
    "Start a new paragraph here.",
    "Okay.",
    "Tell me a short story about a fox.",
    "Where did I park the car?",
)
PHRASES_DE: tuple[str, ...] = (
    "Guten Morgen, wie geht es dir?",
    "Fünf schöne Fische schwimmen im Teich.",
    "Kannst du das bitte wiederholen?",
    "Ich möchte einen Tisch reservieren.",
    "Wie spät ist es jetzt?",
    "Schalte bitte das Licht aus.",
    "Das klingt gut.",
    "Morgen regnet es wahrscheinlich.",
)


@dataclass(frozen=True)
class Conversation:
    """Mixed audio plus exact ground truth (all times in ms from the first sample)."""

    audio: np.ndarray  # int16 mono at `sample_rate`
    turns: list[tuple[float, float]]  # (onset_ms, end_ms) of the voiced extent of each turn
    phrases: list[tuple[float, float]]  # (onset_ms, end_ms) of every phrase
    texts: list[str]  # what each phrase says
    speakers: list[tuple[str, int]]  # (voice, speed) of each turn
    sample_rate: int = SAMPLE_RATE

    @property
    def duration_ms(self) -> float:
        return len(self.audio) * 1000.0 / self.sample_rate


def _espeak_wav(text: str, voice: str, speed: int) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.wav"
        subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(out), text],
            check=True,
            capture_output=True,
        )
        return out.read_bytes()


def _read_wav(data: bytes) -> tuple[np.ndarray, int]:
    with wave.open(io.BytesIO(data)) as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise ValueError("expected 16-bit mono WAV from espeak-ng")
        return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16), w.getframerate()


def resample(audio: np.ndarray, rate_in: int, rate_out: int = SAMPLE_RATE) -> np.ndarray:
    """Resample int16 mono audio with libswresample (PyAV), flushing its delay line."""
    if rate_in == rate_out:
        return audio.astype(np.int16, copy=True)
    resampler = av.AudioResampler(format="s16", layout="mono", rate=rate_out)
    frame = av.AudioFrame.from_ndarray(
        np.ascontiguousarray(audio, dtype=np.int16).reshape(1, -1), format="s16", layout="mono"
    )
    frame.sample_rate = rate_in
    out = resampler.resample(frame) + resampler.resample(None)
    return np.concatenate([f.to_ndarray().reshape(-1) for f in out]).astype(np.int16)


def trim(audio: np.ndarray, threshold_db: float = TRIM_DB) -> np.ndarray:
    """Cut leading/trailing samples quieter than `threshold_db` relative to the peak."""
    mag = np.abs(audio.astype(np.int32))
    peak = int(mag.max(initial=0))
    if peak == 0:
        raise ValueError("audio is silent")
    loud = np.flatnonzero(mag >= peak * 10 ** (threshold_db / 20))
    return audio[loud[0] : loud[-1] + 1]


def synth(
    text: str, voice: str = "en", speed: int = 165, cache_dir: Path | None = None
) -> np.ndarray:
    """Speak `text` with espeak-ng; return int16 mono 16 kHz trimmed to its audible extent."""
    cache_file = None
    if cache_dir is not None:
        key = hashlib.sha256(f"{voice}|{speed}|{text}|{TRIM_DB}".encode()).hexdigest()[:24]
        cache_file = Path(cache_dir) / f"{key}.npy"
        if cache_file.exists():
            return np.load(cache_file)
    raw, rate = _read_wav(_espeak_wav(text, voice, speed))
    audio = trim(resample(raw, rate))
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_file.parent, suffix=".npy")
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, audio)
        os.replace(tmp, cache_file)  # atomic, so parallel workers never read half a file
    return audio


def rms(x: np.ndarray) -> float:
    x = x.astype(np.float64)
    return float(np.sqrt(np.mean(x * x))) if len(x) else 0.0


def white_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(n)


def pink_noise(
    n: int, rng: np.random.Generator, low_hz: float = 20.0, rate: int = SAMPLE_RATE
) -> np.ndarray:
    """1/f power spectrum from `low_hz` to Nyquist, by shaping white noise with an FFT.

    Band-limited at 20 Hz like any microphone chain: unbounded 1/f noise would put about
    half its power below 20 Hz, where it is inaudible and would make the SNR meaningless.
    """
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / rate)
    shape = np.zeros_like(f)
    audible = f >= low_hz
    shape[audible] = 1.0 / np.sqrt(f[audible])
    return np.fft.irfft(spec * shape, n)


def hum_noise(
    n: int, rng: np.random.Generator, mains_hz: float | None = None, rate: int = SAMPLE_RATE
) -> np.ndarray:
    """Mains hum: 50 or 60 Hz plus 7 harmonics with random phases, as from a ground loop."""
    base = mains_hz if mains_hz is not None else float(rng.choice([50.0, 60.0]))
    t = np.arange(n) / rate
    amps = (1.0, 0.6, 0.45, 0.3, 0.25, 0.2, 0.15, 0.1)
    phases = rng.uniform(0, 2 * np.pi, len(amps))
    return sum(
        a * np.sin(2 * np.pi * base * (k + 1) * t + p)
        for k, (a, p) in enumerate(zip(amps, phases, strict=True))
    )


def _shaped(n: int, rng: np.random.Generator, exponent: float, rate: int) -> np.ndarray:
    """Noise with a 1/f^exponent power spectrum down to the lowest FFT bin (no floor)."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / rate)
    shape = np.zeros_like(f)
    shape[1:] = f[1:] ** (-exponent / 2)
    return np.fft.irfft(spec * shape, n)


def pink_full_noise(n: int, rng: np.random.Generator, rate: int = SAMPLE_RATE) -> np.ndarray:
    """1/f noise with no 20 Hz floor: most of its power lies below the speech band."""
    return _shaped(n, rng, 1.0, rate)


def brown_noise(n: int, rng: np.random.Generator, rate: int = SAMPLE_RATE) -> np.ndarray:
    """1/f^2 (Brownian) noise with no floor, as wind or handling noise."""
    return _shaped(n, rng, 2.0, rate)


def rumble_noise(n: int, rng: np.random.Generator, rate: int = SAMPLE_RATE) -> np.ndarray:
    """HVAC/traffic rumble: 1/f noise from the lowest FFT bin up to ~300 Hz (24 dB/octave
    roll-off above), its level swinging slowly by up to +-6 dB (two random sinusoids in
    dB, periods 3-9 s), over a quiet pink bed 25 dB down. About a tenth of its power lies
    within the speech band (100-300 Hz), so a high-pass filter alone does not remove it."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / rate)
    shape = np.zeros_like(f)
    shape[1:] = f[1:] ** -0.5 / (1.0 + (f[1:] / 300.0) ** 4)
    low = np.fft.irfft(spec * shape, n)
    t = np.arange(n) / rate
    swing_db = sum(
        3.0 * np.sin(2 * np.pi * t / rng.uniform(3.0, 9.0) + rng.uniform(0, 2 * np.pi))
        for _ in range(2)
    )
    low = low / rms(low) * 10 ** (swing_db / 20)
    bed = pink_noise(n, rng, rate=rate)
    return low + bed / rms(bed) * 10 ** (-25 / 20)


def music_noise(n: int, rng: np.random.Generator, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Background music: a chord (three harmonic tones) every 1-2 s and a melody of
    0.15-0.5 s notes over it, each note with a fast attack and exponential decay."""
    out = np.zeros(n)
    t_all = np.arange(n) / rate

    def note(start: int, length: int, hz: float, amp: float, decay_s: float) -> None:
        end = min(n, start + length)
        t = t_all[: end - start]
        env = np.minimum(1.0, t / 0.01) * np.exp(-t / decay_s)
        tone = sum(0.6**k * np.sin(2 * np.pi * hz * (k + 1) * t) for k in range(5))
        out[start:end] += amp * env * tone

    scale = 220.0 * 2 ** (np.array([0, 2, 4, 5, 7, 9, 11, 12]) / 12)
    pos = 0
    while pos < n:  # chords
        length = int(rng.uniform(1.0, 2.0) * rate)
        root = int(rng.integers(0, 4))
        for step in (0, 2, 4):
            note(pos, length, float(scale[root + step]) / 2, 0.5, 1.0)
        pos += length
    pos = 0
    while pos < n:  # melody
        length = int(rng.uniform(0.15, 0.5) * rate)
        note(pos, length, float(rng.choice(scale)) * 2, 0.7, 0.3)
        pos += length
    return out


def keyboard_noise(n: int, rng: np.random.Generator, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Typing: clicks (3-12 ms bursts of band-passed noise, decaying, each press with a
    softer release) every 80-350 ms, in bursts of 3-15 keys with 0.5-2 s rests."""
    out = np.zeros(n)
    pos = int(rng.uniform(0, 0.5) * rate)
    while pos < n:
        for _ in range(int(rng.integers(3, 16))):
            for offset, amp in ((0, 1.0), (int(rng.uniform(0.06, 0.12) * rate), 0.4)):
                length = int(rng.uniform(0.003, 0.012) * rate)
                start = pos + offset
                if start + length >= n:
                    break
                burst = np.diff(rng.standard_normal(length + 1))  # +6 dB/octave: clicky
                env = np.exp(-np.arange(length) / (length / 4))
                out[start : start + length] += amp * rng.uniform(0.5, 1.0) * burst * env
            pos += int(rng.uniform(0.08, 0.35) * rate)
        pos += int(rng.uniform(0.5, 2.0) * rate)
    return out


def babble_noise(
    n: int,
    rng: np.random.Generator,
    rate: int = SAMPLE_RATE,
    voices: int = 5,
    cache_dir: Path | None = None,
) -> np.ndarray:
    """Several people talking at once, none of them to us: `voices` streams of espeak-ng
    phrases (each its own voice, speed and random start) summed at equal levels."""
    if rate != SAMPLE_RATE:
        raise ValueError("babble is made at 16 kHz")
    out = np.zeros(n)
    for _ in range(voices):
        voice = str(rng.choice(list(ENGLISH_VOICES)))
        speed = int(rng.choice(list(SPEEDS)))
        pos = -int(rng.uniform(0, 2.0) * rate)
        while pos < n:
            clip = synth(str(rng.choice(list(PHRASES_EN))), voice, speed, cache_dir)
            clip = clip.astype(np.float64) / rms(clip)
            a, b = max(pos, 0), min(pos + len(clip), n)
            if b > a:
                out[a:b] += clip[a - pos : b - pos]
            pos += len(clip) + int(rng.uniform(0.05, 0.4) * rate)
    return out


def make_noise(
    kind: str, n: int, rng: np.random.Generator, cache_dir: Path | None = None
) -> np.ndarray:
    """Unit-free float noise of the given kind (one of `ALL_NOISES`)."""
    if kind == "babble":
        return babble_noise(n, rng, cache_dir=cache_dir)
    makers = {
        "white": white_noise,
        "pink": pink_noise,
        "hum": hum_noise,
        "pink-full": pink_full_noise,
        "brown": brown_noise,
        "rumble": rumble_noise,
        "music": music_noise,
        "keyboard": keyboard_noise,
    }
    if kind not in makers:
        raise ValueError(f"unknown noise {kind!r}; expected one of {sorted(ALL_NOISES)}")
    return makers[kind](n, rng)


def mix_at_snr(
    speech: np.ndarray,
    noise: np.ndarray,
    snr_db: float,
    voiced: Sequence[tuple[int, int]] | None = None,
) -> np.ndarray:
    """Add `noise` scaled so speech RMS (over `voiced` sample spans) / noise RMS = `snr_db`."""
    if len(noise) != len(speech):
        raise ValueError("speech and noise lengths differ")
    spans = voiced if voiced is not None else [(0, len(speech))]
    speech_rms = rms(np.concatenate([speech[a:b] for a, b in spans]))
    noise_rms = rms(noise)
    if speech_rms == 0 or noise_rms == 0:
        raise ValueError("cannot set an SNR with silent speech or noise")
    gain = speech_rms / noise_rms / 10 ** (snr_db / 20)
    mixed = speech.astype(np.float64) + noise * gain
    return np.clip(np.round(mixed), -32768, 32767).astype(np.int16)


def _ms(samples: int, rate: int = SAMPLE_RATE) -> float:
    return samples * 1000.0 / rate


def make_conversation(
    seed: int,
    n_turns: int = 3,
    voices: Sequence[str] = VOICES,
    speeds: Sequence[int] = SPEEDS,
    noise: str | None = None,
    snr_db: float | None = None,
    *,
    pause_ms: tuple[float, float] = (120.0, 300.0),
    gap_ms: tuple[float, float] = (1500.0, 2500.0),
    lead_ms: tuple[float, float] = (300.0, 1000.0),
    max_phrases: int = 3,
    step_back_db: tuple[float, float] | None = None,
    cache_dir: Path | None = None,
) -> Conversation:
    """Build a deterministic multi-turn conversation with exact turn boundaries.

    Each turn has one voice and speed (drawn from `voices`/`speeds`), 1..`max_phrases`
    phrases, and a level within +-4 dB of -26 dBFS so the detector cannot rely on a fixed
    loudness. German text is used for German voices.

    step_back_db: the speaker steps back from the microphone halfway through: from turn
    ``n_turns // 2`` on, speech is quieter by a random amount in this range (dB). The
    SNR is then measured over the quieter part, so the far speech has `snr_db`.
    """
    if (noise is None) != (snr_db is None):
        raise ValueError("give both noise and snr_db, or neither")
    rng = np.random.default_rng(seed)
    target_rms = 32768 * 10 ** (ACTIVE_LEVEL_DBFS / 20)
    pieces: list[np.ndarray] = []
    pos = 0
    turns: list[tuple[float, float]] = []
    phrases: list[tuple[float, float]] = []
    voiced: list[tuple[int, int]] = []
    spoken: list[str] = []
    speakers: list[tuple[str, int]] = []

    def add_silence(lo_hi: tuple[float, float]) -> None:
        nonlocal pos
        n = int(rng.uniform(*lo_hi) * SAMPLE_RATE / 1000)
        pieces.append(np.zeros(n))
        pos += n

    add_silence(lead_ms)
    far: list[tuple[int, int]] = []  # voiced spans after the step back
    drop_db = rng.uniform(*step_back_db) if step_back_db is not None else 0.0
    for turn in range(n_turns):
        voice = str(rng.choice(list(voices)))
        speed = int(rng.choice(list(speeds)))
        texts = PHRASES_DE if voice.split("+")[0] == "de" else PHRASES_EN
        gain_db = rng.uniform(-4.0, 4.0)
        stepped_back = step_back_db is not None and turn >= n_turns // 2
        if stepped_back:
            gain_db -= drop_db
        speakers.append((voice, speed))
        turn_start = pos
        for p in range(int(rng.integers(1, max_phrases + 1))):
            if p:
                add_silence(pause_ms)
            text = str(rng.choice(list(texts)))
            spoken.append(text)
            clip = synth(text, voice, speed, cache_dir).astype(np.float64)
            clip *= target_rms * 10 ** (gain_db / 20) / rms(clip)
            pieces.append(clip)
            voiced.append((pos, pos + len(clip)))
            if stepped_back:
                far.append(voiced[-1])
            phrases.append((_ms(pos), _ms(pos + len(clip))))
            pos += len(clip)
        turns.append((_ms(turn_start), _ms(pos)))
        add_silence(gap_ms if turn < n_turns - 1 else (gap_ms[0], gap_ms[0]))
    speech = np.concatenate(pieces)
    if noise is None:
        audio = np.clip(np.round(speech), -32768, 32767).astype(np.int16)
    else:
        assert snr_db is not None
        noise_audio = make_noise(noise, len(speech), rng, cache_dir)
        audio = mix_at_snr(speech, noise_audio, snr_db, far or voiced)
    return Conversation(audio, turns, phrases, spoken, speakers)


def frames_of(audio: np.ndarray, frame_samples: int) -> np.ndarray:
    """Whole frames of `audio` as a (n, frame_samples) view; a trailing partial frame is dropped."""
    n = len(audio) // frame_samples
    return audio[: n * frame_samples].reshape(n, frame_samples)
