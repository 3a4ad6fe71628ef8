"""What a new user met in the first hour, over a real server: error ids, REST details,
whole MP4 files on the wire. Each test failed before its fix."""

from __future__ import annotations

import base64
import json
import tempfile
from pathlib import Path

import av
import httpx
import numpy as np
import pytest

from duplex.protocol import peek_id
from tests.conftest import TOKEN
from tests.wsutil import connect, reply_text

AUTH = {"Authorization": f"Bearer {TOKEN}"}


# ---- the id of a message is echoed on any error it causes (docs/protocol.md) ---------


@pytest.mark.parametrize(
    "message",
    [
        {"type": "no.such.thing", "id": "m1"},  # unknown type
        {"type": "input.text", "id": "m1"},  # a missing field
        {"type": "input.video", "id": "m1", "data": "AAAA", "chunk_index": -1, "mime_type": "x"},
        {"id": "m1"},  # no type
        {"type": 5, "id": "m1"},
    ],
    ids=["unknown type", "missing field", "bad field", "no type", "type not a string"],
)
async def test_parse_errors_echo_the_id(live_server, message):
    async with connect(live_server, TOKEN) as c:
        await c.recv()
        await c.send(message)
        err = await c.recv()
        assert err["type"] == "error" and err["code"] == 400 and err.get("id") == "m1", err


async def test_oversize_message_echoes_an_id_from_its_first_bytes(live_server):
    limit = live_server.app.state.duplex.settings.max_message_bytes
    async with connect(live_server, TOKEN) as c:
        await c.recv()
        big = {"type": "input.text", "id": "big-1", "text": "x" * (limit + 10)}
        await c.send(json.dumps(big))
        err = await c.recv()
        assert err["code"] == 413 and err.get("id") == "big-1", err
        # An id only after the payload cannot be found cheaply: no id, still a 413.
        await c.send(json.dumps({"type": "input.text", "text": "x" * (limit + 10), "id": "z"}))
        err = await c.recv()
        assert err["code"] == 413 and "id" not in err
        assert "ok" in reply_text(await c.ask("ok"))


def test_peek_id_reads_only_the_top_level_plain_id():
    assert peek_id('{"type": "input.video", "id": "v1", "data": "AAAA') == "v1"
    assert peek_id('{"config": {"id": "inner"}, "id": "outer", "x": "') == "outer"
    assert peek_id('{"text": "say \\"id\\": \\"no\\"", "id": "yes"') == "yes"
    assert peek_id('{"data": "AAAAAAAA') is None
    assert peek_id('{"id": 5}') is None
    assert peek_id('{"id": "' + "a" * 200 + '"}') is None  # over 128 characters: not an id


# ---- REST ------------------------------------------------------------------------------


async def test_create_session_without_a_body(live_server):
    async with httpx.AsyncClient(base_url=live_server.base, headers=AUTH) as http:
        r = await http.post("/v1/sessions")
        assert r.status_code == 201, r.text
        assert r.json()["id"].startswith("sess_") and r.json()["name"] == ""


async def test_patch_answers_the_new_updated_at(live_server):
    async with httpx.AsyncClient(base_url=live_server.base, headers=AUTH) as http:
        created = (await http.post("/v1/sessions", json={"name": "a"})).json()
        patched = (await http.patch(f"/v1/sessions/{created['id']}", json={"name": "b"})).json()
        fetched = (await http.get(f"/v1/sessions/{created['id']}")).json()
        assert patched["name"] == fetched["name"] == "b"
        assert patched["updated_at"] > created["updated_at"]
        assert patched["updated_at"] == fetched["updated_at"]


async def test_stored_answer_is_not_older_than_its_question(live_server):
    async with connect(live_server, TOKEN) as c:
        sid = (await c.recv())["session"]["id"]
        await c.ask("first")
        await c.ask("second")
    async with httpx.AsyncClient(base_url=live_server.base, headers=AUTH) as http:
        messages = (await http.get(f"/v1/sessions/{sid}/messages")).json()["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 2
    times = [m["created_at"] for m in messages]
    assert times == sorted(times), times


async def test_completions_errors_come_in_the_envelope(live_server):
    async with httpx.AsyncClient(base_url=live_server.base, headers=AUTH) as http:
        sid = (await http.post("/v1/sessions")).json()["id"]
        url = f"/v1/sessions/{sid}/completions"
        bad_json = {"content-type": "application/json"}
        cases = [
            (http.post(url, json={"question": "x"}, headers={"Authorization": "Bearer no"}), 401),
            (http.post("/v1/sessions/sess_nope/completions", json={"question": "x"}), 404),
            (http.post(url, json={}), 422),
            (http.post(url, content=b"{not json", headers=bad_json), 422),
        ]
        for call, status in cases:
            r = await call
            body = r.json()
            assert r.status_code == status and "detail" not in body, body
            assert body["code"] == status and body["message"], body
            assert body["data"]["answer"].startswith("**ERROR**: "), body


async def test_plain_answers_carry_no_hops(live_server):
    async with connect(live_server, TOKEN) as c:
        await c.recv()
        events = await c.ask("hello")
    final = next(e for e in events if e["type"] == "chunk" and e.get("finish_reason"))
    assert "hops" not in (final.get("metadata") or {}), final
    async with httpx.AsyncClient(base_url=live_server.base, headers=AUTH) as http:
        sid = (await http.post("/v1/sessions")).json()["id"]
        r = await http.post(
            f"/v1/sessions/{sid}/completions", json={"question": "hi", "stream": False}
        )
    assert r.json()["data"]["reference"] == {}, r.json()


async def test_readyz_names_what_it_counts(live_server):
    async with connect(live_server, TOKEN) as c:
        await c.recv()
        async with httpx.AsyncClient(base_url=live_server.base) as http:
            body = (await http.get("/readyz")).json()
    assert "sessions" not in body and body["live_sessions"] >= 1, body


# ---- whole MP4 files on the wire ---------------------------------------------------------


def _phone_clip() -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "clip.mov"
        with av.open(str(path), "w", format="mov") as container:
            stream = container.add_stream("libx264", rate=10)
            stream.width, stream.height = 320, 240
            stream.pix_fmt = "yuv420p"
            for i in range(25):
                img = np.full((240, 320, 3), i * 8, np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return path.read_bytes()


async def test_whole_mp4_in_one_message_gives_frames(live_server):
    data = _phone_clip()
    async with connect(live_server, TOKEN) as c:
        await c.recv()
        await c.send(
            {
                "type": "input.video",
                "id": "v1",
                "mime_type": "video/mp4",
                "chunk_index": 0,
                "data": base64.b64encode(data).decode(),
            }
        )
        events = await c.ask("what do you see?")
    assert not [e for e in events if e["type"] == "error"], events
    assert "Saw 3 frame(s): 320x240 image/jpeg" in reply_text(events)


async def test_undecodable_mp4_answers_415_with_the_id(live_server):
    async with connect(live_server, TOKEN) as c:
        await c.recv()
        for index, piece in enumerate([b"\x00\x00\x00\x18ftypisom" + bytes(12), b"\x00" * 64]):
            await c.send(
                {
                    "type": "input.video",
                    "id": f"v{index}",
                    "mime_type": "video/mp4",
                    "chunk_index": index,
                    "final": index == 1,
                    "data": base64.b64encode(piece).decode(),
                }
            )
        err = await c.recv()
        assert err["type"] == "error" and err["code"] == 415 and err["id"] == "v1", err
        assert "MP4" in err["message"]
        assert "still here" in reply_text(await c.ask("still here"))
