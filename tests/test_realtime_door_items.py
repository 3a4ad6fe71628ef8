"""The Realtime door, driven by the official `openai` Python client: user audio as a
conversation item, server VAD that does not answer (``create_response: false``) or is
not interrupted (``interrupt_response: false``), and out-of-band responses
(``conversation: "none"``, ``input``, ``metadata``)."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import numpy as np
import pytest

from tests.fakes.openai_http import ChatReply, run_fake
from tests.test_realtime_door import (
    TIMEOUT,
    append,
    chat_server,
    connect,
    pcm24,
    say_text,
    silence24,
    stored_when,
    types,
    until,
)

KEY = "sk-fake"


def audio_of(events: list[Any]) -> bytes:
    return b"".join(
        base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta"
    )


def text_of(events: list[Any]) -> str:
    kinds = ("response.output_text.delta", "response.output_audio_transcript.delta")
    return "".join(e.delta for e in events if e.type in kinds)


async def test_user_audio_item_joins_the_turn_and_is_transcribed(server_factory):
    async with run_fake(api_key=KEY, seed=3) as fake:
        server = server_factory(
            openai_base_url=fake.url,
            openai_api_key=KEY,
            realtime_models={"duplex-echo": {"provider": "echo", "stt": True}},
        )
        speech = pcm24("Please book a table for two at seven.")
        async with connect(server) as conn:
            await conn.conversation.item.create(
                item={
                    "type": "message",
                    "role": "user",
                    "content": [
                        {"type": "input_audio", "audio": base64.b64encode(speech).decode()}
                    ],
                },
                event_id="evt_audio",
            )
            added = await until(conn, "conversation.item.done", stop_on_error=True)
            assert types(added) == ["conversation.item.added", "conversation.item.done"]
            item = added[-1].item
            assert (item.role, item.content[0].type) == ("user", "input_audio")
            # Bad audio answers an error naming the event; the session goes on.
            await conn.conversation.item.create(
                item={
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_audio", "audio": "@@"}],
                },
                event_id="evt_bad",
            )
            bad = await until(conn, "error")
            assert (bad[-1].error.event_id, bad[-1].error.param) == (
                "evt_bad",
                "item.content[0].audio",
            )
            await conn.response.create()
            events = await until(conn, "response.done", stop_on_error=True)
            await conn.conversation.item.retrieve(item_id=item.id)
            got = await until(conn, "conversation.item.retrieved", stop_on_error=True)
            session_id = conn.session_id
    # Not heard by turn detection: no speech events, no answer before response.create.
    assert not [k for k in types(added + events) if k.startswith("input_audio_buffer.")]
    seconds = len(speech) / 48000
    # Echo plays the item's audio back and says how long it was.
    assert f"Heard {seconds:.2f}"[:9] in text_of(events)
    assert abs(len(audio_of(events)) - len(speech)) <= 24 * 2 * 40
    completed = [
        e for e in events if e.type == "conversation.item.input_audio_transcription.completed"
    ]
    assert [e.item_id for e in completed] == [item.id]
    assert completed[0].transcript.startswith("transcript of")
    assert got[-1].item.content[0].transcript == completed[0].transcript
    messages = await stored_when(server, session_id, lambda m: len(m) == 2)
    assert messages[0]["content"] == completed[0].transcript
    assert abs(messages[0]["metadata"]["audio_ms"] - seconds * 1000) <= 40


async def test_create_response_false_waits_for_response_create(live_server):
    async with connect(live_server) as conn:
        await conn.session.update(
            session={
                "type": "realtime",
                "audio": {
                    "input": {"turn_detection": {"type": "server_vad", "create_response": False}}
                },
            }
        )
        updated = await until(conn, "session.updated", stop_on_error=True)
        turn_detection = updated[-1].session.audio.input.turn_detection
        assert turn_detection.create_response is False
        first, second = pcm24("Seven thirty would be great."), pcm24("Or maybe eight.")
        await append(conn, silence24(300) + first + silence24(1200))
        await append(conn, second + silence24(1200))
        events: list[Any] = []
        async with asyncio.timeout(TIMEOUT):
            while types(events).count("input_audio_buffer.committed") < 2:
                events.append(await conn.recv())
                assert events[-1].type != "error", events[-1]
        committed = [e.item_id for e in events if e.type == "input_audio_buffer.committed"]
        await conn.response.create()
        events += await until(conn, "response.done", stop_on_error=True)
        session_id = conn.session_id
    kinds = types(events)
    # Turns were detected and committed, and nothing answered them until response.create.
    assert kinds.count("input_audio_buffer.speech_stopped") == 2
    assert kinds.count("response.created") == 1
    assert kinds.index("response.created") > kinds.index("input_audio_buffer.committed")
    # The one response answers both turns: echo plays both back (with their padding).
    heard = float(text_of(events).split()[1])
    assert heard >= (len(first) + len(second)) / 48000
    assert len(audio_of(events)) >= len(first) + len(second)
    messages = await stored_when(live_server, session_id, lambda m: len(m) == 2)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert len(committed) == 2


async def test_interrupt_response_false_lets_the_answer_finish(server_factory):
    server = server_factory(echo_pace=1.0)
    async with connect(server) as conn:
        await conn.session.update(
            session={
                "type": "realtime",
                "audio": {
                    "input": {"turn_detection": {"type": "server_vad", "interrupt_response": False}}
                },
            }
        )
        await until(conn, "session.updated", stop_on_error=True)
        await append(conn, pcm24("I would like to book a table for two.") + silence24(1200))
        first = await until(conn, "response.output_audio.delta", stop_on_error=True)
        # The user talks over the answer: it goes on, and the new turn is answered next.
        await append(conn, pcm24("Please turn the lights off in the kitchen.") + silence24(1200))
        events = first + await until(conn, "response.done", stop_on_error=True)
        assert "input_audio_buffer.speech_started" in types(events)
        assert events[-1].response.status == "completed"
        after = await until(conn, "response.done", stop_on_error=True)
    assert "response.created" in types(after)
    assert after[-1].response.status == "completed"


async def test_out_of_band_responses(server_factory):
    async with run_fake(api_key=KEY, seed=5) as fake:
        fake.script(
            ChatReply(text="In-band answer."),
            ChatReply(text="A summary."),
            ChatReply(text="Out of band, default context."),
            ChatReply(text="Stored without its input."),
            ChatReply(text="The pending question, answered."),
        )
        server = chat_server(server_factory, fake)
        async with connect(server, model="chat") as conn:
            await conn.session.update(
                session={"type": "realtime", "output_modalities": ["text"], "instructions": "Hi."}
            )
            await until(conn, "session.updated", stop_on_error=True)
            await say_text(conn, "first question")
            user_item = (await until(conn, "conversation.item.done", stop_on_error=True))[-1].item
            await conn.response.create()
            await until(conn, "response.done", stop_on_error=True)
            await stored_when(server, conn.session_id, lambda m: len(m) == 2)
            # A question waiting for the next in-band response: out-of-band ones leave it.
            await say_text(conn, "pending question")
            await until(conn, "conversation.item.done", stop_on_error=True)
            await conn.response.create(
                response={
                    "conversation": "none",
                    "metadata": {"purpose": "summary"},
                    "input": [
                        {"type": "item_reference", "id": user_item.id},
                        {
                            "type": "message",
                            "role": "user",
                            "content": [{"type": "input_text", "text": "Summarize that."}],
                        },
                    ],
                }
            )
            summary = await until(conn, "response.done", stop_on_error=True)
            await conn.response.create(response={"conversation": "none"})
            default_context = await until(conn, "response.done", stop_on_error=True)
            await conn.response.create(
                response={
                    "input": [
                        {
                            "type": "message",
                            "role": "user",
                            "content": [{"type": "input_text", "text": "Note this."}],
                        }
                    ]
                }
            )
            stored_answer = await until(conn, "response.done", stop_on_error=True)
            await conn.response.create(response={"metadata": {"n": "5"}})
            in_band = await until(conn, "response.done", stop_on_error=True)
            session_id = conn.session_id
    requests = [r.json["messages"] for r in fake.requests_to("/v1/chat/completions")]
    # Out of band with input: that input is the whole context.
    assert requests[1] == [
        {"role": "system", "content": "Hi."},
        {"role": "user", "content": "first question"},
        {"role": "user", "content": "Summarize that."},
    ]
    # Out of band without input: the conversation as stored, no new user turn.
    assert requests[2] == [
        {"role": "system", "content": "Hi."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "In-band answer."},
    ]
    assert requests[3][-1] == {"role": "user", "content": "Note this."}
    assert requests[3][:-1] == [{"role": "system", "content": "Hi."}]
    # The pending question went to the next in-band response, after the stored answer.
    assert requests[4][-2:] == [
        {"role": "assistant", "content": "Stored without its input."},
        {"role": "user", "content": "pending question"},
    ]
    created = summary[0]
    assert created.type == "response.created"
    assert created.response.conversation_id is None
    assert created.response.metadata == {"purpose": "summary"}
    done = summary[-1].response
    assert (done.conversation_id, done.metadata) == (None, {"purpose": "summary"})
    assert text_of(summary) == "A summary."
    assert done.output[0].content[0].text == "A summary."
    # Not added to the conversation: no conversation.item events.
    for events in (summary, default_context):
        assert not [k for k in types(events) if k.startswith("conversation.")]
    assert text_of(default_context) == "Out of band, default context."
    assert "conversation.item.added" in types(stored_answer)
    assert stored_answer[-1].response.conversation_id is not None
    assert in_band[-1].response.metadata == {"n": "5"}
    messages = await stored_when(server, session_id, lambda m: len(m) == 5)
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "first question"),
        ("assistant", "In-band answer."),
        ("assistant", "Stored without its input."),
        ("user", "pending question"),
        ("assistant", "The pending question, answered."),
    ]


async def test_out_of_band_refusals(live_server):
    async with connect(live_server) as conn:
        for event_id, response in (
            ("evt_conv", {"conversation": "conv_other"}),
            ("evt_meta", {"metadata": {"k": 1}}),
            ("evt_input", {"input": [{"type": "function_call_output", "call_id": "c"}]}),
            ("evt_ref", {"input": [{"type": "item_reference", "id": "item_nope"}]}),
            ("evt_ref_type", {"input": [{"type": "item_reference", "id": ["x"]}]}),
            ("evt_part", {"input": [{"role": "user", "content": [{"type": "input_audio"}]}]}),
        ):
            await conn.send({"type": "response.create", "event_id": event_id, "response": response})
            error = (await until(conn, "error"))[-1].error
            assert error.event_id == event_id
            assert error.param.startswith("response.")


@pytest.mark.parametrize("store", ["sqlite", "redis"])
async def test_item_edits_through_each_store(server_factory, tmp_path, request, store):
    """Delete and truncate after the turns are stored, through the app's own store stack
    (resilient, timed) on SQLite and Redis (the memory store: tests/test_realtime_door.py)."""
    if store == "redis":
        url = request.getfixturevalue("redis_url")
    else:
        url = f"sqlite:///{tmp_path}/door.db"
    server = server_factory(store_url=url)
    async with connect(server) as conn:
        await say_text(conn, "first")
        user = (await until(conn, "conversation.item.done", stop_on_error=True))[-1].item
        await conn.response.create()
        await until(conn, "response.done", stop_on_error=True)
        await append(conn, pcm24("Set a timer for fifteen minutes.") + silence24(1200))
        events = await until(conn, "response.done", stop_on_error=True)
        answer = events[-1].response.output[0]
        played = int(len(audio_of(events)) / 48 / 3)
        await stored_when(server, conn.session_id, lambda m: len(m) == 4)
        await conn.conversation.item.delete(item_id=user.id)
        await until(conn, "conversation.item.deleted", stop_on_error=True)
        await conn.conversation.item.truncate(
            item_id=answer.id, content_index=0, audio_end_ms=played
        )
        await until(conn, "conversation.item.truncated", stop_on_error=True)

        def edited(messages: list[dict[str, Any]]) -> bool:
            return len(messages) == 3 and messages[2]["metadata"].get("played_ms") == played

        messages = await stored_when(server, conn.session_id, edited)
    assert [m["role"] for m in messages] == ["assistant", "user", "assistant"]
    full = answer.content[0].transcript
    assert full.startswith(messages[2]["content"])
    assert len(messages[2]["content"]) < len(full)


async def test_audio_item_in_g711_with_manual_turns(live_server):
    from media import g711

    speech = pcm24("Two coffees, please.")
    pcm8 = np.frombuffer(speech, "<i2")[::3].astype("<i2").tobytes()  # 24 -> 8 kHz
    async with connect(live_server) as conn:
        await conn.session.update(
            session={
                "type": "realtime",
                "audio": {"input": {"format": {"type": "audio/pcmu"}, "turn_detection": None}},
            }
        )
        await until(conn, "session.updated", stop_on_error=True)
        await conn.conversation.item.create(
            item={
                "type": "message",
                "role": "user",
                "content": [
                    {
                        "type": "input_audio",
                        "audio": base64.b64encode(g711.encode(pcm8, "mulaw")).decode(),
                    },
                    {"type": "input_text", "text": "to go"},
                ],
            }
        )
        await until(conn, "conversation.item.done", stop_on_error=True)
        await conn.response.create()
        events = await until(conn, "response.done", stop_on_error=True)
    seconds = len(pcm8) / 16000
    assert text_of(events).startswith("You said: \u201cto go\u201d Heard ")
    assert f"Heard {seconds:.2f}"[:9] in text_of(events)
