"""Wire protocol v1 over a real server: auth, text turns, errors, sessions, fork."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
import websockets

from tests.conftest import OTHER_TOKEN, TOKEN
from tests.wsutil import connect, reply_text


async def test_auth_by_header_and_query(live_server):
    async with connect(live_server, TOKEN) as c:
        created = await c.recv()
        assert created["type"] == "session.created" and created["seq"] == 1
    async with connect(live_server, None, query=f"token={TOKEN}") as c:
        assert (await c.recv())["type"] == "session.created"


@pytest.mark.parametrize("token", [None, "wrong"])
async def test_auth_failure_is_401_then_1008(live_server, token):
    async with connect(live_server, token) as c:
        err = await c.recv()
        assert err["type"] == "error" and err["code"] == 401 and err["fatal"] is True
        with pytest.raises(websockets.ConnectionClosed) as info:
            await c.ws.recv()
        assert info.value.rcvd.code == 1008


async def test_multi_turn_text_streams_and_keeps_history(live_server):
    async with connect(live_server, TOKEN) as c:
        session_id = (await c.recv())["session"]["id"]
        first = await c.ask("hello there my friend")
        kinds = [e["type"] for e in first]
        assert kinds[0] == "turn.ended" and kinds[1] == "response.started"
        assert kinds[-1] == "response.done" and first[-1]["finish_reason"] == "stop"
        assert sum(1 for e in first if e.get("delta")) >= 2, "reply should stream in deltas"
        assert "hello there my friend" in reply_text(first)
        second = await c.ask("again")
        assert "again" in reply_text(second)
        ids = {e["response_id"] for e in first + second if e["type"] == "response.done"}
        assert len(ids) == 2
    async with httpx.AsyncClient(base_url=live_server.base) as http:
        r = await http.get(
            f"/v1/sessions/{session_id}/messages", headers={"Authorization": f"Bearer {TOKEN}"}
        )
    messages = r.json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == "hello there my friend"
    assert "hello there my friend" in messages[1]["content"]


async def test_text_chunks_join_until_final(live_server):
    async with connect(live_server, TOKEN) as c:
        await c.recv()
        await c.send({"type": "input.text", "text": "one ", "final": False})
        await c.send({"type": "input.text", "text": "two"})
        events = await c.ask(" three")
        assert "one two three" in reply_text(events)


async def test_invalid_json_and_unknown_type_keep_connection(live_server):
    async with connect(live_server, TOKEN) as c:
        await c.recv()
        await c.send("{not json")
        err = await c.recv()
        assert err["type"] == "error" and err["code"] == 400 and err["fatal"] is False
        await c.send({"type": "no.such.thing", "id": "m1"})
        err = await c.recv()
        assert err["code"] == 400 and "no.such.thing" in err["message"]
        await c.send({"type": "input.text", "id": "m2"})  # missing text
        err = await c.recv()
        assert err["code"] == 400 and "text" in err["message"]
        events = await c.ask("still here")
        assert "still here" in reply_text(events)


async def test_oversize_message_is_413_and_connection_lives(live_server):
    limit = live_server.app.state.duplex.settings.max_message_bytes
    async with connect(live_server, TOKEN) as c:
        await c.recv()
        await c.send(json.dumps({"type": "input.text", "text": "x" * (limit + 10)}))
        err = await c.recv()
        assert err["type"] == "error" and err["code"] == 413 and not err["fatal"]
        await c.send(b"\x00" * (limit + 2))
        err = await c.recv()
        assert err["code"] == 413
        assert "ok" in reply_text(await c.ask("ok"))


async def test_ping_pong_and_ids(live_server):
    async with connect(live_server, TOKEN) as c:
        await c.recv()
        await c.send({"type": "ping", "id": "p1"})
        pong = await c.recv()
        assert pong == {"type": "pong", "id": "p1", "seq": pong["seq"]}


async def test_session_update_instructions_variables_provider(live_server):
    async with connect(live_server, TOKEN) as c:
        await c.recv()
        await c.send(
            {
                "type": "session.update",
                "config": {"instructions": "Be {{tone}}.", "variables": {"tone": "brief"}},
            }
        )
        updated = await c.recv()
        assert updated["type"] == "session.updated"
        assert updated["session"]["config"]["instructions"] == "Be {{tone}}."
        await c.send({"type": "session.update", "id": "u2", "config": {"provider": "nope"}})
        err = await c.recv()
        assert err["code"] == 400 and err["id"] == "u2" and "nope" in err["message"]
        await c.send({"type": "session.update", "config": {"turn_detection": {"stop_ms": 5}}})
        err = await c.recv()
        assert err["code"] == 400 and "stop_ms" in err["message"]


async def test_foreign_and_unknown_session_are_404(live_server):
    async with connect(live_server, TOKEN) as c:
        session_id = (await c.recv())["session"]["id"]
        await c.ask("mine")
    for sid, token in [(session_id, OTHER_TOKEN), ("sess_doesnotexist", TOKEN)]:
        async with connect(live_server, token, query=f"session_id={sid}") as c:
            err = await c.recv()
            assert err["code"] == 404 and err["fatal"]
            assert "unknown session" in err["message"]
    async with httpx.AsyncClient(base_url=live_server.base) as http:
        r = await http.get(
            f"/v1/sessions/{session_id}/messages",
            headers={"Authorization": f"Bearer {OTHER_TOKEN}"},
        )
        assert r.status_code == 404
    # the owner can continue it
    async with connect(live_server, TOKEN, query=f"session_id={session_id}") as c:
        assert (await c.recv())["session"]["id"] == session_id


async def test_fork_is_independent(live_server):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with connect(live_server, TOKEN) as c:
        parent = (await c.recv())["session"]["id"]
        await c.ask("before fork")
    async with httpx.AsyncClient(base_url=live_server.base, headers=auth) as http:
        r = await http.patch(f"/v1/sessions/{parent}", json={"name": "p", "variables": {"a": "1"}})
        assert r.status_code == 200 and r.json()["variables"] == {"a": "1"}
        fork = (await http.post(f"/v1/sessions/{parent}/fork")).json()
        assert fork["parent_id"] == parent and fork["variables"] == {"a": "1"}
        async with connect(live_server, TOKEN, query=f"session_id={fork['id']}") as c:
            await c.recv()
            await c.ask("only on the fork")
        parent_msgs = (await http.get(f"/v1/sessions/{parent}/messages")).json()["messages"]
        fork_msgs = (await http.get(f"/v1/sessions/{fork['id']}/messages")).json()["messages"]
        assert parent_msgs[0]["content"] == "before fork"
        assert len(parent_msgs) == 2 and len(fork_msgs) == 4
        assert not any("only on the fork" in m["content"] for m in parent_msgs)
        assert (await http.delete(f"/v1/sessions/{fork['id']}/messages")).status_code == 204
        assert (await http.get(f"/v1/sessions/{fork['id']}/messages")).json()["messages"] == []
        assert len((await http.get(f"/v1/sessions/{parent}/messages")).json()["messages"]) == 2


async def test_health_endpoints(live_server):
    async with httpx.AsyncClient(base_url=live_server.base) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        assert (await http.get("/readyz")).json()["status"] == "ready"
    url = live_server.base.replace("http", "ws", 1) + "/v1/ws/health"
    async with websockets.connect(url) as ws:
        hello = json.loads(await ws.recv())
        assert hello["type"] == "hello"
        await ws.send("abc")
        echo = json.loads(await ws.recv())
        assert echo["data"] == "abc" and echo["time"] >= hello["time"]


async def test_sessions_are_isolated_under_concurrency(live_server):
    async def one(i: int) -> str:
        async with connect(live_server, TOKEN) as c:
            await c.recv()
            return reply_text(await c.ask(f"client {i}"))

    replies = await asyncio.gather(*(one(i) for i in range(8)))
    for i, text in enumerate(replies):
        assert f"client {i}" in text
