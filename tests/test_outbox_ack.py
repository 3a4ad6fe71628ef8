"""Delivery pings: the pong to a ping written after some messages lets the outbox go of
them, for clients that never report ``playback`` (server/ws_protocol.py, server/outbox.py).
"""

from __future__ import annotations

import asyncio
import itertools
import json

from duplex.protocol import RESUME_GAP
from server import ws_protocol
from server.cli import uvicorn_options
from tests.conftest import make_settings
from tests.test_realtime_door import append as realtime_append
from tests.test_realtime_door import connect as realtime_connect
from tests.test_realtime_door import manual_turns
from tests.test_realtime_door import pcm24 as realtime_pcm24
from tests.test_realtime_door import until as realtime_until
from tests.test_resume import Reader, drop, open_ws, tone
from tests.test_ws_protocol import internals_missing

ACK_S = 0.05  # short, so the tests are quick; every wait below is a bound, not a figure


def outbox_of(server, session_id: str):
    return server.app.state.duplex.registry.get("tenant-a", session_id)._outbox


async def wait_for(check, timeout: float = 10.0) -> None:
    """Poll ``check`` (state of the server's thread) until true; ``timeout`` bounds it."""
    async with asyncio.timeout(timeout):
        for _ in itertools.count():
            if check():
                return
            await asyncio.sleep(0.01)


async def manual_session(server) -> tuple[Reader, str]:
    r = Reader(await open_ws(server))
    session_id = (await r.recv())["session"]["id"]
    await r.ws.send(
        json.dumps({"type": "session.update", "config": {"turn_detection": {"type": "manual"}}})
    )
    await r.until(lambda e: e["type"] == "session.updated")
    return r, session_id


async def ask(r: Reader, seconds: float = 1.0) -> None:
    """Send ``seconds`` of audio and commit: the echo answers with it."""
    audio = tone(seconds)
    for pos in range(0, len(audio), 640 * 50):
        await r.ws.send(audio[pos : pos + 640 * 50])
    await r.ws.send(json.dumps({"type": "input.commit"}))


def holds_done(outbox) -> bool:
    return any('"response.done"' in e.text for e in list(outbox._entries))


async def test_a_client_that_reads_lets_the_outbox_go_without_playback_reports(server_factory):
    server = server_factory(outbox_ack_interval_s=ACK_S)
    r, session_id = await manual_session(server)
    await ask(r)
    done = await r.until(lambda e: e["type"] == "response.done")
    outbox = outbox_of(server, session_id)
    # The pong to a ping written after response.done acknowledges everything up to it.
    await wait_for(lambda: len(outbox) == 0)
    assert outbox.size == 0
    session = server.app.state.duplex.registry.get("tenant-a", session_id)
    assert session.last_seq == done["seq"]
    await r.ws.close()


async def test_a_client_that_does_not_read_keeps_everything_until_it_reads(server_factory):
    server = server_factory(outbox_ack_interval_s=ACK_S)
    r, session_id = await manual_session(server)
    before = r.got[-1]["seq"]
    outbox = outbox_of(server, session_id)
    await wait_for(lambda: len(outbox) == 0)  # what came so far was read: acknowledged
    r.ws.transport.pause_reading()  # nothing more is read, pings included: no pong
    await ask(r, 0.5)
    await wait_for(lambda: holds_done(outbox))
    await asyncio.sleep(20 * ACK_S)  # pings went unanswered meanwhile
    assert outbox.first_seq == before + 1  # the whole answer is kept
    session = server.app.state.duplex.registry.get("tenant-a", session_id)
    assert outbox._entries[-1].seq == session.last_seq
    r.ws.transport.resume_reading()  # it reads again: the pongs come, the answer goes
    await wait_for(lambda: len(outbox) == 0)
    await r.until(lambda e: e["type"] == "response.done")
    await r.ws.close()


