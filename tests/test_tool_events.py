"""One tool flow, three doors: VAD mode (OpenAI-compatible chat), ASM mode (OpenAI Realtime,
Gemini Live). The client must see the same typed tool events, in the same shape."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest

from server.tools import ToolRegistry
from tests.conftest import TOKEN
from tests.fakes.gemini_live import FakeGeminiLive
from tests.fakes.openai_http import ChatReply, FakeToolCall, run_fake
from tests.fakes.openai_realtime import FakeOpenAIRealtime
from tests.wsutil import connect

ARGS = {"city": "Paris", "unit": "celsius"}
WEATHER = {"name": "get_weather", "parameters": {"type": "object"}}
TOOL_EVENTS = ("tool.execution", "tool.output", "tool.cancelled", "warning")

#: (server, config, responses until the answer) for one mode.
Door = tuple[Any, dict[str, Any], int]


@asynccontextmanager
async def vad_chat(server_factory, app_kwargs) -> AsyncIterator[Door]:
    async with run_fake(api_key="sk-chat", seed=5) as fake:
        fake.script(
            ChatReply(tool_calls=[FakeToolCall("get_weather", json.dumps(ARGS))]),
            ChatReply(text="Sunny in Paris."),
        )
        server = server_factory(
            openai_base_url=fake.url, openai_api_key="sk-chat", app_kwargs=app_kwargs
        )
        yield server, {"provider": "openai-chat"}, 1


@asynccontextmanager
async def asm_openai(server_factory, app_kwargs) -> AsyncIterator[Door]:
    async with FakeOpenAIRealtime(scenario="tool_call", tool_arguments=json.dumps(ARGS)) as fake:
        server = server_factory(
            openai_realtime_url=fake.base_url, openai_api_key=fake.api_key, app_kwargs=app_kwargs
        )
        yield server, {"mode": "asm", "provider": "openai-realtime"}, 2


@asynccontextmanager
async def asm_gemini(server_factory, app_kwargs) -> AsyncIterator[Door]:
    async with FakeGeminiLive(scenario="tool_call", tool_args=ARGS) as fake:
        server = server_factory(
            gemini_base_url=fake.base_url, gemini_api_key=fake.api_key, app_kwargs=app_kwargs
        )
        yield server, {"mode": "asm", "provider": "gemini-live"}, 2


DOORS: dict[str, Callable[..., AbstractAsyncContextManager[Door]]] = {
    "vad/openai-chat": vad_chat,
    "asm/openai-realtime": asm_openai,
    "asm/gemini-live": asm_gemini,
}


def shape(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """The tool events with what must not differ between modes (ids are checked apart)."""
    out: list[tuple[Any, ...]] = []
    for e in events:
        if e["type"] == "chunk" and e.get("tool_calls"):
            calls = [(c["name"], json.loads(c["arguments"])) for c in e["tool_calls"]]
            out.append(("chunk.tool_calls", calls))
        elif e["type"] == "tool.execution":
            out.append((e["type"], sorted(e), e["calls"], len(e["call_ids"]), e["hop"]))
        elif e["type"] == "tool.output":
            out.append((e["type"], sorted(e), e["name"], json.loads(e["output"])))
        elif e["type"] in TOOL_EVENTS:
            out.append((e["type"], sorted(e)))
    return out


def check_ids(events: list[dict[str, Any]]) -> None:
    """Every tool event names the response that asked, and the same call ids throughout."""
    asked = next(e for e in events if e["type"] == "tool.execution")
    responses = {e["response_id"] for e in events if e["type"] == "response.started"}
    assert asked["response_id"] in responses
    outputs = [e for e in events if e["type"] == "tool.output"]
    assert [o["call_id"] for o in outputs] == asked["call_ids"]
    assert {o["response_id"] for o in outputs} == {asked["response_id"]}
    for chunk in (e for e in events if e["type"] == "chunk" and e.get("tool_calls")):
        assert [c["id"] for c in chunk["tool_calls"]] == asked["call_ids"]
    for e in events:
        if e["type"] == "chunk":
            assert "kind" not in (e.get("metadata") or {}), "sub-events are typed messages now"


async def run_flow(server_factory, door: str, *, server_tool: bool) -> list[dict[str, Any]]:
    tools = ToolRegistry()
    if server_tool:

        @tools.register(parameters={"type": "object", "properties": {"city": {}, "unit": {}}})
        async def get_weather(city: str, unit: str = "celsius") -> dict:
            """Current weather."""
            return {"city": city, "sky": "sunny"}

    async with DOORS[door](server_factory, {"tools": tools}) as (server, config, responses):
        async with connect(server, TOKEN) as c:
            await c.recv()
            client_tools = [] if server_tool else [WEATHER]
            await c.send({"type": "session.update", "config": {**config, "tools": client_tools}})
            assert (await c.recv())["type"] == "session.updated"
            await c.send({"type": "input.text", "text": "Weather in Paris?", "final": True})
            events: list[dict[str, Any]] = []
            if not server_tool:
                events += await c.until("tool.execution", timeout=15)
                call = next(e for e in events if e.get("tool_calls"))["tool_calls"][0]
                output = {"city": "Paris", "sky": "sunny"}
                await c.send({"type": "tool.result", "call_id": call["id"], "output": output})
            while sum(e["type"] == "response.done" for e in events) < responses:
                events += await c.until("response.done", timeout=15)
    return events


@pytest.mark.parametrize("server_tool", [True, False], ids=["server-tool", "client-tool"])
async def test_same_tool_events_in_vad_and_asm_modes(server_factory, server_tool):
    shapes = {}
    for door in DOORS:
        events = await run_flow(server_factory, door, server_tool=server_tool)
        check_ids(events)
        assert events[-1]["finish_reason"] == "stop", door
        shapes[door] = shape(events)
    expected = [
        ("tool.execution", ["call_ids", "calls", "hop", "response_id", "seq", "type"]),
        ("tool.output", ["call_id", "name", "output", "response_id", "seq", "type"]),
    ]
    vad = shapes["vad/openai-chat"]
    assert [(s[0], s[1]) for s in vad if s[0] != "chunk.tool_calls"] == expected
    assert vad[-2][2:] == (["get_weather"], 1, 1)
    assert vad[-1][2:] == ("get_weather", {"city": "Paris", "sky": "sunny"})
    client_calls = [s for s in vad if s[0] == "chunk.tool_calls"]
    assert client_calls == ([] if server_tool else [("chunk.tool_calls", [("get_weather", ARGS)])])
    for door, got in shapes.items():
        assert got == vad, door
