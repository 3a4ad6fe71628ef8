"""The lifecycle every realtime provider session shares: one chassis, two providers.

A realtime session reads one upstream connection in a supervised task, maps
what it reads to protocol events, and puts them on a bounded queue that
``events()`` drains; when the connection ends it reconnects under one jittered
policy with a budget, then reports one typed ``ProviderReconnect``. ``close()`` is
idempotent and leaves no task behind. A provider keeps only its handshake, its
encoding of input and its mapping of output (the hooks below).
"""

from __future__ import annotations

import asyncio
import random
from abc import abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass

from duplex.protocol import PROVIDER_FAILED, ErrorEvent, Message, ProviderReconnect
from server.logs import SessionLog
from server.providers.base import ProviderError, RealtimeEvent, RealtimeSession

_END = None  # queue sentinel: the event stream is over

#: How much of the stored conversation a new upstream session is re-seeded with.
RESEED_MAX_ITEMS = 64
RESEED_MAX_CHARS = 32_000


def reseed_turns(
    history: list[Message], max_items: int = RESEED_MAX_ITEMS, max_chars: int = RESEED_MAX_CHARS
) -> list[Message]:
    """The newest text turns of ``history`` (user and assistant, oldest first) that fit
    the bounds: what a provider gives a new upstream session so the model keeps context."""
    turns: list[Message] = []
    chars = 0
    for message in reversed(history):
        if message.role not in ("user", "assistant") or not message.content:
            continue
        if len(turns) >= max_items or chars + len(message.content) > max_chars:
            break
        chars += len(message.content)
        turns.append(message)
    turns.reverse()
    return turns


