"""The server's own WebSocket framing (server/ws_protocol.py) over a raw TCP socket.

The byte stream is cut at arbitrary points, control and text frames are mixed in,
and the results must equal what the stock path gives: same turns, same order,
pings answered, limits enforced. Every test using ``live_server`` or ``server_factory``
runs twice: on the direct path, and on the stock protocol that `websocket_protocol()`
falls back to when an internal it needs is missing (one is hidden to force it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import websockets
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.uri import parse_uri

from duplex.protocol import InputAudioConfig, TurnDetectionConfig
from server import ws_protocol
from server.cli import uvicorn_options
from server.http_api import HEALTH_MAX_MESSAGE_BYTES
from server.modes.audio_ingest import AudioIngest
from server.session import DuplexSession
from server.ws_protocol import STOCK_PROTOCOL, DuplexWebSocketProtocol, text_frame
from tests.conftest import TOKEN, make_settings, start_server, stop_server
from tests.speech import make_conversation
from tests.wsutil import connect
from vad import turns as vt

SILENCE_1S = np.zeros(16000, dtype=np.int16)
NO_KEEPALIVE = {"ws_ping_interval": None}  # only the frame at hand can close the socket


@contextlib.contextmanager
def internals_missing(*names: str) -> Iterator[None]:
    """As if uvicorn's protocol had no ``frames`` (or ``names``) any more: the startup
    check must see it."""
    stock = ws_protocol._Stock
    names = names or ("frames",)

    class WithoutFrames(stock):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            for name in names:
                delattr(self, name)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ws_protocol, "_Stock", WithoutFrames)
        yield


@pytest.fixture(scope="module", params=["direct", "fallback"])
def ws_path(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def live_server(ws_path) -> Iterator[Any]:
    with internals_missing() if ws_path == "fallback" else contextlib.nullcontext():
        running, server, thread = start_server(make_settings())
    yield running
    stop_server(server, thread)


@pytest.fixture
def server_factory(ws_path) -> Iterator[Any]:
    """conftest's, on the direct path or on the fallback (``ws_path``)."""
    started: list[Any] = []

    def start(**overrides: Any) -> Any:
        uvicorn_kwargs = overrides.pop("uvicorn_kwargs", None)
        with internals_missing() if ws_path == "fallback" else contextlib.nullcontext():
            running, server, thread = start_server(make_settings(**overrides), uvicorn_kwargs)
        started.append((server, thread))
        return running

    yield start
    for server, thread in started:
        stop_server(server, thread)


@pytest.fixture(scope="module")
def both() -> Iterator[dict[str, Any]]:
    """A direct-path server and a stock-protocol one, no keepalive: same bytes to each."""
    started = {
        "direct": start_server(make_settings(), NO_KEEPALIVE),
        "stock": start_server(make_settings(), NO_KEEPALIVE | {"ws": STOCK_PROTOCOL}),
    }
    yield {name: running for name, (running, _, _) in started.items()}
    for _, server, thread in started.values():
        stop_server(server, thread)


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
    async def open(cls, server: Any, path: str = "/v1/duplex") -> RawClient:
        url = server.base.replace("http", "ws", 1) + path
        uri = parse_uri(url + f"?token={TOKEN}")
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


async def test_audio_takes_the_direct_path_with_the_same_turns(
    live_server, audio, direct_count, ws_path
):
    data = audio.astype("<i2").tobytes()
    expected = _turns_offline(data)
    assert len(expected) == 2
    assert await _turn_ends(live_server, data) == expected
    # Messages queued behind a turn's events or a text message take the ASGI path, so
    # how many go direct depends on timing; that some do is what this test shows.
    if ws_path == "direct":
        assert direct_count[0] > 0
    else:
        assert direct_count[0] == 0


def test_the_startup_check_passes_on_the_installed_versions(caplog):
    caplog.set_level(logging.INFO, logger=ws_protocol.__name__)
    assert ws_protocol.direct_path_missing() is None
    assert uvicorn_options(make_settings())["ws"] is DuplexWebSocketProtocol
    assert not [r for r in caplog.records if r.name == ws_protocol.__name__]


def test_missing_internals_fall_back_to_stock_with_one_log_line(caplog):
    """The direct path's internals missing: uvicorn's stock protocol with the delivery
    pings only (they need none of what is missing); also theirs missing: plain stock."""
    caplog.set_level(logging.INFO, logger=ws_protocol.__name__)
    with internals_missing():
        assert ws_protocol.direct_path_missing() == "missing frames"
        assert ws_protocol.delivery_pings_missing() is None
        assert uvicorn_options(make_settings())["ws"] is ws_protocol.DeliveryPingProtocol
    with internals_missing("frames", "close_sent"):
        assert ws_protocol.direct_path_missing() == "missing frames, close_sent"
        assert uvicorn_options(make_settings())["ws"] == STOCK_PROTOCOL
    assert [r.getMessage() for r in caplog.records if r.name == ws_protocol.__name__] == [
        "direct WebSocket path off (missing frames); using uvicorn's 'websockets-sansio' "
        "protocol with delivery pings",
        "direct WebSocket path off (missing frames, close_sent); using uvicorn's "
        "'websockets-sansio' protocol, no delivery pings (missing close_sent)",
    ]


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
    original = vt.TurnDetector.push_pcm  # behind `push` and `events`, fast path or not

    def failing(self, pcm):
        calls[0] += 1
        if calls[0] == 20:
            raise RuntimeError("boom")
        return original(self, pcm)

    monkeypatch.setattr(vt.TurnDetector, "push_pcm", failing)
    data = audio.astype("<i2").tobytes()
    async with connect(server, TOKEN) as c:
        await c.recv()
        for pos in range(0, 40 * 640, 640):
            await c.send(data[pos : pos + 640])
        error = await c.until("error")
    assert error[-1]["code"] == 500 and error[-1]["fatal"]
    monkeypatch.setattr(vt.TurnDetector, "push_pcm", original)
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


