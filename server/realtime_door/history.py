"""Edits of a session's stored history that Realtime clients ask for after the fact
(``conversation.item.truncate`` / ``delete`` once the turn is stored).

An edit rewrites the session's list through `StateStore.edit_messages`, atomically
in each store: a reader or a crash never sees half of it, and a turn stored meanwhile
is kept. A turn is stored a moment after its ``response.done``; an edit waits
(bounded) for the message it concerns to be there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from duplex.protocol import Message
from server.state.base import StateStore

#: How long an edit waits for the message it concerns to be stored.
WAIT_S = 3.0
_POLL_S = 0.05

Match = Callable[[Message], bool]


async def _wait_for(store: StateStore, session_id: str, match: Match) -> list[Message] | None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while True:
        messages = await store.load_messages(session_id)
        if any(match(m) for m in messages):
            return messages
        if loop.time() >= deadline:
            return None
        await asyncio.sleep(_POLL_S)


def cut_text(text: str, played_ms: float, audio_ms: float) -> str:
    """The share of ``text`` heard when ``played_ms`` of ``audio_ms`` played (at a word
    boundary), the rule the turn runner applies to an interrupted answer."""
    if not audio_ms or played_ms >= audio_ms:
        return text
    keep = int(len(text) * max(played_ms, 0.0) / audio_ms)
    cut = text.rfind(" ", 0, keep + 1)
    return text[: cut if cut > 0 else keep]


async def truncate_answer(
    store: StateStore, session_id: str, response_id: str, played_ms: float
) -> bool:
    """Cut the stored answer of ``response_id`` to what ``played_ms`` of its audio said.

    False when it is not stored in time. A no-op when it was already stored cut (the
    client's truncate reached the turn before it was stored)."""

    def match(m: Message) -> bool:
        return m.role == "assistant" and m.metadata.get("response_id") == response_id

    if await _wait_for(store, session_id, match) is None:
        return False

    def cut(messages: list[Message]) -> list[Message] | None:
        for message in reversed(messages):
            if not match(message):
                continue
            audio_ms = float(message.metadata.get("audio_ms") or 0.0)
            heard = message.metadata.get("played_ms")
            if heard is not None and float(heard) <= played_ms:
                return None  # already cut as far
            message.content = cut_text(message.content, played_ms, audio_ms)
            message.metadata["played_ms"] = round(min(played_ms, audio_ms or played_ms), 1)
            return messages
        return None

    await store.edit_messages(session_id, cut)
    return True


async def delete_messages(store: StateStore, session_id: str, match: Match) -> bool:
    """Drop the stored messages ``match`` selects; False when none is stored in time."""
    if await _wait_for(store, session_id, match) is None:
        return False

    def drop(messages: list[Message]) -> list[Message] | None:
        kept = [m for m in messages if not match(m)]
        return kept if len(kept) < len(messages) else None

    await store.edit_messages(session_id, drop)
    return True
