"""The OpenAI Realtime door (/v1/realtime) driven by the official `openai` Python client
against a real server: text and spoken turns, manual commits, formats, function calls,
cancel, barge-in with truncate, images, items, auth, client secrets, bad events."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import numpy as np
import pytest
import websockets
from openai import AsyncOpenAI

from media.audio import MULAW_TO_PCM16
from media.image import encode_jpeg
from tests.conftest import OTHER_TOKEN, TOKEN
from tests.fakes.openai_http import ChatReply, FakeToolCall, run_fake
from tests.speech import resample, synth

KEY = "sk-fake"
TIMEOUT = 30


def client_for(server: Any, token: str = TOKEN) -> AsyncOpenAI:
    ws_base = server.base.replace("http", "ws", 1) + "/v1"
    return AsyncOpenAI(base_url=server.base + "/v1", api_key=token, websocket_base_url=ws_base)


@asynccontextmanager
async def connect(
    server: Any, model: str = "duplex-echo", token: str = TOKEN
) -> AsyncIterator[Any]:
    async with client_for(server, token).realtime.connect(model=model) as conn:
        first = await asyncio.wait_for(conn.recv(), TIMEOUT)
        assert first.type == "session.created"
        conn.session_id = first.session.id  # type: ignore[attr-defined]
        yield conn


async def until(conn: Any, kind: str, *, stop_on_error: bool = False) -> list[Any]:
    """Events up to and including the first of type ``kind``."""
    seen: list[Any] = []
    async with asyncio.timeout(TIMEOUT):
        while True:
            event = await conn.recv()
            seen.append(event)
            if event.type == kind:
                return seen
            if stop_on_error and event.type == "error":
                raise AssertionError(f"error event: {event}")


def types(events: list[Any]) -> list[str]:
    return [e.type for e in events]


def pcm24(text: str) -> bytes:
    """Speech at 24 kHz s16le, as Realtime clients send it."""
    return resample(synth(text), 16000, 24000).astype("<i2").tobytes()


def silence24(ms: int) -> bytes:
    return b"\x00\x00" * (24 * ms)


async def append(conn: Any, pcm: bytes, chunk_ms: int = 40) -> None:
    step = 24 * 2 * chunk_ms
    for start in range(0, len(pcm), step):
        await conn.input_audio_buffer.append(
            audio=base64.b64encode(pcm[start : start + step]).decode()
        )


async def say_text(conn: Any, text: str) -> None:
    await conn.conversation.item.create(
        item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    )


def stored(server: Any, session_id: str) -> list[dict[str, Any]]:
    r = httpx.get(
        f"{server.base}/v1/sessions/{session_id}/messages",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert r.status_code == 200, r.text
    return r.json()["messages"]


async def stored_when(server: Any, session_id: str, ok: Any) -> list[dict[str, Any]]:
    """The stored history once ``ok(messages)`` holds (a turn is stored just after its
    response.done); bounded."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            messages = await asyncio.to_thread(stored, server, session_id)
            if ok(messages):
                return messages
            await asyncio.sleep(0.05)


# ---- priority 1: text turns, session, models, auth, errors ------------------------------


async def test_text_turn_answered_with_text_and_audio(server_factory):
    async with run_fake(api_key=KEY, seed=1) as fake:
        server = server_factory(
            openai_base_url=fake.url,
            openai_api_key=KEY,
            realtime_models={"duplex-echo": {"provider": "echo", "tts": True}},
        )
        async with connect(server) as conn:
            await say_text(conn, "Hello there")
            added = await until(conn, "conversation.item.done", stop_on_error=True)
            assert types(added) == ["conversation.item.added", "conversation.item.done"]
            await conn.response.create()
            events = await until(conn, "response.done", stop_on_error=True)
        kinds = types(events)
        assert kinds[:4] == [
            "response.created",
            "response.output_item.added",
            "conversation.item.added",
            "response.content_part.added",
        ]
        assert kinds[-6:] == [
            "response.output_audio.done",
            "response.output_audio_transcript.done",
            "response.content_part.done",
            "response.output_item.done",
            "conversation.item.done",
            "response.done",
        ]
        transcript = "".join(
            e.delta for e in events if e.type == "response.output_audio_transcript.delta"
        )
        assert transcript == "You said: \u201cHello there\u201d"
        audio = b"".join(
            base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta"
        )
        assert len(audio) > 24 * 2 * 100  # the fake's speech, at 24 kHz
        done = events[-1].response
        assert done.status == "completed"
        assert done.output[0].content[0].transcript == transcript
        ids = {e.event_id for e in events}
        assert len(ids) == len(events)  # every server event has its own id
        assert [t["model"] for t in (r.json for r in fake.requests_to("/v1/audio/speech"))]
        messages = await stored_when(server, conn.session_id, lambda m: len(m) == 2)
        assert messages[0]["content"] == "Hello there"
        assert messages[1]["content"] == transcript


