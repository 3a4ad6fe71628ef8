"""Tool-call accumulation, the server-side registry and the tool loop (against the fake)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from duplex.protocol import (
    Message,
    SessionConfig,
    StreamChunk,
    ToolCall,
    ToolExecution,
    ToolOutput,
    ToolSpec,
    WarningEvent,
)
from server.providers.base import TurnRequest
from server.providers.openai_chat import OpenAIChatProvider
from server.providers.tool_calls import ToolCallAccumulator
from server.tools import ToolRegistry, run_tool_loop, with_tool_messages
from tests.fakes.openai_http import ChatReply, FakeToolCall, run_fake

CHAT = "/v1/chat/completions"


# --------------------------------------------------------------------------------------
# ToolCallAccumulator


def test_accumulates_openai_style_deltas() -> None:
    acc = ToolCallAccumulator()
    acc.feed(
        [
            {
                "index": 0,
                "id": "call_1",
                "type": "function",
                "function": {"name": "f", "arguments": ""},
            }
        ]
    )
    for piece in ['{"ci', 'ty": ', '"Oslo"}']:
        acc.feed([{"index": 0, "function": {"arguments": piece}}])
    acc.feed([{"index": 1, "id": "call_2", "function": {"name": "g"}}])
    calls, dropped = acc.complete()
    assert calls == [
        ToolCall(id="call_1", name="f", arguments='{"city": "Oslo"}'),
        ToolCall(id="call_2", name="g", arguments="{}"),
    ]
    assert dropped == []


def test_repeated_ids_and_names_and_missing_indexes() -> None:
    acc = ToolCallAccumulator()
    # Servers that repeat id/name in every delta and send no index.
    acc.feed({"id": "a", "function": {"name": "f", "arguments": '{"x":'}})
    acc.feed({"id": "a", "function": {"name": "f", "arguments": " 1}"}})
    acc.feed({"id": "b", "function": {"name": "g", "arguments": "{}"}})
    # A name streamed in pieces.
    acc.feed({"index": 5, "id": "c", "function": {"name": "get_"}})
    acc.feed({"index": 5, "function": {"name": "weather", "arguments": {"already": "parsed"}}})
    calls, dropped = acc.complete()
    assert [(c.id, c.name, c.arguments) for c in calls] == [
        ("a", "f", '{"x": 1}'),
        ("b", "g", "{}"),
        ("c", "get_weather", '{"already": "parsed"}'),
    ]
    assert dropped == []


def test_incomplete_calls_are_dropped_with_reasons() -> None:
    acc = ToolCallAccumulator()
    acc.feed([{"index": 0, "function": {"name": "no_id", "arguments": "{}"}}])
    acc.feed([{"index": 1, "id": "x", "function": {"arguments": "{}"}}])
    acc.feed([{"index": 2, "id": "y", "function": {"name": "cut", "arguments": '{"a": '}}])
    acc.feed([{"index": 3, "id": "z", "function": {"name": "list", "arguments": "[1]"}}])
    acc.feed([{"index": 4, "id": "ok", "function": {"name": "fine", "arguments": "{}"}}])
    calls, dropped = acc.complete()
    assert [c.id for c in calls] == ["ok"]
    assert len(dropped) == 4
    assert "missing id" in dropped[0]
    assert "missing function name" in dropped[1]
    assert "not valid JSON" in dropped[2]
    assert "not a JSON object" in dropped[3]


@settings(max_examples=100, deadline=None)
@given(
    args=st.dictionaries(st.text(max_size=5), st.text(max_size=8) | st.integers(), max_size=4),
    data=st.data(),
)
def test_any_split_of_the_arguments_gives_the_same_call(args: dict[str, Any], data: Any) -> None:
    text = json.dumps(args, ensure_ascii=False)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=10)))
    acc = ToolCallAccumulator()
    acc.feed({"index": 0, "id": "call", "function": {"name": "f", "arguments": ""}})
    start = 0
    for cut in [*cuts, len(text)]:
        acc.feed({"index": 0, "function": {"arguments": text[start:cut]}})
        start = cut
    calls, dropped = acc.complete()
    assert dropped == []
    assert json.loads(calls[0].arguments) == args


# --------------------------------------------------------------------------------------
# ToolRegistry


def make_registry() -> ToolRegistry:
    registry = ToolRegistry(default_timeout_s=5)

    @registry.register(
        parameters={
            "type": "object",
            "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            "required": ["a", "b"],
        }
    )
    async def add(a: float, b: float) -> dict[str, float]:
        """Add two numbers.

        Second paragraph is not part of the description."""
        return {"sum": a + b}

    async def explode() -> None:
        raise RuntimeError("boom")

    registry.register(explode, name="explode", description="Always fails.")

    @registry.register(timeout_s=0.05)
    async def stuck() -> None:
        await asyncio.Event().wait()

    return registry


def test_specs_come_from_registration() -> None:
    registry = make_registry()
    specs = {s.name: s for s in registry.specs()}
    assert set(specs) == {"add", "explode", "stuck"}
    assert specs["add"].description == "Add two numbers."
    assert specs["add"].parameters["required"] == ["a", "b"]
    assert specs["explode"].description == "Always fails."
    assert specs["stuck"].parameters == {"type": "object", "properties": {}}
    client = [ToolSpec(name="add", description="client add"), ToolSpec(name="open_door")]
    merged = registry.merge_specs(client)
    assert [s.name for s in merged] == ["add", "explode", "stuck", "open_door"]
    assert merged[0].description == "Add two numbers."


def test_registration_errors() -> None:
    registry = make_registry()

    async def add() -> None: ...

    with pytest.raises(ValueError, match="already registered"):
        registry.register(add)

    def sync_tool() -> None: ...

    with pytest.raises(TypeError):
        registry.register(sync_tool)
    with pytest.raises(ValueError):
        registry.register(add, name="bad name with spaces")


async def test_run_results_and_failures() -> None:
    registry = make_registry()
    ok = await registry.run(ToolCall(id="1", name="add", arguments='{"a": 2, "b": 3}'))
    assert json.loads(ok) == {"sum": 5}
    failures = {
        "raises": ToolCall(id="2", name="explode", arguments="{}"),
        "timeout": ToolCall(id="3", name="stuck", arguments=""),
        "bad_json": ToolCall(id="4", name="add", arguments='{"a": '),
        "not_object": ToolCall(id="5", name="add", arguments="[1, 2]"),
        "wrong_args": ToolCall(id="6", name="add", arguments='{"c": 1}'),
        "unknown": ToolCall(id="7", name="nope", arguments="{}"),
    }
    results = {k: json.loads(await registry.run(call)) for k, call in failures.items()}
    assert "boom" in results["raises"]["error"]
    assert "timed out" in results["timeout"]["error"]
    assert "invalid arguments JSON" in results["bad_json"]["error"]
    assert "JSON object" in results["not_object"]["error"]
    assert "TypeError" in results["wrong_args"]["error"]
    assert "unknown tool" in results["unknown"]["error"]


# --------------------------------------------------------------------------------------
# The loop, against the fake model


def request(tools: list[ToolSpec]) -> TurnRequest:
    return TurnRequest(
        session_id="sess_1",
        turn_id="turn_9",
        response_id="resp_9",
        config=SessionConfig(),
        instructions="Use tools.",
        history=[Message(role="user", content="earlier"), Message(role="assistant", content="ok")],
        text="What is 2 + 3, and the weather?",
        tools=tools,
    )


async def run_loop(
    provider: OpenAIChatProvider,
    registry: ToolRegistry,
    *,
    client_tool: Any = None,
    hop_limit: int = 5,
    new_messages: list[Message] | None = None,
) -> list[StreamChunk]:
    req = request(registry.merge_specs([ToolSpec(name="open_door")]))

    def call_model(extra: list[Message]) -> AsyncIterator[StreamChunk]:
        return provider.stream(with_tool_messages(req, extra))

    async with asyncio.timeout(10):
        loop = run_tool_loop(
            call_model,
            registry,
            client_tool=client_tool,
            hop_limit=hop_limit,
            new_messages=new_messages,
            turn_id=req.turn_id,
        )
        async with aclosing(loop) as stream:
            return [chunk async for chunk in stream]


def kinds(items: list[Any]) -> list[str]:
    """The wire type of each typed event ("" for a plain chunk)."""
    return ["" if isinstance(c, StreamChunk) else c.type for c in items]


def text(items: list[Any]) -> str:
    return "".join(c.delta or "" for c in items if isinstance(c, StreamChunk))


async def test_parallel_calls_run_concurrently() -> None:
    registry = ToolRegistry(default_timeout_s=5)
    events: list[tuple[str, str]] = []
    started = 0
    both_started = asyncio.Event()

    @registry.register(parameters={"type": "object", "properties": {"city": {"type": "string"}}})
    async def weather(city: str) -> dict[str, Any]:
        nonlocal started
        events.append(("start", city))
        started += 1
        if started == 2:
            both_started.set()
        # Run one after the other and this waits until the tool times out.
        await both_started.wait()
        events.append(("end", city))
        return {"city": city, "temp": 20}

    calls = [
        FakeToolCall(name="weather", arguments='{"city": "Oslo"}'),
        FakeToolCall(name="weather", arguments='{"city": "Rome"}'),
    ]
    async with run_fake(seed=6) as fake:
        fake.script(ChatReply(tool_calls=calls), ChatReply(text="Oslo 20, Rome 20."))
        provider = OpenAIChatProvider(base_url=fake.url)
        chunks = await run_loop(provider, registry)
        await provider.aclose()
        second = fake.requests_to(CHAT)[1].json["messages"]
    assert [kind for kind, _ in events[:2]] == ["start", "start"]
    assert {kind for kind, _ in events[2:]} == {"end"}
    results = [c for c in chunks if isinstance(c, ToolOutput)]
    assert [json.loads(r.output)["city"] for r in results] == ["Oslo", "Rome"]
    assert not any(
        isinstance(c, StreamChunk) and c.tool_calls for c in chunks
    )  # server tools are not sent to the client
    assert second[-3]["tool_calls"][0]["id"] == calls[0].id
    assert second[-2:] == [
        {"role": "tool", "tool_call_id": calls[0].id, "content": '{"city": "Oslo", "temp": 20}'},
        {"role": "tool", "tool_call_id": calls[1].id, "content": '{"city": "Rome", "temp": 20}'},
    ]
    assert chunks[-1].finish_reason == "stop"


async def test_two_hops_then_an_answer() -> None:
    registry = make_registry()

    @registry.register
    async def weather() -> str:
        """Weather here."""
        return "sunny"

    add_call = FakeToolCall(name="add", arguments='{"a": 2, "b": 3}', pieces=9)
    weather_call = FakeToolCall(name="weather", arguments="{}")
    new_messages: list[Message] = []
    async with run_fake(seed=8) as fake:
        fake.script(
            ChatReply(text="Adding first.", tool_calls=[add_call]),
            ChatReply(tool_calls=[weather_call]),
            ChatReply(text="5, and sunny."),
        )
        provider = OpenAIChatProvider(base_url=fake.url)
        chunks = await run_loop(provider, registry, new_messages=new_messages)
        await provider.aclose()
        sent = [r.json["messages"] for r in fake.requests_to(CHAT)]
    assert len(sent) == 3
    assert text(chunks) == "Adding first.5, and sunny."
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].metadata is not None
    assert chunks[-1].metadata["hops"] == 2
    assert chunks[-1].metadata["usage"]["total_tokens"] > 0  # summed over the three calls
    executions = [c for c in chunks if isinstance(c, ToolExecution)]
    assert [(e.calls, e.call_ids, e.hop) for e in executions] == [
        (["add"], [add_call.id], 1),
        (["weather"], [weather_call.id], 2),
    ]
    # The user content stays where it was; this turn's exchange follows it, in order.
    user_index = 3
    for messages in sent:
        assert messages[user_index] == {
            "role": "user",
            "content": "What is 2 + 3, and the weather?",
        }
    assert sent[2][user_index + 1 :] == [
        {
            "role": "assistant",
            "content": "Adding first.",
            "tool_calls": [
                {
                    "id": add_call.id,
                    "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": add_call.id, "content": '{"sum": 5}'},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": weather_call.id,
                    "type": "function",
                    "function": {"name": "weather", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": weather_call.id, "content": '"sunny"'},
    ]
    assert [(m.role, m.content) for m in new_messages] == [
        ("assistant", "Adding first."),
        ("tool", '{"sum": 5}'),
        ("assistant", ""),
        ("tool", '"sunny"'),
        ("assistant", "5, and sunny."),
    ]
    assert new_messages[0].metadata["tool_calls"][0]["id"] == add_call.id
    assert new_messages[1].metadata["tool_call_id"] == add_call.id
    assert all(m.metadata["turn_id"] == "turn_9" for m in new_messages)


async def test_hop_limit_ends_the_loop() -> None:
    registry = make_registry()
    new_messages: list[Message] = []
    async with run_fake() as fake:
        fake.script(
            ChatReply(tool_calls=[FakeToolCall(name="add", arguments='{"a": 1, "b": 1}')]),
            ChatReply(
                text="Once more.",
                tool_calls=[FakeToolCall(name="add", arguments='{"a": 2, "b": 2}')],
            ),
            ChatReply(text="never requested"),
        )
        provider = OpenAIChatProvider(base_url=fake.url)
        chunks = await run_loop(provider, registry, hop_limit=1, new_messages=new_messages)
        await provider.aclose()
        assert len(fake.requests_to(CHAT)) == 2
    assert chunks[-1].finish_reason == "tool_limit_reached"
    warning = next(c for c in chunks if isinstance(c, WarningEvent))
    assert warning.code == "tool_limit_reached" and warning.calls == ["add"]
    assert kinds(chunks).count("tool.output") == 1  # the second request was not run
    assert [(m.role, m.content) for m in new_messages][-1] == ("assistant", "Once more.")
    assert "tool_calls" not in new_messages[-1].metadata


async def test_client_side_tool_goes_through_the_callable() -> None:
    registry = make_registry()
    order: list[str] = []

    async def client_tool(call: ToolCall) -> str:
        order.append(f"client:{call.name}:{call.arguments}")
        return '{"opened": true}'

    door = FakeToolCall(name="open_door", arguments='{"door": "front"}')
    add = FakeToolCall(name="add", arguments='{"a": 1, "b": 2}')
    async with run_fake() as fake:
        fake.script(ChatReply(tool_calls=[door, add]), ChatReply(text="Door open, 3."))
        provider = OpenAIChatProvider(base_url=fake.url)
        req_chunks: list[StreamChunk] = []

        def call_model(extra: list[Message]) -> AsyncIterator[StreamChunk]:
            return provider.stream(with_tool_messages(request(registry.specs()), extra))

        async with asyncio.timeout(10):
            async for chunk in run_tool_loop(call_model, registry, client_tool=client_tool):
                req_chunks.append(chunk)
                if isinstance(chunk, StreamChunk) and chunk.tool_calls:
                    order.append("chunk.tool_calls")
        await provider.aclose()
        second = fake.requests_to(CHAT)[1].json["messages"]
    client_chunk = next(c for c in req_chunks if isinstance(c, StreamChunk) and c.tool_calls)
    assert client_chunk.tool_calls == [
        ToolCall(id=door.id, name="open_door", arguments=door.arguments)
    ]
    assert order == ["chunk.tool_calls", 'client:open_door:{"door": "front"}']
    execution = next(c for c in req_chunks if isinstance(c, ToolExecution))
    assert execution.calls == ["open_door", "add"] and execution.call_ids == [door.id, add.id]
    assert second[-2:] == [
        {"role": "tool", "tool_call_id": door.id, "content": '{"opened": true}'},
        {"role": "tool", "tool_call_id": add.id, "content": '{"sum": 3}'},
    ]
    assert req_chunks[-1].finish_reason == "stop"


async def test_client_tool_timeout_and_missing_client_become_error_results() -> None:
    registry = make_registry()

    async def slow_client(call: ToolCall) -> str:
        async with asyncio.timeout(0.01):
            await asyncio.Event().wait()
        return "unreachable"

    door = FakeToolCall(name="open_door", arguments="{}")
    async with run_fake() as fake:
        fake.script(
            ChatReply(tool_calls=[door]),
            ChatReply(text="Could not."),
            ChatReply(tool_calls=[door]),
            ChatReply(text="No client."),
        )
        provider = OpenAIChatProvider(base_url=fake.url)
        await run_loop(provider, registry, client_tool=slow_client)
        await run_loop(provider, registry, client_tool=None)
        await provider.aclose()
        sent = [r.json["messages"] for r in fake.requests_to(CHAT)]
    assert len(sent) == 4
    timed_out, missing = sent[1][-1], sent[3][-1]
    assert timed_out["role"] == missing["role"] == "tool"
    assert "timed out" in json.loads(timed_out["content"])["error"]
    assert "unknown tool: open_door" in json.loads(missing["content"])["error"]


async def test_tool_timeout_is_reported_to_the_model() -> None:
    registry = make_registry()
    async with run_fake() as fake:
        fake.script(
            ChatReply(tool_calls=[FakeToolCall(name="stuck", arguments="{}")]),
            ChatReply(text="The tool was too slow."),
        )
        provider = OpenAIChatProvider(base_url=fake.url)
        chunks = await run_loop(provider, registry)
        await provider.aclose()
        tool_message = fake.requests_to(CHAT)[1].json["messages"][-1]
    assert tool_message["role"] == "tool"
    assert "timed out" in json.loads(tool_message["content"])["error"]
    result = next(c for c in chunks if isinstance(c, ToolOutput))
    assert "timed out" in result.output
    assert chunks[-1].finish_reason == "stop"


async def test_text_before_a_tool_call_is_streamed_at_once() -> None:
    registry = ToolRegistry()
    tool_started = asyncio.Event()
    release = asyncio.Event()

    @registry.register
    async def lookup() -> str:
        tool_started.set()
        await release.wait()
        return "found"

    async with run_fake() as fake:
        fake.script(
            ChatReply(
                text="Let me look.", tool_calls=[FakeToolCall(name="lookup", arguments="{}")]
            ),
            ChatReply(text="Found it."),
        )
        provider = OpenAIChatProvider(base_url=fake.url)
        req = request(registry.specs())
        seen: list[StreamChunk] = []
        async with asyncio.timeout(10):
            loop = run_tool_loop(
                lambda extra: provider.stream(with_tool_messages(req, extra)), registry
            )
            async with aclosing(loop) as stream:
                async for chunk in stream:
                    seen.append(chunk)
                    if isinstance(chunk, ToolExecution):
                        # The text was already delivered while the tool has not finished.
                        assert text(seen) == "Let me look."
                        release.set()
        await provider.aclose()
    assert tool_started.is_set()
    assert text(seen) == "Let me look.Found it."


async def test_cancelling_the_loop_cancels_running_tools() -> None:
    registry = ToolRegistry()
    running = asyncio.Event()
    cancelled = asyncio.Event()

    @registry.register
    async def forever() -> None:
        running.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with run_fake() as fake:
        fake.script(ChatReply(tool_calls=[FakeToolCall(name="forever", arguments="{}")]))
        provider = OpenAIChatProvider(base_url=fake.url)
        req = request(registry.specs())

        async def consume() -> None:
            loop = run_tool_loop(
                lambda extra: provider.stream(with_tool_messages(req, extra)), registry
            )
            async with aclosing(loop) as stream:
                async for _ in stream:
                    pass

        task = asyncio.create_task(consume())
        async with asyncio.timeout(10):
            await running.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await cancelled.wait()
        await provider.aclose()
        assert len(fake.requests_to(CHAT)) == 1
