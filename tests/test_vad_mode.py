"""VAD mode end to end over a real server: turns from speech, barge-in, manual turns, bad audio."""

from __future__ import annotations

import random

import httpx
import numpy as np
import pytest

from tests.conftest import TOKEN
from tests.speech import make_conversation, synth
from tests.wsutil import connect

SILENCE_1S = np.zeros(16000, dtype=np.int16)


@pytest.fixture(scope="module")
def conversation():
    return make_conversation(seed=7, n_turns=2, voices=["en"], speeds=[160])


async def _stream(c, pcm: np.ndarray, rng: random.Random | None = None) -> None:
    data = pcm.astype("<i2").tobytes()
    pos = 0
    while pos < len(data):
        size = 640 if rng is None else rng.randrange(1, 4000) * 2
        await c.send(data[pos : pos + size])
        pos += size


async def _collect_turns(c, n: int) -> list[dict]:
    """Read until ``n`` responses are done; return every event."""
    events, done = [], 0
    while done < n:
        event = await c.recv(timeout=20)
        events.append(event)
        done += event["type"] == "response.done"
    return events


async def test_spoken_turns_are_found_and_answered(live_server, conversation):
    async with connect(live_server, TOKEN) as c:
        session_id = (await c.recv())["session"]["id"]
        await _stream(c, np.concatenate([conversation.audio, SILENCE_1S]))
        events = await _collect_turns(c, len(conversation.turns))
    ended = [e for e in events if e["type"] == "turn.ended"]
    assert len(ended) == len(conversation.turns)
    for event, (onset, end) in zip(ended, conversation.turns, strict=True):
        assert abs(event["audio_start_ms"] - onset) <= 100, (event, onset)
        assert abs(event["audio_end_ms"] - end) <= 300, (event, end)
    started = [e["audio_start_ms"] for e in events if e["type"] == "speech.started"]
    stopped = [e["audio_end_ms"] for e in events if e["type"] == "speech.stopped"]
    assert started == [e["audio_start_ms"] for e in ended]
    assert stopped == [e["audio_end_ms"] for e in ended]
    replies = [e for e in events if e["type"] == "chunk" and e.get("delta")]
    assert all("Heard" in r["delta"] or "s of audio" in r["delta"] or r["delta"] for r in replies)
    assert "Heard" in "".join(r["delta"] for r in replies)
    audio = [e for e in events if e["type"] == "chunk" and e.get("media")]
    assert audio and all(a["media"]["sample_rate"] == 24000 for a in audio)
    async with httpx.AsyncClient(base_url=live_server.base) as http:
        messages = (
            await http.get(
                f"/v1/sessions/{session_id}/messages", headers={"Authorization": f"Bearer {TOKEN}"}
            )
        ).json()["messages"]
    user = [m for m in messages if m["role"] == "user"]
    assert len(user) == 2 and all(m["metadata"]["audio_ms"] > 500 for m in user)


async def test_events_do_not_depend_on_chunk_sizes(live_server, conversation):
    timings = []
    for seed in (1, 2):
        async with connect(live_server, TOKEN) as c:
            await c.recv()
            await _stream(c, np.concatenate([conversation.audio, SILENCE_1S]), random.Random(seed))
            events = await _collect_turns(c, len(conversation.turns))
        timings.append(
            [
                (e["type"], e.get("audio_start_ms"), e.get("audio_end_ms"))
                for e in events
                if e["type"] in ("speech.started", "speech.stopped", "turn.ended")
            ]
        )
    assert timings[0] == timings[1]


