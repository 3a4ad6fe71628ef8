"""Bad input answers a non-fatal 400 and the session goes on; config caps hold on every door."""

from __future__ import annotations

import asyncio
import json
import threading
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import websockets

from duplex.protocol import (
    ConfigLimits,
    JsonLimits,
    ProtocolError,
    SessionConfig,
    describe_validation_error,
    parse_client_message,
    parse_json,
)
from tests.conftest import TOKEN
from tests.wsutil import connect

AUTH = {"Authorization": f"Bearer {TOKEN}"}

#: Each bad frame, and a word its error message must contain.
BAD_FRAMES = {
    "deep list": ("[" * 100_000 + "]" * 100_000, "nested"),
    "deep object": ('{"a":' * 100_000 + "1" + "}" * 100_000, "nested"),
    "deep in a field": (
        '{"type":"input.text","text":"hi","x":' + "[" * 50_000 + "]" * 50_000 + "}",
        "nested",
    ),
    "type as array": ('{"type":["ping"]}', "type"),
    "type as object": ('{"type":{"a":1}}', "type"),
    "type as number": ('{"type":1}', "type"),
    "huge int": ('{"type":"ping","id":' + "9" * 5000 + "}", "number"),
    "huge int under the str limit": ('{"type":"ping","x":' + "9" * 4000 + "}", "number"),
    "huge float": ('{"type":"ping","x":' + "9" * 5000 + ".5}", "number"),
    "infinite float": ('{"type":"ping","x":1e400}', "number"),
    "NaN": ('{"type":"ping","x":NaN}', "JSON"),
    "lone surrogate": ('{"type":"input.text","text":"\\ud800","final":true}', "surrogate"),
    "lone surrogate in the middle": ('{"type":"input.text","text":"a\\ud800b"}', "surrogate"),
    "lone low surrogate": ('{"type":"input.text","text":"\\udc00","final":true}', "surrogate"),
    "surrogate in a key": ('{"type":"ping","\\ud800":1}', "surrogate"),
}


# ---- unit: the one parse point ------------------------------------------------------


@pytest.mark.parametrize("name", list(BAD_FRAMES))
def test_parse_refuses_with_400(name: str) -> None:
    raw, word = BAD_FRAMES[name]
    with pytest.raises(ProtocolError) as caught:
        parse_client_message(raw)
    assert caught.value.code == 400
    assert not caught.value.fatal
    assert word.lower() in caught.value.message.lower(), caught.value.message
    assert len(caught.value.message) < 300  # never echoes the input back whole


def test_parse_accepts_paired_surrogates_and_limits_are_exact() -> None:
    msg = parse_client_message('{"type":"input.text","text":"\\ud83d\\ude00"}')
    assert msg.text == "\U0001f600"  # type: ignore[union-attr]
    limits = JsonLimits(max_depth=3)
    parse_json('{"a":{"b":[1]}}', limits)  # depth 3
    with pytest.raises(ProtocolError, match="nested deeper than 3"):
        parse_json('{"a":{"b":[[1]]}}', limits)
    parse_json('{"a":' + "9" * 40 + "}")
    with pytest.raises(ProtocolError, match="number"):
        parse_json('{"a":' + "9" * 41 + "}")


def test_config_caps_are_checked_only_when_given() -> None:
    limits = ConfigLimits(max_instructions_chars=10, max_variables=2, max_tools=1)
    big = {"instructions": "x" * 11}
    SessionConfig().merged(big)  # no limits: a stored config always loads again
    for patch, word in [
        (big, "instructions"),
        ({"variables": {"a": "1", "b": "2", "c": "3"}}, "variables"),
        ({"tools": [{"name": "a"}, {"name": "b"}]}, "tools"),
    ]:
        with pytest.raises(ValueError, match=word):
            SessionConfig().merged(patch, limits)


# ---- over a real connection ---------------------------------------------------------


async def _ping_answers(c: Any, tag: str) -> None:
    await c.send({"type": "ping", "id": tag})
    while True:
        event = await c.recv()
        assert not (event["type"] == "error" and event["fatal"]), event
        if event["type"] == "pong" and event.get("id") == tag:
            return


