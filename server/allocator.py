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
it back down to 265 MB. `trim_periodically` does that every ``malloc_trim_s``.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import time

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


async def trim_periodically(interval_s: float) -> None:
    """Every ``interval_s``, give the heap's free pages back to the system (glibc's
    ``malloc_trim``; nothing elsewhere). It runs in a worker thread: it holds the
    allocator's lock while it walks the heap (a few ms for hundreds of MB)."""
    libc = _glibc()
    if libc is None or interval_s <= 0:
        return
    while True:
        await asyncio.sleep(interval_s)
        start = time.perf_counter()
        await asyncio.to_thread(libc.malloc_trim, 0)
        log.debug("malloc_trim took %.1f ms", (time.perf_counter() - start) * 1000)
