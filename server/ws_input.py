"""What both WebSocket doors (``/v1/duplex`` and ``/v1/realtime``) do with each frame
they read: take it with the direct path marked idle, and pace input over its budget."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import WebSocket
from starlette.websockets import WebSocketDisconnect

from duplex.protocol import RATE_LIMITED
from server.config import Settings
from server.rate import InputBudget, audio_bytes_per_second
from server.session import DuplexSession
from server.ws_protocol import DirectPath


def input_budget(settings: Settings) -> InputBudget:
    """A connection's input rate limits (docs/protocol.md "Limits"), the same on both doors."""
    return InputBudget.of(
        settings.audio_rate_limit,
        settings.audio_burst_s,
        settings.message_rate_limit,
        settings.message_burst,
    )


async def receive_frame(
    ws: WebSocket, session: DuplexSession, direct: DirectPath | None
) -> dict[str, Any] | None:
    """The next ASGI frame, or None when the client went.

    While this waits, the direct path may hand audio straight to the session; whatever
    it took is fully handled (`DuplexSession.settle`) before the frame is returned.
    """
    if direct is not None:
        direct.ready = True
    try:
        frame = await ws.receive()
    except (WebSocketDisconnect, RuntimeError):
        return None
    finally:
        if direct is not None:
            direct.ready = False
    if frame["type"] == "websocket.disconnect":
        return None
    await session.settle()
    return frame


async def pace_audio(session: DuplexSession, budget: InputBudget, size: int) -> None:
    """Audio beyond its rate waits here, unread input stays in the socket (no error)."""
    await budget.pace_audio(size, audio_bytes_per_second(session.config.input_audio))


async def pace_message(session: DuplexSession, budget: InputBudget) -> None:
    """A message over the rate waits (and the client is told, once a second at most)."""
    delay = budget.message_delay()
    if delay <= 0:
        return
    if budget.notice_due():
        rate = budget.messages.rate
        await session.emit_error(
            RATE_LIMITED, f"more than {rate:g} messages a second: reading is slowed down"
        )
    await asyncio.sleep(delay)
