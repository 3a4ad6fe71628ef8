"""TurnDetector on synthetic conversations: turn boundaries, chunking, edge cases."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.speech import (
    ENGLISH_VOICES,
    NOISES,
    PHRASES_EN,
    SAMPLE_RATE,
    VOICES,
    WIDE_NOISES,
    Conversation,
    frames_of,
    make_conversation,
    make_noise,
    mix_at_snr,
    rms,
    synth,
)
from vad.detector import DetectorConfig, SpeechDetector
from vad.turns import (
    SpeechEnd,
    SpeechStart,
    TurnConfig,
    TurnDetector,
    TurnDiscard,
    TurnEnd,
    TurnEvent,
    TurnState,
)

ONSET_TOLERANCE_MS = 100.0
END_TOLERANCE_MS = 350.0  # weak final consonants vanish under 5 dB noise
FRAME = 320


@pytest.fixture(scope="session")
def speech_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("speech")


def detector(**turn_kwargs: int) -> TurnDetector:
    return TurnDetector(TurnConfig(**turn_kwargs), SpeechDetector())


def run(td: TurnDetector, audio: np.ndarray) -> list[TurnEvent]:
    return td.push_many(frames_of(audio, td.detector.frame_samples)) + td.flush()


def ended(events: list[TurnEvent]) -> list[TurnEnd]:
    return [e for e in events if isinstance(e, TurnEnd)]


def ms(n: int) -> np.ndarray:
    """n ms of digital silence."""
    return np.zeros(n * SAMPLE_RATE // 1000, dtype=np.int16)


def assert_turns_match(conv: Conversation, events: list[TurnEvent]) -> None:
    turns = ended(events)
    found = [(round(t.start_ms), round(t.end_ms)) for t in turns]
    truth = [(round(a), round(b)) for a, b in conv.turns]
    assert len(turns) == len(conv.turns), f"found {found}, truth {truth}"
    for turn, (start, end) in zip(turns, conv.turns, strict=True):
        assert abs(turn.start_ms - start) <= ONSET_TOLERANCE_MS, f"found {found}, truth {truth}"
        assert abs(turn.end_ms - end) <= END_TOLERANCE_MS, f"found {found}, truth {truth}"
    kinds = [type(e) for e in events]
    assert kinds == [SpeechStart, SpeechEnd, TurnEnd] * len(conv.turns)


# -- conversations --------------------------------------------------------------------


@pytest.mark.parametrize("snr_db", [20.0, 10.0, 5.0])
@pytest.mark.parametrize("noise", NOISES)
@pytest.mark.parametrize("seed", [1, 2])
def test_turns_in_noise(seed: int, noise: str, snr_db: float, speech_cache: Path) -> None:
    """Every voice and speed at random; phrase pauses of 120-300 ms, gaps of 1.5-2.5 s."""
    conv = make_conversation(seed, n_turns=3, noise=noise, snr_db=snr_db, cache_dir=speech_cache)
    assert_turns_match(conv, run(detector(), conv.audio))


# Known gaps (BENCHMARKS.md, "Turn-taking v2"): babble and music are speech-like to an
# energy-and-webrtcvad detector. The background-peak gate and the user's level stop most
# of their merges, and re-dating a turn's onset by its level fixes most onsets, but some
# are still dated over 100 ms off, some turns still merge, and a few of their sounds make
# turns of their own. One keyboard onset at 5 dB is 100 ms late. Strict: a case that
# starts passing fails here until it is taken off the list.
_KNOWN_GAPS = {
    (1, "keyboard", 5.0),
    (2, "babble", 10.0),
    (2, "babble", 5.0),
}


@pytest.mark.parametrize(
    ("seed", "noise", "snr_db"),
    [
        pytest.param(
            seed,
            noise,
            snr,
            marks=[pytest.mark.xfail(strict=True, reason="known gap, see BENCHMARKS.md")]
            if (seed, noise, snr) in _KNOWN_GAPS
            else [],
        )
        for seed in (1, 2)
        for noise in WIDE_NOISES
        for snr in (20.0, 10.0, 5.0)
    ],
)
def test_turns_in_real_noise(seed: int, noise: str, snr_db: float, speech_cache: Path) -> None:
    """1/f and brown noise with no 20 Hz floor (rumble from wind, HVAC, handling: SNR
    over the full band), rumble with slow level swings, babble, music, typing."""
    conv = make_conversation(seed, n_turns=3, noise=noise, snr_db=snr_db, cache_dir=speech_cache)
    assert_turns_match(conv, run(detector(), conv.audio))


def background_moment_scene(seed: int, cache: Path) -> tuple[np.ndarray, float]:
    """Babble 20 dB under the user; 1.5 s in, another voice 4 dB over the babble (16 dB
    under the user) for 500 ms; the user starts 150 ms after it. Returns the audio and
    the user's onset in ms."""
    rng = np.random.default_rng(seed)
    user = synth("Could you tell me the weather for tomorrow?", "en", 165, cache)
    user = user * (32768 * 10 ** (-26 / 20) / rms(user))
    moment = synth("That sounds like a good plan.", "en+f3", 200, cache)[: SAMPLE_RATE // 2]
    lead, onset = 3 * SAMPLE_RATE // 2, 3 * SAMPLE_RATE // 2 + len(moment) + 150 * 16
    speech = np.zeros(onset + len(user) + 2 * SAMPLE_RATE)
    speech[onset : onset + len(user)] = user
    noise = make_noise("babble", len(speech), rng, cache)
    noise *= rms(user) / rms(noise) / 10 ** (20 / 20)
    noise[lead : lead + len(moment)] += moment * (rms(user) / rms(moment) * 10 ** (-16 / 20))
    audio = np.clip(np.round(speech + noise), -32768, 32767).astype(np.int16)
    return audio, onset * 1000 / SAMPLE_RATE


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_a_loud_background_moment_before_the_user_is_not_the_onset(
    seed: int, speech_cache: Path
) -> None:
    """The background voice opens the turn (the user's level is not known yet) and the
    user's speech follows within `stop_ms`: one turn, which started 370-1730 ms early
    before turns were re-dated at their end. speech.started keeps the early estimate; the
    turn (turn.ended) is re-dated, and its audio starts `pre_roll_ms` before that."""
    audio, onset_ms = background_moment_scene(seed, speech_cache)
    events = run(detector(), audio)
    (turn,) = ended(events)
    (start,) = [e for e in events if isinstance(e, SpeechStart)]
    assert start.start_ms < onset_ms - ONSET_TOLERANCE_MS  # opened on the background
    assert abs(turn.start_ms - onset_ms) <= ONSET_TOLERANCE_MS
    assert turn.audio_start_ms == turn.start_ms - 300
    first = round(turn.audio_start_ms * SAMPLE_RATE / 1000)
    assert np.array_equal(turn.audio, audio[first : first + len(turn.audio)])


@pytest.mark.parametrize(
    ("noise", "seed"),
    [
        ("music", 16),
        pytest.param(
            "music",
            26,
            marks=pytest.mark.xfail(
                strict=True,
                reason="known gap: the onset is re-dated 116 ms late. It passed only while "
                "a whole-file push let the edge read the background's state of later frames "
                "(test_rough_backgrounds_give_the_same_turns_however_chunked)",
            ),
        ),
        ("music", 32),
        ("babble", 28),
    ],
)
def test_an_onset_under_the_backgrounds_peaks_is_found(
    noise: str, seed: int, speech_cache: Path
) -> None:
    """Music or babble 10 dB under the user: the user's first sounds are under the
    background's peaks, and a short first syllable does not hold the turn open; onsets
    came 110-350 ms late before turns were re-dated by their level (these seeds are the
    scenes of seeds 10-39 where that happened)."""
    conv = make_conversation(seed, n_turns=3, noise=noise, snr_db=10.0, cache_dir=speech_cache)
    assert_turns_match(conv, run(detector(), conv.audio))


@pytest.mark.parametrize("idle_history_ms", [None, 0])
def test_redated_onsets_do_not_depend_on_chunking(
    idle_history_ms: int | None, speech_cache: Path
) -> None:
    """Re-dating reads the audio before the onset: the same events however the audio
    came, and with the least idle history."""
    conv = make_conversation(18, n_turns=3, noise="babble", snr_db=20.0, cache_dir=speech_cache)
    frames = frames_of(conv.audio, FRAME)
    td = detector(idle_history_ms=idle_history_ms)
    reference = [e for frame in frames for e in td.push(frame)] + td.flush()
    starts = [e.start_ms for e in reference if isinstance(e, SpeechStart)]
    assert [t.start_ms for t in ended(reference)] != starts  # some onset was re-dated
    for sizes in ([7], [1, 3, 50], [60, 2]):
        td, events = detector(idle_history_ms=idle_history_ms), []
        i = k = 0
        while i < len(frames):
            events += td.push_many(frames[i : i + sizes[k % len(sizes)]])
            i, k = i + sizes[k % len(sizes)], k + 1
        assert events + td.flush() == reference


@pytest.mark.parametrize(
    ("noise", "snr_db", "seed"),
    [("babble", 10.0, 0), ("babble", 20.0, 7), ("music", 10.0, 1), ("music", 20.0, 0)],
)
def test_rough_backgrounds_give_the_same_turns_however_chunked(
    noise: str, snr_db: float, seed: int, speech_cache: Path
) -> None:
    """The background's state (its typical peak, whether it is rough) moves once per
    detector block; turn edges read it. A 1 s push once classified all its frames before
    stepping the first, so an edge read the state of up to 49 frames later: 20 of 48
    babble and music scenes got other turns from 1 s pushes than from 20 ms ones."""
    conv = make_conversation(seed, n_turns=3, noise=noise, snr_db=snr_db, cache_dir=speech_cache)
    pcm = frames_of(conv.audio, FRAME).tobytes()

    def events(frames_per_push: int) -> list[TurnEvent]:
        td, step = detector(), 2 * FRAME * frames_per_push
        return [e for i in range(0, len(pcm), step) for e in td.push_pcm(pcm[i : i + step])] + (
            td.flush()
        )

    reference = events(1)
    assert ended(reference)
    for frames_per_push in (5, 17, 50, 200):
        assert events(frames_per_push) == reference, frames_per_push


@pytest.mark.parametrize("snr_db", [20.0, 10.0, 5.0])
def test_turns_when_the_speaker_steps_back(snr_db: float, speech_cache: Path) -> None:
    """Speech 10-15 dB quieter from the middle turn on, in pink noise (SNR of the far
    speech)."""
    conv = make_conversation(
        3, n_turns=4, noise="pink", snr_db=snr_db, step_back_db=(10.0, 15.0), cache_dir=speech_cache
    )
    assert_turns_match(conv, run(detector(), conv.audio))


@pytest.mark.parametrize("speed", [130, 165, 200])
@pytest.mark.parametrize("voice", VOICES)
def test_each_voice_and_speed_clean(voice: str, speed: int, speech_cache: Path) -> None:
    conv = make_conversation(11, n_turns=2, voices=[voice], speeds=[speed], cache_dir=speech_cache)
    assert_turns_match(conv, run(detector(), conv.audio))


@pytest.mark.parametrize("pause_ms", [120.0, 200.0, 300.0])
def test_short_pauses_do_not_end_a_turn(pause_ms: float, speech_cache: Path) -> None:
    conv = make_conversation(
        21,
        n_turns=2,
        voices=ENGLISH_VOICES,
        noise="white",
        snr_db=10.0,
        pause_ms=(pause_ms, pause_ms),
        max_phrases=3,
        cache_dir=speech_cache,
    )
    assert len(conv.phrases) > len(conv.turns)  # some turns really have pauses
    assert_turns_match(conv, run(detector(), conv.audio))


def test_gaps_over_1300_ms_end_a_turn(speech_cache: Path) -> None:
    conv = make_conversation(
        22, n_turns=4, gap_ms=(1310.0, 1350.0), noise="pink", snr_db=10.0, cache_dir=speech_cache
    )
    assert_turns_match(conv, run(detector(), conv.audio))


# -- the background in the user's gap ----------------------------------------------------

TARGET_RMS = 32768 * 10 ** (-26 / 20)


def voice_in_the_gap(seed: int, cache: Path) -> tuple[np.ndarray, Conversation]:
    """Two turns in babble at 10 dB SNR, 2 s apart. In the gap another talker (another
    voice, 10 dB under the user) speaks without a break, from 100 ms after the first
    turn to 100 ms before the second: as loud as the babble's louder moments."""
    conv = make_conversation(
        seed,
        n_turns=2,
        voices=("en",),
        noise="babble",
        snr_db=10.0,
        gap_ms=(2000.0, 2000.0),
        cache_dir=cache,
    )
    (a0, a1), (b0, _) = conv.turns
    user_rms = rms(conv.audio[int(a0 * 16) : int(a1 * 16)].astype(np.float64))
    out = conv.audio.astype(np.float64)
    pos, stop, k = int((a1 + 100) * 16), int((b0 - 100) * 16), seed
    while pos < stop:
        clip = synth(PHRASES_EN[k % len(PHRASES_EN)], "en-us+m3", 165, cache).astype(np.float64)
        clip *= user_rms * 10 ** (-10 / 20) / rms(clip)
        n = min(len(clip), stop - pos)
        out[pos : pos + n] += clip[:n]
        pos, k = pos + n + 1600, k + 1  # 100 ms between phrases
    return np.clip(np.round(out), -32768, 32767).astype(np.int16), conv


@pytest.mark.parametrize("seed", range(8))
def test_a_voice_under_the_user_in_the_gap_does_not_merge_turns(
    seed: int, speech_cache: Path
) -> None:
    """Before the turn machine compared a resumption with the turn's own level, the
    talker resumed the first turn again and again, and both turns came out as one
    (4 of these 8 scenes). Now what stands under the turn's level and near the
    background's peaks is silence for the end of turn. (Its onset is not judged: the
    talker may open the next turn early, which is the onset's business.)"""
    audio, conv = voice_in_the_gap(seed, speech_cache)
    turns = ended(run(detector(), audio))
    _, (b0, b1) = conv.turns
    assert len(turns) == 2, [(t.start_ms, t.end_ms) for t in turns]
    assert turns[0].end_ms < b0 - 100  # the first turn ended in the gap
    assert abs(turns[1].end_ms - b1) <= END_TOLERANCE_MS


@pytest.mark.parametrize("frames_per_push", [5, 50])
def test_the_background_check_does_not_depend_on_chunking(
    frames_per_push: int, speech_cache: Path
) -> None:
    """The check reads the push being stepped: pushes of 100 ms and 1 s give the events of
    20 ms pushes (a scene where the check decides: it merged before)."""
    audio, _ = voice_in_the_gap(4, speech_cache)
    pcm = frames_of(audio, FRAME).tobytes()

    def events(step: int) -> list[TurnEvent]:
        td = detector()
        out = [e for i in range(0, len(pcm), step) for e in td.push_pcm(pcm[i : i + step])]
        return out + td.flush()

    reference = events(2 * FRAME)
    assert len(ended(reference)) == 2
    assert events(2 * FRAME * frames_per_push) == reference


def softer_continuation(seed: int, soft_db: float, cache: Path) -> tuple[np.ndarray, float]:
    """One turn in babble at 20 dB SNR: a phrase, then after 250 ms pauses two more
    `soft_db` softer (the user turned away). Returns the audio and the turn's end (ms)."""
    rng = np.random.default_rng(seed)
    clips = [
        synth(PHRASES_EN[(3 * seed + j) % len(PHRASES_EN)], "en", 165, cache) for j in range(3)
    ]
    gains = [1.0, 10 ** (-soft_db / 20), 10 ** (-soft_db / 20)]
    parts, spans, pos = [ms(1500).astype(np.float64)], [], 24000
    for j, (clip, gain) in enumerate(zip(clips, gains, strict=True)):
        if j:
            parts.append(ms(250).astype(np.float64))
            pos += 4000
        parts.append(clip * TARGET_RMS * gain / rms(clip))
        spans.append((pos, pos + len(clip)))
        pos += len(clip)
    parts.append(ms(2000).astype(np.float64))
    speech = np.concatenate(parts)
    return mix_at_snr(speech, make_noise("babble", len(speech), rng, cache), 20.0, spans), pos / 16


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("soft_db", [9.0, 12.0])
def test_the_users_softer_continuation_keeps_the_turn_open(
    seed: int, soft_db: float, speech_cache: Path
) -> None:
    """Under the turn's own level, but over the background's peaks: the user. A bound
    on the turn's level alone split every one of these 8 scenes."""
    audio, end_ms = softer_continuation(seed, soft_db, speech_cache)
    turns = ended(run(detector(), audio))
    assert len(turns) == 1, [(t.start_ms, t.end_ms) for t in turns]
    assert abs(turns[0].end_ms - end_ms) <= END_TOLERANCE_MS


# -- chunking ---------------------------------------------------------------------------


def reframe(audio: np.ndarray, sizes: list[int], frame: int = FRAME) -> Iterator[np.ndarray]:
    """Cut `audio` into chunks of the given sizes (cycled), then into whole frames,
    carrying the remainder to the next chunk, as a network framer must."""
    rest = np.zeros(0, dtype=np.int16)
    i = k = 0
    while i < len(audio):
        chunk = audio[i : i + sizes[k % len(sizes)]]
        i, k = i + len(chunk), k + 1
        rest = np.concatenate([rest, chunk])
        n = len(rest) // frame
        yield rest[: n * frame].reshape(n, frame)
        rest = rest[n * frame :]


@pytest.fixture(scope="session")
def chunking_audio(speech_cache: Path) -> np.ndarray:
    conv = make_conversation(5, n_turns=2, noise="pink", snr_db=10.0, cache_dir=speech_cache)
    return conv.audio


@pytest.fixture(scope="session")
def reference_events(chunking_audio: np.ndarray) -> list[TurnEvent]:
    td = detector()
    events = [e for frame in frames_of(chunking_audio, FRAME) for e in td.push(frame)]
    return events + td.flush()


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(min_value=1, max_value=8000), min_size=1, max_size=20))
def test_reframing_yields_the_same_frames(chunking_audio: np.ndarray, sizes: list[int]) -> None:
    got = np.concatenate(list(reframe(chunking_audio, sizes)))
    assert np.array_equal(got, frames_of(chunking_audio, FRAME))


