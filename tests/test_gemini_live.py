"""GeminiLiveProvider against the local fake Gemini Live service (no Duplex server)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from duplex.protocol import (
    ErrorEvent,
    ImageFrame,
    ProviderReconnect,
    ResponseDone,
    ResponseStarted,
    SessionConfig,
    SpeechStarted,
    SpeechStopped,
    StreamChunk,
    ToolCancelled,
    ToolSpec,
    Transcript,
)
from server.providers.base import ProviderError, RealtimeEvent, RealtimeSetup
from server.providers.gemini_live import GeminiLiveProvider, GeminiLiveSession
from tests.fakes.gemini_live import BAD_KEY_REASON, FakeGeminiLive

RATE = 16000
CHUNK_MS = 20
WEATHER = ToolSpec(
    name="get_weather",
    description="Current weather for a city",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
)


# --------------------------------------------------------------------------------------
# helpers


def make_setup(instructions: str = "", **config: Any) -> RealtimeSetup:
    cfg = SessionConfig(mode="asm", provider="gemini_live", **config)
    return RealtimeSetup(
        session_id="sess_test", config=cfg, instructions=instructions, tools=list(cfg.tools)
    )


def make_provider(fake: FakeGeminiLive, key: str = "test-key", **kw: Any) -> GeminiLiveProvider:
    kw.setdefault("reconnect_backoff_s", 0.01)
    kw.setdefault("connect_timeout_s", 5.0)
    return GeminiLiveProvider(key, base_url=fake.base_url, model="models/test-live", **kw)


@contextlib.asynccontextmanager
async def live(
    fake: FakeGeminiLive, setup: RealtimeSetup, **kw: Any
) -> AsyncIterator[tuple[GeminiLiveSession, AsyncIterator[RealtimeEvent]]]:
    session = await make_provider(fake, **kw).connect(setup)
    events = session.events()
    try:
        yield session, events
    finally:
        await session.close()


def tone(ms: int, amplitude: float = 6000.0) -> bytes:
    n = RATE * ms // 1000
    return (amplitude * np.sin(2 * np.pi * 220 * np.arange(n) / RATE)).astype("<i2").tobytes()


def quiet(ms: int, level: int = 0) -> bytes:
    """Below the fake's activity threshold; ``level`` makes each chunk's content unique."""
    n = RATE * ms // 1000
    return (np.arange(n) % 5 + level).astype("<i2").tobytes()


async def speak_turn(session: GeminiLiveSession, speech_ms: int = 300, pause_ms: int = 300) -> None:
    for _ in range(speech_ms // CHUNK_MS):
        await session.send_audio(tone(CHUNK_MS))
    for _ in range(pause_ms // CHUNK_MS):
        await session.send_audio(quiet(CHUNK_MS))


async def until(
    events: AsyncIterator[RealtimeEvent],
    done: Callable[[RealtimeEvent], bool],
    timeout: float = 5.0,
) -> list[RealtimeEvent]:
    """Events up to and including the first one for which ``done`` is true."""
    got: list[RealtimeEvent] = []
    async with asyncio.timeout(timeout):
        async for event in events:
            got.append(event)
            if done(event):
                return got
    raise AssertionError(f"event stream ended before the expected event: {got!r}")


def is_done(reason: str | None = None) -> Callable[[RealtimeEvent], bool]:
    return lambda e: isinstance(e, ResponseDone) and (reason is None or e.finish_reason == reason)


def chunks(events: list[RealtimeEvent]) -> list[StreamChunk]:
    return [e for e in events if isinstance(e, StreamChunk)]


def started_id(events: list[RealtimeEvent]) -> str:
    ids = [e.response_id for e in events if isinstance(e, ResponseStarted)]
    assert len(ids) == 1, events
    return ids[0]


def dedup(items: list[bytes]) -> list[bytes]:
    seen: set[bytes] = set()
    return [x for x in items if not (x in seen or seen.add(x))]


# --------------------------------------------------------------------------------------
# setup


async def test_setup_message_carries_the_session_config() -> None:
    setup = make_setup(
        "Be brief.",
        voice="Puck",
        tools=[WEATHER, ToolSpec(name="ping", description="No arguments")],
        turn_detection={"pre_roll_ms": 250, "stop_ms": 600},
        provider_options={"temperature": 0.4},
    )
    async with FakeGeminiLive() as fake, live(fake, setup):
        record = fake.connections[0]
        body = record.setup
    assert record.key == "test-key"
    assert body is not None
    assert body["model"] == "models/test-live"
    assert body["generationConfig"] == {
        "responseModalities": ["AUDIO"],
        "speechConfig": {"voiceConfig": {"prebuiltVoiceConfig": {"voiceName": "Puck"}}},
        "temperature": 0.4,
    }
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert body["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "Current weather for a city",
                    "parameters": WEATHER.parameters,
                },
                {"name": "ping", "description": "No arguments"},  # empty OBJECT schema omitted
            ]
        }
    ]
    assert body["realtimeInputConfig"] == {
        "automaticActivityDetection": {
            "disabled": False,
            "prefixPaddingMs": 250,
            "silenceDurationMs": 600,
        },
        "activityHandling": "START_OF_ACTIVITY_INTERRUPTS",
    }
    assert body["sessionResumption"] == {}
    assert body["contextWindowCompression"] == {"slidingWindow": {}}
    assert body["inputAudioTranscription"] == {}
    assert body["outputAudioTranscription"] == {}


async def test_setup_with_duplex_turns_disables_gemini_activity_detection() -> None:
    setup = make_setup(
        model="gemini-other-live",
        turn_detection={"provider_vad": "duplex"},
        provider_options={"response_modality": "text", "transparent_resumption": True},
    )
    async with FakeGeminiLive() as fake, live(fake, setup):
        body = fake.connections[0].setup
    assert body is not None
    assert body["model"] == "models/gemini-other-live"
    assert body["generationConfig"] == {"responseModalities": ["TEXT"]}
    assert body["realtimeInputConfig"] == {
        "automaticActivityDetection": {"disabled": True},
        "activityHandling": "NO_INTERRUPTION",
    }
    assert body["sessionResumption"] == {"transparent": True}
    assert "outputAudioTranscription" not in body


# --------------------------------------------------------------------------------------
# turns


async def test_spoken_turn_is_answered_with_audio_and_transcripts() -> None:
    async with FakeGeminiLive(audio_chunks=4) as fake, live(fake, make_setup()) as (s, events):
        await speak_turn(s)
        got = await until(events, is_done())
        audio_in = [m["realtimeInput"]["audio"] for m in fake.connections[0].messages[1:]]

    started = [i for i, e in enumerate(got) if isinstance(e, ResponseStarted)]
    assert len(started) == 1
    assert all(i > started[0] for i, e in enumerate(got) if isinstance(e, StreamChunk))
    rid = got[started[0]].response_id  # type: ignore[union-attr]
    assert rid.startswith("resp_")
    media = [c.media for c in chunks(got) if c.media is not None]
    assert len(media) == 4
    assert {(m.mime_type, m.sample_rate, m.channels) for m in media} == {("audio/pcm", 24000, 1)}
    assert all(len(m.data) == 24000 * 20 // 1000 * 2 for m in media)
    spoken = [c.delta for c in chunks(got) if c.transcript]
    assert "".join(d or "" for d in spoken) == fake.reply_text
    assert all(c.response_id == rid for c in chunks(got))
    finals = [e for e in got if isinstance(e, Transcript) and e.final]
    assert [t.text for t in finals] == [fake.user_transcript]
    done = got[-1]
    assert isinstance(done, ResponseDone)
    assert (done.response_id, done.finish_reason) == (rid, "stop")
    assert done.usage is not None and done.usage["output_tokens"] == len(fake.reply_text.split())
    assert {a["mimeType"] for a in audio_in} == {"audio/pcm;rate=16000"}


async def test_text_in_text_out() -> None:
    setup = make_setup(provider_options={"response_modality": "TEXT"})
    async with FakeGeminiLive() as fake, live(fake, setup) as (s, events):
        await s.send_text("what time is it")
        got = await until(events, is_done())
        sent = fake.connections[0].messages[1]
    assert sent == {"realtimeInput": {"text": "what time is it"}}
    assert isinstance(got[0], ResponseStarted)
    assert "".join(c.delta or "" for c in chunks(got)) == "You said: what time is it"
    assert not any(c.media for c in chunks(got))
    assert isinstance(got[-1], ResponseDone) and got[-1].finish_reason == "stop"


async def test_barge_in_interrupts_the_answer() -> None:
    async with FakeGeminiLive(hold_response=True) as fake, live(fake, make_setup()) as (s, events):
        await speak_turn(s)
        first = await until(events, lambda e: isinstance(e, StreamChunk) and e.media is not None)
        rid = started_id(first)
        await s.send_audio(tone(CHUNK_MS))  # the user talks over the answer
        cut = await until(events, is_done())
        assert any(c.interrupted and c.response_id == rid for c in chunks(cut))
        assert isinstance(cut[-1], ResponseDone)
        assert (cut[-1].response_id, cut[-1].finish_reason) == (rid, "interrupted")
        speech = await until(events, lambda e: isinstance(e, SpeechStarted))
        assert speech[-1].audio_start_ms >= 600  # type: ignore[union-attr]
        await speak_turn(s, speech_ms=200)
        nxt = await until(events, lambda e: isinstance(e, ResponseStarted))
        kinds = [type(e) for e in nxt]
        assert kinds.index(SpeechStopped) < kinds.index(ResponseStarted)
        assert nxt[-1].response_id != rid  # type: ignore[union-attr]


async def test_cancel_response_drops_the_rest_of_that_answer() -> None:
    async with FakeGeminiLive(hold_response=True) as fake, live(fake, make_setup()) as (s, events):
        await speak_turn(s)
        head = await until(events, lambda e: isinstance(e, StreamChunk) and e.media is not None)
        rid = started_id(head)
        await s.cancel_response()
        done = await until(events, is_done())
        assert isinstance(done[-1], ResponseDone)
        assert (done[-1].response_id, done[-1].finish_reason) == (rid, "cancelled")
        # Gemini keeps generating the cancelled answer; that audio must not surface.
        sent_at_cancel = fake.audio_chunks_sent
        await fake.wait_until(lambda: fake.audio_chunks_sent >= sent_at_cancel + 3)
        await s.send_text("never mind")  # Gemini interrupts the held answer, then replies
        after = await until(events, lambda e: isinstance(e, StreamChunk) and e.delta == "mind")
    assert not any(getattr(e, "response_id", None) == rid for e in after)
    assert not any(isinstance(e, ResponseDone) for e in after)
    started = [e for e in after if isinstance(e, ResponseStarted)]
    assert len(started) == 1 and started[0].response_id != rid
    spoken = [c.delta or "" for c in chunks(after) if c.transcript]
    assert "".join(spoken) == "You said: never mind"
    assert fake.connections[0].messages[-1] == {"realtimeInput": {"text": "never mind"}}


async def test_duplex_turns_frame_audio_with_activity_markers() -> None:
    setup = make_setup(turn_detection={"provider_vad": "duplex"})
    async with FakeGeminiLive() as fake, live(fake, setup) as (s, events):
        for _ in range(5):
            await s.send_audio(tone(CHUNK_MS))
        await s.commit()
        await until(events, is_done("stop"))
        await s.send_audio(quiet(CHUNK_MS))
        await s.send_text("and text")
        await until(events, is_done("stop"))
        kinds = fake.connections[0].realtime_kinds()
    assert kinds == [
        "activityStart",
        *["audio"] * 5,
        "activityEnd",
        "activityStart",
        "audio",
        "text",
        "activityEnd",
    ]


async def test_odd_length_pcm_is_carried_to_the_next_chunk() -> None:
    pcm = tone(60)
    pieces = [pcm[:101], pcm[101:640], pcm[640:1281], pcm[1281:]]
    async with FakeGeminiLive() as fake, live(fake, make_setup()) as (s, _):
        for piece in pieces:
            await s.send_audio(piece)
        await s.send_audio(b"")
        await fake.wait_until(lambda: b"".join(fake.received_audio()) == pcm)
        record = fake.connections[0]
    assert record.closed_with is None
    assert all(len(c) % 2 == 0 for c in record.audio())


# --------------------------------------------------------------------------------------
# tools


async def test_tool_call_round_trip() -> None:
    setup = make_setup(tools=[WEATHER], provider_options={"response_modality": "TEXT"})
    async with FakeGeminiLive(scenario="tool_call") as fake, live(fake, setup) as (s, events):
        await s.send_text("weather in Paris?")
        first = await until(events, is_done())
        calls = [tc for c in chunks(first) for tc in c.tool_calls or []]
        assert isinstance(first[-1], ResponseDone) and first[-1].finish_reason == "tool_calls"
        assert [(c.name, json.loads(c.arguments)) for c in calls] == [
            ("get_weather", {"city": "Paris"})
        ]
        await s.send_tool_result(calls[0].id, "", json.dumps({"temp_c": 21}))
        second = await until(events, is_done())
    assert fake.tool_responses == [
        {"id": calls[0].id, "name": "get_weather", "response": {"temp_c": 21}}
    ]
    assert "".join(c.delta or "" for c in chunks(second)) == 'The tool said {"temp_c": 21}'
    assert isinstance(second[0], ResponseStarted)
    assert second[0].response_id != first[-1].response_id  # type: ignore[union-attr]
    assert isinstance(second[-1], ResponseDone) and second[-1].finish_reason == "stop"


async def test_plain_tool_output_is_wrapped_and_cancellation_is_reported() -> None:
    setup = make_setup(tools=[WEATHER])
    async with FakeGeminiLive(scenario="tool_call") as fake, live(fake, setup) as (s, events):
        await speak_turn(s)
        first = await until(events, is_done("tool_calls"))
        call = next(tc for c in chunks(first) for tc in c.tool_calls or [])
        await s.send_audio(tone(CHUNK_MS))  # the user speaks instead of waiting
        got = await until(events, lambda e: isinstance(e, ToolCancelled))
        assert got[-1].call_ids == [call.id]  # type: ignore[union-attr]
        await s.send_tool_result(call.id, "get_weather", "sunny")
        await fake.wait_until(lambda: len(fake.tool_responses) == 1)
    assert fake.tool_responses[0]["response"] == {"output": "sunny"}


# --------------------------------------------------------------------------------------
# resumption


@pytest.mark.parametrize("transparent", [True, False])
async def test_go_away_resumes_without_losing_input(transparent: bool) -> None:
    setup = make_setup(provider_options={"transparent_resumption": transparent})
    sent = [quiet(CHUNK_MS, level=i) for i in range(1, 41)]
    frame = ImageFrame(data=b"\xff\xd8jpeg-bytes\xff\xd9", mime_type="image/jpeg")
    fake = FakeGeminiLive(scenario="go_away", go_away_after=10, resumption_every=4)
    async with fake, live(fake, setup) as (s, events):
        for i, chunk in enumerate(sent):
            await s.send_audio(chunk)
            if i == 20:
                await s.send_image(frame)
            if i % 5 == 4:
                # Bursts: resumption updates arrive while later chunks are in flight, and
                # the goAway and the reconnection interleave with sending.
                await asyncio.sleep(0.005)
        await fake.wait_until(lambda: set(sent) <= set(fake.session_audio()))
        await s.close()
        async with asyncio.timeout(2):
            leftovers = [e async for e in events]

    assert len(fake.connections) == 2
    first, second = fake.connections
    assert second.resumed_from is not None and second.resumed_from in first.handles
    assert second.setup is not None
    assert second.setup["sessionResumption"]["handle"] == second.resumed_from
    # Every chunk reached the service, some twice (replayed): nothing lost, order kept.
    received = fake.received_audio()
    assert dedup(received) == sent
    assert len(received) > len(sent)
    heard = fake.session_audio()
    if transparent:
        assert heard == sent  # the index says exactly what to replay: each chunk once
    else:
        assert dedup(heard) == sent  # no index: a margin is replayed, duplicates possible
    images = [v for kind, v in fake.states[-1].inputs if kind == "video"]
    assert images == [frame.data]
    assert not [e for e in leftovers if isinstance(e, ErrorEvent)]


async def test_dropped_connection_mid_response_reconnects() -> None:
    setup = make_setup(provider_options={"transparent_resumption": True})
    fake = FakeGeminiLive(scenario="drop_mid_response", drop_after_chunks=2, audio_chunks=6)
    async with fake, live(fake, setup) as (s, events):
        await speak_turn(s)
        cut = await until(events, is_done())
        rid = started_id(cut)
        assert isinstance(cut[-1], ResponseDone)
        assert (cut[-1].response_id, cut[-1].finish_reason) == (rid, "interrupted")
        assert any(c.interrupted for c in chunks(cut))
        await s.send_text("are you still there")  # buffered if the reconnection is under way
        again = await until(events, is_done())
    assert len(fake.connections) == 2
    assert fake.connections[0].closed_with == (1006, "dropped")
    assert fake.connections[1].resumed_from in fake.connections[0].handles
    assert isinstance(again[-1], ResponseDone) and again[-1].finish_reason == "stop"
    assert again[-1].response_id != rid
    notes = [e for e in again if isinstance(e, ProviderReconnect)]
    # After the cut reply ended; resumed with a handle, so the context is kept.
    assert [(n.response_id, n.attempt, n.context_kept) for n in notes] == [(rid, 1, True)]
    spoken = "".join(c.delta or "" for c in chunks(again) if c.transcript)
    assert spoken == "You said: are you still there"
    assert not any(isinstance(e, ErrorEvent) for e in cut + again)


# --------------------------------------------------------------------------------------
# faults


async def test_wrong_api_key_is_a_fatal_provider_error() -> None:
    async with FakeGeminiLive(api_key="the-right-key") as fake:
        with pytest.raises(ProviderError) as info:
            await make_provider(fake, key="wrong-key-123").connect(make_setup())
    err = info.value
    assert (err.code, err.fatal, err.upstream_status) == (502, True, 1007)
    assert "rejected the API key" in err.message
    assert "wrong-key-123" not in err.message
    assert fake.connections[0].closed_with == (1007, BAD_KEY_REASON)


async def test_missing_api_key_fails_before_connecting() -> None:
    provider = GeminiLiveProvider(None, base_url="ws://127.0.0.1:9")
    with pytest.raises(ProviderError, match="GEMINI_API_KEY"):
        await provider.connect(make_setup())


async def test_quota_close_ends_the_session_without_retrying() -> None:
    async with (
        FakeGeminiLive(scenario="quota_exceeded") as fake,
        live(fake, make_setup()) as (s, events),
    ):
        await s.send_audio(quiet(CHUNK_MS))
        got = await until(events, lambda e: isinstance(e, ErrorEvent))
        error = got[-1]
        assert isinstance(error, ErrorEvent)
        assert (error.code, error.fatal) == (502, True)
        assert "quota" in error.message
        async with asyncio.timeout(2):
            rest = [e async for e in events]
        assert rest == []
        with pytest.raises(ProviderError):
            await s.send_audio(quiet(CHUNK_MS))
    assert len(fake.connections) == 1


async def test_error_frame_becomes_a_non_fatal_error_event() -> None:
    async with FakeGeminiLive() as fake, live(fake, make_setup()) as (_, events):
        await fake.inject(
            {"error": {"code": 400, "status": "INVALID_ARGUMENT", "message": "bad frame"}}
        )
        got = await until(events, lambda e: isinstance(e, ErrorEvent))
    error = got[-1]
    assert isinstance(error, ErrorEvent)
    assert (error.code, error.fatal) == (502, False)
    assert "400 INVALID_ARGUMENT: bad frame" in error.message


async def test_refusing_close_is_fatal_and_not_retried() -> None:
    async with FakeGeminiLive() as fake, live(fake, make_setup()) as (_, events):
        await fake.close_current(1008, "Operation is not implemented, or supported, or enabled.")
        got = await until(events, lambda e: isinstance(e, ErrorEvent))
        async with asyncio.timeout(2):
            rest = [e async for e in events]
    error = got[-1]
    assert isinstance(error, ErrorEvent)
    assert (error.code, error.fatal) == (502, True)
    assert "1008" in error.message and "not implemented" in error.message
    assert rest == []
    assert len(fake.connections) == 1


async def test_internal_error_close_is_resumed() -> None:
    setup = make_setup(
        provider_options={"response_modality": "TEXT", "transparent_resumption": True}
    )
    async with FakeGeminiLive() as fake, live(fake, setup) as (s, events):
        await s.send_text("first")
        await until(events, is_done("stop"))
        await fake.wait_until(
            lambda: len(fake.connections[0].handles) == 1
        )  # issued after the turn
        await fake.close_current(1011, "Internal error occurred.")
        await fake.wait_until(lambda: len(fake.connections) == 2)
        await s.send_text("second")
        got = await until(events, is_done())
    assert fake.connections[1].resumed_from == fake.connections[0].handles[-1]
    assert "".join(c.delta or "" for c in chunks(got)) == "You said: second"
    assert not any(isinstance(e, ErrorEvent) for e in got)
    texts = [m["realtimeInput"]["text"] for m in fake.connections[1].messages[1:]]
    assert texts == ["second"]


async def test_without_a_handle_a_new_session_gets_everything_unconfirmed() -> None:
    """No handle ever confirmed any input, so all of it is replayed: duplicate over loss."""
    setup = make_setup(provider_options={"response_modality": "TEXT"})
    pending = [quiet(CHUNK_MS, level=i) for i in (1, 2, 3)]  # not yet a turn
    async with FakeGeminiLive(issue_handles=False) as fake, live(fake, setup) as (s, events):
        await s.send_text("first")
        await until(events, is_done("stop"))
        for chunk in pending:
            await s.send_audio(chunk)
        await fake.wait_until(lambda: len(fake.connections[0].audio()) == 3)
        await fake.close_current(1011, "Internal error occurred.")
        await s.send_text("second")
        await fake.wait_until(
            lambda: len(fake.connections) == 2 and len(fake.connections[1].messages) >= 6
        )
    second = fake.connections[1]
    assert second.setup is not None and second.setup["sessionResumption"] == {}
    assert second.audio() == pending
    texts = [
        m["realtimeInput"]["text"] for m in second.messages if "text" in m.get("realtimeInput", {})
    ]
    assert texts == ["first", "second"]  # in the order sent, nothing lost


async def test_close_leaves_no_tasks_behind() -> None:
    before = asyncio.all_tasks()
    async with FakeGeminiLive() as fake:
        session = await make_provider(fake).connect(make_setup())
        await speak_turn(session, speech_ms=100, pause_ms=0)
        await session.close()
        await session.close()  # idempotent
        async with asyncio.timeout(1):
            rest = [e async for e in session.events()]
        assert not any(isinstance(e, ErrorEvent) for e in rest)
    await asyncio.sleep(0)
    assert asyncio.all_tasks() - before == set()


# --------------------------------------------------------------------------------------
# the fake itself refuses what the real service refuses


@pytest.mark.parametrize(
    "audio",
    [
        {"data": base64.b64encode(b"\x00\x01\x02").decode(), "mimeType": "audio/pcm;rate=16000"},
        {"data": base64.b64encode(b"\x00\x01").decode(), "mimeType": "audio/pcm;rate=8000"},
    ],
)
async def test_fake_refuses_malformed_audio(audio: dict[str, str]) -> None:
    async with FakeGeminiLive() as fake:
        path = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"
        url = f"{fake.base_url}{path}?key=test-key"
        async with ws_connect(url) as ws:
            await ws.send(json.dumps({"setup": {"model": "models/x"}}))
            assert json.loads(await ws.recv()) == {"setupComplete": {}}
            await ws.send(json.dumps({"realtimeInput": {"audio": audio}}))
            with pytest.raises(ConnectionClosed) as info:
                async with asyncio.timeout(2):
                    await ws.recv()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1007
