"""HTTP completions (SSE and JSON) and the chat WebSocket envelope, over a real server."""

from __future__ import annotations

import json

import httpx
import pytest
import websockets

from tests.conftest import OTHER_TOKEN, TOKEN

AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def _new_session(http: httpx.AsyncClient) -> str:
    r = await http.post("/v1/sessions", json={"name": "chat"})
    assert r.status_code == 201
    return r.json()["id"]


async def test_completions_stream_is_sse_data_lines(live_server):
    async with httpx.AsyncClient(base_url=live_server.base, headers=AUTH) as http:
        sid = await _new_session(http)
        events = []
        async with http.stream(
            "POST",
            f"/v1/sessions/{sid}/completions",
            json={"question": "tell me a story", "stream": True},
        ) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
        assert events[-1] == {"code": 0, "message": "", "data": True}
        answers = [e["data"]["answer"] for e in events[:-1]]
        assert len(answers) >= 3, "several deltas, then the final envelope"
        assert all(a.startswith(b) for a, b in zip(answers[1:], answers, strict=False)), (
            "answer grows"
        )
        final = events[-2]["data"]
        assert "tell me a story" in final["answer"] and final["session_id"] == sid
        assert final["id"].startswith("resp_")
        history = (await http.get(f"/v1/sessions/{sid}/messages")).json()["messages"]
        assert [m["role"] for m in history] == ["user", "assistant"]


async def test_completions_json_and_errors(live_server):
    async with httpx.AsyncClient(base_url=live_server.base, headers=AUTH) as http:
        sid = await _new_session(http)
        r = await http.post(
            f"/v1/sessions/{sid}/completions", json={"question": "hi", "stream": False}
        )
        body = r.json()
        assert body["code"] == 0 and "hi" in body["data"]["answer"]
        assert (await http.post(f"/v1/sessions/{sid}/completions", json={})).status_code == 422
        r = await http.post(
            f"/v1/sessions/{sid}/completions",
            json={"question": "x"},
            headers={"Authorization": f"Bearer {OTHER_TOKEN}"},
        )
        assert r.status_code == 404
        r = await http.post(
            f"/v1/sessions/{sid}/completions",
            json={"question": "x"},
            headers={"Authorization": "Bearer no"},
        )
        assert r.status_code == 401


async def test_chat_websocket_envelope(live_server):
    url = live_server.base.replace("http", "ws", 1) + f"/v1/ws/chat?token={TOKEN}"
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"type": "chat", "question": "first one", "stream": True}))
        events = []
        while True:
            event = json.loads(await ws.recv())
            events.append(event)
            if event["data"] is True:
                break
        assert events[-1] == {"code": 0, "message": "", "data": True}
        sid = events[0]["data"]["session_id"]
        assert "first one" in events[-2]["data"]["answer"]
        # same session, not streamed: one answer envelope then the terminator
        await ws.send(
            json.dumps({"type": "chat", "session_id": sid, "question": "second", "stream": False})
        )
        answer = json.loads(await ws.recv())
        assert answer["code"] == 0 and "second" in answer["data"]["answer"]
        assert json.loads(await ws.recv())["data"] is True
        # errors keep the connection
        await ws.send("not json")
        err = json.loads(await ws.recv())
        assert err["code"] == 400 and err["data"]["answer"].startswith("**ERROR**")
        await ws.send(json.dumps({"type": "dance", "question": "x"}))
        err = json.loads(await ws.recv())
        assert err["code"] == 400 and "dance" in err["message"]
        await ws.send(json.dumps({"type": "chat", "session_id": "sess_nope", "question": "x"}))
        err = json.loads(await ws.recv())
        assert err["code"] == 404
        await ws.send(json.dumps({"type": "chat", "question": "still alive", "stream": False}))
        assert "still alive" in json.loads(await ws.recv())["data"]["answer"]


async def test_chat_websocket_auth(live_server):
    url = live_server.base.replace("http", "ws", 1) + "/v1/ws/chat"
    async with websockets.connect(url) as ws:
        err = json.loads(await ws.recv())
        assert err["code"] == 401 and err["data"]["answer"].startswith("**ERROR**")
        with pytest.raises(websockets.ConnectionClosed) as info:
            await ws.recv()
        assert info.value.rcvd.code == 1008