async def test_resume_replays_what_was_not_acknowledged(server_factory):
    server = server_factory(outbox_ack_interval_s=ACK_S)
    r, session_id = await manual_session(server)
    start = r.got[-1]["seq"]
    await ask(r, 0.5)
    first_done = await r.until(lambda e: e["type"] == "response.done")
    outbox = outbox_of(server, session_id)
    await wait_for(lambda: len(outbox) == 0)  # the first answer: acknowledged
    r.ws.transport.pause_reading()
    await ask(r, 0.5)
    await wait_for(lambda: holds_done(outbox))  # the second: written, never read
    drop(r.ws)
    # From where the client's messages stop: the second answer, all of it, no 410.
    second = Reader(await open_ws(server, session_id=session_id, last_seq=first_done["seq"]))
    resumed = await second.recv()
    assert resumed["type"] == "session.resumed"
    assert resumed["first_seq"] == first_done["seq"] + 1
    done = await second.until(lambda e: e["type"] == "response.done")
    replayed = second.got[1:]
    assert [e["seq"] for e in replayed] == list(range(first_done["seq"] + 1, done["seq"] + 1))
    assert all(e["type"] != "error" for e in replayed)
    drop(second.ws)
    # From before the first answer: what the pong acknowledged is gone, as for playback.
    third = Reader(await open_ws(server, session_id=session_id, last_seq=start))
    resumed = await third.recv()
    assert resumed["first_seq"] > first_done["seq"]
    gap = await third.recv()
    assert gap["type"] == "error" and gap["code"] == RESUME_GAP
    await third.ws.close()


async def test_uvicorn_keepalive_still_works_beside_the_delivery_pings(server_factory):
    server = server_factory(
        outbox_ack_interval_s=ACK_S,
        uvicorn_kwargs={"ws_ping_interval": ACK_S, "ws_ping_timeout": 1.0},
    )
    r, session_id = await manual_session(server)
    for _ in range(3):  # keepalive pings and delivery pings interleave for a while
        await ask(r, 0.5)
        await r.until(lambda e: e["type"] == "response.done")
    await asyncio.sleep(60 * ACK_S)  # longer than the keepalive timeout
    await ask(r, 0.5)  # still open: every keepalive ping got its pong
    await r.until(lambda e: e["type"] == "response.done")
    outbox = outbox_of(server, session_id)
    await wait_for(lambda: len(outbox) == 0)
    await r.ws.close()


async def test_the_stock_fallback_pings_too(server_factory):
    """The direct path's internals missing (`websocket_protocol` falls back to uvicorn's
    stock protocol): the delivery pings still let the outbox go, through the ASGI send."""
    with internals_missing():
        assert uvicorn_options(make_settings())["ws"] is ws_protocol.DeliveryPingProtocol
        server = server_factory(outbox_ack_interval_s=ACK_S)
    r, session_id = await manual_session(server)
    await ask(r)
    done = await r.until(lambda e: e["type"] == "response.done")
    session = server.app.state.duplex.registry.get("tenant-a", session_id)
    assert session.last_seq == done["seq"]
    outbox = outbox_of(server, session_id)
    await wait_for(lambda: len(outbox) == 0)
    assert outbox.size == 0
    # A client that stops reading keeps what it did not read (no pong comes).
    r.ws.transport.pause_reading()
    await ask(r, 0.5)
    await wait_for(lambda: holds_done(outbox))
    await asyncio.sleep(20 * ACK_S)
    assert outbox.first_seq == done["seq"] + 1
    r.ws.transport.resume_reading()
    await wait_for(lambda: len(outbox) == 0)
    await r.ws.close()


async def test_the_realtime_door_pings_too(server_factory):
    """/v1/realtime (no ``playback`` report in that protocol): the pong to a delivery
    ping lets the session's outbox go of what the client read."""
    server = server_factory(outbox_ack_interval_s=ACK_S)
    async with realtime_connect(server) as conn:
        await manual_turns(conn)
        await realtime_append(conn, realtime_pcm24("Thursday works better for me."))
        await conn.input_audio_buffer.commit()
        await realtime_until(conn, "conversation.item.done", stop_on_error=True)
        await conn.response.create()
        events = await realtime_until(conn, "response.done", stop_on_error=True)
        assert any(e.type == "response.output_audio.delta" for e in events)
        outbox = outbox_of(server, conn.session_id)
        await wait_for(lambda: len(outbox) == 0)
        assert outbox.size == 0
