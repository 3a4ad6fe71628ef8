"""A client that closes with 1000 is done with its session: it ends at once, its memory and
its outbox (memory and the store's copy) go. Any other way of leaving detaches the session
for the resume grace period, as before (docs/protocol.md "Resuming a session")."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import websockets

from duplex.sdk import Client
from tests.conftest import TOKEN, store_url
from tests.test_resume import Reader, drop, open_ws, start_answer

TENANT = "tenant-a"
LONG_GRACE = 600.0  # only the close rule, not the grace period, can end a session in a test
PROTOCOLS = [None, "websockets-sansio"]  # the direct path, and uvicorn's stock protocol


def _server(server_factory, ws: str | None, **settings):
    return server_factory(
        resume_grace_s=LONG_GRACE,
        uvicorn_kwargs={"ws": ws} if ws else None,
        **settings,
    )


async def on_server(server, coro):
    """Run ``coro`` on the server's event loop (its own thread) and wait for it."""
    loop = server.server.servers[0].get_loop()
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))


async def stored_outbox(server, session_id: str) -> list:
    app = server.app.state.duplex
    store, limits = app.services.store, app.services.limits
    return await on_server(server, store.load_outbox(session_id, max_age_s=limits.outbox_max_age_s))


async def live_sessions(server) -> int:
    async with httpx.AsyncClient(base_url=server.base) as http:
        return (await http.get("/readyz")).json()["live_sessions"]


async def until_gone(server, session_id: str, timeout: float = 20) -> None:
    registry = server.app.state.duplex.registry
    async with asyncio.timeout(timeout):  # a safety bound: the grace period is 600 s
        while registry.get(TENANT, session_id) is not None:  # noqa: ASYNC110 - polled state
            await asyncio.sleep(0.02)


async def until_detached(server, session_id: str, timeout: float = 20):
    """The live session once the server has seen its connection go (and kept it)."""
    registry = server.app.state.duplex.registry
    async with asyncio.timeout(timeout):
        while (session := registry.get(TENANT, session_id)) is not None and (  # noqa: ASYNC110
            session.connection is not None  # polled state
        ):
            await asyncio.sleep(0.02)
    assert session is not None and not session.closed, "the session ended: not detached"
    return session


async def answered(server) -> tuple[Reader, str]:
    """A session with one finished answer, its outbox copied to the store."""
    r = Reader(await open_ws(server))
    session_id = (await r.recv())["session"]["id"]
    await r.ws.send(json.dumps({"type": "input.text", "text": "kept for later", "final": True}))
    await r.until(lambda e: e["type"] == "response.done")
    async with asyncio.timeout(10):
        while len(await stored_outbox(server, session_id)) < len(r.got):  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # the writer copies it every outbox_flush_ms
    return r, session_id


@pytest.mark.parametrize("ws", PROTOCOLS)
async def test_close_1000_ends_the_session_at_once_and_drops_its_outbox(server_factory, ws):
    server = _server(server_factory, ws)
    r, session_id = await answered(server)
    assert await live_sessions(server) == 1
    await r.ws.close(1000)
    await until_gone(server, session_id)
    assert await live_sessions(server) == 0
    assert await stored_outbox(server, session_id) == []


@pytest.mark.parametrize("store", ["memory", "sqlite", "redis"])
async def test_resume_after_close_1000_reopens_with_nothing_to_replay(
    server_factory, store, tmp_path, request
):
    """As for any ended session whose outbox the store no longer holds: reopened,
    numbering goes on after the client's ``last_seq``, nothing replayed, no 410."""
    server = _server(server_factory, None, store_url=store_url(store, tmp_path, request))
    r, session_id = await answered(server)
    last = r.got[-1]["seq"]
    await r.ws.close()  # the websockets default: 1000
    await until_gone(server, session_id)
    again = Reader(await open_ws(server, session_id=session_id, last_seq=2))
    resumed = await again.recv()
    assert resumed["type"] == "session.resumed" and resumed["first_seq"] == 3
    await again.ws.send(json.dumps({"type": "input.text", "text": "back", "final": True}))
    first_new = await again.recv()
    assert first_new["type"] != "error" and first_new["seq"] == 3  # nothing replayed before it
    await again.until(lambda e: e["type"] == "response.done")
    assert last > 3
    await again.ws.close()


