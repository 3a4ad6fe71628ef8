"""glibc malloc: a fixed mmap threshold, so a server's freed memory goes back to the system.

glibc serves blocks over 128 KB with mmap and returns them to the system when freed, but
it raises that threshold to the size of the first such block freed (up to 32 MB). From
then on turn audio (32 KB a second: a few-second turn is over 128 KB), reply buffers and
decoded images come from the heap, where one long-lived small block keeps everything
below it. Measured with bench/bench_memory.py, 10 rounds of 200 sessions: RSS stepped up
by 37 MB once and stayed there (+14 % over round 1); with the threshold fixed, +3 %.

Fixing it costs an mmap and a munmap per large block: a few per turn.

Smaller blocks stay in the heap, and freed ones there go back to the system only from its
top. The outbox (server/outbox.py) holds a minute of sent messages, ~6 KB each with reply
audio; when sessions that heard replies end, hundreds of MB of such blocks are freed in
the middle of the heap and stay resident: measured after 3 rounds of 200 echo sessions
and the resume windows, RSS stayed at 463 MB with every outbox freed; `malloc_trim` gave
it back down to 265 MB. `HeapTrimmer` does that every ``malloc_trim_s`` and soon after sessions end.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import logging
import os
import time
from collections.abc import Callable

_M_MMAP_THRESHOLD = -3  # mallopt parameter, from glibc's malloc.h
DEFAULT_THRESHOLD = 128 * 1024  # glibc's initial value

log = logging.getLogger(__name__)


def fix_mmap_threshold(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Pin glibc's mmap threshold (which turns its dynamic adjustment off). False, and
    nothing done, off glibc or when ``MALLOC_MMAP_THRESHOLD_`` already chose one."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has no dynamic threshold)
    except (OSError, AttributeError, TypeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, threshold))
    if not ok:
        log.warning("mallopt(M_MMAP_THRESHOLD) failed; freed memory may not return")
    return ok


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.gnu_get_libc_version  # noqa: B018 - glibc only
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError, TypeError):
        return None
    return libc


class HeapTrimmer:
    """Gives the heap's free pages back to the system (glibc's ``malloc_trim``; nothing
    elsewhere): every ``interval_s``, and ``after_close_s`` after sessions stop ending, so
    what a closed session held is returned within seconds, not at the next period.

    A trim runs in a worker thread: it holds the allocator's lock while it walks the heap
    (up to ~11 ms at 100 live sessions, measured), so trims are at least ``min_gap_s``
    apart however many sessions end, and a burst of closes gets one trim when it is over
    (at most ``max_wait_s`` after its first close)."""

    def __init__(
        self,
        interval_s: float,
        after_close_s: float = 1.0,
        *,
        min_gap_s: float = 5.0,
        max_wait_s: float = 10.0,
    ) -> None:
        self.interval_s = interval_s
        self.after_close_s = after_close_s
        self.min_gap_s = min_gap_s
        self.max_wait_s = max_wait_s
        self._ended = asyncio.Event()

    def session_ended(self) -> None:
        """A session's memory was let go (call on the event loop's thread)."""
        if self.after_close_s > 0:
            self._ended.set()

    async def run(self, trim: Callable[[], object] | None = None) -> None:
        """Trim until cancelled; ``trim`` defaults to glibc's (none off glibc: returns)."""
        if trim is None:
            libc = _glibc()
            if libc is None:
                return
            trim = functools.partial(libc.malloc_trim, 0)
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            periodic = self.interval_s > 0
            wait = last + self.interval_s - loop.time() if periodic else None
            if not await _event(self._ended, None if wait is None else max(0.0, wait)):
                if periodic:
                    await self._trim(trim)
                    last = loop.time()
                continue
            first = loop.time()  # a burst of closes: trim once it is quiet
            while True:
                self._ended.clear()
                left = first + self.max_wait_s - loop.time()
                if left <= 0 or not await _event(self._ended, min(self.after_close_s, left)):
                    break
            gap = last + self.min_gap_s - loop.time()
            if gap > 0:
                await asyncio.sleep(gap)
            self._ended.clear()
            await self._trim(trim)
            last = loop.time()

    async def _trim(self, trim: Callable[[], object]) -> None:
        start = time.perf_counter()
        await asyncio.to_thread(trim)
        log.debug("malloc_trim took %.1f ms", (time.perf_counter() - start) * 1000)


async def _event(event: asyncio.Event, timeout: float | None) -> bool:
    """True once ``event`` is set, False after ``timeout`` seconds (None: no limit)."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True
