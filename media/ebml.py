"""EBML / Matroska reading shared by the WebM audio and video demuxers (RFC 8794, RFC 9559).

Element IDs, variable-size integers, element headers, the children of a buffered master
element, (Simple)Block headers and lacing, and :class:`EbmlWalker`, the incremental walk
over a live, growing stream that both demuxers in ``media.webm`` are built on.
``av.open()`` cannot do this part: it reads a whole file-like object, probing and seeking.
"""

from __future__ import annotations

from collections.abc import Iterator

from media.bytequeue import ByteQueue
from media.errors import Corrupt

# Element IDs (RFC 9559), marker bits kept as they stand in the byte stream.
# fmt: off
EBML, DOC_TYPE = 0x1A45DFA3, 0x4282
SEGMENT, SEEK_HEAD, INFO, TRACKS = 0x18538067, 0x114D9B74, 0x1549A966, 0x1654AE6B
CLUSTER = 0x1F43B675
CUES, CHAPTERS, TAGS, ATTACHMENTS = 0x1C53BB6B, 0x1043A770, 0x1254C367, 0x1941A469
VOID, CRC32 = 0xEC, 0xBF
TIMESTAMP_SCALE = 0x2AD7B1  # in Info
TRACK_ENTRY, VIDEO = 0xAE, 0xE0  # in Tracks, TrackEntry
TRACK_NUMBER, TRACK_TYPE, CODEC_ID, CODEC_PRIVATE = 0xD7, 0x83, 0x86, 0x63A2  # in TrackEntry
TIMESTAMP, SILENT_TRACKS, POSITION, PREV_SIZE = 0xE7, 0x5854, 0xA7, 0xAB  # in Cluster
SIMPLE_BLOCK, BLOCK_GROUP, ENCRYPTED_BLOCK = 0xA3, 0xA0, 0xAF  # in Cluster
BLOCK, DISCARD_PADDING = 0xA1, 0x75A2  # in BlockGroup

TOP_LEVEL = frozenset({EBML, SEGMENT, SEEK_HEAD, INFO, TRACKS, CLUSTER, CUES, CHAPTERS, TAGS,
                       ATTACHMENTS, VOID, CRC32})
CLUSTER_CHILDREN = frozenset({TIMESTAMP, SILENT_TRACKS, POSITION, PREV_SIZE, SIMPLE_BLOCK,
                              BLOCK_GROUP, ENCRYPTED_BLOCK, VOID, CRC32})
# Block, BlockVirtual, BlockAdditions, BlockDuration, ReferencePriority, ReferenceBlock,
# ReferenceVirtual, CodecState, DiscardPadding, Slices, ReferenceFrame
BLOCK_GROUP_CHILDREN = frozenset({BLOCK, 0xA2, 0x75A1, 0x9B, 0xFA, 0xFB, 0xFD, 0xA4,
                                  DISCARD_PADDING, 0x8E, 0xC8, VOID, CRC32})
# fmt: on
EBML_MAGIC = EBML.to_bytes(4, "big")
CLUSTER_MAGIC = CLUSTER.to_bytes(4, "big")
UNKNOWN_SIZE = -1  # a master element's size with all value bits set (live recordings)


# --------------------------------------------------------------------------- numbers


def read_id(data: bytes | bytearray, pos: int = 0) -> tuple[int, int] | None:
    """Element ID at ``pos`` as written (marker bits kept) -> (id, length); None if incomplete."""
    if pos >= len(data):
        return None
    first = data[pos]
    length = 9 - first.bit_length()
    if first == 0 or length > 4:
        raise Corrupt(f"invalid EBML ID byte 0x{first:02x}")
    if pos + length > len(data):
        return None
    return int.from_bytes(data[pos : pos + length], "big"), length