MASK = b"\x01\x02\x03\x04"
LIMIT = 2 * 256 * 1024  # the test servers' ws_max_size (twice max_message_bytes)


def _header(first: int, length: int, masked: bool = True) -> bytes:
    """A frame header alone: the payload it declares is never sent."""
    mask_bit = 0x80 if masked else 0
    if length < 126:
        head = bytes((first, mask_bit | length))
    elif length < 65536:
        head = bytes((first, mask_bit | 126)) + length.to_bytes(2)
    else:
        head = bytes((first, mask_bit | 127)) + length.to_bytes(8)
    return head + (MASK if masked else b"")


def _continuation_overflow(client: RawClient) -> bytes:
    first = Frame(Opcode.BINARY, bytes(300_000), fin=False)
    client.proto.send_frame(first)
    return b"".join(client.proto.data_to_send()) + _header(0x80, 300_000)


#: Violations visible in a frame header, and the close code stock websockets answers.
HEADER_VIOLATIONS = {
    "unmasked binary, 65535 declared": (lambda c: bytes.fromhex("827EFFFF"), 1002),
    "8 MiB over the limit declared": (lambda c: _header(0x82, LIMIT + 8 * 2**20), 1009),
    "8 MiB over the limit declared, text": (lambda c: _header(0x81, LIMIT + 8 * 2**20), 1009),
    "reserved opcode 3": (lambda c: _header(0x83, 16), 1002),
    "reserved control opcode 0xB": (lambda c: _header(0x8B, 4), 1002),
    "continuation over the limit": (_continuation_overflow, 1009),
    "unmasked text, 1000 declared": (lambda c: _header(0x81, 1000, masked=False), 1002),
}


@pytest.mark.parametrize("case", HEADER_VIOLATIONS)
async def test_a_bad_frame_header_closes_at_once_as_stock_does(both, case):
    """Only the header is sent: without a payload to wait for, and no keepalive, the
    close can only come from the header (stock websockets refuses it there)."""
    make, code = HEADER_VIOLATIONS[case]
    for name, server in both.items():
        client = await RawClient.open(server)
        try:
            await client.events(lambda got: any(e["type"] == "session.created" for e in got))
            await client.write([make(client)])
            got = await client.events(lambda got: False, timeout=10)
        finally:
            client.close()
        assert got[-1] == {"type": "<close>", "code": code}, name


async def test_health_socket_refuses_a_big_frame_at_its_header(both):
    """Under the global limit but over the health socket's: refused before its payload."""
    client = await RawClient.open(both["direct"], "/v1/ws/health")
    try:
        await client.events(lambda got: any(e["type"] == "hello" for e in got))
        await client.write([_header(0x81, HEALTH_MAX_MESSAGE_BYTES + 1)])
        got = await client.events(lambda got: False, timeout=10)
    finally:
        client.close()
    assert got[-1] == {"type": "<close>", "code": 1009}


@pytest.mark.parametrize("name", ["direct", "stock"])
async def test_health_socket_answers_binary_and_big_text_as_documented(both, name):
    url = both[name].base.replace("http", "ws", 1) + "/v1/ws/health"
    async with websockets.connect(url) as ws:
        assert json.loads(await ws.recv())["type"] == "hello"
        await ws.send(b"\x00\x01")
        error = json.loads(await ws.recv())
        assert error["type"] == "error" and error["code"] == 400
        await ws.send("still here")
        assert json.loads(await ws.recv())["data"] == "still here"
        await ws.send("x" * HEALTH_MAX_MESSAGE_BYTES)
        assert json.loads(await ws.recv())["type"] == "echo"
        await ws.send("x" * (HEALTH_MAX_MESSAGE_BYTES + 1))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd.code == 1009


@pytest.fixture
def server_logs() -> Iterator[list[logging.LogRecord]]:
    """Every record of the loggers a WebSocket error can reach (uvicorn's do not propagate)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign]
    loggers = [logging.getLogger(n) for n in ("uvicorn.error", "uvicorn", "server")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    yield records
    for lg, level in zip(loggers, levels, strict=True):
        lg.removeHandler(handler)
        lg.setLevel(level)


async def test_invalid_utf8_text_closes_1007_with_one_log_line(both, server_logs):
    client = await RawClient.open(both["direct"])
    try:
        await client.events(lambda got: any(e["type"] == "session.created" for e in got))
        before = len(server_logs)
        await client.write([client.frame(Opcode.TEXT, b'{"type": "\xff\xfe"}')])
        got = await client.events(lambda got: False, timeout=10)
    finally:
        client.close()
    assert got[-1] == {"type": "<close>", "code": 1007}
    utf8 = [r for r in server_logs[before:] if "UTF-8" in r.getMessage()]
    assert len(utf8) == 1 and utf8[0].exc_info is None
    assert not [r for r in server_logs[before:] if r.exc_info]
