"""A StateStore wrapper for stores across a network or on a disk (Redis, SQLite).

Why: a store that stalls or goes away must not stall or end live sessions.
Every call runs in its own task and is waited for at most ``timeout_s``, so a
caller's cancellation is never swallowed by a driver and no wait is unbounded.
When a write fails for a transient reason (connection refused, timeout), it is
kept, in order, in a bounded backlog and retried until the store is back; live
sessions read their conversation from an in-memory copy meanwhile and are told
through ``watch``. New sessions, REST calls and readiness get ``StoreUnavailable``
(503) during an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from duplex.protocol import Message
from server.state.base import (
    MessageEdit,
    OutboxBatch,
    OutboxEntry,
    SessionRecord,
    StateStore,
    StoreUnavailable,
    StreamEvent,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Backoff between retries of the backlog's oldest write while the store is down.
RETRY_FIRST_S = 0.2
RETRY_MAX_S = 2.0
#: Rough per-message and per-event overhead added to their text, for the byte bound.
_OVERHEAD = 200


@dataclass(slots=True)
class _Write:
    session_id: str
    method: str
    args: tuple[Any, ...]
    size: int


class ResilientStore(StateStore):
    """``inner`` with bounded waits, a write backlog through outages and a copy of each
    watched (live) session's messages."""

    def __init__(
        self,
        inner: StateStore,
        *,
        timeout_s: float = 5.0,
        backlog_max_writes: int = 10_000,
        backlog_max_bytes: int = 16 * 1024 * 1024,
        max_messages: int = 1000,
    ) -> None:
        self.inner = inner
        self._timeout = timeout_s
        self._max_writes = backlog_max_writes
        self._max_bytes = backlog_max_bytes
        self._max_messages = max_messages
        self._transient = (OSError, TimeoutError, *inner.transient_errors)
        self._backlog: deque[_Write] = deque()
        self._backlog_bytes = 0
        self._down: str | None = None  # why the store is unavailable, while it is
        self._drainer: asyncio.Task[None] | None = None
        self._calls: set[asyncio.Task[Any]] = set()
        self._watchers: dict[str, Callable[[bool], None]] = {}
        self._copies: OrderedDict[str, list[Message]] = OrderedDict()

    # ---- calls ----------------------------------------------------------------------

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``inner.method(*args)`` in its own task, waited for at most ``timeout_s``.

        The caller's cancellation interrupts only the wait (a driver that swallows
        cancellation cannot keep the caller running); the call itself goes on,
        bounded by the same timeout.
        """
        task = asyncio.ensure_future(self._bounded(getattr(self.inner, method)(*args, **kwargs)))
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)
        done, _ = await asyncio.wait({task}, timeout=self._timeout)
        if not done:
            task.cancel()
            raise TimeoutError(f"state store call {method} took over {self._timeout} s")
        return task.result()

    async def _bounded(self, call: Awaitable[T]) -> T:
        async with asyncio.timeout(self._timeout):
            return await call

    def _transient_fault(self, exc: BaseException) -> bool:
        return isinstance(exc, self._transient)

    async def _read(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            result = await self._call(method, *args, **kwargs)
        except Exception as exc:
            if not self._transient_fault(exc):
                raise
            self._mark_down(exc)
            raise StoreUnavailable(self._down or "state store unavailable") from exc
        if self._down is not None and not self._backlog:
            self._mark_up(0)
        return result

    async def _write(self, session_id: str, method: str, *args: Any, size: int = 0) -> None:
        """Write now, or (while earlier writes wait, or when this one fails for a
        transient reason) keep it in the backlog, in order."""
        if not self._backlog:
            try:
                await self._call(method, *args)
                if self._down is not None:
                    self._mark_up(0)
                return
            except Exception as exc:
                if not self._transient_fault(exc):
                    raise
                self._mark_down(exc)
        self._defer(_Write(session_id, method, args, size + _OVERHEAD))

    def _defer(self, write: _Write) -> None:
        self._backlog.append(write)
        self._backlog_bytes += write.size
        while len(self._backlog) > self._max_writes or self._backlog_bytes > self._max_bytes:
            lost = self._backlog.popleft()
            self._backlog_bytes -= lost.size
            log.warning(
                "[%s] state store backlog full (%d writes, %d bytes): dropped its oldest write "
                "(%s)",
                lost.session_id,
                self._max_writes,
                self._max_bytes,
                lost.method,
            )
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        """Replay the backlog in order until it is empty, backing off while the store is down."""
        delay = RETRY_FIRST_S
        written = 0
        while self._backlog:
            write = self._backlog[0]
            try:
                await self._replay(write)
            except Exception as exc:
                if self._transient_fault(exc):
                    self._mark_down(exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX_S)
                    continue
                log.error("[%s] state store refused a deferred %s", write.session_id, write.method)
            if self._backlog and self._backlog[0] is write:
                self._backlog.popleft()
                self._backlog_bytes -= write.size
                written += 1
            delay = RETRY_FIRST_S
        self._mark_up(written)

    async def _replay(self, write: _Write) -> None:
        if write.method == "append_messages":
            # A write that timed out may have landed after all: never store a message twice.
            stored = {m.id for m in await self._call("load_messages", write.session_id)}
            fresh = [m for m in write.args[1] if m.id not in stored]
            if fresh:
                await self._call("append_messages", write.session_id, fresh)
            return
        await self._call(write.method, *write.args)

    def _mark_down(self, exc: BaseException) -> None:
        if self._down is not None:
            return
        self._down = f"state store unavailable ({type(exc).__name__}: {exc})"
        log.warning("%s; live sessions go on, writes are kept until it is back", self._down)
        for callback in list(self._watchers.values()):
            callback(False)

    def _mark_up(self, written: int) -> None:
        if self._down is None:
            return
        self._down = None
        log.warning("state store is back: %d deferred writes written", written)
        for callback in list(self._watchers.values()):
            callback(True)

    # ---- health and live sessions ---------------------------------------------------

    def unavailable(self) -> str | None:
        return self._down

    def watch(self, session_id: str, callback: Callable[[bool], None]) -> Callable[[], None]:
        self._watchers[session_id] = callback

        def unwatch() -> None:
            if self._watchers.get(session_id) is callback:
                del self._watchers[session_id]
                self._copies.pop(session_id, None)

        return unwatch

    def _copy_extend(self, session_id: str, messages: list[Message]) -> None:
        copy = self._copies.get(session_id)
        if copy is not None:
            copy.extend(m.model_copy() for m in messages)
            del copy[: -self._max_messages]

    # ---- StateStore -----------------------------------------------------------------

    async def create_session(self, record: SessionRecord) -> None:
        if self._backlog:
            raise StoreUnavailable(self._down or "state store unavailable: writes are pending")
        await self._read("create_session", record)  # a new session needs the store now

    async def get_session(self, session_id: str, tenant: str | None = None) -> SessionRecord | None:
        return await self._read("get_session", session_id, tenant)

    async def update_session(self, record: SessionRecord) -> None:
        await self._write(record.id, "update_session", record, size=len(str(record.variables)))

    async def delete_session(self, session_id: str) -> None:
        self._copies.pop(session_id, None)
        await self._write(session_id, "delete_session", session_id)

    async def load_messages(self, session_id: str) -> list[Message]:
        copy = self._copies.get(session_id)
        if copy is not None and (self._backlog or self._down is not None):
            return [m.model_copy() for m in copy]  # no wait on a store known to be down
        try:
            messages = await self._read("load_messages", session_id)
        except StoreUnavailable:
            if session_id not in self._watchers:
                raise
            log.warning("[%s] state store unavailable: history not in memory yet", session_id)
            messages = []
        messages += [
            m
            for w in self._backlog
            if w.session_id == session_id and w.method == "append_messages"
            for m in w.args[1]
        ]
        if session_id in self._watchers:  # shares the messages; copies go out in an outage
            self._copies[session_id] = messages[-self._max_messages :]
        return messages

    async def append_messages(self, session_id: str, messages: list[Message]) -> None:
        if not messages:
            return
        self._copy_extend(session_id, messages)
        size = sum(len(m.content) + _OVERHEAD for m in messages)
        await self._write(session_id, "append_messages", session_id, list(messages), size=size)

    async def clear_messages(self, session_id: str) -> None:
        if session_id in self._copies:
            self._copies[session_id] = []
        await self._write(session_id, "clear_messages", session_id)

    async def edit_messages(self, session_id: str, edit: MessageEdit) -> list[Message] | None:
        """Not deferred through an outage: an edit needs the list as it is now."""
        if self._backlog:
            raise StoreUnavailable(self._down or "state store unavailable: writes are pending")
        edited = await self._read("edit_messages", session_id, edit)
        if edited is not None and session_id in self._copies:
            self._copies[session_id] = [m.model_copy() for m in edited][-self._max_messages :]
        return edited

    async def append_events(self, session_id: str, events: list[StreamEvent]) -> None:
        size = sum(len(str(e.data)) + _OVERHEAD for e in events)
        await self._write(session_id, "append_events", session_id, list(events), size=size)

    async def load_events(self, session_id: str) -> list[StreamEvent]:
        return await self._read("load_events", session_id)

    async def drop_events(self, session_id: str, response_id: str) -> None:
        await self._write(session_id, "drop_events", session_id, response_id)

    async def append_outbox(self, batches: list[OutboxBatch], *, max_age_s: float) -> None:
        """Best effort and never in the backlog: during an outage the outbox stays in the
        live sessions' memory (audio would crowd the history writes out of the backlog)."""
        if self._backlog or self._down is not None:
            return
        try:
            await self._call("append_outbox", batches, max_age_s=max_age_s)
        except Exception as exc:
            if not self._transient_fault(exc):
                raise
            self._mark_down(exc)

    async def load_outbox(self, session_id: str, *, max_age_s: float) -> list[OutboxEntry]:
        return await self._read("load_outbox", session_id, max_age_s=max_age_s)

    async def revoke(self, key: str, until: float) -> None:
        """Now or not at all (StoreUnavailable): a revocation waiting in the backlog would
        go unseen by the other replicas."""
        await self._read("revoke", key, until)

    async def is_revoked(self, key: str) -> bool:
        return await self._read("is_revoked", key)

    async def close(self) -> None:
        """Write what the backlog still holds if the store answers within the timeout,
        then release the store."""
        if self._drainer is not None and not self._drainer.done():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._timeout):
                    await asyncio.shield(self._drainer)
            self._drainer.cancel()
        if self._backlog:
            log.error("closing with %d state store writes never written", len(self._backlog))
        if self._calls:
            await asyncio.wait(set(self._calls), timeout=self._timeout)
        await self.inner.close()