def read_vint(data: bytes | bytearray, pos: int = 0) -> tuple[int, int] | None:
    """Unsigned variable-size integer (size, track number, lace size) -> (value, length)."""
    if pos >= len(data):
        return None
    first = data[pos]
    if first == 0:
        raise Corrupt("invalid EBML size byte 0x00")
    end = pos + 9 - first.bit_length()
    if end > len(data):
        return None
    return int.from_bytes(data[pos:end], "big") & ((1 << (7 * (end - pos))) - 1), end - pos


def read_size(data: bytes | bytearray, pos: int = 0) -> tuple[int, int] | None:
    """Element data size -> (size, length), ``UNKNOWN_SIZE`` if all value bits are set."""
    vint = read_vint(data, pos)
    if vint is None:
        return None
    size, length = vint
    return (UNKNOWN_SIZE if size == (1 << (7 * length)) - 1 else size), length


def read_header(data: bytes | bytearray, pos: int = 0) -> tuple[int, int, int] | None:
    """Element header at ``pos`` -> (id, size, header length); None if incomplete.

    :func:`read_id` then :func:`read_size`, inlined: this runs for every element.
    """
    n = len(data)
    if pos >= n:
        return None
    first = data[pos]
    at = pos + 9 - first.bit_length()
    if first == 0 or at - pos > 4:
        raise Corrupt(f"invalid EBML ID byte 0x{first:02x}")
    if at >= n:
        return None
    first = data[at]
    length = 9 - first.bit_length()
    if first == 0:
        raise Corrupt(f"invalid EBML size byte 0x{first:02x}")
    end = at + length
    if end > n:
        return None
    mask = (1 << (7 * length)) - 1
    size = int.from_bytes(data[at:end], "big") & mask
    return int.from_bytes(data[pos:at], "big"), UNKNOWN_SIZE if size == mask else size, end - pos


def uint(payload: bytes) -> int:
    return int.from_bytes(payload[:8], "big")


def string(payload: bytes) -> str:
    return payload.rstrip(b"\0").decode("ascii", "replace")


# --------------------------------------------------------------------------- buffered elements


def children(body: bytes) -> Iterator[tuple[int, bytes]]:
    """(id, payload) of each child of a fully buffered master element."""
    pos = 0
    while pos < len(body):
        eid = read_id(body, pos)
        if eid is None:
            raise Corrupt("truncated child element")
        size = read_size(body, pos + eid[1])
        if size is None or size[0] < 0:
            raise Corrupt("truncated or unknown-size child element")
        start = pos + eid[1] + size[1]
        if start + size[0] > len(body):
            raise Corrupt("child element overruns its parent")
        yield eid[0], body[start : start + size[0]]
        pos = start + size[0]


def doc_type(header: bytes) -> bytes:
    """The DocType of an EBML header's payload (``webm``, ``matroska``); b"" if absent."""
    return dict(children(header)).get(DOC_TYPE, b"").rstrip(b"\0")


def block_header(body: bytes) -> tuple[int, int, int, int]:
    """A (Simple)Block's (track number, relative timestamp, flags, payload offset)."""
    track = read_vint(body)
    if track is None or len(body) < track[1] + 3:
        raise Corrupt("block too short")
    at = track[1]
    return track[0], int.from_bytes(body[at : at + 2], "big", signed=True), body[at + 2], at + 3


