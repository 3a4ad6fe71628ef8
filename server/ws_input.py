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


#: A client's close with this code says it is done with the session: it ends at once
#: (docs/protocol.md "Resuming a session").
CLOSE_NORMAL = 1000
#: The close code of a connection that ended without one.
CLOSE_ABNORMAL = 1006


async def receive_frame(
    ws: WebSocket, session: DuplexSession, direct: DirectPath | None
) -> dict[str, Any] | int:
    """The next ASGI frame, or the close code when the connection went.

    The code is the client's close frame's (1000: it is done with the session), or what
    the server reports for a connection that ended without one (uvicorn: 1005 after the
    handshake, 1006; never 1000). While this waits, the direct path may hand audio
    straight to the session; whatever it took is fully handled (`DuplexSession.settle`)
    before the frame is returned.
    """
    if direct is not None:
        direct.ready = True
    try:
        frame = await ws.receive()
    except WebSocketDisconnect as exc:
        return exc.code
    except RuntimeError:  # received after the disconnect: the code was taken already
        return CLOSE_ABNORMAL
    finally:
        if direct is not None:
            direct.ready = False
    if frame["type"] == "websocket.disconnect":
        return int(frame.get("code") or CLOSE_ABNORMAL)
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
