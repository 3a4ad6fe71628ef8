"""One tool flow, three doors: VAD mode (OpenAI-compatible chat), ASM mode (OpenAI Realtime,
Gemini Live). The client must see the same typed tool events, in the same shape."""

from __future__ import annotations

import asyncio
import json
import threading
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


#: The fake of the door, for the tests that look at what reached the provider.
FAKES: dict[str, Any] = {}


@asynccontextmanager
async def vad_chat(server_factory, app_kwargs, loop: int = 0, **settings) -> AsyncIterator[Door]:
    async with run_fake(api_key="sk-chat", seed=5) as fake:
        call = ChatReply(tool_calls=[FakeToolCall("get_weather", json.dumps(ARGS))])
        if loop:
            fake.script(*[call for _ in range(loop)])
        else:
            fake.script(call, ChatReply(text="Sunny in Paris."))
        server = server_factory(
            openai_base_url=fake.url, openai_api_key="sk-chat", app_kwargs=app_kwargs, **settings
        )
        FAKES["vad/openai-chat"] = fake
        yield server, {"provider": "openai-chat"}, 1


@asynccontextmanager
async def asm_openai(server_factory, app_kwargs, loop: int = 0, **settings) -> AsyncIterator[Door]:
    scenario = "tool_loop" if loop else "tool_call"
    async with FakeOpenAIRealtime(scenario=scenario, tool_arguments=json.dumps(ARGS)) as fake:
        server = server_factory(
            openai_realtime_url=fake.base_url,
            openai_api_key=fake.api_key,
            app_kwargs=app_kwargs,
            **settings,
        )
        FAKES["asm/openai-realtime"] = fake
        yield server, {"mode": "asm", "provider": "openai-realtime"}, loop or 2


@asynccontextmanager
async def asm_gemini(server_factory, app_kwargs, loop: int = 0, **settings) -> AsyncIterator[Door]:
    scenario = "tool_loop" if loop else "tool_call"
    async with FakeGeminiLive(scenario=scenario, tool_args=ARGS) as fake:
        server = server_factory(
            gemini_base_url=fake.base_url,
            gemini_api_key=fake.api_key,
            app_kwargs=app_kwargs,
            **settings,
        )
        FAKES["asm/gemini-live"] = fake
        yield server, {"mode": "asm", "provider": "gemini-live"}, loop or 2


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


def weather_tools() -> ToolRegistry:
    tools = ToolRegistry()

    @tools.register(parameters={"type": "object", "properties": {"city": {}, "unit": {}}})
    async def get_weather(city: str, unit: str = "celsius") -> dict:
        """Current weather."""
        return {"city": city, "sky": "sunny"}

    return tools


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


HOP_LIMIT = 2