async def test_text_modality_session_update_and_models(live_server):
    async with connect(live_server) as conn:
        await conn.session.update(
            session={"type": "realtime", "output_modalities": ["text"], "instructions": "Be brief."}
        )
        updated = await until(conn, "session.updated", stop_on_error=True)
        assert updated[-1].session.output_modalities == ["text"]
        assert updated[-1].session.instructions == "Be brief."
        await say_text(conn, "one two")
        await conn.response.create()
        events = await until(conn, "response.done", stop_on_error=True)
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "You said: \u201cone two\u201d"
    assert "response.output_audio.delta" not in types(events)
    assert events[-1].response.output_modalities == ["text"]
    models = await client_for(live_server).models.list()
    assert [m.id for m in models.data] == ["duplex-echo"]
    r = await asyncio.to_thread(httpx.get, f"{live_server.base}/v1/models")
    assert r.status_code == 401


async def test_bad_events_answer_error_events_and_the_session_goes_on(live_server):
    async with connect(live_server) as conn:
        await conn.send({"type": "no.such.event", "event_id": "evt_1"})
        await conn.send({"type": "input_audio_buffer.append", "event_id": "evt_2", "audio": "@@"})
        await conn.send({"type": "conversation.item.create", "event_id": "evt_3"})
        await conn.send({"type": "session.update", "event_id": "evt_4", "session": {"bogus": 1}})
        await conn.send(
            {
                "type": "session.update",
                "event_id": "evt_5",
                "session": {"type": "realtime", "audio": {"input": {"format": {"type": "x"}}}},
            }
        )
        await conn.send({"type": "response.cancel", "event_id": "evt_6"})
        await conn.send({"type": "conversation.item.retrieve", "event_id": "evt_7", "item_id": "x"})
        errors = []
        async with asyncio.timeout(TIMEOUT):
            while len(errors) < 7:
                event = await conn.recv()
                assert event.type == "error"
                errors.append(event.error)
        assert [e.event_id for e in errors] == [f"evt_{i}" for i in range(1, 8)]
        assert [e.code for e in errors] == [
            "invalid_value",
            "invalid_value",
            "missing_required_parameter",
            "unknown_parameter",
            "invalid_value",
            "response_cancel_not_active",
            "item_not_found",
        ]
        assert [e.param for e in errors[:5]] == [
            "type",
            "audio",
            "item",
            "session.bogus",
            "session.audio.input.format.type",
        ]
        assert all(e.type == "invalid_request_error" and e.message for e in errors)
        # Not JSON at all: still an error event, not a closed socket.
        await conn._connection.send("{not json")  # a raw frame, on purpose
        bad = await until(conn, "error")
        assert bad[-1].error.code == "invalid_json"
        await say_text(conn, "still here")
        await conn.response.create()
        events = await until(conn, "response.done", stop_on_error=True)
        assert events[-1].response.status == "completed"


