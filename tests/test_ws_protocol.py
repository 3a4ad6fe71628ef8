"""The server's own WebSocket framing (server/ws_protocol.py) over a raw TCP socket.

The byte stream is cut at arbitrary points, control and text frames are mixed in,
and the results must equal what the stock path gives: same turns, same order,
pings answered, limits enforced.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import numpy as np
import pytest
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.uri import parse_uri

from duplex.protocol import InputAudioConfig, TurnDetectionConfig
from server.modes.audio_ingest import AudioIngest
from server.session import DuplexSession
from server.ws_protocol import text_frame
from tests.conftest import TOKEN
from tests.speech import make_conversation
from tests.wsutil import connect
from vad import turns as vt

SILENCE_1S = np.zeros(16000, dtype=np.int16)


@pytest.fixture(scope="module")
def audio() -> np.ndarray:
    conv = make_conversation(seed=11, n_turns=2, voices=["en"], speeds=[160])
    return np.concatenate([conv.audio, SILENCE_1S])


class RawClient:
    """websockets' sans-I/O client over asyncio streams: we choose the TCP writes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.proto: ClientProtocol

    @classmethod
    async def open(cls, server: Any) -> RawClient:
        uri = parse_uri(server.ws_url + f"?token={TOKEN}")
        reader, writer = await asyncio.open_connection(uri.host, uri.port)
        client = cls(reader, writer)
        client.proto = ClientProtocol(uri, max_size=None)
        client.proto.send_request(client.proto.connect())
        await client.write(client.proto.data_to_send())
        while client.proto.handshake_exc is None and not client.proto.events:
            client.proto.receive_data(await reader.read(65536))
        assert client.proto.handshake_exc is None
        client.proto.events.pop(0)  # the handshake response; frames after it stay queued
        return client

    def frame(self, opcode: Opcode, data: bytes) -> bytes:
        """The exact bytes of one masked client frame."""
        self.proto.send_frame(Frame(opcode, data))
        return b"".join(self.proto.data_to_send())

    async def write(self, chunks: list[bytes]) -> None:
        self.writer.write(b"".join(chunks))
        await self.writer.drain()

    async def events(self, until: Any, timeout: float = 30) -> list[dict[str, Any]]:
        """Read server messages until ``until(messages)``; pongs become {"type": "<pong>"}."""
        got: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            while not until(got):
                for frame in self.proto.events_received():
                    if frame.opcode is Opcode.TEXT:
                        got.append(json.loads(frame.data))
                    elif frame.opcode is Opcode.PONG:
                        got.append({"type": "<pong>", "data": bytes(frame.data)})
                    elif frame.opcode is Opcode.CLOSE:
                        got.append({"type": "<close>", "code": self.proto.close_rcvd.code})
                        return got
                if not until(got):
                    data = await self.reader.read(65536)
                    assert data, "server closed the connection"
                    self.proto.receive_data(data)
        return got

    def close(self) -> None:
        self.writer.close()


def _turns_offline(pcm: bytes, rate: int = 16000, channels: int = 1) -> list[float]:
    ingest = AudioIngest(
        InputAudioConfig(sample_rate=rate, channels=channels), TurnDetectionConfig()
    )
    events = ingest.push(pcm).events
    return [e.end_ms for e in events if isinstance(e, vt.TurnEnd)]


def _done(n: int):
    return lambda got: sum(e["type"] == "response.done" for e in got) >= n


async def _turn_ends(server: Any, data: bytes, turns: int = 2) -> list[float]:
    """Stream ``data`` as 20 ms messages; the audio_end_ms of every turn.ended."""
    async with connect(server, TOKEN) as c:
        await c.recv()
        for pos in range(0, len(data), 640):
            await c.send(data[pos : pos + 640])
        events = [await c.recv(timeout=20)]
        while sum(e["type"] == "response.done" for e in events) < turns:
            events.append(await c.recv(timeout=20))
    return [e["audio_end_ms"] for e in events if e["type"] == "turn.ended"]


@pytest.fixture
def direct_count(monkeypatch) -> list[int]:
    """How many audio messages the direct path took (the server runs in this process)."""
    count = [0]
    original = DuplexSession.send_audio_nowait

    def counting(self, pcm):
        taken = original(self, pcm)
        count[0] += taken
        return taken

    monkeypatch.setattr(DuplexSession, "send_audio_nowait", counting)
    return count


async def test_audio_takes_the_direct_path_with_the_same_turns(live_server, audio, direct_count):
    data = audio.astype("<i2").tobytes()
    expected = _turns_offline(data)
    assert len(expected) == 2
    assert await _turn_ends(live_server, data) == expected
    # Messages queued behind a turn's events or a text message take the ASGI path, so
    # how many go direct depends on timing; that some do is what this test shows.
    assert direct_count[0] > 0


