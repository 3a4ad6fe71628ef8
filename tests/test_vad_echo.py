"""Echo-aware barge-in: the library on synthetic echo scenes, and VAD mode end to end with
a client that plays the reply through a simulated room into its microphone."""

from __future__ import annotations

import asyncio
import base64
import dataclasses

import numpy as np
import pytest

from duplex.protocol import InputAudioConfig
from server.modes.echo_guard import EchoGuard, echo_aware
from tests.conftest import TOKEN
from tests.echo_sim import (
    BARGE_IN_DEADLINE_MS,
    NOISE_DBFS,
    USER_TEXT,
    USER_VOICE,
    barge_in_ms,
    make_scene,
    room_ir,
    speech_starts,
)
from tests.speech import ACTIVE_LEVEL_DBFS, rms, synth
from tests.wsutil import connect
from vad.detector import DetectorConfig, SpeechDetector
from vad.echo import EchoConfig, EchoSuppressor
from vad.turns import TurnConfig, TurnDetector

DELAYS = (40, 300)
ATTENUATIONS = (0, 10, 20)
RT60S = (200, 400)
GRID = [(d, a, r) for d in DELAYS for a in ATTENUATIONS for r in RT60S]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("echo-speech")


def _whole(scene) -> tuple[bytes, bytes]:
    n = len(scene.mic) // 320 * 320
    return scene.mic[:n].tobytes(), scene.ref[:n].tobytes()


def _level_db(x: np.ndarray) -> float:
    return 20 * np.log10(rms(x) + 1e-9) - 20 * np.log10(32768)


def test_config_and_input_are_checked():
    with pytest.raises(ValueError, match="margin_db"):
        EchoConfig(margin_db=-1)
    with pytest.raises(ValueError, match="sample_rate"):
        EchoConfig(sample_rate=22050)
    echo = EchoSuppressor()
    with pytest.raises(ValueError, match="whole frames"):
        echo.process(b"\0" * 100, None)
    with pytest.raises(ValueError, match="as long as mic"):
        echo.process(b"\0" * 640, b"\0" * 320)


def test_without_reference_the_audio_passes_untouched():
    echo = EchoSuppressor()
    pcm = np.random.default_rng(0).integers(-3000, 3000, 3200).astype(np.int16).tobytes()
    assert echo.process(pcm, None) is pcm
    assert echo.process(pcm, b"") is pcm
    assert not echo.active and echo.frames == 0