async def test_auth_bearer_subprotocol_and_refusals(live_server):
    url = live_server.base.replace("http", "ws", 1) + "/v1/realtime?model=duplex-echo"
    async with websockets.connect(
        url, subprotocols=["realtime", f"openai-insecure-api-key.{TOKEN}"]
    ) as ws:
        assert ws.subprotocol == "realtime"
        assert json.loads(await ws.recv())["type"] == "session.created"
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(url, subprotocols=["realtime", "openai-insecure-api-key.x"]):
            pass
    assert refused.value.response.status_code == 401
    with pytest.raises(websockets.InvalidStatus) as unknown:
        async with websockets.connect(
            url.replace("duplex-echo", "nope"),
            additional_headers={"Authorization": f"Bearer {TOKEN}"},
        ):
            pass
    assert unknown.value.response.status_code == 404
    # A Realtime session is a Duplex session: the other tenant cannot read it.
    async with connect(live_server) as conn:
        r = await asyncio.to_thread(
            httpx.get,
            f"{live_server.base}/v1/sessions/{conn.session_id}/messages",
            headers={"Authorization": f"Bearer {OTHER_TOKEN}"},
        )
        assert r.status_code == 404


# ---- priority 2: spoken turns, manual commit, clear, formats ------------------------------


async def test_spoken_turn_with_server_vad(live_server):
    async with connect(live_server) as conn:
        await append(
            conn, silence24(300) + pcm24("Hello there, how are you today?") + silence24(1200)
        )
        events = await until(conn, "response.done", stop_on_error=True)
    kinds = types(events)
    order = [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
        "response.created",
    ]
    assert [k for k in kinds if k in order][:6] == order
    started = events[kinds.index("input_audio_buffer.speech_started")]
    stopped = events[kinds.index("input_audio_buffer.speech_stopped")]
    committed = events[kinds.index("input_audio_buffer.committed")]
    assert started.item_id == stopped.item_id == committed.item_id
    assert 0 <= started.audio_start_ms < stopped.audio_end_ms
    audio = b"".join(
        base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta"
    )
    assert len(audio) > 24 * 2 * 1000  # echo plays the turn back, at 24 kHz
    assert events[-1].response.status == "completed"


async def manual_turns(conn: Any) -> None:
    """Turn detection off: the client commits its audio turns itself."""
    await conn.session.update(
        session={"type": "realtime", "audio": {"input": {"turn_detection": None}}}
    )
    await until(conn, "session.updated", stop_on_error=True)


async def test_manual_commit_clear_and_response_create(live_server):
    async with connect(live_server) as conn:
        await manual_turns(conn)
        await append(conn, pcm24("Seven thirty would be perfect."))
        await conn.input_audio_buffer.clear()
        assert types(await until(conn, "input_audio_buffer.cleared")) == [
            "input_audio_buffer.cleared"
        ]
        await conn.input_audio_buffer.commit(event_id="evt_empty")
        empty = await until(conn, "error")
        assert empty[-1].error.code == "input_audio_buffer_commit_empty"
        assert empty[-1].error.event_id == "evt_empty"
        speech = pcm24("Thursday works better for me.")
        await append(conn, speech)
        await conn.input_audio_buffer.commit()
        committed = await until(conn, "conversation.item.done", stop_on_error=True)
        assert types(committed) == [
            "input_audio_buffer.committed",
            "conversation.item.added",
            "conversation.item.done",
        ]
        await conn.response.create()
        events = await until(conn, "response.done", stop_on_error=True)
    assert "input_audio_buffer.speech_started" not in types(events)
    audio = b"".join(
        base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta"
    )
    # Echo plays back what was committed (not the cleared audio): same length, +-a frame.
    assert abs(len(audio) - len(speech)) <= 24 * 2 * 40
    heard = "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")
    assert heard.startswith(f"Heard {len(speech) / 48000:.2f}"[:9])