def unlace(body: bytes, pos: int, flags: int) -> list[bytes]:
    """The frames of a block whose payload starts at ``pos``, per the lacing in ``flags``."""
    lacing = (flags >> 1) & 0x03
    if lacing == 0:
        return [body[pos:]]
    count = body[pos] + 1
    pos += 1
    sizes: list[int] = []
    if lacing == 1:  # Xiph lacing
        for _ in range(count - 1):
            size = 0
            while body[pos] == 255:
                size += 255
                pos += 1
            size += body[pos]
            pos += 1
            sizes.append(size)
    elif lacing == 3:  # EBML lacing: first size, then signed differences
        first = read_vint(body, pos)
        if first is None:
            raise Corrupt("truncated EBML lacing")
        sizes.append(first[0])
        pos += first[1]
        for _ in range(count - 2):
            diff = read_vint(body, pos)
            if diff is None:
                raise Corrupt("truncated EBML lacing")
            sizes.append(sizes[-1] + diff[0] - ((1 << (7 * diff[1] - 1)) - 1))
            pos += diff[1]
    else:  # fixed-size lacing
        if (len(body) - pos) % count:
            raise Corrupt("fixed lacing does not divide the block")
        sizes = [(len(body) - pos) // count] * (count - 1)
    sizes.append(len(body) - pos - sum(sizes))
    if min(sizes) < 0:
        raise Corrupt("lace sizes overrun the block")
    frames = []
    for size in sizes:
        frames.append(body[pos : pos + size])
        pos += size
    return frames


# --------------------------------------------------------------------------- the live walk


class EbmlWalker:
    """Walks a live, growing EBML stream element by element, buffering at most one.

    A demuxer says what each element is for in :meth:`_element`: walked into (its
    children follow, so the size of a Segment or Cluster, unknown in a live recording,
    never matters), skipped by size as it streams past (set ``_skip``), or buffered
    whole and read. The walker does the rest: element headers, skipping, and after
    corruption (:meth:`_desync`, or ``Corrupt`` raised from :meth:`_element`) the
    rescan for the next Cluster or EBML header (:meth:`_find_sync`).
    """

    def __init__(self, max_marked: int = 16 * 1024 * 1024) -> None:
        self._buf = ByteQueue(max_marked)
        self._skip = 0  # bytes of the current element still to pass over
        self._resync = False

    def reset(self) -> None:
        """Data was lost: drop what is buffered and resume at the next sync point."""
        self._buf.clear()
        self._skip = 0
        self._resync = True

    def _walk(self, out: list) -> None:
        """Consume the buffered bytes until more are needed."""
        buf = self._buf
        while True:
            if self._skip:
                self._skip -= buf.skip(self._skip)
                if self._skip:
                    return
            elif self._resync:
                if not self._find_sync():
                    return
                self._resync = False
            else:
                try:
                    header = read_header(buf.peek(12))
                    if header is None or not self._element(out, header[0], header[1], header[2]):
                        return
                except Corrupt as exc:
                    self._desync(out, str(exc), exc.code)

    def _element(self, out: list, eid: int, size: int, header: int) -> bool:
        """Handle the element starting here; False if it needs more bytes first."""
        raise NotImplementedError

    def _desync(self, out: list, reason: str, code: int = 415) -> bool:
        """Lost sync: rescan from the byte after the mark (or after here). Subclasses report."""
        self._buf.rewind()  # a block's bad size may have swallowed the next cluster
        self._buf.skip(1)
        self._skip = 0
        self._resync = True
        return True

    def _find_sync(self) -> bool:
        """Skip to the next sync point; False (at the candidate) while more bytes are needed."""
        buf = self._buf
        while True:
            hits = [at for at in self._sync_candidates() if at >= 0]
            if not hits:
                buf.skip(max(0, len(buf) - 3))
                return False
            buf.skip(min(hits))
            verdict = self._sync_verdict()
            if verdict is None:
                return False
            if verdict:
                return True
            buf.skip(1)

    def _sync_candidates(self) -> list[int]:
        return [self._buf.find(CLUSTER_MAGIC), self._buf.find(EBML_MAGIC)]

    def _sync_verdict(self) -> bool | None:
        """An EBML header, or a Cluster whose size parses and whose first child is its
        Timestamp or a CRC-32, is a sync point; None if that cannot be told yet."""
        head = self._buf.peek(13)
        if head.startswith(EBML_MAGIC):
            return True
        try:
            size = read_size(head, 4)
        except Corrupt:
            return False
        if size is None or len(head) <= 4 + size[1]:
            return None
        return head[4 + size[1]] in (TIMESTAMP, CRC32)
