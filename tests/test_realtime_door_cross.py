"""A session belongs to the endpoint that opened it: `/v1/duplex` neither resumes nor
continues a `/v1/realtime` session (live or stored), `/v1/realtime` never attaches to a
`/v1/duplex` one, and the session on the other endpoint goes on untouched."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from typing import Any

import httpx
import pytest
import websockets

from duplex import Client, ConflictError
from server.realtime_door import routes
from server.resume import CLOSE_REPLACED, _evict
from server.state.base import SessionRecord
from server.state.open import open_store
from tests.conftest import TOKEN, store_url
from tests.test_realtime_door import stored_when
from tests.test_resume import Reader, drop, open_ws

TIMEOUT = 20
CONFLICT = 409


async def open_realtime(server: Any, **query: str) -> Any:
    q = "&".join(f"{k}={v}" for k, v in ({"model": "duplex-echo"} | query).items())
    return await websockets.connect(
        server.base.replace("http", "ws", 1) + f"/v1/realtime?{q}",
        additional_headers={"Authorization": f"Bearer {TOKEN}"},
        max_size=None,
    )


async def realtime_until(ws: Any, kind: str) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(TIMEOUT):
        while True:
            event = json.loads(await ws.recv())
            seen.append(event)
            if event["type"] == kind:
                return seen


async def realtime_turn(ws: Any, text: str) -> list[dict[str, Any]]:
    """A text turn answered on the Realtime socket: it is open and its session live."""
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
    await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
    await ws.send(json.dumps({"type": "response.create"}))
    events = await realtime_until(ws, "response.done")
    assert "error" not in [e["type"] for e in events], events
    return events


async def realtime_session(server: Any) -> tuple[Any, str]:
    ws = await open_realtime(server)
    created = json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))
    assert created["type"] == "session.created"
    return ws, created["session"]["id"]


async def refused_409(other: Reader) -> None:
    error = await other.until(lambda e: e["type"] == "error")
    assert error["code"] == CONFLICT and error["fatal"], error
    assert "/v1/realtime" in error["message"], error
    with pytest.raises(websockets.ConnectionClosed) as info:
        await other.ws.recv()
    assert info.value.rcvd.code == 1008


async def duplex_attempt(server: Any, session_id: str, by: str) -> Reader:
    if by == "resume":
        return Reader(await open_ws(server, session_id=session_id, last_seq=0))
    if by == "continue":
        return Reader(await open_ws(server, session_id=session_id))
    other = Reader(await open_ws(server))  # first message: session.resume
    assert (await other.recv())["type"] == "session.created"
    await other.ws.send(
        json.dumps({"type": "session.resume", "session_id": session_id, "last_seq": 0})
    )
    return other


@pytest.mark.parametrize("store", ["memory", "sqlite"])  # sqlite: with session leases
@pytest.mark.parametrize("by", ["resume", "message", "continue"])
async def test_duplex_refuses_a_live_realtime_session_which_goes_on(
    server_factory, by, store, tmp_path, request
):
    server = server_factory(store_url=store_url(store, tmp_path, request))
    registry = server.app.state.duplex.registry
    rt, session_id = await realtime_session(server)
    await realtime_turn(rt, "before")
    live = registry.get("tenant-a", session_id)
    assert live is not None
    await refused_409(await duplex_attempt(server, session_id, by))
    if store == "sqlite":  # its lease is as it was: no new fencing token, not released
        lease = server.app.state.duplex.replica._leases[live]
        with sqlite3.connect(tmp_path / "s.db") as db:
            row = db.execute(
                "SELECT owner, token FROM leases WHERE session_id = ?", (session_id,)
            ).fetchone()
        assert row is not None and row[0] is not None and row[1] == lease.token, row
    # untouched: the same live session, its socket open, still answering
    assert registry.get("tenant-a", session_id) is live and not live.closed
    events = await realtime_turn(rt, "after")
    assert events[-1]["response"]["status"] == "completed"
    # ... and still writes its history (its lease and fencing token untouched)
    await stored_when(server, session_id, lambda ms: any(m["content"] == "after" for m in ms))
    assert not live.closed
    await rt.close()


@pytest.mark.parametrize("store", ["memory", "sqlite", "redis"])
async def test_duplex_refuses_a_stored_realtime_session(server_factory, store, tmp_path, request):
    """A dropped Realtime connection leaves the session in the store (its outbox holds
    Realtime events); /v1/duplex does not reopen it, nor replay those."""
    server = server_factory(store_url=store_url(store, tmp_path, request))
    registry = server.app.state.duplex.registry
    rt, session_id = await realtime_session(server)
    await realtime_turn(rt, "kept")
    drop(rt)
    async with asyncio.timeout(TIMEOUT):
        while registry.get("tenant-a", session_id) is not None:  # noqa: ASYNC110
            await asyncio.sleep(0.02)  # closed, stored
    for by in ("resume", "continue"):
        await refused_409(await duplex_attempt(server, session_id, by))
    # its conversation goes on through a fork, which is a /v1/duplex session
    fork = await asyncio.to_thread(
        httpx.post,
        f"{server.base}/v1/sessions/{session_id}/fork",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert fork.status_code == 201, fork.text
    again = Reader(await open_ws(server, session_id=fork.json()["id"]))
    assert (await again.recv())["type"] == "session.created"
    await again.ws.send(json.dumps({"type": "input.text", "text": "on", "final": True}))
    assert (await again.until(lambda e: e["type"] == "response.done"))["finish_reason"] == "stop"
    await again.ws.close()


async def test_the_sdk_raises_a_conflict_error_for_a_realtime_session(server_factory):
    """The SDK names the 409 (`ConflictError`, fatal: no reconnect), and the Realtime
    session goes on."""
    server = server_factory()
    rt, session_id = await realtime_session(server)
    async with Client(server.ws_url, TOKEN) as client:
        with pytest.raises(ConflictError) as info:
            await client.connect(session_id=session_id)
    assert info.value.code == CONFLICT and info.value.fatal
    assert "/v1/realtime" in info.value.message
    await realtime_turn(rt, "still here")
    await rt.close()


async def test_completions_and_chat_refuse_a_realtime_session(server_factory):
    """HTTP completions and /v1/ws/chat do not write into a Realtime session's
    conversation either (409), and its history stays readable."""
    server = server_factory()
    rt, session_id = await realtime_session(server)
    await realtime_turn(rt, "mine")
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=server.base, headers=headers) as http:
        for stream in (False, True):
            answer = await http.post(
                f"/v1/sessions/{session_id}/completions",
                json={"question": "from elsewhere", "stream": stream},
            )
            assert answer.status_code == CONFLICT, answer.text
            assert "/v1/realtime" in answer.text
        chat = await websockets.connect(
            server.base.replace("http", "ws", 1) + "/v1/ws/chat", additional_headers=headers
        )
        chat_req = {"type": "chat", "session_id": session_id, "question": "from chat"}
        await chat.send(json.dumps(chat_req))
        reply = json.loads(await asyncio.wait_for(chat.recv(), TIMEOUT))
        assert reply["code"] == CONFLICT, reply
        await chat.send(json.dumps({"type": "chat", "question": "a new one"}))  # goes on
        async with asyncio.timeout(TIMEOUT):
            while (reply := json.loads(await chat.recv()))["data"] is not True:
                assert reply["code"] == 0, reply
        await chat.close()
        history = (await http.get(f"/v1/sessions/{session_id}/messages")).json()
    assert [m["content"] for m in history["messages"]][:1] == ["mine"]
    assert not any(
        "elsewhere" in m["content"] or "chat" in m["content"] for m in history["messages"]
    )
    await realtime_turn(rt, "still mine")
    await rt.close()


async def test_realtime_never_attaches_to_a_duplex_session(server_factory):
    """/v1/realtime has no way to name a session: a `session_id` in its query is not one,
    it opens a new session, and the /v1/duplex one goes on on its socket."""
    server = server_factory()
    duplex = Reader(await open_ws(server))
    duplex_id = (await duplex.recv())["session"]["id"]
    rt = await open_realtime(server, session_id=duplex_id, last_seq="0")
    created = json.loads(await asyncio.wait_for(rt.recv(), TIMEOUT))
    assert created["type"] == "session.created" and created["session"]["id"] != duplex_id
    await realtime_turn(rt, "mine")
    await rt.close()
    await duplex.ws.send(json.dumps({"type": "input.text", "text": "still here", "final": True}))
    done = await duplex.until(lambda e: e["type"] == "response.done")
    assert done["finish_reason"] == "stop"
    await duplex.ws.close()


async def test_a_realtime_connection_taken_over_leaves_the_session_open(server_factory):
    """The Realtime reader never closes a session its connection no longer holds (what a
    takeover, `server.resume._evict`, leaves: the new holder serves the session)."""
    server = server_factory()
    rt, session_id = await realtime_session(server)
    session = server.app.state.duplex.registry.get("tenant-a", session_id)
    loop = session.connection.writer.get_loop()  # the server's

    async def take_over() -> bool:
        readers = [t for t in asyncio.all_tasks() if t.get_coro().cr_code is routes._read.__code__]
        async with session.claim_lock:
            await _evict(session)
            await session.claim_output()
        async with asyncio.timeout(TIMEOUT):
            await asyncio.wait(readers)  # the old connection's reader is done
        closed = session.closed
        await session.close()
        server.app.state.duplex.registry.remove("tenant-a", session)
        return closed

    future = asyncio.run_coroutine_threadsafe(take_over(), loop)
    with pytest.raises(websockets.ConnectionClosed) as info:
        async with asyncio.timeout(TIMEOUT):
            while True:
                await rt.recv()
    assert info.value.rcvd.code == CLOSE_REPLACED
    closed = await asyncio.wait_for(asyncio.wrap_future(future), TIMEOUT)
    assert not closed, "the old connection's reader closed the session"


async def test_a_record_stored_before_the_endpoint_field_loads(tmp_path):
    """SQLite files and Redis records written before `endpoint` existed: /v1/duplex's."""
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE sessions (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, name TEXT NOT NULL,"
        " variables TEXT NOT NULL, config TEXT NOT NULL, parent_id TEXT,"
        " created_at REAL NOT NULL, updated_at REAL NOT NULL, input_received INTEGER)"
    )
    db.execute(
        "INSERT INTO sessions VALUES ('sess_old', 't', '', '{}', '{}', NULL, 1.0, 1.0, NULL)"
    )
    db.commit()
    db.close()
    store = open_store(f"sqlite:///{path}", ttl_s=3600, max_sessions=100, max_messages=100)
    try:
        record = await store.get_session("sess_old", "t")
        assert record is not None and record.endpoint == "/v1/duplex"
        record.endpoint = "/v1/realtime"
        await store.update_session(record)
        assert (await store.get_session("sess_old", "t")).endpoint == "/v1/realtime"
    finally:
        await store.close()
    old = {k: v for k, v in SessionRecord(id="s", tenant="t").__dict__.items()}
    del old["endpoint"]
    assert SessionRecord.from_dict(json.loads(json.dumps(old))).endpoint == "/v1/duplex"


def test_a_record_from_a_newer_replica_loads():
    """A rolling upgrade: a newer replica's record carries keys this one does not know."""
    newer = {**SessionRecord(id="s", tenant="t").__dict__, "added_later": {"x": 1}}
    record = SessionRecord.from_dict(json.loads(json.dumps(newer)))
    assert record.id == "s" and not hasattr(record, "added_later")
