"""The outbox holds reply audio raw, replays it byte for byte, and lets go of what the
client has heard (server/outbox.py)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from duplex.protocol import RESUME_GAP, ChunkEvent, Media, encode_server_message
from server.limits import SessionLimits
from server.outbox import Outbox, OutboxWriter
from server.state.base import OutboxBatch, OutboxEntry, SessionRecord
from server.state.memory import MemoryStore
from server.state.open import open_store
from tests.conftest import store_url
from tests.test_resume import drop, open_ws, tone

RATE_OUT = 24000  # the default output_audio.sample_rate: the echo's 16 kHz is resampled


class RawReader:
    """Keeps every frame as received (text), to compare replays byte for byte."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.raw: list[str] = []

    async def until(self, kind: str, timeout: float = 20) -> dict:
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.ws.recv()
                self.raw.append(raw)
                event = json.loads(raw)
                if event["type"] == kind:
                    return event

    def events(self) -> list[dict]:
        return [json.loads(r) for r in self.raw]


async def answered(server) -> tuple[RawReader, str, int]:
    """A session that heard a whole 3 s echo answer; the ``seq`` before the answer."""
    r = RawReader(await open_ws(server))
    session_id = (await r.until("session.created"))["session"]["id"]
    await r.ws.send(
        json.dumps({"type": "session.update", "config": {"turn_detection": {"type": "manual"}}})
    )
    before = (await r.until("session.updated"))["seq"]
    audio = tone()
    for pos in range(0, len(audio), 640 * 50):
        await r.ws.send(audio[pos : pos + 640 * 50])
    await r.ws.send(json.dumps({"type": "input.commit"}))
    await r.until("response.done")
    return r, session_id, before


def audio_chunk(seq: int, pcm: bytes, response_id: str = "resp_1") -> tuple[ChunkEvent, str]:
    media = Media(mime_type="audio/pcm", data=pcm, sample_rate=RATE_OUT, channels=1)
    message = ChunkEvent(response_id=response_id, media=media)
    message.seq = seq
    return message, encode_server_message(message)


async def test_byte_budget_counts_raw_audio_and_the_replay_is_identical(server_factory):
    # The 3 s answer is 144,000 bytes of audio at 24 kHz, 192,000 characters as base64:
    # a budget of 170,000 bytes holds all of it only if the audio is counted raw.
    server = server_factory(echo_pace=0, outbox_max_bytes=170_000)
    first, session_id, before = await answered(server)
    live = [raw for raw in first.raw if json.loads(raw)["seq"] > before]
    assert sum(len(raw) for raw in live) > 170_000  # as JSON it would not fit
    drop(first.ws)
    second = RawReader(await open_ws(server, session_id=session_id, last_seq=before))
    resumed = await second.until("session.resumed")
    assert resumed["first_seq"] == before + 1  # nothing missing: no 410
    await second.until("response.done")
    replayed = second.raw[1:]
    assert all(json.loads(raw)["type"] != "error" for raw in replayed)
    assert replayed == live  # re-encoded from the raw audio: the very same text
    await second.ws.close()


