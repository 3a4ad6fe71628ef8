"""OpenAIRealtimeProvider against the local fake Realtime service (no Duplex server).

Each test runs under ``asyncio.timeout`` so a protocol bug fails fast instead
of hanging. The fake records every client event, so assertions are about what
went over the wire, not about the provider's internals.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import connect as ws_connect

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
    ToolSpec,
    Transcript,
)
from server.providers.base import ProviderError, RealtimeEvent, RealtimeSetup
from server.providers.openai_realtime import (
    OpenAIRealtimeProvider,
    OpenAIRealtimeSession,
    ReconnectPolicy,
)
from tests.fakes.openai_realtime import FakeOpenAIRealtime

KEY = "sk-test-duplex-fake"
RATE = 24000
FAST_RETRY = ReconnectPolicy(max_attempts=3, base_delay=0.01, max_delay=0.05)
WEATHER_TOOL = ToolSpec(
    name="get_weather",
    description="Current weather for a city.",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
        "required": ["city"],
    },
)


# --------------------------------------------------------------------------------------
# helpers


def tone(ms: int, freq: float = 300.0, level: float = 0.3) -> bytes:
    t = np.arange(RATE * ms // 1000) / RATE
    return (np.sin(2 * math.pi * freq * t) * level * 32767).astype("<i2").tobytes()


def silence(ms: int) -> bytes:
    return bytes(RATE * ms // 1000 * 2)


def chunks(pcm: bytes, ms: int = 20) -> list[bytes]:
    size = RATE * ms // 1000 * 2
    return [pcm[i : i + size] for i in range(0, len(pcm), size)]


def make_setup(tools: list[ToolSpec] | None = None, **config: Any) -> RealtimeSetup:
    cfg = SessionConfig(mode="asm", provider="openai_realtime", tools=tools or [], **config)
    return RealtimeSetup(
        session_id="sess_test", config=cfg, instructions=cfg.instructions, tools=cfg.tools
    )


def provider_for(fake: FakeOpenAIRealtime, key: str | None = KEY) -> OpenAIRealtimeProvider:
    return OpenAIRealtimeProvider(
        key, base_url=fake.base_url, reconnect=FAST_RETRY, connect_timeout=3.0, send_timeout=3.0
    )


@contextlib.asynccontextmanager
async def open_session(
    fake: FakeOpenAIRealtime, tools: list[ToolSpec] | None = None, **config: Any
) -> AsyncIterator[OpenAIRealtimeSession]:
    session = await provider_for(fake).connect(make_setup(tools, **config))
    try:
        yield session
    finally:
        await session.close()


async def collect(
    session: OpenAIRealtimeSession,
    until: Callable[[RealtimeEvent], bool] | None = None,
    timeout: float = 5.0,
) -> list[RealtimeEvent]:
    """Events up to and including the first that satisfies ``until`` (or the stream's end)."""
    out: list[RealtimeEvent] = []
    async with asyncio.timeout(timeout), contextlib.aclosing(session.events()) as stream:
        async for event in stream:
            out.append(event)
            if until is not None and until(event):
                break
    return out


def is_done(event: RealtimeEvent) -> bool:
    return isinstance(event, ResponseDone)


def audio_of(events: list[RealtimeEvent]) -> list[StreamChunk]:
    return [e for e in events if isinstance(e, StreamChunk) and e.media is not None]


def transcript_of(events: list[RealtimeEvent]) -> str:
    return "".join(e.delta or "" for e in events if isinstance(e, StreamChunk) and e.transcript)


def without_event_id(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k != "event_id"}


async def speak(session: OpenAIRealtimeSession, pcm: bytes) -> None:
    for chunk in chunks(pcm):
        await session.send_audio(chunk)


# --------------------------------------------------------------------------------------
# session setup


@pytest.mark.parametrize("provider_vad", ["server_vad", "semantic_vad", "duplex", "none"])
async def test_session_update_carries_the_config(provider_vad: str) -> None:
    extra = {"server_vad": {"threshold": 0.6}, "semantic_vad": {"eagerness": "high"}}
    async with asyncio.timeout(10), FakeOpenAIRealtime() as fake:
        async with open_session(
            fake,
            tools=[WEATHER_TOOL],
            instructions="Be brief.",
            voice="cedar",
            turn_detection={
                "provider_vad": provider_vad,
                "stop_ms": 650,
                "pre_roll_ms": 250,
                "interrupt": False,
            },
            provider_options={"turn_detection": extra.get(provider_vad, {})},
        ):
            conn = fake.connections[0]
            assert conn.model == "gpt-realtime"
            assert conn.headers["authorization"] == f"Bearer {KEY}"
            assert conn.received_types() == ["session.update"]
            session = conn.received[0]["session"]
            # The fake validated it the way the service does, and accepted it.
            assert conn.sent_of("session.updated") and not conn.sent_of("error")

    assert session["type"] == "realtime"
    assert session["instructions"] == "Be brief."
    assert session["output_modalities"] == ["audio"]
    pcm24 = {"type": "audio/pcm", "rate": 24000}
    assert session["audio"]["input"]["format"] == pcm24
    assert session["audio"]["output"] == {"format": pcm24, "voice": "cedar"}
    assert session["audio"]["input"]["transcription"] == {"model": "gpt-4o-mini-transcribe"}
    assert session["tools"] == [
        {
            "type": "function",
            "name": "get_weather",
            "description": "Current weather for a city.",
            "parameters": WEATHER_TOOL.parameters,
        }
    ]
    assert session["tool_choice"] == "auto"
    expected_td: dict[str, Any] | None = {
        "server_vad": {
            "type": "server_vad",
            "interrupt_response": False,
            "silence_duration_ms": 650,
            "prefix_padding_ms": 250,
            "threshold": 0.6,
        },
        "semantic_vad": {"type": "semantic_vad", "interrupt_response": False, "eagerness": "high"},
    }.get(provider_vad)
    assert session["audio"]["input"]["turn_detection"] == expected_td


async def test_provider_options_select_text_output_and_no_transcription() -> None:
    async with asyncio.timeout(10), FakeOpenAIRealtime() as fake:
        async with open_session(
            fake, provider_options={"output_modalities": ["text"], "transcription": None}
        ):
            session = fake.connections[0].received[0]["session"]
    assert session["output_modalities"] == ["text"]
    assert session["audio"]["input"]["transcription"] is None
    assert "tool_choice" not in session and session["tools"] == []


# --------------------------------------------------------------------------------------
# conversation


async def test_spoken_turn_with_server_vad_is_answered_with_audio_and_transcript() -> None:
    async with asyncio.timeout(10), FakeOpenAIRealtime(reply_audio_ms=600) as fake:
        async with open_session(
            fake, turn_detection={"provider_vad": "server_vad", "stop_ms": 400, "pre_roll_ms": 100}
        ) as s:
            utterance = silence(300) + tone(600) + silence(600)
            await speak(s, utterance)
            events = await collect(s, is_done)
        conn = fake.connections[0]

    appended = b"".join(
        base64.b64decode(e["audio"]) for e in conn.received_of("input_audio_buffer.append")
    )
    assert appended == utterance

    started = [e for e in events if isinstance(e, SpeechStarted)]
    stopped = [e for e in events if isinstance(e, SpeechStopped)]
    # Speech begins at 300 ms, minus the 100 ms prefix padding we configured.
    assert [e.audio_start_ms for e in started] == [200.0]
    # Speech ends at 900 ms; 400 ms of silence is needed before the stop.
    assert [e.audio_end_ms for e in stopped] == [1300.0]

    transcripts = [e for e in events if isinstance(e, Transcript)]
    assert transcripts[-1] == Transcript(text=fake.transcript, final=True)
    assert any(not t.final for t in transcripts)

    response_id = next(e.response_id for e in events if isinstance(e, ResponseStarted))
    assert response_id == fake.responses[0].id
    audio = audio_of(events)
    assert audio and all(c.response_id == response_id for c in audio)
    assert {
        (c.media.mime_type, c.media.sample_rate, c.media.channels) for c in audio if c.media
    } == {("audio/pcm", 24000, 1)}
    pcm = b"".join(c.media.data for c in audio if c.media)
    sent_pcm = b"".join(
        base64.b64decode(e["delta"]) for e in conn.sent_of("response.output_audio.delta")
    )
    assert pcm == sent_pcm and len(pcm) == 600 * 48
    assert transcript_of(events) == fake.reply_text

    done = events[-1]
    assert isinstance(done, ResponseDone)
    assert done.response_id == response_id and done.finish_reason == "stop"
    assert done.usage is not None and done.usage["total_tokens"] > 0
    assert events.index(done) > max(events.index(c) for c in audio)


async def test_duplex_turns_commit_and_request_a_response() -> None:
    async with asyncio.timeout(10), FakeOpenAIRealtime() as fake:
        async with open_session(fake, turn_detection={"provider_vad": "duplex"}) as s:
            await speak(s, silence(40))
            await s.commit()  # 40 ms: below the service minimum, so nothing is sent
            await speak(s, tone(300))
            await s.commit()
            events = await collect(s, is_done)
        conn = fake.connections[0]

    types = [t for t in conn.received_types() if t != "input_audio_buffer.append"]
    assert types == ["session.update", "input_audio_buffer.commit", "response.create"]
    assert not conn.sent_of("error")
    assert not [e for e in events if isinstance(e, SpeechStarted)]  # no provider VAD
    assert isinstance(events[-1], ResponseDone) and events[-1].finish_reason == "stop"
    assert audio_of(events)


async def test_text_in_text_out() -> None:
    async with asyncio.timeout(10), FakeOpenAIRealtime() as fake:
        async with open_session(fake, provider_options={"output_modalities": ["text"]}) as s:
            await s.send_text("Hello there?")
            events = await collect(s, is_done)
        conn = fake.connections[0]

    create, response_create = conn.received[1:3]
    assert without_event_id(create) == {
        "type": "conversation.item.create",
        "item": {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "Hello there?"}],
        },
    }
    assert without_event_id(response_create) == {"type": "response.create"}
    chunks_ = [e for e in events if isinstance(e, StreamChunk)]
    assert chunks_ and all(c.media is None and c.metadata is None for c in chunks_)
    assert "".join(c.delta or "" for c in chunks_) == fake.reply_text
    assert isinstance(events[-1], ResponseDone) and events[-1].finish_reason == "stop"


