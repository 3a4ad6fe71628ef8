"""DuplexSession and UnarySession used directly, without a server."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest

from duplex.protocol import Pong, ProtocolError, SessionConfig, TextChunk
from server.config import Settings
from server.limits import SessionLimits
from server.modes.base import Mode, SessionPort
from server.modes.catalog import builtin_modes
from server.providers.catalog import ProviderCatalog
from server.session import DuplexSession, SessionServices, UnarySession, substitute
from server.state.memory import MemoryStore


def services(**limits) -> SessionServices:
    return SessionServices(
        store=MemoryStore(),
        providers=ProviderCatalog.from_settings(Settings(echo_pace=0)),
        limits=SessionLimits(**limits),
        modes=builtin_modes(),
    )


async def collect_until(session: DuplexSession, kind: str) -> list:
    out = []
    async with asyncio.timeout(5):
        async for message in session.response():
            out.append(message)
            if message.type == kind:
                return out
    raise AssertionError(f"session ended before {kind}")


def test_substitute_variables():
    assert substitute("Hi {{ name }}, {{x}}!", {"name": "Ada"}) == "Hi Ada, {{x}}!"


async def test_duplex_session_text_turns_and_history():
    s = await DuplexSession.open(services(), tenant="t")
    await s.update({"instructions": "Be {{tone}}", "variables": {"tone": "kind"}})
    assert s.instructions() == "Be kind"
    await s.send_text(TextChunk("hello ", final=False))
    await s.send_text(TextChunk("world", final=True))
    events = await collect_until(s, "response.done")
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[0].type == "session.created" and events[1].type == "session.updated"
    text = "".join(e.delta or "" for e in events if e.type == "chunk")
    assert "hello world" in text
    messages = await s.messages()
    assert [m.role for m in messages] == ["user", "assistant"]
    assert messages[0].content == "hello world"
    fork = await s.fork()
    await fork.send_text(TextChunk("forked", final=True))
    await collect_until(fork, "response.done")
    assert len(await fork.messages()) == 4 and len(await s.messages()) == 2
    await s.clear()
    assert await s.messages() == []
    await s.close()
    await fork.close()
    assert s.done.is_set() and s.error is None


async def test_unknown_provider_is_refused():
    s = await DuplexSession.open(services(), tenant="t")
    with pytest.raises(ProtocolError) as info:
        await s.update({"provider": "missing"})
    assert info.value.code == 400
    await s.close()


async def test_slow_consumer_ends_session_with_bounded_queue():
    s = await DuplexSession.open(
        services(output_queue_size=4, output_stall_timeout_s=0.2), tenant="t"
    )
    for i in range(6):  # nobody reads: the queue fills, then the stall timeout fires
        with contextlib.suppress(ProtocolError):  # 429 too many turns, then "closed"
            await s.send_text(TextChunk(f"turn {i} with several words in it", final=True))
        await asyncio.sleep(0.05)
    async with asyncio.timeout(5):
        await s.done.wait()
    assert s.error is not None and s.error.code == 429 and s.error.fatal
    assert s._out.qsize() <= 4
    drained = [m async for m in s.response()]
    assert drained[-1].type == "error" and drained[-1].fatal


async def test_unary_session_execute_and_stream():
    svc = services()
    u = await UnarySession.open(svc, tenant="t", config=SessionConfig(instructions="x"))
    answer = await u.execute("user", "what is up")
    assert answer.role == "assistant" and "what is up" in answer.content
    chunks = [c async for c in u.execute_stream("user", "second question")]
    assert chunks[-1].finish_reason == "stop"
    assert "second question" in "".join(c.delta or "" for c in chunks)
    assert len(await u.messages()) == 4
    fork = await u.fork()
    await fork.execute("user", "only fork")
    assert len(await fork.messages()) == 6 and len(await u.messages()) == 4
    again = await UnarySession.open(svc, tenant="t", session_id=u.id)
    assert len(await again.messages()) == 4
    with pytest.raises(ProtocolError) as info:
        await UnarySession.open(svc, tenant="other", session_id=u.id)
    assert info.value.code == 404


async def test_emit_writes_directly_only_when_nothing_is_queued_before_it():
    s = await DuplexSession.open(services(), tenant="t")
    sent = []
    s.attach_output(lambda text: sent.append(text) or True)  # the encoded frame
    stream = s.response()
    assert (await anext(stream)).type == "session.created"  # queued before anyone read
    await s.emit(Pong(id="a"))  # the consumer holds a message: queue, do not overtake
    assert sent == []
    assert (await anext(stream)).id == "a"
    waiting = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)  # now the consumer waits on an empty queue
    await s.emit(Pong(id="b"))
    assert [(json.loads(m)["id"], json.loads(m)["seq"]) for m in sent] == [("b", 3)]
    s.attach_output(lambda text: False)  # the connection pushes back: queue it
    await s.emit(Pong(id="c"))
    got = await waiting
    assert (got.id, got.seq) == ("c", 4)
    await s.close()


class RecordingMode(Mode):
    """A mode that notes what reaches it and answers through its port only."""

    def __init__(self, session: SessionPort) -> None:
        super().__init__(session)
        self.calls: list[tuple] = []

    async def on_text(self, chunk: TextChunk, msg_id: str | None) -> None:
        self.calls.append(("text", chunk.text))
        await self.session.emit(Pong(id=chunk.text))

    async def on_audio(self, pcm: bytes, msg_id: str | None) -> None:
        self.calls.append(("audio", pcm))

    async def reconfigure(self, old: SessionConfig) -> None:
        self.calls.append(("reconfigure", old.instructions, self.session.config.instructions))

    async def close(self) -> None:
        self.calls.append(("close",))


async def test_the_app_chooses_the_mode_and_the_mode_sees_only_its_port():
    built: list[RecordingMode] = []

    def factory(port: SessionPort) -> RecordingMode:
        built.append(RecordingMode(port))
        return built[-1]

    svc = services()
    svc.modes = {"vad": factory}
    s = await DuplexSession.open(svc, tenant="t")
    assert len(built) == 1 and isinstance(built[0].session, SessionPort)
    mode = built[0]
    await s.send_text(TextChunk("hi", final=True))
    await s.send_audio(b"\x00\x00" * 160)
    await s.update({"instructions": "new"})
    assert mode.session.config is s.config  # the port follows the session's config
    with pytest.raises(ProtocolError) as info:  # no factory for it: refused, mode kept
        await s.update({"mode": "asm"})
    assert info.value.code == 400 and "asm" in info.value.message
    assert s.config.mode == "vad" and len(built) == 1
    events = await collect_until(s, "session.updated")
    assert [e.type for e in events] == ["session.created", "pong", "session.updated"]
    await s.close()
    assert mode.calls == [
        ("text", "hi"),
        ("audio", b"\x00\x00" * 160),
        ("reconfigure", "", "new"),
        ("close",),
    ]


async def test_a_session_without_a_factory_for_its_mode_is_refused():
    svc = services()
    svc.modes = {}
    with pytest.raises(ProtocolError) as info:
        await DuplexSession.open(svc, tenant="t")
    assert info.value.code == 400
