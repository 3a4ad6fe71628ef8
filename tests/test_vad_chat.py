"""VAD mode with the OpenAI-compatible HTTP provider, over a real server and the fake API."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from server.tools import ToolRegistry
from tests.conftest import TOKEN
from tests.fakes.openai_http import ChatReply, FakeOpenAI, FakeToolCall, run_fake
from tests.speech import synth
from tests.wsutil import connect, reply_text

KEY = "sk-test-chat"
SILENCE = np.zeros(16000, dtype=np.int16)


def chat_server(server_factory, fake: FakeOpenAI, **extra):
    return server_factory(openai_base_url=fake.url, openai_api_key=KEY, **extra)


async def use_chat(c, **config) -> str:
    session_id = (await c.recv())["session"]["id"]
    await c.send({"type": "session.update", "config": {"provider": "openai-chat", **config}})
    assert (await c.recv())["type"] == "session.updated"
    return session_id


async def send_pcm(c, pcm: np.ndarray) -> None:
    data = pcm.astype("<i2").tobytes()
    for i in range(0, len(data), 640):
        await c.send(data[i : i + 640])


async def test_spoken_turn_answered_with_text_and_tts_audio(server_factory):
    async with run_fake(api_key=KEY, seed=1) as fake:
        fake.script_transcript("What time is it?")
        fake.script(ChatReply(text="It is noon. Time for lunch, I would say."))
        server = chat_server(server_factory, fake)
        async with connect(server, TOKEN) as c:
            await use_chat(
                c, stt=True, tts=True, instructions="Be {{tone}}.", variables={"tone": "brief"}
            )
            await send_pcm(c, np.concatenate([synth("what time is it", "en", 160), SILENCE]))
            events = await c.until("response.done", timeout=20)
        transcript = next(e for e in events if e["type"] == "transcript")
        assert transcript["text"] == "What time is it?"
        assert reply_text(events) == "It is noon. Time for lunch, I would say."
        audio = [e for e in events if e["type"] == "chunk" and e.get("media")]
        assert audio and audio[0]["media"]["sample_rate"] == 24000
        chat = fake.requests_to("/v1/chat/completions")[0].json
        assert chat["messages"][0] == {"role": "system", "content": "Be brief."}
        assert "What time is it?" in json.dumps(chat["messages"][-1])
        speech = fake.requests_to("/v1/audio/speech")
        assert speech and speech[0].json["response_format"] == "pcm"


async def test_tool_loop_of_two_hops(server_factory):
    tools = ToolRegistry()
    seen: list[str] = []

    @tools.register(parameters={"type": "object", "properties": {"city": {"type": "string"}}})
    async def get_weather(city: str) -> dict:
        """Current weather."""
        seen.append(city)
        return {"city": city, "temp": 20 + len(seen)}

    async with run_fake(api_key=KEY, seed=2) as fake:
        fake.script(
            ChatReply(tool_calls=[FakeToolCall("get_weather", '{"city": "Paris"}')]),
            ChatReply(tool_calls=[FakeToolCall("get_weather", '{"city": "Rome"}')]),
            ChatReply(text="Paris 21, Rome 22."),
        )
        server = chat_server(server_factory, fake, app_kwargs={"tools": tools})
        async with connect(server, TOKEN) as c:
            session_id = await use_chat(c)
            events = await c.ask("Weather in Paris and Rome?")
        assert seen == ["Paris", "Rome"]
        assert events[-1]["finish_reason"] == "stop"
        executions = [e for e in events if e["type"] == "tool.execution"]
        assert [(e["calls"], e["hop"]) for e in executions] == [
            (["get_weather"], 1),
            (["get_weather"], 2),
        ]
        outputs = [json.loads(e["output"]) for e in events if e["type"] == "tool.output"]
        assert len(outputs) == 2
        assert not any(e.get("metadata", {}).get("kind") for e in events if e["type"] == "chunk")
        assert len(fake.requests_to("/v1/chat/completions")) == 3
        async with httpx.AsyncClient(
            base_url=server.base, headers={"Authorization": f"Bearer {TOKEN}"}
        ) as http:
            messages = (await http.get(f"/v1/sessions/{session_id}/messages")).json()["messages"]
        roles = [m["role"] for m in messages]
        assert roles == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
        assert messages[-1]["content"] == "Paris 21, Rome 22."


async def test_hop_limit_reached(server_factory):
    tools = ToolRegistry()

    @tools.register
    async def again() -> str:
        """Always asks for more."""
        return "more"

    async with run_fake(api_key=KEY, seed=3) as fake:
        fake.script(*[ChatReply(tool_calls=[FakeToolCall("again", "{}")]) for _ in range(4)])
        server = chat_server(server_factory, fake, tool_hop_limit=2, app_kwargs={"tools": tools})
        async with connect(server, TOKEN) as c:
            await use_chat(c)
            events = await c.ask("loop forever")
        assert events[-1]["finish_reason"] == "tool_limit_reached"
        warnings = [e for e in events if e["type"] == "warning"]
        assert warnings and warnings[0]["code"] == "tool_limit_reached"
        assert warnings[0]["calls"] == ["again"]
        assert len(fake.requests_to("/v1/chat/completions")) == 3


async def test_barge_in_stops_tts_and_the_model(server_factory):
    async with run_fake(api_key=KEY, seed=4, speech_ms_per_char=60.0) as fake:
        hold = asyncio.Event()
        fake.speech_hold = hold
        last = asyncio.Event()
        fake.script_transcript("Tell me a story")
        fake.script(
            ChatReply(
                text="Once upon a time there was a server. It listened well. The end came later.",
                hold_before_last=last,
            )
        )
        server = chat_server(server_factory, fake, echo_pace=1.0)
        speech = synth("tell me a story please", "en", 160)
        async with connect(server, TOKEN) as c:
            await use_chat(c, stt=True, tts=True)
            await send_pcm(c, np.concatenate([speech, SILENCE]))
            while True:
                event = await c.recv(timeout=20)
                if event["type"] == "chunk" and event.get("media"):
                    break
            await send_pcm(c, speech)  # the user talks over the reply
            events = await c.until("response.done", timeout=10)
            assert events[-1]["finish_reason"] == "interrupted"
            assert any(e.get("interrupted") for e in events)
            await asyncio.sleep(0.3)
            chat = fake.requests_to("/v1/chat/completions")[0]
            speech_requests = fake.requests_to("/v1/audio/speech")
            assert chat.aborted, "the model stream was cut"
            assert any(r.aborted for r in speech_requests), "the speech request was cut"
        hold.set()
        last.set()


async def test_replayed_request_id_calls_the_model_once(server_factory):
    async with run_fake(api_key=KEY, seed=5) as fake:
        fake.script(ChatReply(text="Answer once.", delay_s=0.02))
        server = chat_server(server_factory, fake)
        async with connect(server, TOKEN) as c:
            session_id = await use_chat(c)
        # Two connections to the same session send the same request at once.
        async with (
            connect(server, TOKEN, query=f"session_id={session_id}") as a,
            connect(server, TOKEN, query=f"session_id={session_id}") as b,
        ):
            await a.recv()
            await b.recv()
            first, second = await asyncio.gather(
                a.ask("same question", request_id="req-1"),
                b.ask("same question", request_id="req-1"),
            )
            third = await a.ask("same question", request_id="req-1")
        assert len(fake.requests_to("/v1/chat/completions")) == 1
        texts = {reply_text(first), reply_text(second), reply_text(third)}
        assert texts == {"Answer once."}
        cached = [e for e in first + second + third if e.get("metadata", {}).get("cached") is True]
        assert len(cached) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(port: int, db: str, fake_url: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "DUPLEX_OPENAI_BASE_URL": fake_url,
        "OPENAI_API_KEY": KEY,
        "DUPLEX_API_TOKENS": f"{TOKEN}:tenant-a",
        "DUPLEX_PERSIST_INTERVAL_MS": "50",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--port",
            str(port),
            "--store",
            f"sqlite:///{db}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


@pytest.mark.slow
async def test_crash_mid_stream_leaves_the_partial_answer_readable(tmp_path):
    db = str(tmp_path / "duplex.db")
    async with run_fake(api_key=KEY, seed=6) as fake:
        never = asyncio.Event()
        words = "one two three four five six seven eight nine ten eleven twelve".split()
        fake.script(
            ChatReply(
                text=" ".join(words),
                text_pieces=[w + " " for w in words],
                delay_s=0.05,
                hold_before_last=never,
            )
        )
        port = _free_port()
        proc = await asyncio.to_thread(_serve, port, db, fake.url)

        class Server:
            ws_url = f"ws://127.0.0.1:{port}/v1/duplex"

        try:
            async with connect(Server, TOKEN) as c:
                session_id = await use_chat(c)
                await c.send({"type": "input.text", "text": "count", "final": True})
                got = ""
                while got.count(" ") < 6:
                    event = await c.recv(timeout=10)
                    got += event.get("delta", "")
                await asyncio.sleep(0.3)  # past the persistence interval
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
        never.set()
        proc = await asyncio.to_thread(_serve, port, db, fake.url)
        try:
            async with httpx.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
                body = (
                    await http.get(f"http://127.0.0.1:{port}/v1/sessions/{session_id}/messages")
                ).json()
        finally:
            proc.kill()
            proc.wait(timeout=10)
    partial = body["in_progress"]
    assert len(partial) == 1 and partial[0]["metadata"]["partial"] is True
    assert partial[0]["content"].startswith("one two three four five six")
    # The question was stored before the provider was called; the answer never completed.
    assert [(m["role"], m["content"]) for m in body["messages"]] == [("user", "count")]


@pytest.mark.parametrize("store", ["memory://", "sqlite"])
async def test_provider_text_with_a_lone_surrogate_is_sent_and_stored(
    server_factory, tmp_path, store
):
    """An upstream may send ``"\\ud800"`` (valid JSON, not encodable as UTF-8): the reply
    goes out and into history with U+FFFD in its place, and the session goes on."""
    url = store if store != "sqlite" else f"sqlite:///{tmp_path / 'duplex.db'}"
    async with run_fake(api_key=KEY, seed=9) as fake:
        fake.script(ChatReply(text="bad \ud800 text"), ChatReply(text="fine"))
        server = chat_server(server_factory, fake, store_url=url)
        async with connect(server, TOKEN) as c:
            session_id = await use_chat(c)
            first = await c.ask("one")
            assert reply_text(first) == "bad \ufffd text"
            assert first[-1]["finish_reason"] == "stop"
            assert reply_text(await c.ask("two")) == "fine"
        async with httpx.AsyncClient(base_url=server.base) as http:
            r = await http.get(
                f"/v1/sessions/{session_id}/messages",
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
        assert [m["content"] for m in r.json()["messages"]] == [
            "one",
            "bad \ufffd text",
            "two",
            "fine",
        ]
