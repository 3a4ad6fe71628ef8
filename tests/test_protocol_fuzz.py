"""Random client messages never crash the endpoint; every reply is a valid v1 message."""

from __future__ import annotations

import asyncio
import json

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