async def test_beta_event_names_are_accepted() -> None:
    async with asyncio.timeout(10), FakeOpenAIRealtime(event_names="beta") as fake:
        async with open_session(fake) as s:
            await s.send_text("Hi")
            events = await collect(s, is_done)
        assert fake.connections[0].sent_of("response.audio.delta")
    assert audio_of(events)
    assert transcript_of(events) == fake.reply_text


async def test_image_is_sent_as_input_image_data_url() -> None:
    jpeg = b"\xff\xd8\xff\xe0fake-jpeg-bytes\xff\xd9"
    async with asyncio.timeout(10), FakeOpenAIRealtime() as fake:
        async with open_session(fake) as s:
            await s.send_image(ImageFrame(data=jpeg, mime_type="image/jpeg"))
            event = await fake.wait_received("conversation.item.create")
            with pytest.raises(ProviderError) as info:
                await s.send_image(ImageFrame(data=b"RIFF", mime_type="image/webp"))
            await fake.wait_for(
                lambda: bool(fake.connections[0].sent_of("conversation.item.created"))
            )
        conn = fake.connections[0]
    assert event["item"]["content"] == [
        {
            "type": "input_image",
            "image_url": "data:image/jpeg;base64," + base64.b64encode(jpeg).decode(),
        }
    ]
    assert not conn.sent_of("error")
    assert info.value.code == 415
    assert len(conn.received_of("conversation.item.create")) == 1