def test_bad_frames_answer_400_and_the_session_goes_on(server_factory) -> None:
    server = server_factory(max_message_bytes=1024 * 1024)

    async def run() -> None:
        async with connect(server, TOKEN) as c:
            await c.recv()
            for name, (raw, word) in BAD_FRAMES.items():
                await c.send(raw)
                event = await c.recv()
                assert event["type"] == "error", (name, event)
                assert event["code"] == 400 and not event["fatal"], (name, event)
                assert word.lower() in event["message"].lower(), (name, event)
                await _ping_answers(c, name)
            # A reply made from good text still works after all that.
            events = await c.ask("still here")
            assert any(e["type"] == "response.done" for e in events)

    asyncio.run(run())


def _deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return value


OVER_LIMIT = {
    "instructions": {"instructions": "x" * 1_000_000},
    "variables": {"variables": {f"v{i}": "x" for i in range(20_000)}},
    "variable value": {"variables": {"v": "x" * 100_000}},
    "variable name": {"variables": {"v" * 1000: "x"}},
    "tools": {"tools": [{"name": f"t{i}"} for i in range(10_000)]},
    "tool schema": {"tools": [{"name": "t", "parameters": {"description": "x" * 100_000}}]},
    "voice": {"voice": "v" * 100_000},
    "model": {"model": "m" * 100_000},
    "provider_options depth": {"provider_options": _deep(20)},
    "provider_options too deep to parse": {"provider_options": _deep(300)},
}


def test_over_limit_updates_answer_400_and_change_nothing(server_factory) -> None:
    server = server_factory(max_message_bytes=4 * 1024 * 1024)

    async def run() -> None:
        async with connect(server, TOKEN) as c:
            created = await c.recv()
            session_id = created["session"]["id"]
            before = created["session"]["config"]
            for name, patch in OVER_LIMIT.items():
                await c.send({"type": "session.update", "id": name, "config": patch})
                event = await c.recv()
                assert event["type"] == "error", (name, event)
                assert event["code"] == 400 and not event["fatal"], (name, event)
                await _ping_answers(c, name)
            await c.send({"type": "session.update", "config": {"provider_options": {"t": 1}}})
            updated = (await c.until("session.updated"))[-1]["session"]["config"]
            assert updated == {**before, "provider_options": {"t": 1}}
        # The stored session loads again, over the socket and over REST.
        async with connect(server, TOKEN, query=f"session_id={session_id}") as c:
            again = await c.recv()
            assert again["type"] == "session.created"
            assert again["session"]["config"] == updated
        async with httpx.AsyncClient(base_url=server.base, headers=AUTH) as http:
            r = await http.post(f"/v1/sessions/{session_id}/fork")
            assert r.status_code == 201
            variables = (await http.get(f"/v1/sessions/{session_id}")).json()["variables"]
            assert variables == {}

    asyncio.run(run())


def test_limits_are_settings(server_factory) -> None:
    server = server_factory(max_instructions_chars=5, max_json_depth=4)

    async def run() -> None:
        async with connect(server, TOKEN) as c:
            await c.recv()
            await c.send({"type": "session.update", "config": {"instructions": "123456"}})
            event = await c.recv()
            assert event["code"] == 400 and "instructions" in event["message"]
            await c.send({"type": "session.update", "config": {"provider_options": {"a": [[1]]}}})
            event = await c.recv()
            assert event["code"] == 400 and "nested deeper than 4" in event["message"]
            await c.send({"type": "session.update", "config": {"instructions": "12345"}})
            assert (await c.recv())["type"] == "session.updated"

    asyncio.run(run())


