"""A tiny protocol-checking client for tests: every message it reads must be valid v1."""

from __future__ import annotations

import asyncio
import json
from contextlib import asynccontextmanager
from typing import Any

import websockets

from duplex.protocol import parse_server_message


class Conn:
    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.seen: list[dict[str, Any]] = []
        self.last_seq = 0

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        await self.ws.send(json.dumps(message) if isinstance(message, dict) else message)

    async def recv(self, timeout: float = 10) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            raw = await self.ws.recv()
        parse_server_message(raw)  # raises if the server sent anything off-protocol
        event = json.loads(raw)
        assert event["seq"] > self.last_seq, f"seq not increasing: {event}"
        self.last_seq = event["seq"]
        self.seen.append(event)
        return event

    async def until(self, kind: str, timeout: float = 10) -> list[dict[str, Any]]:
        """Read until a message of ``kind``; returns everything read, that one last."""
        got = []
        async with asyncio.timeout(timeout):
            while True:
                event = await self.recv(timeout)
                got.append(event)
                if event["type"] == kind:
                    return got

    async def ask(self, text: str, **extra: Any) -> list[dict[str, Any]]:
        await self.send({"type": "input.text", "text": text, "final": True, **extra})
        return await self.until("response.done")


@asynccontextmanager
async def connect(server: Any, token: str | None, *, query: str = "", header: bool = True):
    url = server.ws_url + (f"?{query}" if query else "")
    headers = {"Authorization": f"Bearer {token}"} if token and header else {}
    async with websockets.connect(url, additional_headers=headers, max_size=None) as ws:
        yield Conn(ws)


def reply_text(events: list[dict[str, Any]]) -> str:
    return "".join(e.get("delta", "") for e in events if e["type"] == "chunk")