# --------------------------------------------------------------------------------------
# barge-in


async def test_barge_in_cancel_and_truncate_send_the_right_events() -> None:
    fake = FakeOpenAIRealtime(scenario="long_response", reply_audio_ms=300, chunk_ms=100)
    async with asyncio.timeout(10), fake:
        async with open_session(
            fake, turn_detection={"provider_vad": "server_vad", "interrupt": False}
        ) as s:
            await s.send_text("Tell me a long story.")
            events: list[RealtimeEvent] = []
            while len(audio_of(events)) < 3:
                events += await collect(
                    s, lambda e: isinstance(e, StreamChunk) and e.media is not None
                )
            response_id = next(e.response_id for e in events if isinstance(e, ResponseStarted))

            await speak(s, tone(200))
            events += await collect(s, lambda e: isinstance(e, SpeechStarted))
            await s.cancel_response()
            await s.truncate(response_id, 150.7)
            events += await collect(s, is_done)
            truncate = await fake.wait_received("conversation.item.truncate")
            await fake.wait_for(
                lambda: bool(fake.connections[0].sent_of("conversation.item.truncated"))
            )
        conn = fake.connections[0]

    cancel = conn.received_of("response.cancel")
    assert [c["response_id"] for c in cancel] == [response_id]
    assert without_event_id(truncate) == {
        "type": "conversation.item.truncate",
        "item_id": fake.responses[0].item_id,
        "content_index": 0,
        "audio_end_ms": 150,
    }
    assert not conn.sent_of("error")
    done = events[-1]
    assert isinstance(done, ResponseDone)
    assert done.response_id == response_id and done.finish_reason == "cancelled"


