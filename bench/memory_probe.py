"""``duplex serve`` with a memory account on SIGUSR1, for ``bench_memory --account``.

Run as ``python -m bench.memory_probe OUT.jsonl serve ...`` (the rest is ``duplex``'s
command line). Each SIGUSR1 appends one JSON line to OUT.jsonl: the server's RSS and the
bytes held by what a live VAD session keeps, found by walking the objects the garbage
collector tracks (no tracing, so the server runs at its usual speed; the walk pauses
the event loop for a few milliseconds). Python-level bytes only; resamplers (under 1 KB
each) are counted as their number.

With ``DUPLEX_PROBE_TRACE=FRAMES`` each SIGUSR2 writes a tracemalloc snapshot to
OUT.jsonl.1.trace, .2.trace, ... (``bench_memory --trace``); tracing (slower) starts at
the first, so the first snapshot holds nothing and later ones what was allocated since.
With ``DUPLEX_PROBE_TRIM=1`` each account also calls ``malloc_trim`` and records what it
gave back (``trimmed_kb``: free memory the allocator held; it lowers the RSS samples
that follow, so use it for accounting only).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
import signal
import sys
import tempfile
import time
import tracemalloc


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def heap() -> dict[str, int]:
    """Where the process's memory is, in bytes: glibc's heap (``mallinfo2``: in use,
    free in its heap, mmapped blocks) and Python's own allocator (pymalloc: blocks in
    use, and the rest of its 1 MiB arenas: free blocks, free pools, overhead)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    row = {
        "glibc_in_use": info.uordblks,
        "glibc_free": info.fordblks,
        "glibc_mmap": info.hblkhd,
    }
    # sys._debugmallocstats() writes to fd 2: read it through a temporary file.
    with tempfile.TemporaryFile("w+") as f:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        used = total = 0
        for line in f:
            if line.startswith("# bytes in allocated blocks"):
                used = int(line.split("=")[1].replace(",", ""))
            elif line.startswith("Total") and not total:
                total = int(line.split("=")[1].replace(",", ""))
    row["pymalloc_used"] = used
    row["pymalloc_free"] = total - used
    return row


def census() -> dict[str, list[int]]:
    """The objects the garbage collector tracks, by type: [count, bytes] (``getsizeof``:
    the object itself, and a dict's or deque's table, not what they refer to)."""
    out: dict[str, list[int]] = {}
    for obj in gc.get_objects():
        kind = type(obj)
        name = f"{kind.__module__}.{kind.__qualname__}"
        entry = out.setdefault(name, [0, 0])
        entry[0] += 1
        try:
            entry[1] += sys.getsizeof(obj)
        except Exception:
            pass
    return out


def account() -> dict[str, float]:
    from media.audio import StreamResampler
    from server.outbox import Outbox
    from server.providers.base import AudioClip
    from server.session import DuplexSession
    from server.state.memory import MemoryStore
    from server.ws_protocol import DuplexWebSocketProtocol
    from vad.turns import TurnDetector

    keys = ("sessions", "history", "turn_audio", "outbox", "resamplers")
    keys += ("queued", "write_buffers", "partial_frames", "stored_messages")
    row = dict.fromkeys(keys, 0)
    clips: set[int] = set()
    stores: set[object] = set()
    for obj in gc.get_objects():
        kind = type(obj)
        if isinstance(obj, DuplexWebSocketProtocol):
            # Output the kernel did not take yet, and a frame being received.
            transport = getattr(obj, "transport", None)
            if transport is not None and not transport.is_closing():
                row["write_buffers"] += transport.get_write_buffer_size()
            row["partial_frames"] += len(obj._pending)
        elif kind is TurnDetector:
            row["history"] += sum(map(len, obj._blocks)) + sum(map(len, obj._tail))
        elif kind is AudioClip and id(obj.pcm) not in clips:
            clips.add(id(obj.pcm))
            row["turn_audio"] += len(obj.pcm)
        elif kind is Outbox:
            row["outbox"] += obj.size
        elif kind is StreamResampler:
            row["resamplers"] += 1
        elif isinstance(obj, DuplexSession) and not obj.closed:
            if not row["sessions"]:  # the app's store, frozen with the start-up heap
                stores.add(obj.services.store)
            row["sessions"] += 1
            row["queued"] += obj._out.qsize()  # messages waiting in the output queue
    for store in stores:
        while not isinstance(store, MemoryStore) and hasattr(store, "_store"):
            store = store._store  # the metrics' timing wrapper
        if isinstance(store, MemoryStore):
            row["stored_messages"] += sum(len(e.messages) for e in store._entries.values())
    rss = _rss_kb()
    row.update(heap())
    if os.environ.get("DUPLEX_PROBE_CENSUS"):
        row["census"] = census()
    if tracemalloc.is_tracing():
        row["traced"] = tracemalloc.get_traced_memory()[0]
    if os.environ.get("DUPLEX_PROBE_TRIM"):
        # What the allocator holds free in its heap: what malloc_trim gives back now
        # (it perturbs the RSS samples that follow: for accounting runs only).
        start = time.perf_counter()
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
        row["trim_ms"] = (time.perf_counter() - start) * 1000  # the allocator lock held
        row["trimmed_kb"] = rss - _rss_kb()
    return {"at": time.time(), "rss_kb": rss, **row}


def main() -> int:
    out = sys.argv[1]

    def dump(*_: object) -> None:
        with open(out, "a") as f:
            f.write(json.dumps(account()) + "\n")

    signal.signal(signal.SIGUSR1, dump)
    frames = int(os.environ.get("DUPLEX_PROBE_TRACE", "0"))
    if frames:
        # tracemalloc (slows the server down): SIGUSR2 writes a snapshot to OUT.N.trace.
        # Tracing starts at the first one (the server with no session): start-up runs at
        # full speed, and what is traced is what came after.
        taken = [0]

        def snapshot(*_: object) -> None:
            if not tracemalloc.is_tracing():
                tracemalloc.start(frames)
            taken[0] += 1
            tracemalloc.take_snapshot().dump(f"{out}.{taken[0]}.trace")

        signal.signal(signal.SIGUSR2, snapshot)
    from server.cli import main as duplex_main

    return duplex_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
