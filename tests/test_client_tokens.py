"""Short-lived client tokens over real servers: mint with an API token, connect with the
client token, refuse expired, forged and revoked ones, scope to a session, and share
verification and revocation across replicas (a shared key and a shared store)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import httpx
import pytest
import websockets

from server.client_tokens import ClientTokens, revocation_key
from server.state.memory import MemoryStore
from server.state.sqlite import SqliteStore
from tests.conftest import OTHER_TOKEN, TOKEN
from tests.wsutil import connect

AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def call(
    method: str, url: str, headers: dict[str, str] | None = None, body: Any = None
) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.request(method, url, headers=headers, json=body)


async def mint(server: Any, headers: dict[str, str] | None = AUTH, **body: Any) -> httpx.Response:
    return await call("POST", f"{server.base}/v1/client_tokens", headers, body or None)


async def refused(server: Any, token: str, query: str = "") -> dict[str, Any]:
    """The fatal error a WebSocket with ``token`` gets, after checking the close."""
    async with connect(server, token, header=False, query=f"token={token}{query}") as c:
        error = await c.recv()
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await c.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert error["type"] == "error" and error["fatal"] is True
    return error


async def opened(server: Any, token: str, query: str = "") -> dict[str, Any]:
    async with connect(server, token, header=False, query=f"token={token}{query}") as c:
        created = await c.recv()
        assert created["type"] == "session.created"
        done = await c.ask("hello")
        assert done[-1]["finish_reason"] == "stop"
        return created["session"]


async def test_mint_and_connect(live_server: Any) -> None:
    reply = await mint(live_server, ttl_s=120)
    assert reply.status_code == 201, reply.text
    body = reply.json()
    token = body["token"]
    assert token.startswith("ek_") and body["id"].startswith("ct_")
    assert time.time() + 100 < body["expires_at"] <= time.time() + 121
    session = await opened(live_server, token)
    # The session belongs to the API token's tenant.
    url = f"{live_server.base}/v1/sessions/{session['id']}"
    assert (await call("GET", url, headers=AUTH)).status_code == 200
    assert (
        await call("GET", url, headers={"Authorization": f"Bearer {OTHER_TOKEN}"})
    ).status_code == 404
    # As a bearer header too.
    async with connect(live_server, token) as c:
        assert (await c.recv())["type"] == "session.created"


async def test_mint_needs_an_api_token(live_server: Any) -> None:
    assert (await mint(live_server, headers=None)).status_code == 401
    assert (await mint(live_server, headers={"Authorization": "Bearer nope"})).status_code == 401
    token = (await mint(live_server)).json()["token"]
    # A client token cannot mint more, nor use the REST API.
    assert (
        await mint(live_server, headers={"Authorization": f"Bearer {token}"})
    ).status_code == 401
    sessions = await call(
        "POST",
        f"{live_server.base}/v1/sessions",
        headers={"Authorization": f"Bearer {token}"},
        body={},
    )
    assert sessions.status_code == 401
    # TTLs outside 10 s .. 1 h are refused.
    assert (await mint(live_server, ttl_s=5)).status_code == 422
    assert (await mint(live_server, ttl_s=7200)).status_code == 422


async def test_expired_and_forged_tokens_get_401(live_server: Any) -> None:
    tokens: ClientTokens = live_server.app.state.duplex.client_tokens
    expired, _ = tokens.mint("tenant-a", ttl_s=60, now=time.time() - 61)
    error = await refused(live_server, expired)
    assert error["code"] == 401 and "expired" in error["message"]

    good = (await mint(live_server)).json()["token"]
    payload, _, signature = good[3:].partition(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["t"] = "tenant-b"  # another tenant, same signature
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    for bad in (
        f"ek_{forged}.{signature}",
        good[:-2] + ("xx" if not good.endswith("xx") else "yy"),
        ClientTokens("another-key", 600, MemoryStore()).mint("tenant-a")[0],
        "ek_",
    ):
        error = await refused(live_server, bad)
        assert error["code"] == 401 and error["message"] == "invalid client token"


async def test_revoked_tokens_get_401(live_server: Any) -> None:
    body = (await mint(live_server)).json()
    await opened(live_server, body["token"])
    # Another tenant cannot revoke it...
    other = {"Authorization": f"Bearer {OTHER_TOKEN}"}
    revoke = f"{live_server.base}/v1/client_tokens/{body['id']}"
    assert (await call("DELETE", revoke, headers=other)).status_code == 204
    await opened(live_server, body["token"])
    # ... its own tenant can; then it is refused, while other tokens still work.
    assert (await call("DELETE", revoke)).status_code == 401
    assert (await call("DELETE", revoke, headers=AUTH)).status_code == 204
    error = await refused(live_server, body["token"])
    assert error["code"] == 401 and "revoked" in error["message"]
    await opened(live_server, (await mint(live_server)).json()["token"])
    assert (
        await call("DELETE", f"{live_server.base}/v1/client_tokens/nope", headers=AUTH)
    ).status_code == 404


async def test_session_scoped_token(live_server: Any) -> None:
    sessions = f"{live_server.base}/v1/sessions"
    session_id = (await call("POST", sessions, headers=AUTH, body={})).json()["id"]
    other_id = (await call("POST", sessions, headers=AUTH, body={})).json()["id"]
    token = (await mint(live_server, session_id=session_id)).json()["token"]
    # Without session_id it opens its own session; with it, only that one.
    assert (await opened(live_server, token))["id"] == session_id
    assert (await opened(live_server, token, f"&session_id={session_id}"))["id"] == session_id
    error = await refused(live_server, token, f"&session_id={other_id}")
    assert error["code"] == 401 and "another session" in error["message"]
    # Minting for a session of another tenant (or none) is refused.
    assert (await mint(live_server, session_id="sess_unknown")).status_code == 404
    foreign = (
        await call("POST", sessions, headers={"Authorization": f"Bearer {OTHER_TOKEN}"}, body={})
    ).json()["id"]
    assert (await mint(live_server, session_id=foreign)).status_code == 404


async def test_tokens_work_across_replicas(server_factory: Any, redis_url: str) -> None:
    """Two replicas with one key and one Redis store: minted on one, used on the other;
    revoked on one, refused by the other. A replica with another key refuses it."""
    shared = {"client_secret_key": "replica-key", "store_url": redis_url}
    a, b = server_factory(**shared), server_factory(**shared)
    stranger = server_factory(client_secret_key="other-key", store_url=redis_url)
    body = (await mint(a)).json()
    await opened(b, body["token"])
    assert (await refused(stranger, body["token"]))["code"] == 401
    assert (
        await call("DELETE", f"{a.base}/v1/client_tokens/{body['id']}", headers=AUTH)
    ).status_code == 204
    assert (await refused(b, body["token"]))["code"] == 401


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis"])
async def test_deny_list_in_every_store(kind: str, tmp_path: Any, request: Any) -> None:
    if kind == "memory":
        store: Any = MemoryStore()
    elif kind == "sqlite":
        store = SqliteStore(str(tmp_path / "state.db"))
    else:
        from server.state.redis import RedisStore

        store = RedisStore(request.getfixturevalue("redis_url"), prefix=f"deny-{time.time()}:")
    try:
        tokens = ClientTokens("k", 600, store)
        token, claims = tokens.mint("t1")
        assert await tokens.check(token) == claims
        await tokens.revoke("t2", claims.id)  # another tenant's revocation: no effect
        assert await tokens.check(token) == claims
        await tokens.revoke("t1", claims.id)
        assert await tokens.check(token) == "revoked"
        assert await store.is_revoked(revocation_key("t1", claims.id))
        # An entry whose time has passed is no longer on the list.
        await store.revoke("old", time.time() - 1)
        assert not await store.is_revoked("old")
    finally:
        await store.close()


async def test_unreadable_deny_list_refuses_with_503(server_factory: Any) -> None:
    """A store that cannot be read might hide a revocation: the token is refused (503),
    not admitted."""
    import socket

    with socket.socket() as sock:  # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = server_factory(store_url=f"redis://127.0.0.1:{port}/0")
    token, _ = server.app.state.duplex.client_tokens.mint("tenant-a")
    async with connect(server, token, header=False, query=f"token={token}") as c:
        error = await c.recv()
    assert error["code"] == 503 and "state store" in error["message"]


async def test_one_mechanism_for_both_doors(live_server: Any) -> None:
    """A secret from the OpenAI door opens /v1/duplex; a client token (bound to no model)
    opens /v1/realtime."""
    reply = await call(
        "POST",
        f"{live_server.base}/v1/realtime/client_secrets",
        AUTH,
        {"session": {"type": "realtime", "model": "duplex-echo"}},
    )
    assert reply.status_code == 200, reply.text
    await opened(live_server, reply.json()["value"])

    token = (await mint(live_server)).json()["token"]
    url = live_server.base.replace("http", "ws", 1) + "/v1/realtime?model=duplex-echo"
    async with websockets.connect(
        url, additional_headers={"Authorization": f"Bearer {token}"}
    ) as ws:
        first = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert first["type"] == "session.created", first