@pytest.mark.parametrize(
    ("fmt", "law_table"), [("audio/pcmu", MULAW_TO_PCM16), ("audio/pcma", None)]
)
async def test_g711_formats_in_and_out(live_server, fmt, law_table):
    from media import g711

    law = "mulaw" if fmt == "audio/pcmu" else "alaw"
    async with connect(live_server) as conn:
        await conn.session.update(
            session={
                "type": "realtime",
                "audio": {
                    "input": {"format": {"type": fmt}, "turn_detection": None},
                    "output": {"format": {"type": fmt}},
                },
            }
        )
        updated = await until(conn, "session.updated", stop_on_error=True)
        assert updated[-1].session.audio.input.format.type == fmt
        speech16 = synth("Can you play some quiet music?")
        speech8 = resample(speech16, 16000, 8000).astype("<i2").tobytes()
        encoded = g711.encode(speech8, law)
        await conn.input_audio_buffer.append(audio=base64.b64encode(encoded).decode())
        await conn.input_audio_buffer.commit()
        await conn.response.create()
        events = await until(conn, "response.done", stop_on_error=True)
    out = b"".join(
        base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta"
    )
    # One byte per sample at 8 kHz: as long as what was sent, within a frame.
    assert abs(len(out) - len(encoded)) <= 8 * 40
    if law_table is not None:
        level = np.abs(law_table[np.frombuffer(out, np.uint8)].astype(np.int32)).mean()
        assert level > 100  # speech came back, not silence


# ---- priority 3: tools, cancel, barge-in + truncate, images, items ----------------------


def chat_server(server_factory, fake):
    """A server whose model ``chat`` is the OpenAI-compatible chat provider on ``fake``."""
    return server_factory(
        openai_base_url=fake.url,
        openai_api_key=KEY,
        realtime_models={
            "duplex-echo": {"provider": "echo"},
            "chat": {"provider": "openai-chat"},
        },
    )


async def test_function_call_round_trip(server_factory):
    async with run_fake(api_key=KEY, seed=2) as fake:
        fake.script(
            ChatReply(tool_calls=[FakeToolCall("get_weather", '{"city": "Paris"}', id="call_1")]),
            ChatReply(text="It is sunny in Paris."),
        )
        server = chat_server(server_factory, fake)
        async with connect(server, model="chat") as conn:
            await conn.session.update(
                session={
                    "type": "realtime",
                    "output_modalities": ["text"],
                    "tools": [
                        {
                            "type": "function",
                            "name": "get_weather",
                            "description": "Weather by city",
                            "parameters": {
                                "type": "object",
                                "properties": {"city": {"type": "string"}},
                            },
                        }
                    ],
                }
            )
            await until(conn, "session.updated", stop_on_error=True)
            await say_text(conn, "Weather in Paris?")
            await conn.response.create()
            first = await until(conn, "response.done", stop_on_error=True)
            call = first[-1].response.output[-1]
            assert call.type == "function_call"
            assert (call.name, call.call_id, call.arguments) == (
                "get_weather",
                "call_1",
                '{"city": "Paris"}',
            )
            args = [e for e in first if e.type == "response.function_call_arguments.done"]
            assert args[0].arguments == '{"city": "Paris"}'
            await conn.conversation.item.create(
                item={
                    "type": "function_call_output",
                    "call_id": "call_1",
                    "output": '{"sky": "clear"}',
                }
            )
            await until(conn, "conversation.item.done", stop_on_error=True)
            await conn.response.create()
            second = await until(conn, "response.done", stop_on_error=True)
        text = "".join(e.delta for e in second if e.type == "response.output_text.delta")
        assert text == "It is sunny in Paris."
        assert second[0].type == "response.created"
        assert second[-1].response.id != first[-1].response.id
        followup = fake.requests_to("/v1/chat/completions")[1].json["messages"]
        tool_msgs = [m for m in followup if m["role"] == "tool"]
        assert tool_msgs == [
            {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear"}'}
        ]


async def test_response_cancel(server_factory):
    server = server_factory(echo_pace=1.0)
    async with connect(server) as conn:
        await manual_turns(conn)
        await append(conn, pcm24("Send the report to the whole team.") + silence24(2000))
        await conn.input_audio_buffer.commit()
        await conn.response.create()
        await until(conn, "response.output_audio.delta", stop_on_error=True)
        await conn.response.create(event_id="evt_twice")
        twice = await until(conn, "error")
        assert (twice[-1].error.code, twice[-1].error.event_id) == (
            "conversation_already_has_active_response",
            "evt_twice",
        )
        await conn.response.cancel()
        events = await until(conn, "response.done", stop_on_error=True)
    done = events[-1].response
    assert done.status == "cancelled"
    assert done.status_details.reason == "client_cancelled"


async def test_barge_in_then_truncate_cuts_the_stored_answer(server_factory):
    server = server_factory(echo_pace=1.0)
    async with connect(server) as conn:
        await append(conn, pcm24("I would like to book a table for two.") + silence24(1200))
        first = await until(conn, "response.output_audio.delta", stop_on_error=True)
        item_id = first[-1].item_id
        # The user talks over the answer: the response is cancelled as OpenAI does.
        sender = asyncio.create_task(
            append(conn, pcm24("Please turn the lights off in the kitchen."), 20)
        )
        events = first + await until(conn, "response.done")
        await sender
        assert "input_audio_buffer.speech_started" in types(events)
        done = events[-1].response
        assert done.status == "cancelled"
        assert done.status_details.reason == "turn_detected"
        transcript = done.output[0].content[0].transcript
        sent = b"".join(
            base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta"
        )
        played = int(len(sent) / 48 / 2)  # the client played half of what it got
        assert played > 0
        await conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=played)
        truncated = await until(conn, "conversation.item.truncated", stop_on_error=True)
        assert truncated[-1].audio_end_ms == played
        session_id = conn.session_id

    def cut(messages: list[dict[str, Any]]) -> bool:
        answers = [m for m in messages if m["role"] == "assistant"]
        return bool(answers) and answers[0]["metadata"].get("played_ms") == played

    messages = await stored_when(server, session_id, cut)
    answer = next(m for m in messages if m["role"] == "assistant")
    assert answer["metadata"]["finish_reason"] == "interrupted"
    assert len(answer["content"]) < len(transcript)
    assert transcript.startswith(answer["content"])