async def test_stock_uvicorn_protocol_gives_the_same_turns(server_factory, audio, direct_count):
    """Without our protocol class (any ASGI server) every message takes the ASGI path."""
    server = server_factory(uvicorn_kwargs={"ws": "websockets-sansio"})
    data = audio.astype("<i2").tobytes()
    assert await _turn_ends(server, data) == _turns_offline(data)
    assert direct_count[0] == 0


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_stream_cut_anywhere_with_pings_gives_the_same_turns(live_server, audio, seed):
    rng = random.Random(seed)
    data = audio.astype("<i2").tobytes()
    client = await RawClient.open(live_server)
    try:
        await client.events(lambda got: any(e["type"] == "session.created" for e in got))
        stream, pings = [], 0
        for i, pos in enumerate(range(0, len(data), 640)):
            stream.append(client.frame(Opcode.BINARY, data[pos : pos + 640]))
            if i % 97 == 0:
                stream.append(client.frame(Opcode.PING, b"p%d" % i))
                pings += 1
        wire = b"".join(stream)
        pos = 0
        while pos < len(wire):  # TCP writes that split frames and headers anywhere
            size = rng.choice([1, 2, 3, 7, 100, 641, 1500, 5000])
            await client.write([wire[pos : pos + size]])
            pos += size
            if rng.random() < 0.2:
                await asyncio.sleep(0.001)  # let the server read a partial frame
        got = await client.events(_done(2))
    finally:
        client.close()
    assert [e["audio_end_ms"] for e in got if e["type"] == "turn.ended"] == _turns_offline(data)
    assert sum(e["type"] == "<pong>" for e in got) == pings
    assert not [e for e in got if e["type"] == "error"]


async def test_text_sent_with_audio_in_one_write_keeps_its_order(live_server, audio):
    """session.update and the audio that needs it arrive in one TCP read: the audio must
    not overtake the update (it would be taken for 16 kHz mono)."""
    stereo48 = np.repeat(np.repeat(audio, 3), 2)  # crude 48 kHz stereo of the same speech
    data = stereo48.astype("<i2").tobytes()
    client = await RawClient.open(live_server)
    try:
        await client.events(lambda got: any(e["type"] == "session.created" for e in got))
        update = {
            "type": "session.update",
            "config": {"input_audio": {"sample_rate": 48000, "channels": 2}},
        }
        frames = [client.frame(Opcode.TEXT, json.dumps(update).encode())]
        frames += [
            client.frame(Opcode.BINARY, data[p : p + 3840]) for p in range(0, len(data), 3840)
        ]
        await client.write(frames)
        got = await client.events(_done(2))
    finally:
        client.close()
    assert [e["type"] for e in got[:1]] == ["session.updated"]
    assert [e["audio_end_ms"] for e in got if e["type"] == "turn.ended"] == _turns_offline(
        data, 48000, 2
    )


async def test_oversize_audio_is_refused_and_the_session_goes_on(server_factory, audio):
    server = server_factory(max_message_bytes=4096)
    data = audio.astype("<i2").tobytes()
    client = await RawClient.open(server)
    try:
        await client.events(lambda got: any(e["type"] == "session.created" for e in got))
        frames = [client.frame(Opcode.BINARY, bytes(6000))]  # over our limit, under 2x
        frames += [client.frame(Opcode.BINARY, data[p : p + 640]) for p in range(0, len(data), 640)]
        await client.write(frames)
        got = await client.events(_done(2))
        errors = [e for e in got if e["type"] == "error"]
        assert [e["code"] for e in errors] == [413]
        assert len([e for e in got if e["type"] == "turn.ended"]) == 2
        # Over the socket's own limit (2x ours): the connection is closed with 1009.
        await client.write([client.frame(Opcode.BINARY, bytes(9000))])
        closed = await client.events(lambda got: False)
    finally:
        client.close()
    assert closed[-1] == {"type": "<close>", "code": 1009}


@pytest.mark.parametrize("n", [0, 1, 125, 126, 65535, 65536, 200_000])
def test_text_frame_matches_websockets(n):
    payload = bytes(range(97, 123)) * (n // 26) + b"a" * (n % 26)
    assert text_frame(payload) == Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])


@pytest.mark.parametrize("ws", [None, "websockets-sansio"])
async def test_internal_error_in_audio_ends_that_session_with_500(
    server_factory, audio, monkeypatch, ws
):
    """A bug while handling audio (direct path or not) is a fatal 500 for that session;
    the server goes on serving others."""
    server = server_factory(uvicorn_kwargs={"ws": ws} if ws else None)
    calls = [0]
    original = AudioIngest._turn_events  # behind both `push` and `events`

    def failing(self, pcm, detect):
        calls[0] += 1
        if calls[0] == 20:
            raise RuntimeError("boom")
        return original(self, pcm, detect)

    monkeypatch.setattr(AudioIngest, "_turn_events", failing)
    data = audio.astype("<i2").tobytes()
    async with connect(server, TOKEN) as c:
        await c.recv()
        for pos in range(0, 40 * 640, 640):
            await c.send(data[pos : pos + 640])
        error = await c.until("error")
    assert error[-1]["code"] == 500 and error[-1]["fatal"]
    monkeypatch.setattr(AudioIngest, "_turn_events", original)
    assert await _turn_ends(server, data) == _turns_offline(data)


async def test_large_message_over_many_reads(live_server):
    """A 60 KB message trickling in over many TCP reads is put together once, intact."""
    text = "".join(random.Random(5).choice("abcdefgh ") for _ in range(60_000))
    client = await RawClient.open(live_server)
    try:
        await client.events(lambda got: any(e["type"] == "session.created" for e in got))
        message = {"type": "input.text", "text": text, "final": True}
        wire = client.frame(Opcode.TEXT, json.dumps(message).encode())
        for pos in range(0, len(wire), 1000):
            await client.write([wire[pos : pos + 1000]])
            await asyncio.sleep(0.0005)  # let the server read each piece on its own
        got = await client.events(_done(1))
    finally:
        client.close()
    reply = "".join(e.get("delta", "") for e in got if e["type"] == "chunk")
    assert text in reply
    assert not [e for e in got if e["type"] == "error"]
