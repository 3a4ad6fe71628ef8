"""glibc malloc: a fixed mmap threshold, so a server's freed memory goes back to the system.

glibc serves blocks over 128 KB with mmap and returns them to the system when freed, but
it raises that threshold to the size of the first such block freed (up to 32 MB). From
then on turn audio (32 KB a second: a few-second turn is over 128 KB), reply buffers and
decoded images come from the heap, where one long-lived small block keeps everything
below it. Measured with bench/bench_memory.py, 10 rounds of 200 sessions: RSS stepped up
by 37 MB once and stayed there (+14 % over round 1); with the threshold fixed, +3 %.

Fixing it costs an mmap and a munmap per large block: a few per turn.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

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