def test_rest_bodies_are_held_to_the_same_limits(live_server) -> None:
    with httpx.Client(base_url=live_server.base, headers=AUTH) as http:
        sid = http.post("/v1/sessions", json={"name": "ok"}).json()["id"]
        bad_creates = [
            {"config": {"instructions": "x" * 1_000_000}},
            {"config": {"provider_options": _deep(20)}},
            {"config": {"tools": [{"name": "t", "parameters": _deep(50)}]}},
            {"variables": {f"v{i}": "x" for i in range(20_000)}},
            {"name": "n" * 100_000},
        ]
        for body in bad_creates:
            r = http.post("/v1/sessions", json=body)
            assert r.status_code == 400, (str(body)[:60], r.text[:200])
        # Bodies that do not parse or hold unwritable text answer 400; a wrong shape 422
        # (as any invalid body does). Never 500, never the input echoed back.
        raw_bodies = [
            ('{"name":"\\ud800"}', 400),
            ('{"variables":{"a":"\\udc00"}}', 400),
            ('{"variables":{"\\ud800":"a"}}', 400),
            ('{"name":["\\ud800"]}', 422),
            ('{"name":' + "[" * 100_000 + "]" * 100_000 + "}", 400),
            ('{"name":"a","variables":' + json.dumps(_deep(300)) + "}", 422),
            ('{"name":' + "9" * 5000 + "}", 400),
        ]
        for raw, code in raw_bodies:
            for method, url in [("POST", "/v1/sessions"), ("PATCH", f"/v1/sessions/{sid}")]:
                r = http.request(
                    method, url, content=raw, headers={"content-type": "application/json"}
                )
                assert r.status_code == code, (method, raw[:40], r.status_code, r.text[:200])
                assert len(r.content) < 2000
        bad_patches = [
            {"name": "n" * 100_000},
            {"variables": {f"v{i}": "x" for i in range(20_000)}},
            {"variables": {"v": "x" * 100_000}},
        ]
        for body in bad_patches:
            r = http.patch(f"/v1/sessions/{sid}", json=body)
            assert r.status_code == 400, (str(body)[:60], r.text[:200])
        for i in range(3):  # the variable count holds across several patches too
            r = http.patch(
                f"/v1/sessions/{sid}", json={"variables": {f"p{i}_{j}": "x" for j in range(100)}}
            )
            assert r.status_code == (200 if i < 2 else 400), r.text[:200]
        view = http.get(f"/v1/sessions/{sid}").json()
        assert view["name"] == "ok" and len(view["variables"]) == 200
        r = http.post(f"/v1/sessions/{sid}/completions", json={"question": "hi", "stream": False})
        assert r.status_code == 200, r.text[:200]
        r = http.post(
            f"/v1/sessions/{sid}/completions",
            content='{"question":"\\ud800","stream":true}',
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 422, r.text[:200]


def test_chat_socket_answers_bad_json_and_goes_on(live_server) -> None:
    url = live_server.base.replace("http", "ws", 1) + "/v1/ws/chat"

    async def run() -> None:
        async with websockets.connect(url, additional_headers=AUTH, max_size=None) as ws:
            for raw in [
                "[" * 100_000 + "]" * 100_000,
                '{"type":"chat","question":"\\ud800"}',
                '{"type":["chat"],"question":"x"}',
                '{"type":"chat","question":"x","n":' + "9" * 5000 + "}",
            ]:
                await ws.send(raw)
                reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
                assert reply["code"] == 400, (raw[:40], reply)
            await ws.send(json.dumps({"type": "chat", "question": "hello", "stream": False}))
            while True:
                reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
                assert reply["code"] == 0, reply
                if reply["data"] is True:
                    break

    asyncio.run(run())


# ---- the close race in media_inputs ----------------------------------------------------


def test_poll_while_the_session_closes_is_quiet() -> None:
    """`FrameSource.poll` walks the video streams while a turn ends; a close in the middle
    (it clears the streams) used to raise "dictionary changed size during iteration"."""
    from server.media_inputs import FrameSource

    async def notify(code: int, message: str, *, id: str | None = None) -> None:
        raise AssertionError(message)

    source = FrameSource(SessionConfig().video, 1_000_000, notify)
    inside = threading.Event()
    release = threading.Event()
    polled: list[str] = []

    class Stream:
        def __init__(self, name: str) -> None:
            self.name = name

        def decode_pixels(self) -> int:  # held from the decode budget while it polls
            return 0

        def poll(self, *, now_ms: float, speaking: bool) -> Any:
            polled.append(self.name)
            inside.set()
            assert release.wait(5)
            return SimpleNamespace(frames=[], notices=[])

    source._streams = {"video/a": Stream("a"), "video/b": Stream("b")}  # type: ignore[dict-item]

    async def run() -> None:
        task = asyncio.ensure_future(source.poll(speaking=False))
        assert await asyncio.to_thread(inside.wait, 5)
        source.close()
        release.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(run())
    assert polled == ["a"]  # a stream closed meanwhile is not polled


def test_errors_quote_only_short_pieces_of_the_input() -> None:
    for raw in [
        json.dumps({"type": "x" * 100_000}),
        json.dumps({"type": "ping", "y" * 100_000: 1}),
        json.dumps({"type": "input.text", "text": ["x" * 100_000]}),
        json.dumps({"type": "tool.result", "call_id": "c" * 100_000, "output": 1}),
        json.dumps({"type": "playback", "response_id": "r" * 100_000, "played_ms": 1}),
        json.dumps({"type": "input.image", "data": "", "mime_type": "m" * 100_000}),
    ]:
        with pytest.raises(ProtocolError) as caught:
            parse_client_message(raw)
        assert len(caught.value.message) < 300, caught.value.message[:400]
    for patch in [{"variables": {"k" * 100_000: 1}}, {"z" * 100_000: 1}]:
        with pytest.raises(ValueError) as error:
            SessionConfig().merged(patch, ConfigLimits())
        assert len(describe_validation_error(error.value)) < 300  # type: ignore[arg-type]


def test_a_stored_config_that_cannot_be_written_answers_instead_of_a_silent_close(
    server_factory,
) -> None:
    """Sessions stored before the caps existed may hold a config the server cannot
    serialise; resuming one must say so, not drop the socket without a message."""
    server = server_factory()
    store = server.app.state.duplex.services.store
    from server.state.base import SessionRecord

    record = SessionRecord(
        id="sess_broken", tenant="tenant-a", config={"provider_options": _deep(300)}
    )

    async def run() -> None:
        # The store belongs to the server's loop; the in-memory one needs no loop of its own.
        await store.create_session(record)
        async with connect(server, TOKEN, query="session_id=sess_broken") as c:
            event = await c.recv()
            assert event["type"] == "error" and event["fatal"], event
            assert "stored" in event["message"], event
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await c.ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
        async with connect(server, TOKEN) as c:  # the server is fine
            assert (await c.recv())["type"] == "session.created"

    asyncio.run(run())


def _nested(levels: int) -> dict[str, Any]:
    value: Any = 1
    for _ in range(levels):
        value = {"k": value}
    return value


#: Each cap: (the ConfigLimits field, a patch at a limit of 3 (4 for names), one over it).
CAPS = {
    "instructions": (
        "max_instructions_chars",
        {"instructions": "x" * 3},
        {"instructions": "x" * 4},
    ),
    "variables": (
        "max_variables",
        {"variables": {"a": "", "b": "", "c": ""}},
        {"variables": {"a": "", "b": "", "c": "", "d": ""}},
    ),
    "variable name": (
        "max_variable_name_chars",
        {"variables": {"abc": ""}},
        {"variables": {"abcd": ""}},
    ),
    "variable value": (
        "max_variable_value_chars",
        {"variables": {"a": "123"}},
        {"variables": {"a": "1234"}},
    ),
    "tools": (
        "max_tools",
        {"tools": [{"name": n} for n in "abc"]},
        {"tools": [{"name": n} for n in "abcd"]},
    ),
    "option depth": (
        "max_option_depth",
        {"provider_options": _nested(3)},
        {"provider_options": _nested(4)},
    ),
    "voice": ("max_voice_chars", {"voice": "v" * 3}, {"voice": "v" * 4}),
    # (the provider, "echo", is held to the same cap: 4 characters are the least)
    "model": ("max_name_chars", {"model": "m" * 4}, {"model": "m" * 5}),
}


@pytest.mark.parametrize("cap", list(CAPS))
def test_each_cap_holds_at_its_limit(cap: str) -> None:
    field, at, over = CAPS[cap]
    limit = 4 if field == "max_name_chars" else 3
    limits = ConfigLimits(**{field: limit})
    SessionConfig().merged(at, limits)
    with pytest.raises(ValueError, match=f"over the limit of {limit}"):
        SessionConfig().merged(over, limits)


def test_tool_schema_size_cap() -> None:
    tool = {"name": "t", "description": "", "parameters": {}}
    size = len(json.dumps(tool, separators=(",", ":")))
    limits = ConfigLimits(max_tool_schema_bytes=size + 10)
    SessionConfig().merged({"tools": [{**tool, "description": "d" * 10}]}, limits)
    with pytest.raises(ValueError, match=f"over the limit of {size + 10}"):
        SessionConfig().merged({"tools": [{**tool, "description": "d" * 11}]}, limits)
