"""Synthetic echo scenes for the echo-aware barge-in tests and benchmark.

A *scene* is what the microphone of a client without echo cancellation hears while a
reply plays: the reply through a room (delay, attenuation, an exponentially decaying
noise impulse response), a quiet room noise, and optionally the user talking over it in a
different voice at normal level. Deterministic for a given seed; built on tests.speech.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.speech import ACTIVE_LEVEL_DBFS, SAMPLE_RATE, make_noise, rms, synth
from vad.detector import DetectorConfig, SpeechDetector
from vad.echo import EchoConfig, EchoSuppressor
from vad.turns import SpeechStart, TurnConfig, TurnDetector

FRAME = 320  # 20 ms at 16 kHz
REPLY_VOICE = ("en-us+m3", 165)  # the assistant: a low male voice
USER_VOICE = ("en+f4", 150)  # the user: a female voice, another pitch and speed
REPLY_TEXT = (
    "Sure, here is the forecast for tomorrow.",
    "In the morning it will be cloudy with a light breeze from the west.",
    "By the afternoon the sun comes out and it gets warmer, around twenty degrees.",
    "In the evening there may be a short shower, so take an umbrella.",
)
USER_TEXT = ("Wait, stop, what about Saturday?", "No, tell me about the weekend instead.")
QUESTION_TEXT = ("What will the weather be like tomorrow?",)
NOISE_DBFS = -60.0  # room noise at the microphone
BARGE_IN_DEADLINE_MS = 400.0


@dataclass(frozen=True)
class Scene:
    mic: np.ndarray  # int16, what the microphone heard
    ref: np.ndarray  # int16, the reply as played (same clock as mic, no delay)
    reply_start_ms: float  # when playback of the reply starts
    reply_end_ms: float  # when playback of the reply ends
    onset_ms: float | None  # the user's onset (None: echo only)


def room_ir(rt60_ms: float, rng: np.random.Generator, rate: int = SAMPLE_RATE) -> np.ndarray:
    """A direct path plus an exponentially decaying noise tail (energy -60 dB at rt60_ms),
    scaled to unit energy."""
    n = int(rate * rt60_ms / 1000)
    t = np.arange(n) / rate
    ir = rng.standard_normal(n) * 10 ** (-3.0 * t / (rt60_ms / 1000))  # amplitude: -60 dB
    ir[0] = 3.0 * np.abs(ir[:64]).max()  # the direct path stands out of the tail
    return ir / np.sqrt((ir * ir).sum())


def _speech(texts: tuple[str, ...], voice: tuple[str, int], gap_ms: float, cache: Path | None):
    gap = np.zeros(int(SAMPLE_RATE * gap_ms / 1000))
    parts: list[np.ndarray] = []
    for text in texts:
        parts += [synth(text, voice[0], voice[1], cache_dir=cache).astype(np.float64), gap]
    audio = np.concatenate(parts[:-1])
    voiced = np.abs(audio) > 0
    level = rms(audio[voiced])
    return audio * (32768 * 10 ** (ACTIVE_LEVEL_DBFS / 20) / level)


def make_scene(
    seed: int,
    delay_ms: float,
    atten_db: float,
    rt60_ms: float,
    *,
    barge_in: bool,
    cache_dir: Path | None = None,
    lead_ms: float = 500.0,
    question: bool = False,
) -> Scene:
    """The reply starts playing at `lead_ms`; its echo arrives `delay_ms` later,
    `atten_db` below the reply's level, through a room of `rt60_ms`. With `barge_in` the
    user starts talking 2.5-4 s into the reply. With `question` the user's question comes
    first, then `lead_ms` of room noise (a reply follows a turn: end-of-turn silence plus
    the provider's latency), so the suppressor starts with speech in its history."""
    rng = np.random.default_rng(seed)
    reply = _speech(REPLY_TEXT, REPLY_VOICE, 250.0, cache_dir)
    asked = _speech(QUESTION_TEXT, USER_VOICE, 200.0, cache_dir) if question else np.zeros(0)
    start = len(asked) + int(SAMPLE_RATE * lead_ms / 1000)
    total = start + len(reply) + SAMPLE_RATE * 2
    ref = np.zeros(total)
    ref[start : start + len(reply)] = reply
    echo = np.convolve(ref, room_ir(rt60_ms, rng))[:total]
    shift = int(SAMPLE_RATE * delay_ms / 1000)
    echo = np.concatenate([np.zeros(shift), echo[: total - shift]])
    played = echo[start + shift : start + shift + len(reply)]
    echo *= 10 ** (-atten_db / 20) * rms(reply) / rms(played)  # atten_db below the reply
    noise = make_noise("pink", total, rng)
    mic = echo + noise * (32768 * 10 ** (NOISE_DBFS / 20) / rms(noise))
    mic[: len(asked)] += asked
    onset_ms = None
    if barge_in:
        user = _speech(USER_TEXT, USER_VOICE, 200.0, cache_dir)
        at = start + int(SAMPLE_RATE * rng.uniform(2.5, 4.0))
        end = min(total, at + len(user))
        mic[at:end] += user[: end - at]
        onset_ms = at * 1000 / SAMPLE_RATE
    clip = lambda x: np.clip(np.round(x), -32768, 32767).astype(np.int16)  # noqa: E731
    return Scene(
        clip(mic),
        clip(ref),
        start * 1000 / SAMPLE_RATE,
        (start + len(reply)) * 1000 / SAMPLE_RATE,
        onset_ms,
    )


def barge_in_ms(scene: Scene, echo_aware: bool, min_barge_in_ms: int = 300) -> float | None:
    """When the default turn detector (fed as VAD mode feeds it) would interrupt the
    reply: the first frame, while the reply plays, at which speech has lasted
    `min_barge_in_ms`. None if it never would."""
    detector = TurnDetector(TurnConfig(), SpeechDetector(DetectorConfig()))
    echo = EchoSuppressor(EchoConfig()) if echo_aware else None
    mic, ref = scene.mic.tobytes(), scene.ref.tobytes()
    step = 2 * FRAME
    for i in range(0, len(mic) - step + 1, step):
        pcm = mic[i : i + step]
        if echo is not None:
            pcm = echo.process(pcm, ref[i : i + step])
        detector.push_pcm(pcm)
        now = (i + step) / 2 * 1000 / SAMPLE_RATE
        if now > scene.reply_end_ms:
            return None
        if now <= scene.reply_start_ms:
            continue  # the question (if any): the user's own turn
        if detector.state not in ("speaking", "stopping"):
            continue
        # As VAD mode decides: the user's onset the echo hid counts too.
        credit = echo.onset_credit_ms if echo is not None else 0.0
        if detector.speech_ms + credit >= min_barge_in_ms:
            return now
    return None


def speech_starts(scene: Scene, echo_aware: bool) -> list[float]:
    """Onsets (ms) of every turn the default turn detector opens once the reply starts,
    echo tail included: with echo alone, each one would be answered as the user's turn."""
    detector = TurnDetector(TurnConfig(), SpeechDetector(DetectorConfig()))
    echo = EchoSuppressor(EchoConfig()) if echo_aware else None
    n = len(scene.mic) // FRAME * FRAME
    mic, ref = scene.mic[:n].tobytes(), scene.ref[:n].tobytes()
    starts: list[float] = []
    for i in range(0, len(mic), 2 * FRAME):
        pcm = mic[i : i + 2 * FRAME]
        if echo is not None:
            pcm = echo.process(pcm, ref[i : i + 2 * FRAME])
        starts += [e.start_ms for e in detector.push_pcm(pcm) if isinstance(e, SpeechStart)]
    return [t for t in starts if t >= scene.reply_start_ms]
