"""A FIFO for asyncio with `asyncio.Queue`'s waiting rules and a fraction of its memory.

`asyncio.Queue` makes three deques and an `asyncio.Event` (a fourth deque) when it is
created: ~2.5 KB, each deque's first block sized for 64 items, kept for the queue's life.
A connection has two queues (its output and uvicorn's received events) that are empty
nearly all the time; 100 live sessions held ~0.6 MB in them. `Fifo` keeps its items and
waiters in plain lists (56 bytes each when empty): ~0.3 KB in all. Its operations are
`asyncio.Queue`'s (``put``, ``get``, their ``_nowait`` forms, ``qsize``, ``empty``,
``full``, ``maxsize``), with the same wake-up order and cancellation handling; there is
no ``task_done``/``join`` (nothing here uses them).

Taking from the front of a list moves the rest (`list.pop(0)`): fine for queues that hold
a few items, as these do (the session's output queue is bounded, 256 by default).
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

T = TypeVar("T")


class Fifo(Generic[T]):
    __slots__ = ("_getters", "_items", "_putters", "maxsize")

    def __init__(self, maxsize: int = 0) -> None:
        self.maxsize = maxsize  # 0: unbounded
        self._items: list[T] = []
        self._getters: list[asyncio.Future[None]] = []
        self._putters: list[asyncio.Future[None]] = []

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        return 0 < self.maxsize <= len(self._items)

    def put_nowait(self, item: T) -> None:
        if self.full():
            raise asyncio.QueueFull
        self._items.append(item)
        _wake_next(self._getters)

    def get_nowait(self) -> T:
        if not self._items:
            raise asyncio.QueueEmpty
        item = self._items.pop(0)
        _wake_next(self._putters)
        return item

    async def put(self, item: T) -> None:
        """Put ``item``, waiting while the FIFO is full."""
        while self.full():
            putter = asyncio.get_running_loop().create_future()
            self._putters.append(putter)
            try:
                await putter
            except BaseException:
                putter.cancel()  # in case it was woken, then cancelled
                _discard(self._putters, putter)
                if not self.full() and not putter.cancelled():
                    _wake_next(self._putters)  # its wake-up goes to the next in line
                raise
        self.put_nowait(item)

    async def get(self) -> T:
        """The oldest item, waiting for one while the FIFO is empty."""
        while not self._items:
            getter = asyncio.get_running_loop().create_future()
            self._getters.append(getter)
            try:
                await getter
            except BaseException:
                getter.cancel()
                _discard(self._getters, getter)
                if self._items and not getter.cancelled():
                    _wake_next(self._getters)
                raise
        return self.get_nowait()


def _wake_next(waiters: list[asyncio.Future[None]]) -> None:
    while waiters:
        waiter = waiters.pop(0)
        if not waiter.done():
            waiter.set_result(None)
            return


def _discard(waiters: list[asyncio.Future[None]], waiter: asyncio.Future[None]) -> None:
    try:
        waiters.remove(waiter)
    except ValueError:
        pass
