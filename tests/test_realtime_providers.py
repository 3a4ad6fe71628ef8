"""The Realtime door in front of other providers: the cascade (OpenAI-compatible chat with
STT and TTS stages, against the HTTP fake) and Gemini Live in ASM mode (against its
fake), driven by the official `openai` Python client."""

from __future__ import annotations

import base64

import numpy as np

from tests.fakes.gemini_live import FakeGeminiLive
from tests.fakes.openai_http import ChatReply, run_fake
from tests.test_realtime_door import append, connect, pcm24, say_text, silence24, types, until

KEY = "sk-fake"


def audio_of(events: list) -> bytes:
    return b"".join(
        base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta"
    )


def transcript_of(events: list) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")


async def test_cascade_spoken_and_text_turns(server_factory):
    async with run_fake(api_key=KEY, seed=7) as fake:
        fake.script(
            ChatReply(text="A table for two, done."),
            ChatReply(text="You are welcome."),
            ChatReply(text="Bye."),
        )
        fake.script_transcript("I would like to book a table for two.")
        server = server_factory(
            openai_base_url=fake.url,
            openai_api_key=KEY,
            realtime_models={
                "duplex-echo": {"provider": "echo"},
                "cascade": {"provider": "openai-chat", "stt": True, "tts": True},
            },
        )
        async with connect(server, model="cascade") as conn:
            await conn.session.update(
                session={
                    "type": "realtime",
                    "instructions": "Be kind.",
                    "audio": {"input": {"transcription": {"model": "whisper-1"}}},
                }
            )
            await until(conn, "session.updated", stop_on_error=True)
            await append(conn, pcm24("I would like to book a table for two.") + silence24(1200))
            spoken = await until(conn, "response.done", stop_on_error=True)
            await say_text(conn, "Thanks!")
            await conn.response.create(response={"instructions": "Answer in French."})
            typed = await until(conn, "response.done", stop_on_error=True)
            await say_text(conn, "Goodbye")
            await conn.response.create(response={"output_modalities": ["text"]})
            last = await until(conn, "response.done", stop_on_error=True)
    kinds = types(spoken)
    committed = spoken[kinds.index("input_audio_buffer.committed")]
    done = [e for e in spoken if e.type.endswith("input_audio_transcription.completed")]
    assert done and done[0].item_id == committed.item_id
    assert done[0].transcript == "I would like to book a table for two."
    assert transcript_of(spoken) == "A table for two, done."
    assert len(audio_of(spoken)) > 0
    assert spoken[-1].response.status == "completed"
    assert transcript_of(typed) == "You are welcome."
    assert len(audio_of(typed)) > 0
    requests = [r.json["messages"] for r in fake.requests_to("/v1/chat/completions")]
    assert requests[1][-1] == {"role": "user", "content": "Thanks!"}
    # Per-response instructions hold for that response only.
    assert [m["content"] for m in requests[1] if m["role"] == "system"] == ["Answer in French."]
    assert [m["content"] for m in requests[2] if m["role"] == "system"] == ["Be kind."]
    # A text-only response: text deltas, no audio.
    assert "".join(e.delta for e in last if e.type == "response.output_text.delta") == "Bye."
    assert not audio_of(last)


def tone24(ms: int) -> bytes:
    t = np.arange(24 * ms) / 24000
    return (np.sin(2 * np.pi * 300 * t) * 8000).astype("<i2").tobytes()


async def test_gemini_live_text_and_spoken_turns(server_factory):
    async with FakeGeminiLive() as fake:
        server = server_factory(
            gemini_base_url=fake.base_url,
            gemini_api_key=fake.api_key,
            realtime_models={
                "duplex-echo": {"provider": "echo"},
                "gemini-live": {"mode": "asm", "provider": "gemini-live"},
            },
        )
        async with connect(server, model="gemini-live") as conn:
            await say_text(conn, "Hello?")
            await until(conn, "conversation.item.done", stop_on_error=True)
            await conn.response.create()
            typed = await until(conn, "response.done", stop_on_error=True)
            await append(conn, tone24(400) + silence24(600))
            spoken = await until(conn, "response.done", stop_on_error=True)
    assert "Hello?" in transcript_of(typed)
    assert typed[-1].response.status == "completed"
    kinds = types(spoken)
    assert "input_audio_buffer.committed" in kinds
    assert fake.reply_text in transcript_of(spoken)
    assert len(audio_of(spoken)) > 0
    completed = [e for e in spoken if e.type.endswith("input_audio_transcription.completed")]
    assert completed and completed[0].transcript == fake.user_transcript


async def test_openai_realtime_relayed_spoken_and_text_turns(server_factory):
    from tests.fakes.openai_realtime import FakeOpenAIRealtime

    async with FakeOpenAIRealtime(reply_audio_ms=400) as fake:
        server = server_factory(
            openai_realtime_url=fake.base_url,
            openai_api_key="sk-test-duplex-fake",
            realtime_models={
                "duplex-echo": {"provider": "echo"},
                "gpt-realtime": {"mode": "asm", "provider": "openai-realtime"},
            },
        )
        async with connect(server, model="gpt-realtime") as conn:
            await append(
                conn, silence24(300) + pcm24("What is the weather in Paris") + silence24(1000)
            )
            spoken = await until(conn, "response.done", stop_on_error=True)
            await say_text(conn, "And tomorrow?")
            await until(conn, "conversation.item.done", stop_on_error=True)
            await conn.response.create()
            typed = await until(conn, "response.done", stop_on_error=True)
    kinds = types(spoken)
    for kind in (
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "response.created",
    ):
        assert kind in kinds, (kind, kinds)
    assert kinds.index("input_audio_buffer.committed") < kinds.index("response.created")
    # Transcription runs beside the response: it may come after response.done.
    completed = [
        e for e in spoken + typed if e.type.endswith("input_audio_transcription.completed")
    ]
    assert completed and completed[0].transcript == fake.transcript
    assert completed[0].item_id == spoken[kinds.index("input_audio_buffer.committed")].item_id
    deltas = [e for e in spoken + typed if e.type.endswith("input_audio_transcription.delta")]
    assert "".join(d.delta for d in deltas) == fake.transcript
    assert transcript_of(spoken) == fake.reply_text
    assert len(audio_of(spoken)) > 0
    assert typed[-1].response.status == "completed"
    assert transcript_of(typed)
