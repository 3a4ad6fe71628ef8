"""ASM mode over a real server, against the fake OpenAI Realtime service."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np

from server.tools import ToolRegistry
from tests.conftest import TOKEN
from tests.fakes.openai_realtime import FakeOpenAIRealtime
from tests.speech import synth
from tests.wsutil import connect

KEY = "sk-test-duplex-fake"
SILENCE = np.zeros(16000, dtype=np.int16)


def asm_server(server_factory, fake: FakeOpenAIRealtime, **extra):
    return server_factory(openai_realtime_url=fake.base_url, openai_api_key=KEY, **extra)


async def open_asm(c, **config) -> str:
    session_id = (await c.recv())["session"]["id"]
    await c.send(
        {
            "type": "session.update",
            "config": {"mode": "asm", "provider": "openai-realtime", **config},
        }
    )
    assert (await c.recv())["type"] == "session.updated"
    return session_id


async def send_pcm(c, pcm: np.ndarray) -> None:
    data = pcm.astype("<i2").tobytes()
    for i in range(0, len(data), 640):
        await c.send(data[i : i + 640])


async def test_spoken_turn_answered_with_audio_and_transcript(server_factory):
    async with FakeOpenAIRealtime(reply_audio_ms=400) as fake:
        server = asm_server(server_factory, fake)
        async with connect(server, TOKEN) as c:
            await open_asm(c, instructions="Be {{tone}}.", variables={"tone": "brief"})
            speech = synth("What is the weather in Paris", "en", 160)
            await send_pcm(c, np.concatenate([SILENCE[:4000], speech, SILENCE]))
            events = await c.until("response.done", timeout=15)
        kinds = [e["type"] for e in events]
        assert "speech.started" in kinds and "speech.stopped" in kinds
        assert any(e["type"] == "transcript" and e["text"] == fake.transcript for e in events)
        audio = [e for e in events if e["type"] == "chunk" and e.get("media")]
        assert audio and audio[0]["media"]["sample_rate"] == 24000
        said = "".join(e.get("delta", "") for e in events if e["type"] == "chunk")
        assert said == fake.reply_text
        assert events[-1]["finish_reason"] == "stop"
        conn = fake.connections[0]
        assert conn.received[0]["session"]["instructions"] == "Be brief."
        appended = conn.received_of("input_audio_buffer.append")
        total = sum(len(a["audio"]) * 3 // 4 for a in appended)
        sent_16k = (len(speech) + 4000 + 16000) * 2
        assert abs(total - sent_16k * 1.5) < 24000 * 2 * 0.1, "resampled to 24 kHz, nothing lost"


async def test_text_in_text_and_audio_out(server_factory):
    async with FakeOpenAIRealtime() as fake:
        server = asm_server(server_factory, fake)
        async with connect(server, TOKEN) as c:
            await open_asm(c)
            await c.send({"type": "input.text", "text": "Hello?", "final": True})
            events = await c.until("response.done", timeout=15)
        assert events[-1]["finish_reason"] == "stop"
        items = fake.connections[0].received_of("conversation.item.create")
        assert items[0]["item"]["content"][0] == {"type": "input_text", "text": "Hello?"}


async def test_cancel_truncates_once_at_the_last_position_heard(server_factory):
    async with FakeOpenAIRealtime(scenario="long_response", chunk_interval=0.05) as fake:
        server = asm_server(server_factory, fake)
        async with connect(server, TOKEN) as c:
            await open_asm(c)
            await c.send({"type": "input.text", "text": "Talk for a long time", "final": True})
            started = (await c.until("response.started"))[-1]
            for _ in range(3):
                await c.until("chunk")
            await c.send(
                {"type": "playback", "response_id": started["response_id"], "played_ms": 150}
            )
            await c.send({"type": "response.cancel"})
            events = await c.until("response.done", timeout=10)
            assert events[-1]["finish_reason"] == "cancelled"
            await fake.wait_received("conversation.item.truncate")
        truncates = fake.connections[0].received_of("conversation.item.truncate")
        assert [(t["audio_end_ms"], t["content_index"]) for t in truncates] == [(150, 0)]
        kinds = fake.connections[0].received_types()
        assert kinds.index("response.cancel") < kinds.index("conversation.item.truncate")


def loud(ms: int) -> np.ndarray:
    t = np.arange(16 * ms) / 16000
    return (np.sin(2 * np.pi * 300 * t) * 8000).astype(np.int16)


async def stored_messages(server, session_id: str) -> list[dict]:
    async with httpx.AsyncClient(base_url=server.base) as http:
        got = await http.get(
            f"/v1/sessions/{session_id}/messages", headers={"Authorization": f"Bearer {TOKEN}"}
        )
    return got.json()["messages"]


async def test_provider_vad_barge_in_interrupts_truncates_once_and_cuts_history(server_factory):
    async with FakeOpenAIRealtime(scenario="long_response", chunk_interval=0.02) as fake:
        server = asm_server(server_factory, fake)
        async with connect(server, TOKEN) as c:
            session_id = await open_asm(c)
            await c.send({"type": "input.text", "text": "Talk for a long time", "final": True})
            rid = (await c.until("response.started"))[-1]["response_id"]
            audio = 0
            while audio < 6:  # the whole 600 ms the fake speaks before it waits
                event = await c.recv()
                audio += event["type"] == "chunk" and "media" in event
            for played in (100, 200):  # progress while the reply plays: no truncate
                await c.send({"type": "playback", "response_id": rid, "played_ms": played})
            await c.send({"type": "ping", "id": "p"})
            await c.until("pong")
            assert fake.connections[0].received_of("conversation.item.truncate") == []
            await send_pcm(c, loud(400))  # the user talks over the reply (OpenAI's VAD)
            events = await c.until("chunk")
            while not events[-1].get("interrupted"):
                assert events[-1]["type"] != "response.done", "interrupted comes first"
                events += await c.until("chunk")
            assert events[-1]["response_id"] == rid
            await c.send({"type": "playback", "response_id": rid, "played_ms": 250})
            done = await c.until("response.done")
            assert done[-1]["finish_reason"] == "interrupted"
            await fake.wait_received("conversation.item.truncate")
            await c.send({"type": "playback", "response_id": rid, "played_ms": 300})  # late
            await c.send({"type": "ping", "id": "q"})
            await c.until("pong")
            await asyncio.sleep(0.5)  # anything else the server would send upstream, it has
        truncates = fake.connections[0].received_of("conversation.item.truncate")
        assert [t["audio_end_ms"] for t in truncates] == [250]
        kinds = fake.connections[0].received_types()
        assert kinds.index("conversation.item.truncate") > kinds.index("input_audio_buffer.append")
        answer = next(
            m
            for m in await stored_messages(server, session_id)
            if m["metadata"].get("response_id") == rid
        )
        assert answer["metadata"]["finish_reason"] == "interrupted"
        assert answer["metadata"]["played_ms"] == 250
        assert answer["content"] == "It is sunny"  # 250 of 600 ms of "It is sunny in Paris today."


async def test_completed_answer_is_stored_whole_without_a_stale_position(server_factory):
    async with FakeOpenAIRealtime(chunk_interval=0.02) as fake:
        server = asm_server(server_factory, fake)
        async with connect(server, TOKEN) as c:
            session_id = await open_asm(c)
            await c.send({"type": "input.text", "text": "Hello?", "final": True})
            rid = (await c.until("response.started"))[-1]["response_id"]
            await c.until("chunk")
            await c.send({"type": "playback", "response_id": rid, "played_ms": 100})
            done = await c.until("response.done")
            assert done[-1]["finish_reason"] == "stop"
            await c.send({"type": "playback", "response_id": rid, "played_ms": 600})
            await c.send({"type": "ping", "id": "p"})
            await c.until("pong")
        assert fake.connections[0].received_of("conversation.item.truncate") == []
        answer = next(
            m
            for m in await stored_messages(server, session_id)
            if m["metadata"].get("response_id") == rid
        )
        assert answer["content"] == fake.reply_text
        assert "played_ms" not in answer["metadata"]


async def test_session_update_is_applied_live_or_by_reopening(server_factory):
    async with FakeOpenAIRealtime() as fake:
        server = asm_server(server_factory, fake)
        async with connect(server, TOKEN) as c:
            await open_asm(c)
            await c.ask("My name is Ada")
            await c.send(
                {
                    "type": "session.update",
                    "config": {
                        "provider_options": {"max_output_tokens": 50},
                        "turn_detection": {"stop_ms": 700},
                    },
                }
            )
            assert (await c.until("session.updated"))[-1]["type"] == "session.updated"
            live = fake.connections[0].received_of("session.update")
            assert len(live) == 2 and len(fake.connections) == 1, "changed live, same socket"
            assert live[1]["session"]["max_output_tokens"] == 50
            assert (
                live[1]["session"]["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 700
            )
            # Another model needs another upstream session: reopened, conversation re-seeded.
            await c.send({"type": "session.update", "config": {"model": "gpt-realtime-mini"}})
            events = await c.until("session.updated", timeout=15)
            assert len(fake.connections) == 2 and fake.connections[1].model == "gpt-realtime-mini"
            items = fake.connections[1].received_of("conversation.item.create")
            assert items[0]["item"]["content"][0]["text"] == "My name is Ada"
            notes = [e for e in events if e["type"] == "provider.reconnect"]
            notes = notes or (await c.until("provider.reconnect"))[-1:]  # its own event stream
            assert notes[-1]["context_kept"] is True
            assert notes[-1]["reason"] == "session configuration changed"
            await c.send({"type": "input.text", "text": "Still there?", "final": True})
            assert (await c.until("response.done", timeout=15))[-1]["finish_reason"] == "stop"


async def test_session_update_the_provider_refuses_is_not_acknowledged(server_factory):
    async with FakeOpenAIRealtime() as fake:
        server = asm_server(server_factory, fake)
        async with connect(server, TOKEN) as c:
            await open_asm(c)
            await c.ask("Hi")
            await c.send({"type": "session.update", "config": {"provider_options": {"speed": 99}}})
            error = (await c.until("error", timeout=10))[-1]
            assert error["code"] == 400 and not error["fatal"]
            assert not [e for e in c.seen if e["type"] == "session.updated"][1:]
            await c.send({"type": "ping", "id": "alive"})
            assert (await c.until("pong"))[-1]["id"] == "alive"


async def test_server_side_tool_round_trip(server_factory):
    tools = ToolRegistry()
    calls = []

    @tools.register(
        parameters={"type": "object", "properties": {"city": {"type": "string"}, "unit": {}}}
    )
    async def get_weather(city: str, unit: str = "celsius") -> dict:
        """Current weather for a city."""
        calls.append(city)
        return {"city": city, "sky": "sunny", "temp": 21}

    async with FakeOpenAIRealtime(scenario="tool_call") as fake:
        server = asm_server(server_factory, fake, app_kwargs={"tools": tools})
        async with connect(server, TOKEN) as c:
            await open_asm(c)
            await c.send({"type": "input.text", "text": "Weather in Paris?", "final": True})
            await c.until("response.done", timeout=15)  # the tool-call response
            events = await c.until("response.done", timeout=15)  # the answer
        assert calls == ["Paris"]
        outputs = fake.connections[0].received_of("conversation.item.create")
        output = next(o["item"] for o in outputs if o["item"]["type"] == "function_call_output")
        assert json.loads(output["output"])["sky"] == "sunny"
        assert events[-1]["finish_reason"] == "stop"


async def test_client_side_tool_round_trip(server_factory):
    async with FakeOpenAIRealtime(scenario="tool_call") as fake:
        server = asm_server(server_factory, fake)
        async with connect(server, TOKEN) as c:
            await open_asm(c, tools=[{"name": "get_weather", "parameters": {"type": "object"}}])
            await c.send({"type": "input.text", "text": "Weather in Paris?", "final": True})
            events = await c.until("response.done", timeout=15)
            call = next(e for e in events if e.get("tool_calls"))["tool_calls"][0]
            assert (
                call["name"] == "get_weather" and json.loads(call["arguments"])["city"] == "Paris"
            )
            await c.send({"type": "tool.result", "call_id": call["id"], "output": {"temp": 3}})
            answer = await c.until("response.done", timeout=15)
        assert answer[-1]["finish_reason"] == "stop"
        outputs = fake.connections[0].received_of("conversation.item.create")
        output = next(o["item"] for o in outputs if o["item"]["type"] == "function_call_output")
        assert output["call_id"] == call["id"] and json.loads(output["output"]) == {"temp": 3}


async def test_reconnect_reseeds_the_conversation_and_says_context_was_kept(server_factory):
    async with FakeOpenAIRealtime() as fake:
        server = asm_server(server_factory, fake)
        async with connect(server, TOKEN) as c:
            await open_asm(c)
            await c.send({"type": "input.text", "text": "My name is Ada", "final": True})
            assert (await c.until("response.done", timeout=15))[-1]["finish_reason"] == "stop"
            fake.drop_current()
            note = (await c.until("provider.reconnect", timeout=10))[-1]
            assert note["context_kept"] is True and note["attempt"] == 1 and note["reason"]
            await c.send({"type": "input.text", "text": "What is my name?", "final": True})
            again = await c.until("response.done", timeout=15)
        assert again[-1]["finish_reason"] == "stop"
        second = fake.connections[1]
        items = [e["item"] for e in second.received_of("conversation.item.create")]
        seeded = [(i["role"], i["content"][0]) for i in items]
        assert seeded == [
            ("user", {"type": "input_text", "text": "My name is Ada"}),
            ("assistant", {"type": "output_text", "text": fake.reply_text}),
            ("user", {"type": "input_text", "text": "What is my name?"}),
        ]
        kinds = second.received_types()
        assert kinds.index("response.create") > 3, "seeded before anything is answered"


async def test_dropped_provider_connection_is_reported_and_recovered(server_factory):
    async with FakeOpenAIRealtime(scenario="drop") as fake:
        server = asm_server(server_factory, fake)
        async with connect(server, TOKEN) as c:
            await open_asm(c)
            await c.send({"type": "input.text", "text": "Hi", "final": True})
            events = await c.until("response.done", timeout=15)
            assert events[-1]["finish_reason"] == "interrupted"
            cut = [e for e in events if e["type"] == "chunk" and e.get("interrupted")]
            assert len(cut) == 1, "the client stops playing the cut reply"
            note = (await c.until("provider.reconnect", timeout=10))[-1]
            assert note["context_kept"] is True
            assert note["response_id"] == events[-1]["response_id"]
            await fake.wait_for(lambda: len(fake.connections) >= 2, timeout=10)
            await c.send({"type": "input.text", "text": "Again", "final": True})
            again = await c.until("response.done", timeout=15)
        assert again[-1]["finish_reason"] == "stop"


async def test_wrong_key_is_reported_clearly(server_factory):
    async with FakeOpenAIRealtime() as fake:
        server = server_factory(openai_realtime_url=fake.base_url, openai_api_key="sk-wrong")
        async with connect(server, TOKEN) as c:
            await open_asm(c)
            await c.send({"type": "input.text", "text": "Hi", "final": True})
            error = (await c.until("error", timeout=10))[-1]
        assert error["code"] == 502 and error["fatal"]
        assert "key" in error["message"].lower()
        assert fake.rejected_handshakes and fake.rejected_handshakes[0][0] == 401


async def test_provider_error_event_is_502_and_session_goes_on(server_factory):
    async with FakeOpenAIRealtime(scenario="error") as fake:
        server = asm_server(server_factory, fake)
        async with connect(server, TOKEN) as c:
            await open_asm(c)
            await c.send({"type": "input.text", "text": "Hi", "final": True})
            error = (await c.until("error", timeout=10))[-1]
            assert error["code"] == 502 and not error["fatal"]
            await asyncio.sleep(0.1)
            await c.send({"type": "ping", "id": "alive"})
            assert (await c.until("pong"))[-1]["id"] == "alive"
