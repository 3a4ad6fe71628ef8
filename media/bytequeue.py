"""The growing byte buffer that the incremental demuxers (WebM, fragmented MP4) read."""

from __future__ import annotations


class ByteQueue:
    """A growing byte buffer read from the front; tracks the stream offset consumed.

    A mark keeps the bytes from one unit start (a frame, at most) so that a
    parser that finds itself out of sync can rescan from there rather than
    from the point where it noticed, which may lie past the next sync point.
    """

    def __init__(self, max_marked: int = 16 * 1024 * 1024) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._mark: int | None = None
        self._max_marked = max_marked
        self.consumed = 0

    def extend(self, data: bytes) -> None:
        if self._mark is not None and self._pos - self._mark > self._max_marked:
            self._mark = None
        keep = self._pos if self._mark is None else min(self._pos, self._mark)
        if keep > 65536 and keep * 2 > len(self._buf):
            del self._buf[:keep]
            self._pos -= keep
            if self._mark is not None:
                self._mark -= keep
        self._buf += data

    def mark(self, on: bool = True) -> None:
        self._mark = self._pos if on else None

    def rewind(self) -> bool:
        """Back to the mark, if any (then dropped)."""
        if self._mark is None:
            return False
        self.consumed -= self._pos - self._mark
        self._pos, self._mark = self._mark, None
        return True

    def __len__(self) -> int:
        return len(self._buf) - self._pos

    def peek(self, n: int, at: int = 0) -> bytearray:
        """A copy of up to ``n`` bytes from ``at`` bytes ahead, to parse (``take`` to keep)."""
        start = self._pos + at
        return self._buf[start : start + n]

    def take(self, n: int) -> bytes:
        data = bytes(self._buf[self._pos : self._pos + n])
        self.skip(n)
        return data

    def skip(self, n: int) -> int:
        n = min(n, len(self))
        self._pos += n
        self.consumed += n
        return n

    def find(self, pattern: bytes, at: int = 0) -> int:
        """Offset of ``pattern`` from the front, searching from ``at``; -1 if absent."""
        found = self._buf.find(pattern, self._pos + at)
        return -1 if found < 0 else found - self._pos

    def clear(self) -> None:
        self.consumed += len(self)
        self._buf.clear()
        self._pos = 0
        self._mark = None