@dataclass(frozen=True, slots=True)
class ReconnectPolicy:
    """Bounded exponential backoff, jittered so that many sessions do not stampede.

    ``max_attempts`` is also the budget of attempts in a row without a single
    message read in between: a connection that opens and drops at once does not
    reset it, so a flapping upstream ends the session instead of looping.
    """

    max_attempts: int = 3
    base_delay: float = 0.5
    max_delay: float = 5.0

    def delay(self, attempt: int) -> float:
        """Delay before ``attempt`` (1-based): half to all of the exponential ceiling."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return ceiling * (0.5 + random.random() / 2)


@dataclass(frozen=True, slots=True)
class LinkEnded:
    """Why a connection ended, and whether reconnecting may help."""

    reason: str
    retryable: bool = True
    immediate: bool = False  # reconnect without waiting (goAway, a reopen we asked for)
    code: int | None = None
    upstream_code: str | None = None


class RealtimeLink(RealtimeSession):
    """Base of the realtime provider sessions; ``events()`` has a single consumer."""

    #: How the provider is named in messages ("OpenAI Realtime", "Gemini Live").
    label = "realtime provider"

    def __init__(
        self, log: SessionLog, *, policy: ReconnectPolicy, queue_size: int, task_name: str
    ) -> None:
        self._log = log
        self._policy = policy
        self._queue: asyncio.Queue[RealtimeEvent | None] = asyncio.Queue(queue_size)
        self._task_name = task_name
        self._reader: asyncio.Task[None] | None = None
        self._closing = False
        self._ended = False  # nothing more goes in
        self._end_queued = False
        self._failure: str | None = None
        self._streak = 0  # reconnect attempts since a message was last read

    # -- what a provider implements ---------------------------------------------------

    @abstractmethod
    async def _read(self) -> LinkEnded:
        """Read the current connection until it ends (call ``_alive()`` per message)."""

    @abstractmethod
    async def _reopen(self, attempt: int) -> bool:
        """Open a new connection and restore what it needs; True if the model kept its
        context. ProviderError (``fatal``: no point retrying) on failure."""

    @abstractmethod
    async def _close_connection(self) -> None:
        """Close the current connection, if any (bounded)."""

    async def _lost(self, ended: LinkEnded) -> str | None:
        """The connection ended: end the reply it cut (``chunk.interrupted`` and
        ``response.done("interrupted")``: it will never finish); returns its id."""
        return None

    def _failed(self) -> None:
        """The session is over for good: wake whatever waits for a connection."""

    # -- lifecycle ---------------------------------------------------------------------

    def _start_reader(self) -> None:
        self._reader = asyncio.create_task(self._supervise(), name=self._task_name)

    async def close(self) -> None:
        """Stop the reader, close the connection, end ``events()``; idempotent."""
        if self._closing:
            return
        self._closing = True
        self._failed()
        reader, self._reader = self._reader, None
        if reader is not None and not reader.done():
            reader.cancel()
            try:
                await reader
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
        await self._close_connection()
        self._end_now()

    async def events(self) -> AsyncIterator[RealtimeEvent]:
        while True:
            item = await self._queue.get()
            if item is _END:
                self._queue.put_nowait(_END)  # a later reader ends too
                return
            yield item

    def _alive(self) -> None:
        """A message came in: the connection works, the reconnect budget is whole again."""
        self._streak = 0

    def _check_usable(self) -> None:
        if self._closing:
            raise ProviderError(f"{self.label} session is closed", fatal=True)
        if self._failure is not None:
            raise ProviderError(self._failure, code=PROVIDER_FAILED, fatal=True)

    async def _supervise(self) -> None:
        """Read; when a connection ends, reconnect or give up. Always ends the stream."""
        try:
            while True:
                ended = await self._read()
                if self._closing:
                    return
                cut = await self._lost(ended)
                if not ended.retryable:
                    await self._fail(ended.reason)
                    return
                self._log.info("%s; reconnecting", ended.reason)
                if not await self._reconnect(ended, cut):
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must end the session visibly, not hang it
            self._log.exception("%s session failed", self.label)
            await self._fail(f"internal error in the {self.label} provider: {exc!r}")
        finally:
            if not self._closing:
                await self._close_connection()
                await self._end()

    async def _reconnect(self, ended: LinkEnded, cut: str | None) -> bool:
        policy = self._policy
        last: ProviderError | None = None
        attempts = 0
        for attempt in range(1, policy.max_attempts + 1):
            if self._streak >= policy.max_attempts:
                break
            self._streak += 1
            attempts = attempt
            if not (ended.immediate and attempt == 1):
                delay = policy.delay(attempt)
                self._log.info(
                    "reconnecting in %.2fs (attempt %d/%d)", delay, attempt, policy.max_attempts
                )
                await asyncio.sleep(delay)
            try:
                kept = await self._reopen(attempt)
            except ProviderError as exc:
                last = exc
                self._log.warning("reconnect attempt %d failed: %s", attempt, exc.message)
                if exc.fatal:
                    break
                continue
            self._log.info("reconnected after %d attempt(s); context kept: %s", attempt, kept)
            await self._emit(
                ProviderReconnect(
                    response_id=cut, attempt=attempt, reason=ended.reason, context_kept=kept
                )
            )
            return True
        detail = last.message if last is not None else ended.reason
        await self._fail(
            f"{self.label} connection lost; gave up after {attempts} attempt(s): {detail}"
        )
        return False

    async def _fail(self, message: str) -> None:
        """End the session for good: a fatal error event, then the end of the stream."""
        if self._failure is not None:
            return
        self._failure = message
        self._log.error("%s", message)
        self._failed()
        await self._emit(ErrorEvent(code=PROVIDER_FAILED, message=message, fatal=True))

    # -- the event queue ---------------------------------------------------------------

    async def _emit(self, event: RealtimeEvent) -> None:
        """Queue one event; waits while the consumer is behind (the queue is bounded)."""
        if not self._ended:
            await self._queue.put(event)

    async def _end(self) -> None:
        self._ended = True
        if not self._end_queued:
            await self._queue.put(_END)
            self._end_queued = True

    def _end_now(self) -> None:
        """Queue the end marker without waiting (after close, pending events are moot)."""
        self._ended = True
        if self._end_queued:
            return
        while self._queue.full():
            self._queue.get_nowait()
        self._queue.put_nowait(_END)
        self._end_queued = True
