"""``duplex serve --tools module:attribute``: server-side tools for an operator, end to end.

A real ``duplex serve`` process loads the tools by entry point; a client then runs
a tool-calling turn through it in VAD mode (OpenAI-compatible chat) and in ASM mode
(OpenAI Realtime), each provider being a local fake.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from server.tools import ToolRegistry, load_tools
from tests.fakes.openai_http import ChatReply, FakeToolCall, run_fake
from tests.fakes.openai_realtime import FakeOpenAIRealtime
from tests.wsutil import connect

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "serve-tools-token"
KEY = "sk-serve-tools"


@dataclass
class Served:
    base: str

    @property
    def ws_url(self) -> str:
        return self.base.replace("http", "ws", 1) + "/v1/duplex"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def duplex_serve(*args: str, **env: str) -> Iterator[tuple[subprocess.Popen[str], Served]]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--token", TOKEN, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "DUPLEX_ECHO_PACE": "0", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield proc, Served(f"http://127.0.0.1:{port}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


async def _ready(proc: subprocess.Popen[str], served: Served) -> None:
    async with asyncio.timeout(30), httpx.AsyncClient(base_url=served.base) as http:
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else "exited"
            try:
                if (await http.get("/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)


async def _tool_turn(served: Served, config: dict, answers: int) -> list[dict]:
    async with connect(served, TOKEN) as c:
        await c.recv()
        await c.send({"type": "session.update", "config": config})
        await c.until("session.updated")
        await c.send({"type": "input.text", "text": "Weather in Paris?", "final": True})
        events: list[dict] = []
        for _ in range(answers):
            events += await c.until("response.done", timeout=20)
    return events


async def test_serve_tools_entry_point_runs_in_vad_and_asm_modes() -> None:
    args = {"city": "Paris", "unit": "celsius"}
    async with (
        run_fake(api_key=KEY, seed=3) as chat,
        FakeOpenAIRealtime(api_key=KEY, scenario="tool_call") as realtime,
    ):
        chat.script(
            ChatReply(tool_calls=[FakeToolCall("get_weather", json.dumps(args))]),
            ChatReply(text="Sunny in Paris."),
        )
        env = {
            "OPENAI_API_KEY": KEY,
            "DUPLEX_OPENAI_BASE_URL": chat.url,
            "DUPLEX_OPENAI_REALTIME_URL": realtime.base_url,
            "DUPLEX_TOOLS": "tests.tools_entry:registry",
        }
        with duplex_serve("--tools", "tests.tools_entry:register", **env) as (proc, served):
            await _ready(proc, served)
            vad = await _tool_turn(served, {"provider": "openai-chat"}, 1)
            asm = await _tool_turn(served, {"mode": "asm", "provider": "openai-realtime"}, 2)
    for events in (vad, asm):
        outputs = [e for e in events if e["type"] == "tool.output"]
        assert [o["name"] for o in outputs] == ["get_weather"]
        assert json.loads(outputs[0]["output"])["sky"] == "sunny"
        assert not [e for e in events if e["type"] == "chunk" and e.get("tool_calls")]
        assert events[-1]["finish_reason"] == "stop"
    # The model was offered both entry points' tools, in both modes.
    offered = chat.requests_to("/v1/chat/completions")[0].json["tools"]
    assert sorted(t["function"]["name"] for t in offered) == ["clock", "get_weather"]
    session = realtime.connections[0].received[0]["session"]
    assert sorted(t["name"] for t in session["tools"]) == ["clock", "get_weather"]


def test_serve_refuses_a_tools_entry_point_it_cannot_load() -> None:
    with duplex_serve("--tools", "tests.tools_entry:nothing_here") as (proc, _):
        assert proc.wait(timeout=30) == 2
        out = proc.stdout.read() if proc.stdout else ""
    assert "tests.tools_entry:nothing_here" in out and "cannot load" in out


def test_load_tools_forms_and_errors() -> None:
    tools = load_tools(["tests.tools_entry:register", "tests.tools_entry:registry"])
    assert sorted(s.name for s in tools.specs()) == ["clock", "get_weather"]
    for bad in ("tests.tools_entry", "no_such_module:x", "tests.tools_entry:WEATHER_PARAMETERS"):
        with pytest.raises(ValueError, match="--tools"):
            load_tools([bad])
    with pytest.raises(ValueError, match="already registered"):
        load_tools(["tests.tools_entry:registry"], load_tools(["tests.tools_entry:registry"]))
    assert isinstance(load_tools([]), ToolRegistry)