def png_data_url(width: int, height: int) -> str:
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 0] = 200
    return "data:image/jpeg;base64," + base64.b64encode(encode_jpeg(pixels, 80)).decode()


async def test_image_item_and_a_bad_image(live_server):
    async with connect(live_server) as conn:
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"]})
        await until(conn, "session.updated", stop_on_error=True)
        await conn.conversation.item.create(
            event_id="evt_bad",
            item={
                "type": "message",
                "role": "user",
                "content": [{"type": "input_image", "image_url": "data:image/png;base64,aGVsbG8="}],
            },
        )
        bad = await until(conn, "error")
        assert bad[-1].error.event_id == "evt_bad"
        await conn.conversation.item.create(
            item={
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is this?"},
                    {"type": "input_image", "image_url": png_data_url(64, 48)},
                ],
            }
        )
        await until(conn, "conversation.item.done", stop_on_error=True)
        await conn.response.create()
        events = await until(conn, "response.done", stop_on_error=True)
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert "What is this?" in text
    assert "Saw 1 frame(s): 64x48 image/jpeg" in text


async def test_item_retrieve_and_delete_edit_the_stored_history(live_server):
    async with connect(live_server) as conn:
        await say_text(conn, "first")
        user = (await until(conn, "conversation.item.done", stop_on_error=True))[-1].item
        await conn.response.create()
        events = await until(conn, "response.done", stop_on_error=True)
        answer = events[-1].response.output[0]
        await conn.conversation.item.retrieve(item_id=answer.id)
        got = await until(conn, "conversation.item.retrieved", stop_on_error=True)
        assert got[-1].item.content[0].transcript == "You said: \u201cfirst\u201d"
        await stored_when(live_server, conn.session_id, lambda m: len(m) == 2)
        await conn.conversation.item.delete(item_id=user.id)
        deleted = await until(conn, "conversation.item.deleted", stop_on_error=True)
        assert deleted[-1].item_id == user.id
        messages = await stored_when(live_server, conn.session_id, lambda m: len(m) == 1)
        assert messages[0]["role"] == "assistant"
        await conn.conversation.item.retrieve(item_id=user.id, event_id="evt_gone")
        gone = await until(conn, "error")
        assert (gone[-1].error.code, gone[-1].error.event_id) == ("item_not_found", "evt_gone")


