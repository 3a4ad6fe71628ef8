"""Adaptive end of turn (`turn_detection.stop_ms: "auto"`): the detector learns the
session's pauses inside turns; offline, and end to end over a real server."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydantic
import pytest

from duplex.protocol import TurnDetectionConfig
from tests.conftest import TOKEN
from tests.speech import Conversation, frames_of, make_conversation
from tests.wsutil import connect
from vad.detector import SpeechDetector
from vad.turns import TurnConfig, TurnDetector, TurnEnd, TurnEvent

ONSET_TOLERANCE_MS = 100.0


@pytest.fixture(scope="module")
def speech_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("speech")


def pauses_in_turns(conv: Conversation) -> list[float]:
    """True pauses between phrases of the same turn, in ms."""
    out = []
    for (_, end), (start, _) in zip(conv.phrases, conv.phrases[1:], strict=False):
        if any(a <= end and start <= b for a, b in conv.turns):
            out.append(start - end)
    return out


def joined(first: Conversation, second: Conversation) -> Conversation:
    """`second` played right after `first`, as one conversation."""
    shift = first.duration_ms

    def moved(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return [(a + shift, b + shift) for a, b in spans]

    return Conversation(
        np.concatenate([first.audio, second.audio]),
        first.turns + moved(second.turns),
        first.phrases + moved(second.phrases),
        first.texts + second.texts,
        first.speakers + second.speakers,
    )


def short_pause_speaker(cache: Path) -> Conversation:
    """Five turns with 150-300 ms pauses to learn from, then two turns 650 ms apart."""
    learn = make_conversation(
        31, n_turns=5, voices=["en"], speeds=[200], pause_ms=(150, 300), cache_dir=cache
    )
    close = make_conversation(
        32,
        n_turns=2,
        voices=["en"],
        speeds=[200],
        pause_ms=(150, 250),
        gap_ms=(650, 650),
        lead_ms=(1500, 1500),
        max_phrases=2,
        cache_dir=cache,
    )
    assert sum(p >= 200 for p in pauses_in_turns(learn)) >= 3  # enough to learn from
    return joined(learn, close)


def long_pause_speaker(cache: Path) -> Conversation:
    """Three turns with 600-750 ms pauses, then two with 850-900 ms pauses."""
    learn = make_conversation(
        33, n_turns=3, voices=["en"], speeds=[165], pause_ms=(600, 750), cache_dir=cache
    )
    slow = make_conversation(
        36,
        n_turns=2,
        voices=["en"],
        speeds=[165],
        pause_ms=(850, 900),
        lead_ms=(1500, 1500),
        cache_dir=cache,
    )
    assert pauses_in_turns(learn) and len(pauses_in_turns(slow)) >= 2
    return joined(learn, slow)


def run(config: TurnConfig, audio: np.ndarray) -> tuple[TurnDetector, list[TurnEvent]]:
    td = TurnDetector(config, SpeechDetector())
    return td, td.push_many(frames_of(audio, td.detector.frame_samples)) + td.flush()


def onsets_match(conv: Conversation, turns: list[TurnEnd]) -> bool:
    return len(turns) == len(conv.turns) and all(
        abs(t.start_ms - a) <= ONSET_TOLERANCE_MS
        for t, (a, _) in zip(turns, conv.turns, strict=False)
    )


# -- offline ----------------------------------------------------------------------------


def test_short_pauses_shorten_the_end_of_turn(speech_cache: Path) -> None:
    conv = short_pause_speaker(speech_cache)
    td, events = run(TurnConfig(adaptive_stop=True), conv.audio)
    assert td.stop_ms < 600
    assert all(200 <= p <= 400 for p in td.pauses_ms), td.pauses_ms
    assert onsets_match(conv, [e for e in events if isinstance(e, TurnEnd)])
    # The fixed default waits 800 ms, so the last two turns, 650 ms apart, merge.
    _, fixed = run(TurnConfig(), conv.audio)
    assert len([e for e in fixed if isinstance(e, TurnEnd)]) == len(conv.turns) - 1


def test_long_pauses_lengthen_the_end_of_turn(speech_cache: Path) -> None:
    conv = long_pause_speaker(speech_cache)
    td, events = run(TurnConfig(adaptive_stop=True), conv.audio)
    assert td.stop_ms > 900
    assert onsets_match(conv, [e for e in events if isinstance(e, TurnEnd)])
    _, fixed = run(TurnConfig(), conv.audio)  # cuts the 850-900 ms pauses
    assert len([e for e in fixed if isinstance(e, TurnEnd)]) > len(conv.turns)


def test_turn_ends_never_teach_it_to_wait_longer(speech_cache: Path) -> None:
    """Single-phrase turns: every silence ends a turn, and none is learned."""
    conv = make_conversation(35, n_turns=6, max_phrases=1, cache_dir=speech_cache)
    td, events = run(TurnConfig(adaptive_stop=True, stop_ms=500), conv.audio)
    assert td.pauses_ms == []
    assert td.stop_ms == 1200  # where it starts (cautious), unchanged
    assert len([e for e in events if isinstance(e, TurnEnd)]) == len(conv.turns)


def test_a_slow_talkers_first_turns_are_not_cut(speech_cache: Path) -> None:
    """Pauses of 850-900 ms from the first turn on: nothing is learned yet, so "auto"
    must start cautious (1200 ms), not at the fixed default, which cuts them."""
    conv = make_conversation(
        36, n_turns=2, voices=["en"], speeds=[165], pause_ms=(850, 900), cache_dir=speech_cache
    )
    assert any(p >= 850 for p in pauses_in_turns(conv))
    _, events = run(TurnConfig(adaptive_stop=True), conv.audio)
    assert onsets_match(conv, [e for e in events if isinstance(e, TurnEnd)])
    _, fixed = run(TurnConfig(), conv.audio)
    assert len([e for e in fixed if isinstance(e, TurnEnd)]) > len(conv.turns)


def test_a_long_pause_raises_it_at_once_and_bounds_hold(speech_cache: Path) -> None:
    conv = make_conversation(
        37, n_turns=1, voices=["en"], pause_ms=(700, 700), max_phrases=2, cache_dir=speech_cache
    )
    td, _ = run(TurnConfig(adaptive_stop=True, max_stop_ms=900), conv.audio)
    assert len(td.pauses_ms) == 1
    assert td.stop_ms == 900  # 1.25 x 700 + 100 = 975, bounded
    td, _ = run(TurnConfig(adaptive_stop=True, max_stop_ms=1500), conv.audio)
    assert td.stop_ms >= 1.25 * td.pauses_ms[0] + 100


def test_adaptive_events_do_not_depend_on_chunking(speech_cache: Path) -> None:
    conv = short_pause_speaker(speech_cache)
    config = TurnConfig(adaptive_stop=True)
    frames = frames_of(conv.audio, 320)
    single = TurnDetector(config, SpeechDetector())
    expected = [e for f in frames for e in single.push(f)] + single.flush()
    rng = random.Random(5)
    chunked, got, i = TurnDetector(config, SpeechDetector()), [], 0
    while i < len(frames):
        n = rng.randrange(1, 60)
        got += chunked.push_pcm(frames[i : i + n].tobytes())
        i += n
    got += chunked.flush()
    assert got == expected
    assert chunked.stop_ms == single.stop_ms


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_stop_ms": 0}, "min_stop_ms"),
        ({"min_stop_ms": 900, "max_stop_ms": 800}, "min_stop_ms"),
        ({"adaptive_stop": True, "max_stop_ms": 5000, "max_turn_ms": 4000}, "max_turn_ms"),
        ({"adaptive_stop": 1}, "adaptive_stop"),
    ],
)
def test_turn_config_checks_the_adaptive_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TurnConfig(**kwargs)


def test_protocol_accepts_auto_and_checks_bounds() -> None:
    assert TurnDetectionConfig(stop_ms="auto").fixed_stop_ms == 800
    assert TurnDetectionConfig(stop_ms=600).fixed_stop_ms == 600
    for bad in (
        {"stop_ms": "fast"},
        {"stop_ms": 50},
        {"stop_ms": "auto", "min_stop_ms": 900, "max_stop_ms": 800},
        {"stop_ms": "auto", "max_stop_ms": 5000, "max_turn_ms": 4000},
    ):
        with pytest.raises(pydantic.ValidationError):
            TurnDetectionConfig(**bad)


# -- end to end -------------------------------------------------------------------------


async def _turns_over_server(server, conv: Conversation, turn_detection: dict) -> list[dict]:
    """Stream the conversation (then 2 s of silence) in 20 ms messages; return turn.ended
    events. A session.update after the audio is answered only once all of it has been
    through the turn detector, so every turn.ended comes before session.updated."""
    async with connect(server, TOKEN) as c:
        await c.recv()
        await c.send({"type": "session.update", "config": {"turn_detection": turn_detection}})
        await c.until("session.updated")
        data = np.concatenate([conv.audio, np.zeros(32000, np.int16)]).astype("<i2").tobytes()
        for i in range(0, len(data), 640):
            await c.send(data[i : i + 640])
        await c.send({"type": "session.update", "config": {"instructions": "done"}})
        events = await c.until("session.updated", timeout=60)
    return [e for e in events if e["type"] == "turn.ended"]


async def test_server_ends_a_short_pause_speakers_turns_sooner(live_server, speech_cache):
    conv = short_pause_speaker(speech_cache)
    auto = await _turns_over_server(live_server, conv, {"stop_ms": "auto"})
    fixed = await _turns_over_server(live_server, conv, {})
    # "auto" learned to end turns after well under 650 ms of silence; the default (800)
    # had not ended the sixth turn when the seventh began, 650 ms later.
    assert len(auto) == len(conv.turns)
    for event, (onset, _) in zip(auto, conv.turns, strict=True):
        assert abs(event["audio_start_ms"] - onset) <= ONSET_TOLERANCE_MS
    assert len(fixed) == len(conv.turns) - 1


async def test_server_does_not_cut_off_a_long_pause_speaker(live_server, speech_cache):
    conv = long_pause_speaker(speech_cache)
    auto = await _turns_over_server(live_server, conv, {"stop_ms": "auto"})
    fixed = await _turns_over_server(live_server, conv, {})
    assert len(auto) == len(conv.turns)
    for event, (onset, end) in zip(auto, conv.turns, strict=True):
        assert abs(event["audio_start_ms"] - onset) <= ONSET_TOLERANCE_MS
        assert abs(event["audio_end_ms"] - end) <= 300
    assert len(fixed) > len(conv.turns)  # the default cuts the 850-900 ms pauses
