"""Memory is bounded per session and returned at close (no cycles left for a rare full GC)."""

from __future__ import annotations

import asyncio
import gc
import weakref

import numpy as np
import pytest

from tests.conftest import TOKEN
from tests.speech import make_conversation
from tests.wsutil import connect

SILENCE_1S = np.zeros(16000, dtype=np.int16)


@pytest.fixture(scope="module")
def speech() -> bytes:
    conv = make_conversation(seed=11, n_turns=1, voices=["en"], speeds=[160])
    return np.concatenate([conv.audio, SILENCE_1S]).astype("<i2").tobytes()


async def _until_removed(registry, tenant: str, session_id: str) -> None:
    for _ in range(1000):  # at most 10 s
        if registry.get(tenant, session_id) is None:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the session was not removed after its connection closed")


async def test_closed_session_is_freed_by_reference_counting(live_server, speech):
    """A session that streamed audio, got a spoken reply and closed leaves nothing alive,
    with the cyclic GC off: the server freezes the heap and runs full collections
    rarely, so anything left in a cycle would wait there, native buffers included."""
    registry = live_server.app.state.duplex.registry
    gc.collect()
    gc.disable()
    try:
        async with connect(live_server, TOKEN) as c:
            session_id = (await c.recv())["session"]["id"]
            session = registry.get("tenant-a", session_id)
            refs = [weakref.ref(session), weakref.ref(session._mode)]
            refs.append(weakref.ref(session._mode._frames))
            del session
            for i in range(0, len(speech) - 640, 640):
                await c.send(speech[i : i + 640])
            await c.until("response.done", timeout=30)
        await _until_removed(registry, "tenant-a", session_id)
        for _ in range(50):  # the close finishes in tasks of its own: give them turns
            if all(ref() is None for ref in refs):
                break
            await asyncio.sleep(0.02)
        alive = [type(ref()).__name__ for ref in refs if ref() is not None]
        assert alive == []
    finally:
        gc.enable()


async def test_session_ended_by_an_error_is_freed_too(live_server):
    """The fatal path (``fail`` closes in a task of its own) leaves no cycle either."""
    registry = live_server.app.state.duplex.registry
    gc.collect()
    gc.disable()
    try:
        async with connect(live_server, TOKEN) as c:
            session_id = (await c.recv())["session"]["id"]
            session = registry.get("tenant-a", session_id)
            refs = [weakref.ref(session), weakref.ref(session._mode)]
            loop = next(iter(session._tasks)).get_loop()  # the server's, in its own thread
            asyncio.run_coroutine_threadsafe(session.fail(500, "test: fatal"), loop).result(5)
            del session, loop
            event = await c.recv()
            assert event["type"] == "error" and event["fatal"]
        await _until_removed(registry, "tenant-a", session_id)
        for _ in range(50):
            if all(ref() is None for ref in refs):
                break
            await asyncio.sleep(0.02)
        assert [type(ref()).__name__ for ref in refs if ref() is not None] == []
    finally:
        gc.enable()


# ---- per-session buffers ----------------------------------------------------------------


def _kept_bytes(td) -> int:
    return sum(map(len, [*td._blocks, *td._tail]))


def test_quiet_stream_keeps_little_audio_and_turns_are_unchanged(speech):
    """With `idle_history_ms=0` (the server's setting) a stream keeps about a second of
    audio while no turn is open, instead of `pre_roll_ms + max_turn_ms` (~1 MB at the
    defaults), and every event, time and turn's audio is what the unbounded detector
    gives, whatever the chunking."""
    from vad.detector import SpeechDetector
    from vad.turns import TurnConfig, TurnDetector

    quiet = np.zeros(16000 * 40, np.int16).tobytes()  # 40 s, longer than max_turn_ms
    speech = speech[: len(speech) // 640 * 640]
    stream = quiet[: 16000 * 2 * 3] + speech + quiet + speech + quiet[: 16000 * 2 * 2]
    reference = TurnDetector(TurnConfig(), SpeechDetector())
    want = reference.push_pcm(stream) + reference.flush()
    assert sum(type(e).__name__ == "TurnEnded" for e in want) == 2
    rng = np.random.default_rng(3)
    for sizes in ([640], [640 * 5], [640 * 50], list(rng.integers(1, 120, 50) * 640)):
        td = TurnDetector(TurnConfig(idle_history_ms=0), SpeechDetector())
        got, kept_quiet, pos, i = [], [], 0, 0
        while pos < len(stream):
            size = int(sizes[i % len(sizes)])
            got += td.push_pcm(stream[pos : pos + size])
            pos, i = pos + size, i + 1
            if td.state == "quiet":
                kept_quiet.append(_kept_bytes(td))
        assert got + td.flush() == want
        # The edges' history (0.5 s), a sealed block (1 s), the push and the block filling.
        assert max(kept_quiet) <= (500 + 1000 + 1000) * 32 + 2 * max(sizes)
    assert _kept_bytes(reference) >= 30 * 32000  # what the unbounded detector holds


def test_server_ingest_keeps_little_audio_between_turns():
    """What a VAD session holds for its audio after a minute of quiet input."""
    from duplex.protocol import InputAudioConfig, TurnDetectionConfig
    from server.modes.audio_ingest import AudioIngest

    ingest = AudioIngest(InputAudioConfig(), TurnDetectionConfig())
    silence = bytes(640)
    for _ in range(3000):  # 60 s in 20 ms messages
        ingest.events(silence)
    assert _kept_bytes(ingest.detector) <= 2 * 32000 + 640