# ---- priority 4: ephemeral client secrets --------------------------------------------------


async def test_client_secrets(live_server):
    r = await asyncio.to_thread(
        httpx.post,
        f"{live_server.base}/v1/realtime/client_secrets",
        headers={"Authorization": f"Bearer {TOKEN}"},
        json={
            "expires_after": {"anchor": "created_at", "seconds": 60},
            "session": {"type": "realtime", "model": "duplex-echo"},
        },
    )
    assert r.status_code == 200, r.text
    secret = r.json()
    assert secret["value"].startswith("ek_") and secret["session"]["model"] == "duplex-echo"
    async with connect(live_server, token=secret["value"]) as conn:
        await say_text(conn, "via a secret")
        await conn.response.create()
        events = await until(conn, "response.done", stop_on_error=True)
        # Tenant-scoped: the session belongs to the tenant that minted the secret.
        assert await asyncio.to_thread(stored, live_server, conn.session_id) is not None
    assert events[-1].response.status == "completed"
    # A secret cannot mint secrets or use the REST API as the tenant.
    r = await asyncio.to_thread(
        httpx.post,
        f"{live_server.base}/v1/realtime/client_secrets",
        headers={"Authorization": f"Bearer {secret['value']}"},
        json={},
    )
    assert r.status_code == 401
    expired, _ = live_server.app.state.realtime.secrets.mint("tenant-a", "duplex-echo", ttl_s=-1)
    url = live_server.base.replace("http", "ws", 1) + "/v1/realtime?model=duplex-echo"
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(
            url, additional_headers={"Authorization": f"Bearer {expired}"}
        ):
            pass
    assert refused.value.response.status_code == 401
    forged = secret["value"][:-4] + ("AAAA" if not secret["value"].endswith("AAAA") else "BBBB")
    with pytest.raises(websockets.InvalidStatus):
        async with websockets.connect(
            url, additional_headers={"Authorization": f"Bearer {forged}"}
        ):
            pass


async def test_truncate_after_the_turn_is_stored_rewrites_it(live_server):
    async with connect(live_server) as conn:
        await append(conn, pcm24("Set a timer for fifteen minutes.") + silence24(1200))
        events = await until(conn, "response.done", stop_on_error=True)
        item = events[-1].response.output[0]
        sent = b"".join(
            base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta"
        )
        played = int(len(sent) / 48 / 3)
        await stored_when(live_server, conn.session_id, lambda m: len(m) == 2)
        await conn.conversation.item.truncate(item_id=item.id, content_index=0, audio_end_ms=played)
        await until(conn, "conversation.item.truncated", stop_on_error=True)
        await conn.conversation.item.truncate(
            item_id=item.id, content_index=0, audio_end_ms=len(sent), event_id="evt_long"
        )
        too_long = await until(conn, "error")
        assert (too_long[-1].error.param, too_long[-1].error.event_id) == (
            "audio_end_ms",
            "evt_long",
        )

        def cut(messages: list[dict[str, Any]]) -> bool:
            return len(messages) == 2 and messages[1]["metadata"].get("played_ms") == played

        messages = await stored_when(live_server, conn.session_id, cut)
    full = item.content[0].transcript
    assert messages[1]["content"] and len(messages[1]["content"]) < len(full)
    assert full.startswith(messages[1]["content"])


def test_g711_encoder_matches_the_decoder_tables():
    from media import g711
    from media.audio import ALAW_TO_PCM16

    for law, table in (("mulaw", MULAW_TO_PCM16), ("alaw", ALAW_TO_PCM16)):
        codes = np.arange(256, dtype=np.uint8)
        decoded = table[codes]
        again = np.frombuffer(g711.encode(decoded.astype("<i2").tobytes(), law), np.uint8)
        assert np.array_equal(table[again], decoded)  # every level encodes to itself
        ramp = np.arange(-32768, 32768, 7, dtype=np.int32).astype("<i2")
        coded = table[np.frombuffer(g711.encode(ramp.tobytes(), law), np.uint8)]
        error = np.abs(coded.astype(np.int32) - ramp.astype(np.int32))
        assert error.max() <= np.abs(ramp.astype(np.int32)).max() // 16 + 16  # log quantiser