def test_turn_audio_is_the_input_audio(
    chunking_audio: np.ndarray, reference_events: list[TurnEvent]
) -> None:
    """Turn audio is copied out of the kept blocks exactly (it spans several of them)."""
    for turn in ended(reference_events):
        start = round(turn.audio_start_ms * SAMPLE_RATE / 1000)
        assert len(turn.audio) > 2 * SAMPLE_RATE
        assert np.array_equal(turn.audio, chunking_audio[start : start + len(turn.audio)])
        assert turn.audio.dtype == np.int16 and turn.pcm == turn.audio.tobytes()


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=8000), min_size=1, max_size=20),
    via=st.sampled_from(["array", "list", "bytes"]),
)
def test_events_do_not_depend_on_chunking(
    chunking_audio: np.ndarray,
    reference_events: list[TurnEvent],
    sizes: list[int],
    via: str,
) -> None:
    """Frame by frame (the reference: `push`, the one-frame fast path), or random network
    chunks re-framed with a remainder, as 2-D arrays, lists of frames or bytes (one-frame
    chunks take the fast path, longer ones the block path): the same events, with the
    same times and audio."""
    assert len(ended(reference_events)) == 2
    td, events = detector(), []
    for frames in reframe(chunking_audio, sizes):
        if via == "bytes":
            events += td.push_pcm(frames.tobytes())
        else:
            events += td.push_many(list(frames) if via == "list" else frames)
    assert events + td.flush() == reference_events