async def test_playback_report_lets_go_of_what_the_client_received(server_factory):
    server = server_factory(echo_pace=0)
    first, session_id, before = await answered(server)
    events = first.events()
    audio = [e for e in events if e["type"] == "chunk" and "media" in e]
    response_id = audio[0]["response_id"]
    last_audio = audio[-1]["seq"]
    outbox = server.app.state.duplex.registry.get("tenant-a", session_id)._outbox
    held_before = outbox.size
    # the user heard half of the answer: everything up to the chunk that ends there goes
    await first.ws.send(
        json.dumps({"type": "playback", "response_id": response_id, "played_ms": 1500})
    )
    await first.ws.send(json.dumps({"type": "ping", "id": "p"}))
    await first.until("pong")
    half = [e["seq"] for e in audio][14]  # 100 ms chunks: the 15th ends at 1500 ms
    assert outbox.first_seq == half + 1
    assert outbox.size < held_before * 0.6
    # all of it heard: the audio goes, and what came after it stays
    await first.ws.send(
        json.dumps({"type": "playback", "response_id": response_id, "played_ms": 3000})
    )
    await first.ws.send(json.dumps({"type": "ping", "id": "q"}))
    await first.until("pong")
    assert outbox.first_seq == last_audio + 1
    # the store's copy (read after the session closes, or by another replica) lets go too,
    # with no new message to write
    store = server.app.state.duplex.services.store
    await asyncio.sleep(0.5)  # a few outbox_flush_ms
    stored = await store.load_outbox(session_id, max_age_s=60)
    assert [e.seq for e in stored] == [e.seq for e in outbox.after(0)]
    assert all(e.seq > last_audio for e in stored)
    last = first.events()[-1]["seq"]
    drop(first.ws)
    # the same client resumes from what it saw: nothing missing
    again = RawReader(await open_ws(server, session_id=session_id, last_seq=last))
    resumed = await again.until("session.resumed")
    assert resumed["first_seq"] == last + 1
    drop(again.ws)
    # a client asking for older messages is told they are gone (non-fatal 410)
    other = RawReader(await open_ws(server, session_id=session_id, last_seq=before))
    await other.until("session.resumed")
    gap = await other.until("error")
    assert gap["code"] == RESUME_GAP and not gap["fatal"]
    assert f"{before + 1}..{last_audio}" in gap["message"]
    await other.ws.close()


def test_outbox_holds_audio_raw_and_shares_the_bytes():
    limits = SessionLimits(outbox_max_bytes=10 * 5000)
    outbox = Outbox("s", OutboxWriter(MemoryStore(), limits), limits)
    outbox._writer.mark = lambda _: None  # no event loop here: nothing is written
    sent = []
    pcms = [bytes([k]) * 4800 for k in range(10)] + [b"\x01\x02\x03" * 1601]  # odd length
    for seq, pcm in enumerate(pcms, 1):
        message, text = audio_chunk(seq, pcm)
        outbox.record(seq, text, message)
        sent.append(text)
    held = outbox.after(0)
    # 4800 raw bytes and ~150 of JSON each: 10 fit in 50,000 bytes (as base64 JSON, 7)
    assert [e.seq for e in held] == list(range(2, 12))
    assert outbox.size == sum(e.size for e in held) <= 50_000
    assert [e.text for e in held] == sent[1:]
    assert held[0]._audio is pcms[1]  # the reply's own bytes, not a copy
    assert held[-1].end_ms == pytest.approx(1000 + 4803 / 48)


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis"])
async def test_stores_keep_compact_entries_as_their_json(kind, tmp_path, request):
    url = store_url(kind, tmp_path, request)
    store = open_store(url, ttl_s=3600, max_sessions=100, max_messages=100)
    try:
        await store.create_session(SessionRecord(id="c1", tenant="t"))
        now = time.time()
        texts, entries = [], []
        for seq in range(1, 4):
            message, text = audio_chunk(seq, bytes(range(256)) * 19)
            texts.append(text)
            entries.append(OutboxEntry.of_audio(seq, text, now, message.media.data, "r", 0.0))
        await store.append_outbox([OutboxBatch("c1", entries)], max_age_s=60)
        got = await store.load_outbox("c1", max_age_s=60)
        assert [(e.seq, e.text) for e in got] == list(zip((1, 2, 3), texts, strict=True))
    finally:
        await store.close()


async def test_store_copy_lets_go_of_what_was_heard_with_nothing_new_to_write():
    store = MemoryStore()
    await store.create_session(SessionRecord(id="h", tenant="t"))
    limits = SessionLimits(outbox_flush_ms=20)
    writer = OutboxWriter(store, limits)
    outbox = Outbox("h", writer, limits)
    for seq in range(1, 6):
        message, text = audio_chunk(seq, bytes(4800))  # 100 ms each
        outbox.record(seq, text, message)
    outbox.append(6, '{"type":"response.done","seq":6}')
    await asyncio.sleep(0.1)
    assert [e.seq for e in await store.load_outbox("h", max_age_s=60)] == [1, 2, 3, 4, 5, 6]
    outbox.heard("resp_1", 500)  # all of it heard; nothing new is sent after
    assert [e.seq for e in outbox.after(0)] == [6]
    await asyncio.sleep(0.1)
    assert [e.seq for e in await store.load_outbox("h", max_age_s=60)] == [6]
    await writer.aclose()
