"""Abuse limits against a real server on loopback: header timeout, connection caps,
input rates, a client that stops reading, credentials in logs."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import time

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.conftest import TOKEN

HALF_HEADERS = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


def _open(base: str, payload: bytes = b"", rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", _port(base)))
    if payload:
        sock.sendall(payload)
    return sock


def _read_until_closed(sock: socket.socket, bound_s: float) -> bytes:
    """Everything the server sends until it closes; fails if it is still open after
    ``bound_s`` (a safety bound, not a measurement)."""
    sock.settimeout(bound_s)
    data = b""
    deadline = time.monotonic() + bound_s
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            pytest.fail(f"connection still open after {bound_s} s; got {data[:200]!r}")
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


# ---- connections ------------------------------------------------------------------------


def test_half_sent_headers_are_closed_after_the_header_timeout(server_factory):
    running = server_factory(header_timeout_s=1.0)
    socks = [_open(running.base, HALF_HEADERS) for _ in range(50)]
    idle = _open(running.base)  # connected, sends nothing at all
    try:
        for sock in [*socks, idle]:
            answer = _read_until_closed(sock, bound_s=15)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
        # Complete requests are unaffected, also on a connection kept alive.
        with _open(running.base) as sock:
            for _ in range(2):
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                sock.settimeout(10)
                answer = b""
                while not answer.endswith(b'{"status":"ok"}'):
                    answer += sock.recv(65536)
                assert answer.startswith(b"HTTP/1.1 200")
    finally:
        for sock in [*socks, idle]:
            sock.close()


def test_connections_over_the_per_client_cap_are_refused_with_503(server_factory):
    running = server_factory(max_connections_per_client=5, header_timeout_s=30)
    held = [_open(running.base, HALF_HEADERS) for _ in range(5)]
    try:
        with _open(running.base, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") as sock:
            answer = _read_until_closed(sock, bound_s=10)
        assert answer.startswith(b"HTTP/1.1 503"), answer[:100]
        assert b"per client address (5)" in answer
        with pytest.raises(InvalidStatus) as refused:
            connect(f"{running.ws_url}?token={TOKEN}", open_timeout=10)
        assert refused.value.response.status_code == 503
    finally:
        for sock in held:
            sock.close()
    # Slots come back when connections close, WebSocket ones included.
    _wait_for_count(running, 0)
    with contextlib.ExitStack() as stack:
        for _ in range(5):
            ws = stack.enter_context(connect(f"{running.ws_url}?token={TOKEN}", open_timeout=10))
            assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
        with pytest.raises(InvalidStatus):
            connect(f"{running.ws_url}?token={TOKEN}", open_timeout=10)
    _wait_for_count(running, 0)
    with connect(f"{running.ws_url}?token={TOKEN}", open_timeout=10) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "session.created"


def _wait_for_count(running, expected: int) -> None:
    """Until the server counts ``expected`` open connections (closes are asynchronous)."""
    limits = running.server.config.http_protocol_class.limits
    deadline = time.monotonic() + 10
    while limits.total != expected:
        assert time.monotonic() < deadline, f"{limits.total} connections counted"
        time.sleep(0.05)
    assert sum(limits.per_client.values()) == expected


def test_connections_over_the_server_cap_are_refused_with_503(server_factory):
    running = server_factory(max_connections=3, max_connections_per_client=0)
    held = [_open(running.base, HALF_HEADERS) for _ in range(3)]
    try:
        with _open(running.base, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n") as sock:
            answer = _read_until_closed(sock, bound_s=10)
        assert answer.startswith(b"HTTP/1.1 503"), answer[:100]
        assert b"server connection limit (3)" in answer
    finally:
        for sock in held:
            sock.close()


# ---- input rates ------------------------------------------------------------------------


def test_a_ping_flood_is_paced_to_the_message_rate_with_a_429_notice(server_factory):
    rate, burst, count = 50.0, 10, 150
    running = server_factory(message_rate_limit=rate, message_burst=burst)
    with connect(f"{running.ws_url}?token={TOKEN}", open_timeout=10) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
        start = time.monotonic()
        for i in range(count):
            ws.send(json.dumps({"type": "ping", "id": f"p{i}"}))
        pongs: list[tuple[float, str]] = []
        notices = []
        while len(pongs) < count:
            message = json.loads(ws.recv(timeout=30))
            if message["type"] == "pong":
                pongs.append((time.monotonic() - start, message["id"]))
            else:
                assert message["type"] == "error", message
                notices.append(message)
    assert [pong_id for _, pong_id in pongs] == [f"p{i}" for i in range(count)], "none dropped"
    assert notices and all(n["code"] == 429 and not n["fatal"] for n in notices), notices
    # The server cannot have answered the k-th ping before the bucket allowed it (a
    # lower bound: a slow machine only answers later).
    for k, (arrived, _) in enumerate(pongs, start=1):
        assert arrived >= (k - burst - 1) / rate, (k, arrived)


def test_audio_faster_than_the_rate_is_read_no_faster_than_the_rate(server_factory):
    audio_rate, burst_s = 4.0, 1.0
    running = server_factory(audio_rate_limit=audio_rate, audio_burst_s=burst_s)
    chunk = bytes(640)  # 20 ms of 16 kHz PCM16 silence
    with connect(f"{running.ws_url}?token={TOKEN}", open_timeout=10) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "session.created"
        start = time.monotonic()
        for _ in range(125):  # 2.5 s of audio on the direct binary path
            ws.send(chunk)
        b64 = base64.b64encode(chunk).decode()
        for _ in range(125):  # and 2.5 s as JSON
            ws.send(json.dumps({"type": "input.audio", "audio": b64}))
        ws.send(json.dumps({"type": "ping", "id": "after-audio"}))
        while True:
            message = json.loads(ws.recv(timeout=30))
            assert message["type"] != "error", message
            if message["type"] == "pong":
                break
        elapsed = time.monotonic() - start
    # Input is handled in order, so the pong comes after all 5 s of audio were taken:
    # no sooner than the budget allows (a lower bound).
    assert elapsed >= (5.0 - burst_s) / audio_rate - 0.02, elapsed


# ---- a client that stops reading --------------------------------------------------------


def _raw_ws(running, rcvbuf: int):
    """A WebSocket client on a plain socket with a small receive buffer."""
    from websockets.client import ClientProtocol
    from websockets.uri import parse_uri

    proto = ClientProtocol(parse_uri(f"{running.ws_url}?token={TOKEN}"), max_size=None)
    sock = _open(running.base, rcvbuf=rcvbuf)
    proto.send_request(proto.connect())
    sock.sendall(b"".join(proto.data_to_send()))
    sock.settimeout(10)
    messages: list[dict] = []
    while not messages:
        proto.receive_data(sock.recv(4096))
        for event in proto.events_received():
            if hasattr(event, "opcode"):
                messages.append(json.loads(event.data))
    assert proto.handshake_exc is None
    return sock, proto, messages[0]


def test_a_client_that_stops_reading_gets_a_fatal_429_and_is_dropped(server_factory):
    from websockets.frames import Frame, Opcode

    # A fixed 16 KiB kernel send buffer: the stall comes after ~100 KB instead of the
    # few MB the kernel's autotuning allows on loopback (same path, less waiting).
    running = server_factory(output_stall_timeout_s=1.0, message_rate_limit=0, sndbuf=16384)
    sock, proto, created = _raw_ws(running, rcvbuf=4096)
    session_id = created["session"]["id"]
    registry = running.app.state.duplex.registry
    session = registry.get("tenant-a", session_id)
    assert session is not None
    # Each turn's echo answer is ~0.5 MB of small messages; this client reads none.
    text = "word " * 12_000
    sock.settimeout(5)
    try:
        for i in range(6):
            message = {"type": "input.text", "text": text, "final": True, "id": f"t{i}"}
            proto.send_frame(Frame(Opcode.TEXT, json.dumps(message).encode()))
            sock.sendall(b"".join(proto.data_to_send()))
    except TimeoutError:
        pass  # the server stopped reading us too: fine, the output is stalled already
    deadline = time.monotonic() + 20  # a safety bound; the keepalive would act at 40 s
    while registry.get("tenant-a", session_id) is not None:
        assert time.monotonic() < deadline, "the stalled connection is still open"
        time.sleep(0.05)
    assert session.error is not None
    assert (session.error.code, session.error.fatal) == (429, True)
    _read_until_closed(sock, bound_s=10)  # the server dropped the connection
    sock.close()
    _wait_for_count(running, 0)


# ---- credentials in logs ----------------------------------------------------------------


def test_tokens_never_appear_in_logs(server_factory):
    import io
    import logging

    import httpx

    running = server_factory()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    names = ["", "uvicorn", "uvicorn.access", "uvicorn.error", "server", "duplex"]
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    wrong = "wrong-secret-token-123"
    try:
        httpx.get(f"{running.base}/v1/sessions?token={TOKEN}", timeout=10)
        httpx.get(f"{running.base}/healthz?token={wrong}&x=1", timeout=10)
        with connect(f"{running.ws_url}?token={TOKEN}", open_timeout=10) as ws:
            ws.recv(timeout=10)
        with connect(running.ws_url, additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
            ws.recv(timeout=10)
        with connect(f"{running.ws_url}?token={wrong}", open_timeout=10) as ws:
            ws.recv(timeout=10)
        logging.getLogger("server.test").warning(
            "headers %s, subprotocols %s",
            {"authorization": f"Bearer {TOKEN}"},
            [f"openai-insecure-api-key.{TOKEN}", "realtime"],
        )
        time.sleep(0.5)  # the server thread's last log lines
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)
    logged = stream.getvalue()
    assert TOKEN not in logged, logged
    assert wrong not in logged, logged
    assert "token=***" in logged and "uvicorn.access" in logged, logged  # lines were logged


def test_a_foreign_session_id_is_unknown_and_touches_nothing_with_redis(server_factory, redis_url):
    import httpx
    import redis

    from tests.conftest import OTHER_TOKEN

    running = server_factory(store_url=redis_url, store_ttl_s=3600)
    owner = {"Authorization": f"Bearer {TOKEN}"}
    foreign = {"Authorization": f"Bearer {OTHER_TOKEN}"}
    created = httpx.post(f"{running.base}/v1/sessions", headers=owner, json={}, timeout=10)
    session_id = created.json()["id"]
    db = redis.Redis.from_url(redis_url)
    key = f"duplex:session:{session_id}"
    db.expire(key, 100)
    try:
        for path in ("", "/messages"):
            theirs = httpx.get(f"{running.base}/v1/sessions/{session_id}{path}", headers=foreign)
            unknown = httpx.get(f"{running.base}/v1/sessions/sess_nope{path}", headers=foreign)
            assert theirs.status_code == unknown.status_code == 404
            assert theirs.json() == {"detail": f"unknown session {session_id!r}"}
        with connect(f"{running.ws_url}?token={OTHER_TOKEN}&session_id={session_id}") as ws:
            refused = json.loads(ws.recv(timeout=10))
        assert (refused["code"], refused["fatal"]) == (404, True)
        assert db.ttl(key) <= 100, "a foreign lookup extended the owner's TTL"
        mine = httpx.get(f"{running.base}/v1/sessions/{session_id}", headers=owner)
        assert mine.status_code == 200
        assert db.ttl(key) > 100, "the owner's own lookup slides the TTL"
    finally:
        db.close()