@pytest.mark.parametrize("ws", PROTOCOLS)
async def test_dropped_socket_still_detaches_and_resumes(server_factory, ws):
    server = _server(server_factory, ws)
    r, session_id = await answered(server)
    last = r.got[-1]["seq"]
    drop(r.ws)  # no close frame: what a network drop looks like
    await until_detached(server, session_id)
    assert await live_sessions(server) == 1
    again = Reader(await open_ws(server, session_id=session_id, last_seq=2))
    resumed = await again.recv()
    assert resumed["type"] == "session.resumed" and resumed["first_seq"] == 3
    replayed = [await again.recv() for _ in range(last - 2)]
    assert replayed == r.got[2:]
    await again.ws.close()


@pytest.mark.parametrize("ws", PROTOCOLS)
@pytest.mark.parametrize("code", [1001, 4000])
async def test_other_close_codes_detach(server_factory, ws, code):
    server = _server(server_factory, ws)
    r, session_id = await answered(server)
    last = r.got[-1]["seq"]
    await r.ws.close(code)
    await until_detached(server, session_id)
    assert await stored_outbox(server, session_id) != []
    again = Reader(await open_ws(server, session_id=session_id, last_seq=last))
    resumed = await again.recv()
    assert resumed["type"] == "session.resumed" and resumed["first_seq"] == last + 1
    await again.ws.close()


async def test_answer_in_progress_at_close_1000_is_stored_as_it_stood(server_factory):
    server = _server(server_factory, None, echo_pace=1.0)  # a 3 s answer at real time
    r, session_id = await start_answer(server)  # a few of its chunks received
    await r.ws.close(1000)
    await until_gone(server, session_id)
    async with httpx.AsyncClient(
        base_url=server.base, headers={"Authorization": f"Bearer {TOKEN}"}
    ) as http:
        messages = (await http.get(f"/v1/sessions/{session_id}/messages")).json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"]
    answer = messages[1]["metadata"]
    assert answer["finish_reason"] == "cancelled"
    assert 0 < answer["audio_ms"] < 3000  # cut where it stood, not generated to its end


async def test_sdk_close_ends_the_session_at_once(server_factory):
    server = _server(server_factory, None)
    async with Client(server.ws_url, TOKEN) as client:
        session = await client.connect()
        await session.ask("hello", stream=False)
        assert session.ws.close_code is None
        await session.close()
        assert session.ws.close_code == 1000
    await until_gone(server, session.id)


async def test_session_the_server_ended_keeps_its_outbox(server_factory):
    """A session the server ends itself (a fatal error here) closes the socket; the
    client's answer to that close is not the client ending the session."""
    server = _server(server_factory, None)
    r, session_id = await answered(server)
    session = server.app.state.duplex.registry.get(TENANT, session_id)
    await on_server(server, session.fail(500, "test: fatal"))
    with pytest.raises(websockets.ConnectionClosed):
        await r.until(lambda e: False)
    await until_gone(server, session_id)
    assert await stored_outbox(server, session_id) != []


@pytest.mark.parametrize("code", [1000, 1001])
async def test_realtime_door_ends_at_once_and_a_close_1000_drops_the_outbox(server_factory, code):
    """No resume in the Realtime protocol: every ending ends the session; only a close
    1000 also drops the outbox a /v1/duplex resume could read (docs/openai-realtime.md)."""
    server = _server(server_factory, None)
    url = server.base.replace("http", "ws", 1) + "/v1/realtime"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with websockets.connect(url, additional_headers=headers) as ws:
        session_id = json.loads(await ws.recv())["session"]["id"]
        async with asyncio.timeout(10):
            while not await stored_outbox(server, session_id):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        await ws.close(code)
    await until_gone(server, session_id)
    assert (await stored_outbox(server, session_id) == []) == (code == 1000)