@pytest.mark.parametrize("frames_per_push", [1, 5])
def test_end_refined_ahead_equals_end_refined_at_the_end(
    chunking_audio: np.ndarray,
    reference_events: list[TurnEvent],
    frames_per_push: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The push before a turn may end runs the end's FFT ahead; without that the push
    that ends the turn runs it: the same events either way."""
    calls: list[int] = []
    original = TurnDetector._prepare_end

    def counting(self: TurnDetector) -> None:
        calls.append(1)
        original(self)

    monkeypatch.setattr(TurnDetector, "_prepare_end", counting)
    frames = frames_of(chunking_audio, FRAME)
    td = detector()
    events = [
        e
        for i in range(0, len(frames), frames_per_push)
        for e in td.push_many(frames[i : i + frames_per_push])
    ]
    assert calls and events + td.flush() == reference_events
    monkeypatch.setattr(TurnDetector, "_prepare_end", lambda self: None)
    td = detector()
    events = [
        e
        for i in range(0, len(frames), frames_per_push)
        for e in td.push_many(frames[i : i + frames_per_push])
    ]
    assert events + td.flush() == reference_events


# -- turn mechanics -------------------------------------------------------------------


def continuous_speech(seconds: float, cache: Path) -> np.ndarray:
    texts = ["Tell me a short story about a fox.", "Send the report to the whole team."]
    clips, total = [], 0
    while total < seconds * SAMPLE_RATE:
        clip = synth(texts[len(clips) % 2], "en-us", 165, cache)
        clips.append(clip)
        total += len(clip)
    return np.concatenate(clips)[: int(seconds * SAMPLE_RATE)]


def test_max_turn_forces_an_end(speech_cache: Path) -> None:
    audio = np.concatenate([ms(1000), continuous_speech(7.0, speech_cache), ms(1500)])
    cfg = TurnConfig(max_turn_ms=2000, pre_roll_ms=300)
    events = run(TurnDetector(cfg, SpeechDetector()), audio)
    turns = ended(events)
    assert len(turns) >= 3
    assert turns[0].forced and turns[1].forced and not turns[-1].forced
    bound = (cfg.max_turn_ms + cfg.pre_roll_ms + 20) * SAMPLE_RATE // 1000
    for turn in turns:
        assert len(turn.audio) <= bound
        assert turn.end_ms - turn.start_ms <= cfg.max_turn_ms + 20
    # Consecutive turns share no audio, and lose none while the talking goes on.
    for a, b in itertools.pairwise(turns):
        a_end = a.audio_start_ms + len(a.audio) * 1000 / SAMPLE_RATE
        assert b.audio_start_ms == a_end if a.forced else b.audio_start_ms >= a_end
    assert [t.turn_id for t in turns] == list(range(1, len(turns) + 1))


def click(n_ms: int) -> np.ndarray:
    t = np.arange(n_ms * SAMPLE_RATE // 1000) / SAMPLE_RATE
    return (8000 * np.sin(2 * np.pi * 900 * t) * np.hanning(len(t))).astype(np.int16)


def test_min_speech_discards_a_short_sound() -> None:
    audio = np.concatenate([ms(1000), click(120), ms(1500)])
    events = run(detector(start_ms=40, min_speech_ms=300), audio)
    assert [type(e) for e in events] == [SpeechStart, SpeechEnd, TurnDiscard]
    assert events[2].start_ms == events[0].start_ms  # type: ignore[union-attr]
    # With the defaults the same click never even opens a turn.
    assert run(detector(), audio) == []


def test_pre_roll_is_in_the_turn_audio(speech_cache: Path) -> None:
    phrase = synth("Could you tell me the weather for tomorrow?", "en", 165, speech_cache)
    audio = np.concatenate([ms(1000), phrase, ms(1500)])
    (turn,) = ended(run(detector(pre_roll_ms=300), audio))
    assert abs(turn.start_ms - 1000) <= 40
    assert turn.audio_start_ms == turn.start_ms - 300
    first = round(turn.audio_start_ms * SAMPLE_RATE / 1000)
    assert np.array_equal(turn.audio, audio[first : first + len(turn.audio)])
    # Speech, plus up to pre_roll_ms of context after its end.
    assert turn.audio_start_ms + len(turn.audio) * 1000 / SAMPLE_RATE <= turn.end_ms + 300
    assert len(turn.audio) * 1000 / SAMPLE_RATE >= 300 + len(phrase) * 1000 / SAMPLE_RATE - 40


@pytest.mark.parametrize("noise", [None, *NOISES])
def test_noise_alone_gives_no_events(noise: str | None) -> None:
    if noise is None:
        audio = ms(5000)
    else:
        x = make_noise(noise, 10 * SAMPLE_RATE, np.random.default_rng(3))
        audio = np.round(x / rms(x) * 3300).astype(np.int16)  # -20 dBFS
    td = detector()
    assert run(td, audio) == []
    assert td.state is TurnState.QUIET and td.speech_ms == 0.0


def test_state_clock_and_speech_ms(speech_cache: Path) -> None:
    phrase = synth("That sounds like a good plan.", "en", 165, speech_cache)
    audio = np.concatenate([ms(600), phrase, ms(1200)])
    td, states, events = detector(), [], []
    for frame in frames_of(audio, FRAME):
        events += td.push(frame)
        states.append(td.state.value)
        if td.state is TurnState.SPEAKING:
            assert td.speech_ms >= 200
    assert td.clock_ms == len(frames_of(audio, FRAME)) * 20
    # The states come in order, each at least once.
    order = [s for i, s in enumerate(states) if i == 0 or s != states[i - 1]]
    assert order[:2] == ["quiet", "starting"] and order[-1] == "quiet"
    assert {"speaking", "stopping"} <= set(order)
    started, stopped, turn = events
    assert isinstance(started, SpeechStart) and isinstance(stopped, SpeechEnd)
    assert isinstance(turn, TurnEnd)
    assert turn.start_ms == started.start_ms and turn.end_ms == stopped.end_ms
    assert started.start_ms % 20 == 0 and stopped.end_ms % 20 == 0  # whole frames


def test_flush_ends_an_open_turn(speech_cache: Path) -> None:
    phrase = synth("Remind me to call my sister tonight.", "en-us", 165, speech_cache)
    td = detector()
    events = td.push_many(frames_of(np.concatenate([ms(600), phrase]), FRAME))
    assert [type(e) for e in events] == [SpeechStart]
    flushed = td.flush()
    assert [type(e) for e in flushed] == [SpeechEnd, TurnEnd]
    assert td.state is TurnState.QUIET
    assert td.flush() == []


def test_commit_takes_all_audio_since_the_last_turn(speech_cache: Path) -> None:
    phrase = synth("Okay.", "en", 165, speech_cache)
    td = detector()
    assert td.commit() is None  # nothing yet
    first = td.push_many(frames_of(np.concatenate([ms(500), phrase, ms(1200)]), FRAME))
    (vad_turn,) = ended(first)
    td.push_many(frames_of(ms(600), FRAME))  # silence: push-to-talk ignores the VAD
    turn = td.commit()
    assert turn is not None and turn.turn_id == vad_turn.turn_id + 1 and not turn.forced
    vad_audio_end = vad_turn.audio_start_ms + len(vad_turn.audio) * 1000 / SAMPLE_RATE
    assert turn.start_ms == turn.audio_start_ms == vad_audio_end
    assert turn.end_ms == td.clock_ms
    assert len(turn.audio) == (turn.end_ms - turn.start_ms) * SAMPLE_RATE / 1000
    assert td.commit() is None  # no new audio since


def test_commit_is_bounded_by_max_turn() -> None:
    td = detector(max_turn_ms=1000, pre_roll_ms=100)
    td.push_many(frames_of(ms(5000), FRAME))
    turn = td.commit()
    assert turn is not None
    assert len(turn.audio) <= (1000 + 100 + 20) * SAMPLE_RATE // 1000
    assert turn.end_ms == 5000


@pytest.mark.parametrize("push_ms", [20, 100, 1000])
def test_kept_audio_is_bounded(push_ms: int) -> None:
    """However long the stream, the detector keeps at most the audio a turn can need
    (`max_turn_ms` plus pre-roll and the edges' history), and up to two seconds more:
    the block being filled and the oldest block, which is dropped whole."""
    td = detector(max_turn_ms=2000)
    pcm = frames_of(ms(20_000), FRAME).tobytes()
    step = push_ms * SAMPLE_RATE // 1000 * 2
    kept = []
    for i in range(0, len(pcm), step):
        td.push_pcm(pcm[i : i + step])
        kept.append(sum(map(len, [*td._blocks, *td._tail])) // 2)
    bound = (2000 + 300 + 20 + 300 + 200 + 1000 + 2000) * SAMPLE_RATE // 1000 + step // 2
    assert max(kept) <= bound
    assert kept[-1] >= (2000 + 300) * SAMPLE_RATE // 1000  # a whole turn stays available


# -- the server's glue (server.modes.audio_ingest), which feeds push_pcm -----------------


def test_ingest_passes_bytes_through_and_gives_the_same_events(
    chunking_audio: np.ndarray, reference_events: list[TurnEvent]
) -> None:
    """20 ms messages of 16 kHz mono: each message is its own frame (same object, no
    copy), and the events are those of the TurnDetector alone."""
    from duplex.protocol import InputAudioConfig, TurnDetectionConfig
    from server.modes.audio_ingest import AudioIngest

    ingest = AudioIngest(InputAudioConfig(), TurnDetectionConfig())
    data = frames_of(chunking_audio, FRAME).tobytes()
    events: list[TurnEvent] = []
    for i in range(0, len(data), 2 * FRAME):
        message = data[i : i + 2 * FRAME]
        result = ingest.push(message)
        assert result.pcm is message
        events += result.events
    assert events + ingest.detector.flush() == reference_events
    assert ingest.clock_ms == len(data) // 2 * 1000 / SAMPLE_RATE


_MESSAGE_SIZES = st.one_of(
    st.just(2 * FRAME),  # 20 ms: the fast path
    st.sampled_from([FRAME, 2, 2 * FRAME - 2, 2 * FRAME + 2, 1000, 10 * FRAME, 100 * FRAME]),
    st.integers(min_value=1, max_value=20_000).map(lambda n: 2 * n),  # whole samples
)


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(_MESSAGE_SIZES, min_size=1, max_size=30),
    call=st.sampled_from(["events", "push", "both"]),
    with_filter=st.booleans(),
)
def test_ingest_fast_path_gives_the_general_paths_events(
    chunking_audio: np.ndarray,
    reference_events: list[TurnEvent],
    sizes: list[int],
    call: str,
    with_filter: bool,
) -> None:
    """20 ms messages skip the framer while nothing is pending in it; any mix of message
    sizes (10 ms, 20 ms, a sample more or less, 1 s, random), through `events`, `push` or
    both, with or without a filter (which every frame must then pass): the events of the
    TurnDetector alone, and the input clock counts every byte."""
    from duplex.protocol import InputAudioConfig, TurnDetectionConfig
    from server.modes.audio_ingest import AudioIngest

    ingest = AudioIngest(InputAudioConfig(), TurnDetectionConfig())
    filtered: list[int] = []
    if with_filter:

        def identity(pcm: bytes) -> bytes:
            filtered.append(len(pcm))
            return pcm

        ingest.filter = identity
    data = frames_of(chunking_audio, FRAME).tobytes()
    events: list[TurnEvent] = []
    pos, k = 0, 0
    for size in itertools.cycle(sizes):
        message = data[pos : pos + size]
        if not message:
            break
        pos += len(message)
        use_push = call == "push" or (call == "both" and k % 2)
        events += ingest.push(message).events if use_push else ingest.events(message)
        assert ingest.clock_ms == pos // (2 * FRAME) * 20
        k += 1
    assert events + ingest.detector.flush() == reference_events
    assert sum(filtered) == (len(data) if with_filter else 0)


def test_ingest_manual_commit_keeps_the_latest_max_turn() -> None:
    from duplex.protocol import InputAudioConfig, TurnDetectionConfig
    from server.modes.audio_ingest import AudioIngest

    ingest = AudioIngest(InputAudioConfig(), TurnDetectionConfig(type="manual", max_turn_ms=1000))
    audio = np.arange(16000 * 3, dtype=np.int16)  # 3 s, every sample distinct
    data = audio.tobytes()
    pos, sizes = 0, itertools.cycle([2, 640, 998, 12_000, 3_000])
    while pos < len(data):  # odd sizes: frames complete across messages
        size = next(sizes)
        assert ingest.push(data[pos : pos + size]).events == []
        pos += size
    turn = ingest.commit()
    assert turn is not None and ingest.commit() is None
    assert np.array_equal(turn.audio, audio[-16000:])  # the latest max_turn_ms, exactly
    assert turn.pcm == data[-32000:]
    assert turn.end_ms == 3000 and turn.start_ms == 2000


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"start_ms": -1}, "start_ms"),
        ({"stop_ms": 0}, "stop_ms"),
        ({"pre_roll_ms": 700_000}, "pre_roll_ms"),
        ({"min_speech_ms": 1.5}, "min_speech_ms"),
        ({"max_turn_ms": True}, "max_turn_ms"),
        ({"max_turn_ms": 500}, "max_turn_ms"),
    ],
)
def test_turn_config_rejects_nonsense(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TurnConfig(**kwargs)


def test_detector_argument_checks() -> None:
    with pytest.raises(ValueError, match="TurnConfig"):
        TurnDetector({"stop_ms": 500}, SpeechDetector())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="SpeechDetector"):
        TurnDetector(TurnConfig(), object())  # type: ignore[arg-type]
    td = detector()
    with pytest.raises(ValueError, match="320"):
        td.push(np.zeros(160, dtype=np.int16))
    with pytest.raises(ValueError, match="320"):
        td.push(np.zeros(320, dtype=np.float32))
    with pytest.raises(ValueError, match="320"):
        td.push_many([np.zeros(320, dtype=np.int16), np.zeros(100, dtype=np.int16)])
    assert td.push_many([]) == [] and td.clock_ms == 0


def test_other_frame_sizes(speech_cache: Path) -> None:
    phrase = synth("Show me pictures of the mountains.", "en+f3", 165, speech_cache)
    audio = np.concatenate([ms(800), phrase, ms(1500)])
    for frame_ms in (10, 30):
        det = SpeechDetector(DetectorConfig(frame_ms=frame_ms))
        (turn,) = ended(run(TurnDetector(TurnConfig(), det), audio))
        assert abs(turn.start_ms - 800) <= ONSET_TOLERANCE_MS
        assert turn.start_ms % frame_ms == 0