async def test_server_side_interruption_and_truncate_is_clamped_to_received_audio() -> None:
    fake = FakeOpenAIRealtime(scenario="long_response", reply_audio_ms=300, chunk_ms=100)
    async with asyncio.timeout(10), fake:
        async with open_session(fake, turn_detection={"provider_vad": "server_vad"}) as s:
            await s.send_text("Tell me a long story.")
            events: list[RealtimeEvent] = []
            while len(audio_of(events)) < 3:
                events += await collect(
                    s, lambda e: isinstance(e, StreamChunk) and e.media is not None
                )
            await speak(s, tone(200))
            events += await collect(s, is_done)
            response_id = events[-1].response_id  # type: ignore[union-attr]
            await s.cancel_response()  # already over: nothing is sent
            await s.truncate(response_id, 10_000)  # the user heard more than was sent?
            truncate = await fake.wait_received("conversation.item.truncate")
            await fake.wait_for(
                lambda: bool(fake.connections[0].sent_of("conversation.item.truncated"))
            )
        conn = fake.connections[0]

    assert any(isinstance(e, SpeechStarted) for e in events)
    assert isinstance(events[-1], ResponseDone) and events[-1].finish_reason == "interrupted"
    assert not conn.received_of("response.cancel")
    assert truncate["audio_end_ms"] == 300  # clamped to the audio actually received
    assert not conn.sent_of("error")


# --------------------------------------------------------------------------------------
# tools


async def test_tool_call_round_trip() -> None:
    fake = FakeOpenAIRealtime(scenario="tool_call", tool_argument_deltas=5)
    async with asyncio.timeout(10), fake:
        async with open_session(fake, tools=[WEATHER_TOOL]) as s:
            await s.send_text("What's the weather in Paris?")
            first = await collect(s, is_done)
            calls = [c for e in first if isinstance(e, StreamChunk) for c in e.tool_calls or []]
            assert len(calls) == 1
            call = calls[0]
            await s.send_tool_result(call.id, call.name, '{"temperature_c": 21}')
            second = await collect(s, is_done)
        conn = fake.connections[0]

    assert len(conn.sent_of("response.function_call_arguments.delta")) == 5
    done_event = conn.sent_of("response.function_call_arguments.done")[0]
    assert call.id == done_event["call_id"] and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris", "unit": "celsius"}
    assert isinstance(first[-1], ResponseDone) and first[-1].finish_reason == "tool_calls"

    output_item = conn.received_of("conversation.item.create")[-1]["item"]
    assert output_item == {
        "type": "function_call_output",
        "call_id": call.id,
        "output": '{"temperature_c": 21}',
    }
    assert conn.received_types()[-2:] == ["conversation.item.create", "response.create"]
    assert '"temperature_c": 21' in transcript_of(second)
    assert isinstance(second[-1], ResponseDone) and second[-1].finish_reason == "stop"


# --------------------------------------------------------------------------------------
# errors and faults


async def test_error_event_becomes_a_non_fatal_error_with_the_provider_code() -> None:
    async with asyncio.timeout(10), FakeOpenAIRealtime(scenario="error") as fake:
        async with open_session(fake) as s:
            await s.send_text("Hi")
            events = await collect(s, lambda e: isinstance(e, ErrorEvent))
            await s.send_text("Hi again")  # the session is still usable
            events += await collect(s, is_done)
    error = events[0]
    assert isinstance(error, ErrorEvent)
    assert error.code == 502 and not error.fatal
    assert error.message.startswith("server_error: The server had an error")
    assert "in reply to response.create" in error.message
    assert isinstance(events[-1], ResponseDone) and events[-1].finish_reason == "stop"


async def test_failed_response_reports_error_and_finishes_with_error() -> None:
    async with asyncio.timeout(10), FakeOpenAIRealtime(scenario="failed") as fake:
        async with open_session(fake) as s:
            await s.send_text("Hi")
            events = await collect(s, is_done)
    errors = [e for e in events if isinstance(e, ErrorEvent)]
    assert len(errors) == 1 and "response failed: server_error" in errors[0].message
    assert isinstance(events[-1], ResponseDone) and events[-1].finish_reason == "error"


