"""ASM mode over a real server, against the fake OpenAI Realtime service."""

from __future__ import annotations

import asyncio
import json

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


async def test_barge_in_truncates_what_was_not_heard(server_factory):
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
            await fake.wait_received("conversation.item.truncate")
            await c.send({"type": "response.cancel"})
            events = await c.until("response.done", timeout=10)
        assert events[-1]["finish_reason"] in ("cancelled", "interrupted")
        truncate = fake.connections[0].received_of("conversation.item.truncate")[0]
        assert truncate["audio_end_ms"] == 150 and truncate["content_index"] == 0


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


async def test_dropped_provider_connection_is_reported_and_recovered(server_factory):
    async with FakeOpenAIRealtime(scenario="drop") as fake:
        server = asm_server(server_factory, fake)
        async with connect(server, TOKEN) as c:
            await open_asm(c)
            await c.send({"type": "input.text", "text": "Hi", "final": True})
            events = await c.until("response.done", timeout=15)
            assert events[-1]["finish_reason"] == "error"
            errors = [e for e in events if e["type"] == "error"]
            more = [] if errors else await c.until("error", timeout=10)
            error = (errors or more)[-1]
            assert error["code"] == 502 and not error["fatal"]
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