async def test_barge_in_interrupts_and_cuts_the_stored_answer(server_factory, conversation):
    # Reply audio at real time: long enough to talk over. No resume grace: leaving ends the
    # session at once, so the cut answer is stored without waiting for a playback report.
    server = server_factory(echo_pace=1.0, resume_grace_s=0)
    speech = synth("Could you tell me about the weather tomorrow please", "en", 150)
    async with connect(server, TOKEN) as c:
        session_id = (await c.recv())["session"]["id"]
        await _stream(c, np.concatenate([speech, SILENCE_1S]))
        events = await c.until("response.started", timeout=20)
        response_id = events[-1]["response_id"]
        audio_chunks = 0
        while audio_chunks < 5:  # wait until half a second of reply audio has come
            event = await c.recv()
            audio_chunks += event["type"] == "chunk" and "media" in event
        await c.send({"type": "playback", "response_id": response_id, "played_ms": 400})
        await _stream(c, speech[:16000])  # the user talks over the reply
        events = await c.until("response.done", timeout=10)
    assert any(e["type"] == "speech.started" for e in events)
    interrupted = [e for e in events if e["type"] == "chunk" and e.get("interrupted")]
    assert interrupted and interrupted[0]["response_id"] == response_id
    assert events[-1]["finish_reason"] == "interrupted"
    async with httpx.AsyncClient(base_url=server.base) as http:
        messages = (
            await http.get(
                f"/v1/sessions/{session_id}/messages", headers={"Authorization": f"Bearer {TOKEN}"}
            )
        ).json()["messages"]
    answer = next(m for m in messages if m["metadata"].get("response_id") == response_id)
    assert answer["metadata"]["finish_reason"] == "interrupted"
    assert answer["metadata"]["played_ms"] == 400
    assert answer["metadata"]["audio_ms"] < len(speech) / 16, "audio stopped early"


@pytest.mark.parametrize(
    "turn_detection",
    [{"min_barge_in_ms": 800}, {"interrupt": False}],
    ids=["short-backchannel", "interrupt-off"],
)
async def test_speech_over_the_reply_that_must_not_interrupt(server_factory, turn_detection):
    server = server_factory(echo_pace=1.0)
    speech = synth("Tell me a long story about the sea", "en", 150)
    async with connect(server, TOKEN) as c:
        await c.recv()
        await c.send({"type": "session.update", "config": {"turn_detection": turn_detection}})
        await c.recv()
        await _stream(c, np.concatenate([speech, SILENCE_1S]))
        await c.until("response.started", timeout=20)
        # 0.4 s "mm-hm" (or, with interrupt off, a whole sentence)
        talk = speech[:6400] if "min_barge_in_ms" in turn_detection else speech
        await _stream(c, np.concatenate([talk, SILENCE_1S]))
        events = await c.until("response.done", timeout=20)
    assert events[-1]["finish_reason"] == "stop"
    assert not any(e.get("interrupted") for e in events)


async def test_manual_turns_and_commit(live_server):
    speech = synth("push to talk works", "en", 170)
    async with connect(live_server, TOKEN) as c:
        await c.recv()
        await c.send({"type": "session.update", "config": {"turn_detection": {"type": "manual"}}})
        await c.recv()
        await _stream(c, np.concatenate([speech, SILENCE_1S, SILENCE_1S]))
        await c.send({"type": "input.commit", "request_id": "ptt-1"})
        events = await c.until("response.done")
        kinds = [e["type"] for e in events]
        assert "speech.started" not in kinds, "manual mode: no VAD events"
        ended = next(e for e in events if e["type"] == "turn.ended")
        assert ended["request_id"] == "ptt-1"
        assert ended["audio_end_ms"] - ended["audio_start_ms"] >= len(speech) / 16
        await c.send({"type": "input.commit"})
        err = await c.recv()
        assert (
            err["type"] == "error" and err["code"] == 400 and "nothing to commit" in err["message"]
        )