@pytest.mark.parametrize("delay_ms", [40, 150, 300])
def test_delay_is_found_and_echo_is_suppressed(cache, delay_ms):
    scene = make_scene(3, delay_ms, 6.0, 300, barge_in=False, cache_dir=cache)
    echo = EchoSuppressor()
    out = np.frombuffer(echo.process(*_whole(scene)), np.int16)
    assert echo.delay_ms is not None and abs(echo.delay_ms - delay_ms) <= 40, echo.delay_ms
    start = int(16 * (2000 + delay_ms))  # from 1.5 s into the reply (after the lead)
    end = int(16 * scene.reply_end_ms)
    assert _level_db(scene.mic[start:end]) > -40
    # Echo bands become room noise: about the noise level, far below the echo.
    assert _level_db(out[start:end]) < NOISE_DBFS + 10
    frames = out[start:end][: (end - start) // 320 * 320].reshape(-1, 320).astype(np.float64)
    loud = 10 * np.log10((frames**2).mean(axis=1) + 1) - 20 * np.log10(32768) > NOISE_DBFS + 10
    assert loud.mean() < 0.05  # echo frames that got through (1.5-1.7% measured)


@pytest.mark.parametrize("delay_ms", [40, 150, 300])
def test_delay_is_found_when_the_reply_follows_a_question(cache, delay_ms):
    """The microphone history holds the user's question and the reference starts from
    silence: the delay must come from the echo itself, not from the reply's first step
    (which lines up with any lag; measured: lag 0 at correlation 0.97)."""
    scene = _scene(3, delay_ms, 6.0, 300, True, False, cache)
    echo = EchoSuppressor()
    mic, ref = _whole(scene)
    until = int(16 * (scene.reply_start_ms + 1500)) // 320 * 640  # 1.5 s into the reply
    echo.process(mic[:until], ref[:until])
    assert echo.delay_ms is not None and abs(echo.delay_ms - delay_ms) <= 40, echo.delay_ms


def test_a_silent_reference_is_no_reference(cache):
    """A client sending zeros as the reference before the reply (or a reply that starts
    with silence) must not wake the suppressor: it would take the user's question for
    the room and play it back as comfort noise."""
    scene = _scene(3, 150, 6.0, 300, True, False, cache)
    start = int(16 * scene.reply_start_ms) // 320 * 320
    mic = scene.mic[:start].tobytes()
    echo = EchoSuppressor()
    assert echo.process(mic, bytes(len(mic))) is mic
    assert not echo.active and echo.frames == 0


def test_the_user_over_the_echo_passes(cache):
    scene = make_scene(4, 150, 10.0, 300, barge_in=True, cache_dir=cache)
    echo = EchoSuppressor()
    out = np.frombuffer(echo.process(*_whole(scene)), np.int16)
    onset = int(16 * scene.onset_ms)
    user = slice(onset, onset + 16000)
    assert _level_db(out[user]) > ACTIVE_LEVEL_DBFS - 6  # most of the user's voice is kept
    assert echo.near_frames > 25


def _scene(seed, delay_ms, atten_db, rt60_ms, question, barge_in, cache):
    """With ``question`` the reply follows the user's question 1 s after it ends (the
    end-of-turn silence plus the provider's latency), as every reply does on a server."""
    lead = 1000.0 if question else 500.0
    return make_scene(
        seed, delay_ms, atten_db, rt60_ms, barge_in=barge_in, cache_dir=cache,
        question=question, lead_ms=lead,
    )  # fmt: skip


@pytest.mark.parametrize("question", [False, True], ids=["reply", "question-then-reply"])
@pytest.mark.parametrize(("delay_ms", "atten_db", "rt60_ms"), GRID)
def test_echo_alone_never_interrupts(cache, delay_ms, atten_db, rt60_ms, question):
    scene = _scene(1, delay_ms, atten_db, rt60_ms, question, False, cache)
    assert barge_in_ms(scene, echo_aware=True) is None
    assert speech_starts(scene, echo_aware=True) == []  # nor is it taken for a user turn


@pytest.mark.parametrize("atten_db", ATTENUATIONS)
def test_without_echo_awareness_the_echo_interrupts(cache, atten_db):
    """The problem this solves: the default detector interrupts the reply with its own echo."""
    scene = make_scene(1, 150, atten_db, 300, barge_in=False, cache_dir=cache)
    assert barge_in_ms(scene, echo_aware=False) is not None
    assert speech_starts(scene, echo_aware=False)


@pytest.mark.parametrize("question", [False, True], ids=["reply", "question-then-reply"])
@pytest.mark.parametrize(("delay_ms", "atten_db", "rt60_ms"), GRID)
def test_the_user_still_interrupts_in_time(cache, request, delay_ms, atten_db, rt60_ms, question):
    if atten_db == 0:
        # Echo as loud as the user (0 dB): measured late for some delays (see
        # BENCHMARKS.md, "Echo-aware barge-in" and "at loud echo"): the user's first
        # 80-120 ms stay under the echo estimate (counted back since, up to 120 ms: 7 of
        # these 8 in time, 4 before). Kept visible, not dropped.
        request.applymarker(
            pytest.mark.xfail(reason="0 dB echo: barge-in often late", strict=False)
        )
    scene = _scene(1, delay_ms, atten_db, rt60_ms, question, True, cache)
    at = barge_in_ms(scene, echo_aware=True)
    assert at is not None and scene.onset_ms is not None
    assert scene.onset_ms <= at <= scene.onset_ms + BARGE_IN_DEADLINE_MS, at - scene.onset_ms


# Grid points (seed 1) where the barge-in came late before the suppressor held the user's
# frames through double talk (measured: 908, 1414, 832 and 835 ms after the onset).
LOUD_ECHO = [
    (False, 40, 0.0, 200),
    (True, 40, 0.0, 400),
    (True, 40, 5.0, 200),
    (False, 300, 5.0, 400),
]


@pytest.mark.parametrize(("question", "delay_ms", "atten_db", "rt60_ms"), LOUD_ECHO)
def test_the_user_interrupts_in_time_over_loud_echo(cache, question, delay_ms, atten_db, rt60_ms):
    """Echo 0-5 dB below the reply, as loud as the user: once the user has stood out of
    the cautious echo estimate for 100 ms, their quieter syllables must still count
    (barge-in needs 300 ms of speech within 400 ms of the onset)."""
    scene = _scene(1, delay_ms, atten_db, rt60_ms, question, True, cache)
    at = barge_in_ms(scene, echo_aware=True)
    assert at is not None and scene.onset_ms is not None
    assert scene.onset_ms <= at <= scene.onset_ms + BARGE_IN_DEADLINE_MS, at - scene.onset_ms


# Grid points (seed 1, 0 dB) where the barge-in came late before the user's onset was
# counted back (measured: 414, 408 and 854 ms after the onset).
HIDDEN_ONSET = [(False, 40, 400), (False, 300, 200), (True, 300, 400)]


@pytest.mark.parametrize(("question", "delay_ms", "rt60_ms"), HIDDEN_ONSET)
def test_the_users_onset_under_the_echo_counts(cache, question, delay_ms, rt60_ms):
    """Echo as loud as the user: the first frame counted as theirs comes 80-120 ms after
    the onset, and the first word falls short of the 300 ms a barge-in needs. The frames
    just before each run of theirs that stood over the typical echo count back (up to
    120 ms), as VAD mode's barge-in decision adds them."""
    scene = _scene(1, delay_ms, 0.0, rt60_ms, question, True, cache)
    at = barge_in_ms(scene, echo_aware=True)
    assert at is not None and scene.onset_ms is not None
    assert scene.onset_ms <= at <= scene.onset_ms + BARGE_IN_DEADLINE_MS, at - scene.onset_ms


def test_the_users_speech_does_not_teach_the_echo_gain(cache):
    """Double talk: the user's frames, and those just after them, are no echo to learn the
    gain from. Measured before: a band's gain rose 4.6 dB in the barge-in's first second
    (the 95th percentile of 100 ratios moves with five of them), which then hid the user."""
    scene = make_scene(1, 40, 0.0, 200, barge_in=True, cache_dir=cache)
    assert scene.onset_ms is not None
    mic, ref = _whole(scene)
    onset = int(scene.onset_ms // 20) * 640
    echo = EchoSuppressor()
    echo.process(mic[:onset], ref[:onset])
    before = echo.gain_db
    echo.process(mic[onset : onset + 50 * 640], ref[onset : onset + 50 * 640])  # 1 s
    assert (echo.gain_db - before).max() < 2.0, echo.gain_db - before


def test_a_quiet_echo_does_not_hide_the_user(cache):
    """Echo 20 dB down sits near the room's noise: few bands rise out of it, so they got
    no measured gain in the reply's first seconds and kept the prior (+6 dB over the
    reply), under which the user was taken out (measured: barge-in 932 ms late). The
    microphone bounds the echo: those bands now learn from the frames of room alone."""
    scene = _scene(1, 100, 20.0, 200, True, True, cache)
    assert scene.onset_ms is not None
    mic, ref = _whole(scene)
    onset = int(scene.onset_ms // 20) * 640
    echo = EchoSuppressor()
    echo.process(mic[:onset], ref[:onset])
    assert (echo.gain_db < EchoConfig().prior_gain_db).mean() > 0.9, echo.gain_db
    at = barge_in_ms(scene, echo_aware=True)
    assert at is not None
    assert scene.onset_ms <= at <= scene.onset_ms + BARGE_IN_DEADLINE_MS, at - scene.onset_ms


# ---- end to end --------------------------------------------------------------------


async def _play_and_talk(server, echo_cancellation: bool, barge_in: bool, cache) -> list[dict]:
    """A client without echo cancellation: it plays the reply into the room (150 ms, 6 dB
    down, RT60 300 ms) and its microphone hears that, room noise and, with ``barge_in``,
    the user talking 3 s into the reply (once the echo path is learned). Returns the
    events of the reply."""
    rng = np.random.default_rng(11)
    rir = room_ir(300, rng)
    delay = 16 * 150
    gain = 10 ** (-6 / 20)
    question = np.concatenate(
        [
            synth("Tell me everything about the weather for the weekend, please.", "en-us+m3"),
            np.zeros(4000, np.int16),
            synth("And then what I should wear on Saturday and on Sunday.", "en-us+m3"),
        ]
    )
    user = synth(USER_TEXT[0], *USER_VOICE, cache_dir=cache).astype(np.float64)
    user *= 32768 * 10 ** (ACTIVE_LEVEL_DBFS / 20) / rms(user)
    noise_level = 32768 * 10 ** (NOISE_DBFS / 20)
    events: list[dict] = []
    played: list[np.ndarray] = []  # reply audio as it came
    done = asyncio.Event()
    async with connect(server, TOKEN) as c:
        await c.recv()
        config = {
            "input_audio": {"echo_cancellation": echo_cancellation},
            "output_audio": {"sample_rate": 16000},
        }
        await c.send({"type": "session.update", "config": config})
        await c.recv()
        said = np.concatenate([question, np.zeros(16000)])
        said += rng.standard_normal(len(said)) * noise_level  # the room, as ever after
        pcm = np.clip(np.round(said), -32768, 32767).astype("<i2").tobytes()
        for i in range(0, len(pcm), 640):
            await c.send(pcm[i : i + 640])
        response_id = (await c.until("response.started", timeout=20))[-1]["response_id"]

        async def read() -> None:
            while True:
                event = await c.recv(timeout=20)
                events.append(event)
                if event["type"] == "chunk" and event.get("media"):
                    data = base64.b64decode(event["media"]["data"])
                    played.append(np.frombuffer(data, "<i2").astype(np.float64))
                if event["type"] == "response.done":
                    done.set()
                    return

        reader = asyncio.create_task(read())
        try:
            pos = 0  # microphone samples since playback started
            while not done.is_set() and pos < 16 * 20_000:
                reply = np.concatenate(played) if played else np.zeros(0)
                a, b = pos - delay - len(rir) + 1, pos - delay + 320
                seg = np.zeros(b - a)
                lo, hi = max(a, 0), min(b, len(reply))
                if hi > lo:
                    seg[lo - a : hi - a] = reply[lo:hi]
                mic = _convolve_valid(seg, rir)[-320:] * gain
                mic += rng.standard_normal(320) * noise_level
                at = pos - 16 * 3000
                if barge_in and 0 <= at < len(user):
                    mic[: min(320, len(user) - at)] += user[at : at + 320]
                frame = np.clip(np.round(mic), -32768, 32767).astype("<i2")
                await c.send(frame.tobytes())
                pos += 320
                if pos % 3200 == 0:
                    await c.send(
                        {"type": "playback", "response_id": response_id, "played_ms": pos / 16}
                    )
                await asyncio.sleep(0.02)
            await asyncio.wait_for(done.wait(), 20)
        finally:
            reader.cancel()
    return events


@pytest.mark.parametrize("echo_cancellation", [False, True], ids=["echo-aware", "client-says-aec"])
async def test_reply_echo_over_a_real_server(server_factory, cache, echo_cancellation):
    """With echo_cancellation false the reply plays to its end through its own echo; a
    client that claims echo cancellation but has none is interrupted by it (the old
    behaviour, kept for clients that really cancel echo)."""
    server = server_factory(echo_pace=1.0)
    events = await _play_and_talk(server, echo_cancellation, barge_in=False, cache=cache)
    reason = events[-1]["finish_reason"]
    assert reason == ("interrupted" if echo_cancellation else "stop")


async def test_user_barges_in_over_the_echo_on_a_real_server(server_factory, cache):
    server = server_factory(echo_pace=1.0)
    events = await _play_and_talk(server, False, barge_in=True, cache=cache)
    assert events[-1]["finish_reason"] == "interrupted"
    assert any(e["type"] == "chunk" and e.get("interrupted") for e in events)


# ---- the server's side: which sessions, and where the reply sits ---------------------


@pytest.mark.parametrize(
    ("audio", "on"),
    [
        ({}, False),
        ({"echo_cancellation": False}, True),
        ({"echo_cancellation": True}, False),
        ({"format": "mulaw", "sample_rate": 8000}, True),
        ({"format": "alaw", "sample_rate": 8000}, True),
        ({"format": "mulaw", "sample_rate": 8000, "echo_cancellation": True}, False),
        ({"format": "opus", "sample_rate": 48000}, False),
    ],
)
def test_echo_awareness_is_on_without_client_aec_and_for_telephony(audio, on):
    assert echo_aware(InputAudioConfig(**audio)) is on


def test_guard_lays_the_reply_on_the_microphone_clock():
    guard = EchoGuard(16000, 20)
    seen: list[bytes | None] = []
    guard.suppressor.process = lambda mic, ref: seen.append(ref) or mic  # type: ignore[method-assign]
    silence = b"\0" * 640
    guard.filter(silence * 5)  # 100 ms before any reply
    guard.reply_started()
    reply = np.arange(1, 16001, dtype=np.int16)  # 1 s, each sample its own index
    guard.reply_audio(reply.tobytes(), 16000)  # sent at once, played from now on
    guard.filter(silence)
    first = np.frombuffer(seen[-1], np.int16)
    assert first[0] == 1 and first[-1] == 320
    guard.played(500.0)  # the client is further on than the server thought: re-anchored
    guard.filter(silence)
    assert np.frombuffer(seen[-1], np.int16)[0] == 8001
    guard.played(505.0)  # within the report jitter: the anchor stays
    guard.filter(silence)
    assert np.frombuffer(seen[-1], np.int16)[0] == 8321
    guard.reply_cut()  # interrupted: nothing more plays
    guard.filter(silence)
    assert seen[-1] is None


def test_guard_resamples_the_reply_and_bounds_what_it_keeps():
    guard = EchoGuard(16000, 20)
    guard.reply_started()
    for _ in range(70):  # 70 s of 24 kHz reply streamed at once: only 60 s are kept
        guard.reply_audio(b"\1\0" * 24000, 24000)
    assert guard._ref_bytes <= 60 * 16000 * 2


def _convolve_valid(x: np.ndarray, h: np.ndarray) -> np.ndarray:
    """``np.convolve(x, h, "valid")`` by FFT (the room response is thousands of taps)."""
    n = len(x) + len(h) - 1
    size = 1 << (n - 1).bit_length()
    y = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(h, size), size)[:n]
    return y[len(h) - 1 : len(x)]


def _moved(cache):
    """A playback report re-anchors the reference 5 s into the reply while the sound
    itself did not move (a client whose playback reports and microphone audio disagree):
    from then on the echo comes 160 ms later after its reference (100 ->
    260 ms)."""
    scene = make_scene(1, 100, 0.0, 300, barge_in=False, cache_dir=cache)
    cut, shift = 16000 * 5, 16 * 160
    ref = scene.ref.copy()
    ref[cut:] = 0
    ref[cut : len(ref) - shift] = scene.ref[cut + shift :]  # the reference runs ahead
    return dataclasses.replace(scene, ref=ref)


def test_a_moved_reference_does_not_interrupt(cache):
    """No report tells the suppressor of this move (as if the sound had moved without
    one): the newest half second of the delay search alone fits the new lag well before
    the whole 3 s window does, and the echo is predicted there too until the window
    decides. Before: a false barge-in 1.06 s after the move (the window took 1.8 s)."""
    assert barge_in_ms(_moved(cache), echo_aware=True) is None


# ---- a playback report that moves the reference ---------------------------------------

REPORT_EVERY = 10  # frames between playback reports (200 ms)


def _through_guard(
    mic: np.ndarray, scene, played_ms, move_at_ms: float, *, until_ms: float | None = None
) -> tuple[float | None, EchoGuard, list[tuple[float, float | None, float | None]]]:
    """The scene's microphone through an `EchoGuard` fed as VAD mode feeds it: the reply
    sent when it starts playing, a playback report every 200 ms saying ``played_ms(t)``
    (t: the microphone clock, ms), and the default turn detector after it. Returns when
    the reply would be interrupted (None: never), the guard, and the suppressor's
    (time, delay, second delay) at each report from ``move_at_ms`` on."""
    guard = EchoGuard(16000, 20)
    detector = TurnDetector(TurnConfig(), SpeechDetector(DetectorConfig()))
    start = int(16 * scene.reply_start_ms)
    reply = scene.ref[start : int(16 * scene.reply_end_ms)]
    seen: list[tuple[float, float | None, float | None]] = []
    at = None
    step = 320
    end = int(16 * (scene.reply_end_ms if until_ms is None else until_ms))
    for k, i in enumerate(range(0, min(len(mic), end) - step + 1, step)):
        if i == start // step * step:
            guard.reply_started()
            guard.reply_audio(reply.tobytes(), 16000)
        detector.push_pcm(guard.filter(mic[i : i + step].tobytes()))
        now = (i + step) / 16
        if i >= start and k % REPORT_EVERY == 0:
            guard.played(played_ms(now))
            if now >= move_at_ms:
                echo = guard.suppressor
                seen.append((now, echo.delay_ms, echo.candidate_ms))
        if (
            at is None
            and now > scene.reply_start_ms
            and detector.state in ("speaking", "stopping")
            and detector.speech_ms + guard.suppressor.onset_credit_ms >= 300
        ):
            at = now
    return at, guard, seen


@pytest.mark.parametrize(("delay_ms", "shift_ms"), [(100, 160), (40, 300), (300, 160)])
def test_a_wrong_playback_report_does_not_interrupt(cache, delay_ms, shift_ms):
    """A report that puts playback `shift_ms` further on than it is (the sound did not
    move): the reference runs ahead of the echo from then on. The suppressor predicts
    the echo at both delays until the frames after the move tell them apart, then keeps
    the one that fits. Before: the echo interrupted ~1 s after such a move."""
    scene = make_scene(1, delay_ms, 0.0, 300, barge_in=False, cache_dir=cache)
    move = scene.reply_start_ms + 3000

    def played(now: float) -> float:
        return now - scene.reply_start_ms + (shift_ms if now >= move else 0.0)

    at, guard, seen = _through_guard(scene.mic, scene, played, move)
    assert seen[0][1] is not None and abs(seen[0][1] - delay_ms) <= 20  # known before
    assert seen[0][2] is not None and abs(seen[0][2] - (delay_ms + shift_ms)) <= 20
    assert at is None, at - move
    assert guard.suppressor.candidate_ms is None  # settled...
    assert abs(guard.suppressor.delay_ms - (delay_ms + shift_ms)) <= 20  # ...on the new lag


def _stalled(scene, at_ms: float, stall_ms: float):
    """The client's playout stalls for `stall_ms` at `at_ms`: from then on the echo (and
    the user, who speaks to what they hear) comes `stall_ms` later on the microphone."""
    cut, shift = int(16 * at_ms), int(16 * stall_ms)
    mic = scene.mic.copy()
    mic[cut + shift :] = scene.mic[cut : len(mic) - shift]
    mic[cut : cut + shift] = scene.mic[:shift]  # the room alone (before the reply)
    onset = None if scene.onset_ms is None else scene.onset_ms + stall_ms
    return dataclasses.replace(scene, mic=mic, onset_ms=onset)


@pytest.mark.parametrize("barge_in", [False, True], ids=["echo-only", "user-barges-in"])
def test_a_real_playout_stall_is_followed(cache, barge_in):
    """The client's buffer really stalled (160 ms) and its report says so: the anchor
    moves with the sound, the suppressor keeps its delay (confirmed on the frames after
    the move), the echo does not interrupt, and the user who talks a second later still
    does, in time."""
    base = make_scene(1, 300, 10.0, 300, barge_in=True, cache_dir=cache)
    assert base.onset_ms is not None
    move = base.onset_ms - 1000
    scene = _stalled(base, move, 160)
    if not barge_in:  # the same scene without the user: the echo alone
        quiet = make_scene(1, 300, 10.0, 300, barge_in=False, cache_dir=cache)
        scene = dataclasses.replace(_stalled(quiet, move, 160), onset_ms=None)

    def played(now: float) -> float:
        return now - scene.reply_start_ms - (160 if now >= move + 100 else 0.0)

    at, guard, seen = _through_guard(scene.mic, scene, played, move)
    delays = [d for _, d, _ in seen]
    assert seen[0][1] is not None and abs(seen[0][1] - 300) <= 20
    assert any(c is not None and abs(c - 140) <= 20 for _, _, c in seen)  # the hint
    assert all(d is not None and abs(d - 300) <= 20 for d in delays), delays
    if barge_in:
        assert scene.onset_ms is not None and at is not None
        assert scene.onset_ms <= at <= scene.onset_ms + BARGE_IN_DEADLINE_MS, at - scene.onset_ms
    else:
        assert at is None, at - move
        assert guard.suppressor.candidate_ms is None
