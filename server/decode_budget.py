"""Decoded pixels in flight across the server: a weighted semaphore, first come first served.

A 40 Mpx PNG of 140 kB decodes to 120-320 MB; eight of them at once took a server from
282 MB to 1.1 GB. Each image decode holds the budget for its header's pixel count, so
the pixels decoded at any moment stay within ``max_decode_pixels``; small images pass
alongside a large one while there is room, and nothing overtakes a waiting decode
(a large image is never starved by a stream of small ones).
"""

from __future__ import annotations

import asyncio
from collections import deque


class PixelBudget:
    """One per app (in `SessionServices`); used from the app's event loop only."""

    def __init__(self, pixels: int) -> None:
        if pixels < 1:
            raise ValueError("the pixel budget must be positive")
        self.capacity = pixels
        self._free = pixels
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def in_use(self) -> int:
        return self.capacity - self._free

    async def acquire(self, pixels: int) -> int:
        """Take ``pixels`` (at most the whole budget), waiting while they are not free;
        returns what was taken, for `release`. Cancelling the wait gives up its place."""
        pixels = max(0, min(pixels, self.capacity))
        if not self._waiters and self._free >= pixels:
            self._free -= pixels
            return pixels
        waiter = asyncio.get_running_loop().create_future()
        entry = (pixels, waiter)
        self._waiters.append(entry)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release(pixels)  # granted just as the wait was cancelled
            else:
                self._waiters.remove(entry)
                self._wake()  # the waiters behind it may fit now
            raise
        return pixels

    def release(self, pixels: int) -> None:
        self._free += pixels
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._waiters[0][0] <= self._free:
            pixels, waiter = self._waiters.popleft()
            self._free -= pixels
            waiter.set_result(None)