async def test_odd_length_audio_is_rejected_by_the_service_and_reported() -> None:
    async with asyncio.timeout(10), FakeOpenAIRealtime() as fake:
        async with open_session(fake, turn_detection={"provider_vad": "duplex"}) as s:
            await s.send_audio(b"\x01\x02\x03")
            events = await collect(s, lambda e: isinstance(e, ErrorEvent))
            await s.send_text("still there?")
            events += await collect(s, is_done)
        conn = fake.connections[0]
    error = events[0]
    assert isinstance(error, ErrorEvent) and error.code == 502 and not error.fatal
    assert error.message.startswith("invalid_value: Invalid 'audio'")
    assert "param audio" in error.message and "input_audio_buffer.append" in error.message
    assert conn.sent_of("error")[0]["error"]["type"] == "invalid_request_error"
    assert isinstance(events[-1], ResponseDone)


@pytest.mark.parametrize("auth_failure", ["handshake", "event"])
async def test_wrong_key_raises_at_connect(auth_failure: str) -> None:
    async with asyncio.timeout(10), FakeOpenAIRealtime(auth_failure=auth_failure) as fake:  # type: ignore[arg-type]
        with pytest.raises(ProviderError) as info:
            await provider_for(fake, key="sk-wrong-0123456789").connect(make_setup())
    err = info.value
    assert err.fatal and err.code == 502 and err.upstream_status == 401
    assert err.upstream_code == "invalid_api_key"
    assert err.message.startswith("OpenAI rejected the API key")
    assert "Incorrect API key provided" in err.message
    assert "sk-wrong-0123456789" not in err.message
    if auth_failure == "handshake":
        assert [status for status, _ in fake.rejected_handshakes] == [401]
        assert fake.connections == []


async def test_missing_key_raises_at_connect() -> None:
    async with asyncio.timeout(10), FakeOpenAIRealtime() as fake:
        with pytest.raises(ProviderError) as info:
            await provider_for(fake, key=None).connect(make_setup())
        assert fake.connections == []
    assert info.value.fatal and "OPENAI_API_KEY" in info.value.message


async def test_dropped_connection_reconnects_and_reports() -> None:
    async with (
        asyncio.timeout(10),
        FakeOpenAIRealtime(scenario="drop", drop_after_chunks=2) as fake,
    ):
        async with open_session(fake, instructions="Be brief.") as s:
            await s.send_text("Hello")
            events = await collect(s, lambda e: isinstance(e, ProviderReconnect))
            await s.send_text("Hello again")
            after = await collect(s, is_done)
        first, second = fake.connections

    response_id = next(e.response_id for e in events if isinstance(e, ResponseStarted))
    assert len(audio_of(events)) == 2
    cut, done, note = events[-3:]
    assert cut == StreamChunk(response_id=response_id, interrupted=True)
    assert done == ResponseDone(response_id=response_id, finish_reason="interrupted")
    # No stored conversation was given to re-seed from: the model starts afresh.
    assert isinstance(note, ProviderReconnect) and note.response_id == response_id
    assert note.attempt == 1 and not note.context_kept
    assert not any(isinstance(e, ErrorEvent) for e in events)
    # The new connection was configured exactly like the first one.
    assert without_event_id(second.received[0]) == without_event_id(first.received[0])
    assert second.received_types()[1:] == ["conversation.item.create", "response.create"]
    assert isinstance(after[-1], ResponseDone) and after[-1].finish_reason == "stop"


async def test_dropped_connection_gives_up_after_bounded_attempts() -> None:
    fake = FakeOpenAIRealtime(scenario="drop", reject_after_drop=10)
    async with asyncio.timeout(10), fake:
        async with open_session(fake) as s:
            await s.send_text("Hello")
            events = await collect(s)  # runs to the end of the stream
            with pytest.raises(ProviderError) as info:
                await s.send_text("anyone?")
    assert [status for status, _ in fake.rejected_handshakes] == [503, 503, 503]
    assert len(fake.connections) == 1
    done, error = events[-2:]
    assert isinstance(done, ResponseDone) and done.finish_reason == "interrupted"
    assert isinstance(error, ErrorEvent) and error.fatal and error.code == 502
    assert error.message.startswith("OpenAI Realtime connection lost; gave up after 3 attempt(s)")
    assert "HTTP 503" in error.message
    assert info.value.fatal