async def test_held_audio_and_outputs_stay_bounded():
    """Commits without response.create, and outputs for calls nobody waits for, keep at
    most one turn of audio and MAX_OUTPUTS outputs."""
    from duplex.protocol import JsonLimits
    from server.config import Settings
    from server.modes.catalog import builtin_modes
    from server.providers.catalog import ProviderCatalog
    from server.realtime_door.bridge import MAX_OUTPUTS, RealtimeBridge
    from server.realtime_door.models import RealtimeModel
    from server.realtime_door.session_map import RealtimeSessionState
    from server.session import DuplexSession, SessionServices
    from server.state.memory import MemoryStore

    services = SessionServices(
        store=MemoryStore(),
        providers=ProviderCatalog.from_settings(Settings(echo_pace=0)),
        modes=builtin_modes(),
    )
    state = RealtimeSessionState(RealtimeModel("duplex-echo", {"provider": "echo"}))
    session = await DuplexSession.open(services, tenant="t", config=None)
    bridge = RealtimeBridge(session, state, JsonLimits())
    try:
        await bridge.receive(
            json.dumps(
                {
                    "type": "session.update",
                    "session": {"type": "realtime", "audio": {"input": {"turn_detection": None}}},
                }
            )
        )
        ten_seconds = base64.b64encode(silence24(10_000)).decode()
        for _ in range(8):
            await bridge.receive(
                json.dumps({"type": "input_audio_buffer.append", "audio": ten_seconds})
            )
            await bridge.receive(json.dumps({"type": "input_audio_buffer.commit"}))
        held = sum(len(a) for _, a in bridge._committed)
        assert held <= 24000 * 2 * 30  # max_turn_ms (30 s) at 24 kHz
        for i in range(MAX_OUTPUTS + 10):
            item = {"type": "function_call_output", "call_id": f"c{i}", "output": "{}"}
            await bridge.receive(json.dumps({"type": "conversation.item.create", "item": item}))
        assert len(bridge._outputs) == MAX_OUTPUTS
        assert "c0" not in bridge._outputs and f"c{MAX_OUTPUTS + 9}" in bridge._outputs
    finally:
        await session.close()


async def test_the_input_rate_limits_of_duplex_apply(server_factory):
    server = server_factory(message_rate_limit=5.0, message_burst=2)
    async with connect(server) as conn:
        for i in range(6):
            await conn.send(
                {"type": "conversation.item.retrieve", "item_id": "x", "event_id": f"e{i}"}
            )
        errors = []
        async with asyncio.timeout(TIMEOUT):
            while len([e for e in errors if e.code == "item_not_found"]) < 6:
                errors.append((await until(conn, "error"))[-1].error)
    assert "rate_limited" in [e.code for e in errors]


async def test_semantic_vad_runs_as_the_adaptive_end_of_turn(live_server):
    async with connect(live_server) as conn:
        await conn.session.update(
            session={
                "type": "realtime",
                "audio": {
                    "input": {"turn_detection": {"type": "semantic_vad", "eagerness": "high"}}
                },
            }
        )
        updated = await until(conn, "session.updated", stop_on_error=True)
        assert updated[-1].session.audio.input.turn_detection.type == "semantic_vad"
        live = live_server.app.state.duplex.registry.get("tenant-a", conn.session_id)
        td = live.config.turn_detection.model_dump()
        assert (td["type"], td["stop_ms"], td["min_stop_ms"], td["max_stop_ms"]) == (
            "vad",
            "auto",
            200,
            800,
        )
        await append(
            conn, silence24(300) + pcm24("Hello there, how are you today?") + silence24(1500)
        )
        events = await until(conn, "response.done", stop_on_error=True)
    assert "input_audio_buffer.speech_stopped" in types(events)
