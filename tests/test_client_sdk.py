"""The Python SDK and `duplex client` against a real server."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import wave

import av
import numpy as np
import pytest

from duplex import AuthError, Client, ConnectionLost, DuplexError, NotFoundError, SyncClient
from tests.conftest import OTHER_TOKEN, TOKEN
from tests.speech import make_conversation


def jpeg(width: int = 320, height: int = 240) -> bytes:
    frame = av.VideoFrame.from_ndarray(
        np.full((height, width, 3), 128, dtype=np.uint8), format="rgb24"
    )
    codec = av.CodecContext.create("mjpeg", "w")
    codec.width, codec.height, codec.pix_fmt = width, height, "yuvj420p"
    return b"".join(bytes(p) for p in codec.encode(frame.reformat(format="yuvj420p")))


async def test_ask_streaming_and_whole(live_server):
    async with Client(live_server.ws_url, TOKEN) as client:
        session = await client.connect(instructions="Be {{tone}}", variables={"tone": "kind"})
        assert session.id.startswith("sess_")
        assert session.info["config"]["variables"] == {"tone": "kind"}
        grown = [m.content async for m in session.ask("streaming works", stream=True)]
        assert len(grown) >= 3 and grown[-1].startswith(grown[0])
        assert "streaming works" in grown[-1]
        whole = await session.ask("whole works", stream=False)
        assert "whole works" in whole.content and whole.finish_reason == "stop"
        assert whole.id.startswith("resp_") and whole.role == "assistant"
        history = await session.messages()
        assert [m["role"] for m in history] == ["user", "assistant"] * 2
        fork_id = await session.fork()
        forked = await client.connect(session_id=fork_id)
        await forked.ask("fork only", stream=False)
        assert len(await forked.messages()) == 6 and len(await session.messages()) == 4
        await session.clear()
        assert await session.messages() == []
        await forked.close()
        await session.close()


async def test_audio_and_frames_through_the_sdk(live_server):
    conv = make_conversation(seed=3, n_turns=1, voices=["en"], speeds=[170])
    async with Client(live_server.ws_url, TOKEN) as client:
        session = await client.connect()
        events: list[dict] = []

        async def watch() -> None:
            async for event in session.events():
                events.append(event)
                if event["type"] == "response.done":
                    return

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0)
        await session.send_frame(jpeg(), "image/jpeg", width=320, height=240)
        pcm = np.concatenate([conv.audio, np.zeros(16000, np.int16)]).astype("<i2").tobytes()
        for i in range(0, len(pcm), 3200):
            await session.send_audio(pcm[i : i + 3200])
        async with asyncio.timeout(20):
            await watcher
        text = "".join(e.get("delta", "") for e in events if e["type"] == "chunk")
        assert "Heard" in text and "Saw 1 frame(s): 320x240 image/jpeg" in text
        assert any(e["type"] == "turn.ended" for e in events)
        await session.close()


async def test_errors_raise_typed_exceptions(live_server):
    async with Client(live_server.ws_url, "wrong-token") as client:
        with pytest.raises(AuthError) as info:
            await client.connect()
        assert info.value.code == 401
    async with Client(live_server.ws_url, TOKEN) as client:
        session = await client.connect()
        with pytest.raises(DuplexError) as bad:
            await session.update(turn_detection={"stop_ms": 1})
        assert bad.value.code == 400
        await session.close()
    async with Client(live_server.ws_url, OTHER_TOKEN) as other:
        with pytest.raises(NotFoundError):
            await other.connect(session_id=session.id)


async def test_lost_connection_raises_instead_of_hanging(server_factory):
    server = server_factory(echo_pace=1.0)
    async with Client(server.ws_url, TOKEN) as client:
        # Without reconnect (with it, tests/test_resume.py: the drop is hidden, or a
        # failed resume raises).
        session = await client.connect(reconnect=None)
        # The network goes away while an answer is awaited.
        pending = asyncio.ensure_future(session.ask("hello", stream=False))
        await asyncio.sleep(0)
        session.ws.transport.abort()
        with pytest.raises(ConnectionLost):
            async with asyncio.timeout(5):
                await pending
        with pytest.raises(ConnectionLost):  # and every later call fails at once
            async with asyncio.timeout(5):
                await session.ask("anyone?", stream=False)


def test_sync_client(live_server):
    with SyncClient(live_server.ws_url, TOKEN) as client:
        session = client.connect()
        answer = session.ask("from a script")
        assert "from a script" in answer.content
        assert len(session.messages()) == 2
        session.close()


def test_duplex_client_command_streams_a_wav(live_server, tmp_path):
    conv = make_conversation(seed=5, n_turns=1, voices=["en"], speeds=[170])
    wav_path = tmp_path / "in.wav"
    with wave.open(str(wav_path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(conv.audio.astype("<i2").tobytes())
    saved = tmp_path / "out.wav"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "client",
            "--url",
            live_server.ws_url,
            "--token",
            TOKEN,
            "--text",
            "hi there",
            "--wav",
            str(wav_path),
            "--fast",
            "--save-audio",
            str(saved),
            "--idle",
            "0.5",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any('"turn.ended"' in line for line in lines)
    assert any("You said" in line for line in lines)
    assert any("Heard" in line for line in lines)
    with wave.open(io.BytesIO(saved.read_bytes())) as back:
        assert back.getframerate() == 24000
        seconds = back.getnframes() / 24000
    onset, end = conv.turns[0]
    spoken = (end - onset) / 1000
    assert spoken <= seconds <= spoken + 1.0, "the echoed turn (with pre-roll) came back as audio"


async def test_ask_collects_tool_outputs_and_warnings(server_factory):
    from server.tools import ToolRegistry
    from tests.fakes.openai_http import ChatReply, FakeToolCall, run_fake

    tools = ToolRegistry()

    @tools.register
    async def again() -> str:
        """Always asks for more."""
        return "more"

    async with run_fake(api_key="sk-sdk", seed=2) as fake:
        fake.script(*[ChatReply(tool_calls=[FakeToolCall("again", "{}")]) for _ in range(3)])
        server = server_factory(
            openai_base_url=fake.url,
            openai_api_key="sk-sdk",
            tool_hop_limit=1,
            app_kwargs={"tools": tools},
        )
        async with Client(server.ws_url, TOKEN) as client:
            session = await client.connect(provider="openai-chat")
            answer = await session.ask("loop", stream=False)
    assert answer.finish_reason == "tool_limit_reached"
    assert [(t["name"], t["output"]) for t in answer.tool_outputs] == [("again", '"more"')]
    assert [w["code"] for w in answer.warnings] == ["tool_limit_reached"]


async def test_unknown_server_message_types_are_passed_on():
    """A newer server may send message types this SDK does not know: not a reason to fail."""
    import json

    from websockets.asyncio.server import serve

    async def handler(ws):
        info = {"id": "sess_x", "mode": "vad", "provider": "echo", "config": {}}
        await ws.send(json.dumps({"type": "session.created", "seq": 1, "session": info}))
        await ws.send(json.dumps({"type": "something.new", "seq": 2, "x": 1}))
        await ws.send(json.dumps({"type": "pong", "seq": 3, "id": "p"}))
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0) as ws_server:
        port = ws_server.sockets[0].getsockname()[1]
        seen: list[str] = []
        got_pong = asyncio.Event()

        def on_event(event):
            seen.append(event["type"])
            if event["type"] == "pong":
                got_pong.set()

        async with Client(f"ws://127.0.0.1:{port}/v1/duplex", TOKEN) as client:
            session = await client.connect(on_event=on_event)
            async with asyncio.timeout(10):
                await got_pong.wait()
            await session.close()
    assert seen == ["session.created", "something.new", "pong"]