async def test_close_ends_events_and_leaves_no_tasks() -> None:
    async with asyncio.timeout(10), FakeOpenAIRealtime() as fake:
        session = await provider_for(fake).connect(make_setup())
        consumer = asyncio.create_task(collect(session))
        await asyncio.sleep(0)
        await session.close()
        assert await consumer == []
        await session.close()  # idempotent
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("openai-realtime")]
        with pytest.raises(ProviderError):
            await session.send_text("after close")
        await fake.wait_for(lambda: fake.connections[0].closed)


# --------------------------------------------------------------------------------------
# the fake itself


async def test_fake_rejects_wrong_declared_rate_like_the_service() -> None:
    async with asyncio.timeout(10), FakeOpenAIRealtime() as fake:
        url = f"{fake.base_url}/realtime?model=gpt-realtime"
        async with ws_connect(url, additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"
            bad = {"type": "audio/pcm", "rate": 16000}
            await ws.send(
                json.dumps(
                    {
                        "type": "session.update",
                        "event_id": "evt_1",
                        "session": {"type": "realtime", "audio": {"input": {"format": bad}}},
                    }
                )
            )
            wrong_rate = json.loads(await ws.recv())
            await ws.send(
                json.dumps(
                    {
                        "type": "session.update",
                        "session": {
                            "type": "realtime",
                            "audio": {"output": {"format": {"type": "audio/pcm"}}},
                        },
                    }
                )
            )
            no_rate = json.loads(await ws.recv())
    assert wrong_rate["type"] == "error"
    assert wrong_rate["error"]["type"] == "invalid_request_error"
    assert wrong_rate["error"]["code"] == "invalid_value"
    assert wrong_rate["error"]["param"] == "session.audio.input.format.rate"
    assert wrong_rate["error"]["event_id"] == "evt_1"
    assert no_rate["error"]["code"] == "missing_required_parameter"
    assert no_rate["error"]["param"] == "session.audio.output.format.rate"


async def test_fake_accepts_the_official_openai_client() -> None:
    openai = pytest.importorskip("openai")
    from openai.types.realtime import ResponseAudioDeltaEvent, ResponseDoneEvent

    async with asyncio.timeout(15), FakeOpenAIRealtime() as fake:
        client = openai.AsyncOpenAI(api_key=KEY, websocket_base_url=fake.base_url)
        try:
            async with client.realtime.connect(model="gpt-realtime") as conn:
                await conn.session.update(
                    session={
                        "type": "realtime",
                        "output_modalities": ["audio"],
                        "audio": {
                            "input": {
                                "format": {"type": "audio/pcm", "rate": 24000},
                                "turn_detection": {
                                    "type": "server_vad",
                                    "silence_duration_ms": 300,
                                },
                                "transcription": {"model": "gpt-4o-mini-transcribe"},
                            },
                            "output": {"format": {"type": "audio/pcm", "rate": 24000}},
                        },
                    }
                )
                for chunk in chunks(tone(400) + silence(500), ms=100):
                    await conn.input_audio_buffer.append(audio=base64.b64encode(chunk).decode())
                seen: list[Any] = []
                async for event in conn:
                    seen.append(event)
                    if event.type == "response.done":
                        break
        finally:
            await client.close()
        conn_record = fake.connections[0]

    types = [e.type for e in seen]
    assert types[0] == "session.created"
    for expected in (
        "session.updated",
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.input_audio_transcription.completed",
        "response.created",
        "response.output_audio.delta",
        "response.output_audio_transcript.delta",
    ):
        assert expected in types, expected
    deltas = [e for e in seen if isinstance(e, ResponseAudioDeltaEvent)]
    assert deltas and len(base64.b64decode(deltas[0].delta)) == fake.chunk_ms * 48
    assert isinstance(seen[-1], ResponseDoneEvent) and seen[-1].response.status == "completed"
    assert conn_record.headers["authorization"] == f"Bearer {KEY}"
    assert conn_record.model == "gpt-realtime"
    assert conn_record.received_types()[0] == "session.update"
    assert not conn_record.sent_of("error")


async def test_fake_measures_its_own_turn_latency() -> None:
    async with asyncio.timeout(10), FakeOpenAIRealtime(response_delay=0.02) as fake:
        async with open_session(fake) as s:
            await s.send_text("Hi")
            await collect(s, is_done)
    (latency,) = fake.turn_latencies()
    assert latency > 0
