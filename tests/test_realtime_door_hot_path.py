"""The door's per-message paths (audio appends in, events out) take shortcuts for speed;
these pin that the shortcuts answer exactly as the general paths do."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from pydantic import BaseModel

from duplex.protocol import JsonLimits, SpeechStopped
from server.config import Settings
from server.modes.catalog import builtin_modes
from server.providers.catalog import ProviderCatalog
from server.realtime_door.bridge import RealtimeBridge
from server.realtime_door.models import RealtimeModel
from server.realtime_door.routes import _dumps, _Frames
from server.realtime_door.session_map import RealtimeSessionState
from server.session import DuplexSession, SessionServices
from server.state.memory import MemoryStore

AUDIO = base64.b64encode(b"\x01\x00" * 480).decode()


@asynccontextmanager
async def _door(limits: JsonLimits) -> AsyncIterator[tuple[RealtimeBridge, list[str]]]:
    """A session and its bridge, and a writer putting every frame the door writes in the
    list (direct writes and queued ones, as `routes._write` does)."""
    services = SessionServices(
        store=MemoryStore(),
        providers=ProviderCatalog.from_settings(Settings(echo_pace=0)),
        modes=builtin_modes(),
    )
    state = RealtimeSessionState(RealtimeModel("duplex-echo", {"provider": "echo"}))
    session = await DuplexSession.open(services, tenant="t", config=None)
    bridge = RealtimeBridge(session, state, limits)
    sent: list[str] = []
    out = _Frames(bridge, None)
    out.direct_send = lambda frame: sent.append(frame) is None
    session.attach_output(out.send_now, out.encode)

    async def write() -> None:
        async for text in session.frames():
            sent.extend(text.split("\n") if text else [])

    writer = asyncio.create_task(write())
    try:
        yield bridge, sent
    finally:
        await session.close()
        writer.cancel()


async def _error_codes(bridge: RealtimeBridge, sent: list[str]) -> list[str]:
    """The codes of the error events written so far (a marker event's error, awaited,
    shows that everything before it was handled)."""
    await bridge.receive(json.dumps({"type": "marker"}))
    async with asyncio.timeout(10):
        while True:
            codes = [json.loads(t)["error"] for t in sent if t.startswith('{"type":"error"')]
            if codes and codes[-1]["message"].startswith("Invalid value: 'marker'"):
                return [c["code"] for c in codes[:-1]]
            await asyncio.sleep(0.01)


def _append(**extra: Any) -> str:
    return json.dumps({"type": "input_audio_buffer.append", "audio": AUDIO, **extra})


@pytest.mark.parametrize(
    ("text", "taken"),
    [
        (_append(), True),
        (_append(event_id="evt_1"), True),
        ('{"audio":"' + AUDIO + '","type":"input_audio_buffer.append"}', True),
        (_append(audio="@@"), False),  # not base64: the usual path reports it
        (_append(audio=AUDIO[:-1]), False),  # bad padding
        (_append(audio="AAAA=x"), False),  # data after the padding
        (_append(audio="é" + AUDIO), False),  # not ASCII
        (_append(audio=123), False),
        (_append(event_id="\ud800"), False),  # a lone surrogate (escaped in the JSON)
        (_append(extra={"a": {"b": {"c": {"d": 1}}}}), False),  # deeper than the limit
        (_append(extra=10**50), False),  # an integer over the limit
        ('{"type":"input_audio_buffer.append","audio":"' + AUDIO + '"', False),  # cut
        (
            json.dumps({"type": "input_audio_buffer.commit", "x": "input_audio_buffer.append"}),
            False,
        ),
    ],
)
async def test_an_append_goes_direct_only_when_the_usual_path_would_take_it(text, taken):
    async with _door(JsonLimits(max_depth=3)) as (bridge, sent):
        assert bridge.take_nowait(text) is taken
        # The usual path takes the same event, or answers an error event.
        await bridge.receive(text)
        assert bool(await _error_codes(bridge, sent)) is not taken


async def test_an_append_refused_direct_is_reported_by_the_usual_path():
    async with _door(JsonLimits(max_depth=3)) as (bridge, sent):
        for text in (_append(audio="@@"), _append(extra={"a": {"b": {"c": {"d": 1}}}})):
            assert not bridge.take_nowait(text)
            await bridge.receive(text)
        assert await _error_codes(bridge, sent) == ["invalid_value", "invalid_json"]


@pytest.mark.parametrize(
    "event",
    [
        {"type": "x", "event_id": "e1", "delta": AUDIO * 5, "output_index": 0},
        {"type": "x", "text": 'é ü 中 \u2028 "q" \\ / <>&\n\t\x01', "n": None, "ok": True},
        {"type": "x", "usage": {"a": 1.5, "b": 1e16, "c": 2**70, "d": [1, 2.0, "x"]}},
        {"type": "x", "text": "lone \ud800 surrogate"},
    ],
)
def test_events_are_written_as_json_dumps_writes_them(event):
    assert _dumps(event) == json.dumps(event, separators=(",", ":"), ensure_ascii=False)


class _CountingBridge:
    """Translates every message to one event, counting translations (they have effects:
    event and item ids, the bridge's state)."""

    def __init__(self) -> None:
        self.calls = 0

    def translate(self, message: BaseModel) -> list[dict[str, Any]]:
        self.calls += 1
        return [{"type": "input_audio_buffer.speech_stopped", "event_id": f"e{self.calls}"}]


@pytest.mark.parametrize("events", [1, 2])
def test_a_message_cut_short_by_backpressure_is_translated_once(events):
    bridge = _CountingBridge()
    if events == 2:
        one = bridge.translate
        bridge.translate = lambda m: one(m) * 2  # type: ignore[method-assign]
    sent: list[str] = []
    out = _Frames(bridge, None)  # type: ignore[arg-type]
    out.direct_send = lambda frame: bool(sent.append(frame)) and False  # always refused
    message = SpeechStopped(audio_end_ms=1.0)
    text = out.encode(message)
    assert not out.send_now(text)
    # The session queues the message and asks for its text again: the same text.
    assert out.encode(message) == text
    assert bridge.calls == 1
