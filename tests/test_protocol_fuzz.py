"""Random client messages never crash the endpoint; every reply is a valid v1 message."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from duplex.protocol import CLIENT_MESSAGE_TYPES
from tests.conftest import TOKEN
from tests.wsutil import connect

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=10,
)
field_names = st.sampled_from(
    [
        "text",
        "final",
        "audio",
        "data",
        "mime_type",
        "chunk_index",
        "config",
        "id",
        "call_id",
        "output",
        "response_id",
        "played_ms",
        "request_id",
        "width",
        "height",
        "mode",
        "provider",
    ]
)
typed_messages = st.builds(
    lambda kind, fields: {"type": kind, **fields},
    st.sampled_from([*sorted(CLIENT_MESSAGE_TYPES), "bogus", ""]),
    st.dictionaries(field_names, json_values, max_size=4),
)
frames = st.one_of(
    typed_messages.map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=50),
    st.binary(max_size=700),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batch=st.lists(frames, min_size=1, max_size=6))
def test_random_messages_never_break_the_endpoint(live_server, batch):
    async def run() -> None:
        async with connect(live_server, TOKEN) as c:
            await c.recv()
            for frame in batch:
                await c.send(frame)
            await c.send({"type": "ping", "id": "end"})
            async with asyncio.timeout(10):
                while True:
                    event = await c.recv()  # validates against the protocol
                    assert not (event["type"] == "error" and event["fatal"]), event
                    if event["type"] == "pong" and event.get("id") == "end":
                        break

    asyncio.run(run())


# ---- seeded mutational fuzz: every class of bad input, over one real connection -------

#: Reproduce a run with DUPLEX_FUZZ_SEED=<seed>; DUPLEX_FUZZ_SECONDS bounds its wall time.
FUZZ_SEED = int(os.environ.get("DUPLEX_FUZZ_SEED", "14"))
FUZZ_SECONDS = float(os.environ.get("DUPLEX_FUZZ_SECONDS", "20"))

_PCM = base64.b64encode(bytes(640)).decode()
VALID: list[dict[str, Any]] = [
    {"type": "ping", "id": "p"},
    {"type": "input.text", "text": "hello there", "final": False},
    {"type": "input.text", "text": "what time is it", "final": True, "request_id": "r1"},
    {"type": "input.audio", "audio": _PCM},
    {"type": "input.image", "data": _PCM, "mime_type": "image/png", "width": 4, "height": 4},
    {"type": "input.video", "data": _PCM, "mime_type": "video/mp4", "chunk_index": 0},
    {"type": "input.commit", "request_id": "c1"},
    {"type": "response.cancel"},
    {"type": "playback", "response_id": "resp_x", "played_ms": 10.5},
    {"type": "tool.result", "call_id": "call_1", "output": {"ok": True, "n": [1, 2]}},
    {
        "type": "session.update",
        "config": {
            "instructions": "You are {{persona}}.",
            "variables": {"persona": "a guide"},
            "voice": "alloy",
            "turn_detection": {"stop_ms": 500, "interrupt": False},
            "tools": [{"name": "lookup", "parameters": {"type": "object", "properties": {}}}],
            "provider_options": {"temperature": 0.5, "extra": {"a": [1, {"b": None}]}},
        },
    },
]


def _deep_text(rng: random.Random) -> str:
    depth = rng.choice([33, 64, 150, 199, 201, 1000, 100_000])
    opener, closer = rng.choice([("[", "]"), ('{"a":', "}")])
    inner = opener * depth + "1" + closer * depth
    return rng.choice(
        [
            inner,
            '{"type":"ping","x":' + inner + "}",
            '{"type":"session.update","config":{"provider_options":' + inner + "}}",
            '{"type":"tool.result","call_id":"c","output":' + inner + "}",
        ]
    )


def _odd_value(rng: random.Random) -> Any:
    return rng.choice(
        [
            [],
            {},
            ["ping"],
            {"type": "ping"},
            None,
            True,
            0,
            -1,
            1.5,
            "",
            "x" * rng.randint(1, 3000),
            [[[]]],
        ]
    )


def _wrong_type(rng: random.Random) -> str:
    message = dict(rng.choice(VALID))
    if rng.random() < 0.4:
        message["type"] = _odd_value(rng)
    else:
        key = rng.choice([k for k in message if k != "type"] or ["id"])
        message[key] = _odd_value(rng)
    return json.dumps(message)


def _huge_number(rng: random.Random) -> str:
    number = rng.choice(
        [
            "9" * rng.choice([41, 400, 4299, 4301, 6000]),
            "-" + "1" * rng.choice([41, 5000]),
            "1" * 5000 + ".5",
            "1e400",
            "-1e400",
            "NaN",
            "Infinity",
            "1e-400",
        ]
    )
    kind = rng.choice(["ping", "playback", "input.video", "tool.result"])
    field = {"ping": "id", "playback": "played_ms", "input.video": "chunk_index"}.get(
        kind, "output"
    )
    return '{"type":"' + kind + '","call_id":"c","response_id":"r","' + field + '":' + number + "}"


def _surrogate(rng: random.Random) -> str:
    escape = rng.choice(["\\ud800", "\\udfff", "\\udbff", "\\udc00x", "\\ud83d\\ude00"])
    return rng.choice(
        [
            '{"type":"input.text","text":"a' + escape + '","final":true}',
            '{"type":"ping","id":"' + escape + '"}',
            '{"type":"session.update","config":{"instructions":"' + escape + '"}}',
            '{"type":"session.update","config":{"variables":{"' + escape + '":"v"}}}',
            '{"type":"tool.result","call_id":"c","output":"' + escape + '"}',
        ]
    )


def _nest(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"k": value}
    return value


def _over_limit(rng: random.Random) -> str:
    config = rng.choice(
        [
            {"instructions": "x" * rng.choice([65_537, 1_000_000])},
            {"variables": {f"v{i}": "x" for i in range(rng.choice([257, 20_000]))}},
            {"variables": {"v": "x" * 8_193}},
            {"variables": {"v" * 65: "x"}},
            {"tools": [{"name": f"t{i}"} for i in range(rng.choice([129, 10_000]))]},
            {"tools": [{"name": "t", "description": "d" * 20_000}]},
            {"voice": "v" * rng.choice([129, 100_000])},
            {"model": "m" * 257},
            {"provider": "p" * 100_000},
            {"provider_options": _nest(rng.choice([9, 25]))},
        ]
    )
    return json.dumps({"type": "session.update", "id": "over", "config": config})


def _mutate(rng: random.Random) -> str:
    text = json.dumps(rng.choice(VALID))
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(len(text) + 1)
        op = rng.randrange(5)
        if op == 0:  # insert structural or awkward characters
            text = text[:pos] + rng.choice('[]{}",:\\0-e.') * rng.randint(1, 3) + text[pos:]
        elif op == 1:  # delete a span
            text = text[:pos] + text[pos + rng.randint(1, 8) :]
        elif op == 2:  # duplicate a span
            text = text[:pos] + text[pos : pos + rng.randint(1, 40)] * 2 + text[pos:]
        elif op == 3:  # truncate
            text = text[:pos]
        else:  # a random character, sometimes far outside ASCII
            text = (
                text[:pos]
                + chr(rng.choice([rng.randrange(32, 127), rng.randrange(0x80, 0xD7FF)]))
                + text[pos:]
            )
    return text


def _binary(rng: random.Random) -> bytes:
    return rng.randbytes(rng.choice([1, 3, 640, 641]))


FUZZ_CLASSES = [_deep_text, _wrong_type, _huge_number, _surrogate, _over_limit, _mutate, _binary]


async def _check_alive(c: Any, tag: str, context: str) -> None:
    await c.send({"type": "ping", "id": tag})
    async with asyncio.timeout(15):
        while True:
            event = await c.recv(timeout=15)  # a valid v1 message with an increasing seq
            assert not (event["type"] == "error" and event["fatal"]), (context, event)
            if event["type"] == "pong" and event.get("id") == tag:
                return


@pytest.mark.parametrize("store", ["memory", "sqlite", "redis"])
def test_seeded_fuzz_never_ends_a_session(server_factory, request, tmp_path, store):
    """Every class of bad input from issue 14, mixed with valid messages, over a real
    socket: no fatal error, every reply valid, the session answers a ping after each
    batch, and the stored session loads again afterwards (a third of the time per store)."""
    if store == "redis":
        store_url = request.getfixturevalue("redis_url")
    else:
        store_url = "memory://" if store == "memory" else f"sqlite:///{tmp_path}/fuzz.db"
    loopback = "127.0.0.1:9"  # nothing listens: a provider that is somehow picked fails here
    server = server_factory(
        store_url=store_url,
        max_message_bytes=2 * 1024 * 1024,
        openai_api_key=None,
        gemini_api_key=None,
        openai_base_url=f"http://{loopback}",
        openai_realtime_url=f"ws://{loopback}",
        gemini_base_url=f"ws://{loopback}",
    )
    rng = random.Random(f"{FUZZ_SEED}:{store}")
    counts = dict.fromkeys((f.__name__ for f in FUZZ_CLASSES), 0)

    async def run() -> None:
        deadline = time.monotonic() + FUZZ_SECONDS / 3
        session_id = None
        rounds = 0
        while time.monotonic() < deadline or rounds < 2:
            query = f"session_id={session_id}" if session_id else ""
            async with connect(server, TOKEN, query=query) as c:
                created = await c.recv()
                assert created["type"] == "session.created", created
                session_id = created["session"]["id"]
                for batch in range(25):
                    if time.monotonic() > deadline and rounds > 0:
                        break
                    sent = []
                    for _ in range(rng.randint(1, 8)):
                        make = rng.choice(FUZZ_CLASSES)
                        counts[make.__name__] += 1
                        frame = make(rng) if make is not _binary else _binary(rng)
                        sent.append(f"{make.__name__}:{str(frame)[:80]}")
                        await c.send(frame)
                        if rng.random() < 0.3:
                            await c.send(json.dumps(rng.choice(VALID)))
                    await _check_alive(c, f"b{rounds}.{batch}", f"seed {FUZZ_SEED}: {sent}")
            rounds += 1
        # The session as stored loads again, and answers.
        async with connect(server, TOKEN, query=f"session_id={session_id}") as c:
            assert (await c.recv())["type"] == "session.created"
            await _check_alive(c, "final", f"seed {FUZZ_SEED}: resume")

    asyncio.run(run())
    assert all(counts.values()), counts  # every class was exercised
