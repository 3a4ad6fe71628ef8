"""``duplex serve --log-format json`` as a real process: every line is a JSON object, the
session's lines carry its ids, and no credential appears anywhere (tokens in the query
string, bearer headers, client tokens)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.wsutil import connect

ROOT = Path(__file__).resolve().parents[1]
API_TOKEN = "json-log-secret-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def json_server(tmp_path: Path) -> Any:
    port = free_port()
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "server.cli", "serve", "--port", str(port)),
                *("--token", f"{API_TOKEN}:tenant-json", "--log-format", "json"),
            ],
            cwd=ROOT,
            env={**os.environ, "DUPLEX_ECHO_PACE": "0", "PYTHONPATH": str(ROOT)},
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(log_path.read_text()) from None
            time.sleep(0.05)

    class Server:
        base = f"http://127.0.0.1:{port}"
        ws_url = f"ws://127.0.0.1:{port}/v1/duplex"

    yield Server, proc, log_path
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=10)


async def test_json_log_lines_carry_ids_and_no_credential(json_server: Any) -> None:
    server, proc, log_path = json_server
    async with httpx.AsyncClient() as http:
        reply = await http.post(
            f"{server.base}/v1/client_tokens", headers={"Authorization": f"Bearer {API_TOKEN}"}
        )
    client_token = reply.json()["token"]
    async with connect(server, API_TOKEN, header=False, query=f"token={API_TOKEN}") as c:
        session_id = (await c.recv())["session"]["id"]
        done = (await c.ask("hello"))[-1]
    async with connect(server, client_token, header=False, query=f"token={client_token}") as c:
        await c.recv()
    proc.terminate()
    proc.wait(timeout=10)

    text = log_path.read_text()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]  # all JSON
    assert lines and all({"time", "level", "logger", "message"} <= set(r) for r in lines)
    assert API_TOKEN not in text and client_token not in text
    assert client_token.split(".")[-1] not in text  # not even the signature
    ours = [r for r in lines if r.get("session_id") == session_id]
    assert ours and all(r["tenant"] == "tenant-json" for r in ours)
    response = [r for r in ours if r.get("response_id") == done["response_id"]]
    assert len(response) == 1, ours
    assert response[0]["turn_id"].startswith("turn_") and response[0]["finish_reason"] == "stop"
    # uvicorn's own lines (the WebSocket access lines with ?token=...) are JSON too.
    access = [r for r in lines if r["logger"].startswith("uvicorn") and "duplex" in r["message"]]
    assert access and all("token=***" in r["message"] for r in access), access