async def test_bad_audio_is_refused_without_losing_audio(live_server, conversation):
    async with connect(live_server, TOKEN) as c:
        await c.recv()
        data = np.concatenate([conversation.audio, SILENCE_1S]).astype("<i2").tobytes()
        half = len(data) // 2 & ~1
        await c.send(data[:half])
        await c.send(b"\x01\x02\x03")  # not a whole number of samples
        before = await c.until("error")
        assert before[-1]["code"] == 400 and "3 bytes" in before[-1]["message"]
        await c.send(data[half:])
        done_before = sum(e["type"] == "response.done" for e in before)
        events = before + await _collect_turns(c, len(conversation.turns) - done_before)
        ended = [e for e in events if e["type"] == "turn.ended"]
        assert len(ended) == len(conversation.turns)
        for event, (onset, _) in zip(ended, conversation.turns, strict=True):
            assert abs(event["audio_start_ms"] - onset) <= 100, "no audio lost: times unchanged"
        await c.send({"type": "session.update", "config": {"input_audio": {"sample_rate": 4000}}})
        err = await c.recv()
        assert err["code"] == 400 and "sample_rate" in err["message"]
        await c.send({"type": "input.audio", "audio": "not base64!"})
        assert (await c.recv())["code"] == 400


async def test_stereo_48k_input_is_resampled(live_server, conversation):
    pcm16k = np.concatenate([conversation.audio, SILENCE_1S]).astype(np.float64)
    pcm48k = np.interp(np.arange(len(pcm16k) * 3) / 3, np.arange(len(pcm16k)), pcm16k)
    stereo = np.repeat(pcm48k.astype(np.int16)[:, None], 2, axis=1).reshape(-1)
    async with connect(live_server, TOKEN) as c:
        await c.recv()
        await c.send(
            {
                "type": "session.update",
                "config": {"input_audio": {"sample_rate": 48000, "channels": 2}},
            }
        )
        await c.recv()
        await _stream(c, stereo)
        events = await _collect_turns(c, len(conversation.turns))
    ended = [e for e in events if e["type"] == "turn.ended"]
    assert len(ended) == len(conversation.turns)
    for event, (onset, _) in zip(ended, conversation.turns, strict=True):
        assert abs(event["audio_start_ms"] - onset) <= 100


async def test_turn_longer_than_max_turn_is_cut(live_server):
    speech = synth("this sentence keeps going and going without any real pause at all", "en", 140)
    async with connect(live_server, TOKEN) as c:
        await c.recv()
        await c.send(
            {"type": "session.update", "config": {"turn_detection": {"max_turn_ms": 1000}}}
        )
        await c.recv()
        await _stream(c, np.concatenate([speech, SILENCE_1S]))
        events = await c.until("response.done", timeout=20)
    ended = next(e for e in events if e["type"] == "turn.ended")
    assert ended["audio_end_ms"] - ended["audio_start_ms"] <= 1100


async def test_respond_false_holds_turns_until_the_client_ends_one(live_server, conversation):
    async with connect(live_server, TOKEN) as c:
        await c.recv()
        await c.send({"type": "session.update", "config": {"turn_detection": {"respond": False}}})
        assert (await c.recv())["type"] == "session.updated"
        await _stream(c, np.concatenate([conversation.audio, SILENCE_1S]))
        events = []
        while sum(e["type"] == "turn.ended" for e in events) < len(conversation.turns):
            events.append(await c.recv(timeout=20))
        await c.send({"type": "input.text", "text": "and this", "final": True})
        events += await c.until("response.done")
    kinds = [e["type"] for e in events]
    # Both turns were detected and held; the client's turn took them: one answer.
    assert kinds.count("response.started") == 1
    assert kinds.index("response.started") > kinds.index("turn.ended")
    reply = "".join(e.get("delta") or "" for e in events if e["type"] == "chunk")
    assert reply.startswith("You said: \u201cand this\u201d Heard ")
    ended = [e for e in events if e["type"] == "turn.ended" and e.get("audio_end_ms")]
    heard_s = float(reply.split("Heard ")[1].split()[0])
    spoken_s = sum(e["audio_end_ms"] - e["audio_start_ms"] for e in ended) / 1000
    assert heard_s >= spoken_s - 0.1