@pytest.mark.parametrize("door", list(DOORS))
async def test_hop_limit_in_both_modes(server_factory, door):
    """A model that keeps calling tools: HOP_LIMIT rounds run, the next calls do not; the
    client sees the same events in VAD and ASM modes (``warning`` ``tool_limit_reached``,
    then ``response.done`` with ``finish_reason: "tool_limit_reached"``), and a realtime
    model gets an output for the calls not run but is not asked to answer them."""
    door_cm = DOORS[door](
        server_factory,
        {"tools": weather_tools()},
        loop=HOP_LIMIT + 1,
        tool_hop_limit=HOP_LIMIT,
    )
    async with door_cm as (server, config, _responses):
        async with connect(server, TOKEN) as c:
            await c.recv()
            await c.send({"type": "session.update", "config": {**config, "tools": []}})
            assert (await c.recv())["type"] == "session.updated"
            await c.send({"type": "input.text", "text": "Weather in Paris?", "final": True})
            events: list[dict[str, Any]] = []
            for _ in range(HOP_LIMIT + 1):  # bounded: without a limit the model loops on
                events += await c.until("response.done", timeout=15)
                if events[-1]["finish_reason"] == "tool_limit_reached":
                    break
                assert events[-1]["finish_reason"] in ("tool_calls", "tool_limit_reached")
            got = shape(events)
            output = ("get_weather", {"city": "Paris", "sky": "sunny"})
            fields = ["call_ids", "calls", "hop", "response_id", "seq", "type"]
            out_fields = ["call_id", "name", "output", "response_id", "seq", "type"]
            expected: list[tuple[Any, ...]] = []
            for hop in range(1, HOP_LIMIT + 1):
                expected.append(("tool.execution", fields, ["get_weather"], 1, hop))
                expected.append(("tool.output", out_fields, *output))
            expected.append(("warning", ["calls", "code", "message", "response_id", "seq", "type"]))
            assert got == expected
            warning = next(e for e in events if e["type"] == "warning")
            assert warning["code"] == "tool_limit_reached"
            assert warning["calls"] == ["get_weather"]
            assert warning["response_id"] == events[-1]["response_id"]
            assert events.index(warning) == len(events) - 2 or door == "vad/openai-chat"

            # The user's next turn: nothing else of the limited turn reaches the client.
            await c.send({"type": "input.text", "text": "Thanks.", "final": True})
            after = await c.until("response.started", timeout=15)
            assert [e["type"] for e in after if e["type"] != "turn.ended"] == [
                "response.started"
            ], after

        fake = FAKES[door]
        if door == "asm/openai-realtime":
            received = fake.connections[-1].received
            kinds = [
                e["item"].get("type") if e["type"] == "conversation.item.create" else e["type"]
                for e in received
                if e["type"] in ("conversation.item.create", "response.create")
            ]
            # user text, response; HOP_LIMIT x (output, response); the declined output and
            # no response for it; the next user text and its response (then its tools).
            assert kinds[: 5 + 2 * HOP_LIMIT] == [
                "message",
                "response.create",
                *["function_call_output", "response.create"] * HOP_LIMIT,
                "function_call_output",
                "message",
                "response.create",
            ]
            items = [e["item"] for e in received if e["type"] == "conversation.item.create"]
            declined = [i for i in items if i["type"] == "function_call_output"][HOP_LIMIT]
            assert "tool hop limit (2) reached" in json.loads(declined["output"])["error"]
        elif door == "asm/gemini-live":
            # HOP_LIMIT results, the declined call's output (then the next turn's calls).
            responses = [r["response"] for r in fake.tool_responses]
            assert responses[:HOP_LIMIT] == [{"city": "Paris", "sky": "sunny"}] * HOP_LIMIT
            assert "tool hop limit (2) reached" in responses[HOP_LIMIT]["error"]


async def test_gemini_tool_cancellation_stops_a_running_server_tool(server_factory):
    """Gemini withdraws a call (toolCallCancellation) while the server tool runs: the tool's
    task is cancelled, ``tool.cancelled`` names it in ``stopped``, and no output for it goes
    back to Gemini."""
    tools = ToolRegistry()
    started = threading.Event()  # the tool runs on the server's event loop (another thread)
    seen: list[str] = []

    @tools.register(parameters={"type": "object", "properties": {"city": {}, "unit": {}}})
    async def get_weather(city: str, unit: str = "celsius") -> dict:
        """Current weather (slow the first time)."""
        seen.append("run")
        if len(seen) == 1:
            started.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                seen.append("cancelled")
                raise
        return {"city": city, "sky": "sunny"}

    async with asm_gemini(server_factory, {"tools": tools}) as (server, config, _):
        fake = FAKES["asm/gemini-live"]
        async with connect(server, TOKEN) as c:
            await c.recv()
            await c.send({"type": "session.update", "config": {**config, "tools": []}})
            assert (await c.recv())["type"] == "session.updated"
            await c.send({"type": "input.text", "text": "Weather in Paris?", "final": True})
            events = await c.until("tool.execution", timeout=15)
            call_id = events[-1]["call_ids"][0]
            assert await asyncio.to_thread(started.wait, 10)
            # The user speaks again: Gemini withdraws the pending call.
            await c.send({"type": "input.text", "text": "Never mind.", "final": True})
            events = await c.until("tool.cancelled", timeout=15)
            cancelled = events[-1]
            assert cancelled["call_ids"] == [call_id]
            assert cancelled["stopped"] == [call_id]
            events = await c.until("tool.output", timeout=15)
            assert events[-1]["call_id"] == call_id
            assert "cancelled" in json.loads(events[-1]["output"])["error"]
            # The next turn (its call runs at once) ends normally.
            while True:
                events = await c.until("response.done", timeout=15)
                if events[-1]["finish_reason"] == "stop":
                    break
        assert seen[:2] == ["run", "cancelled"]
        assert call_id not in [r["id"] for r in fake.tool_responses]
        assert fake.tool_responses, "the next turn's call was answered"
