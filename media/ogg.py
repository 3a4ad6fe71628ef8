"""Ogg (RFC 3533) page demuxing for one Opus logical stream (RFC 7845), fed in arbitrary chunks."""

from __future__ import annotations

import zlib

from media.errors import MediaError
from media.opus import MAX_PACKET, OpusEvent

# CRC-32 with polynomial 0x04C11DB7, MSB-first, init 0, no final xor, over the page with
# its CRC field zeroed. zlib.crc32 is the bit-reflected variant, so feed it bit-reversed
# bytes (init/xor cancelled) and bit-reverse the result: C speed.
_BITREV8 = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def ogg_crc(page: bytes) -> int:
    data = (page[:22] + b"\0\0\0\0" + page[26:]).translate(_BITREV8)
    reflected = zlib.crc32(data, 0xFFFFFFFF) ^ 0xFFFFFFFF
    return int(f"{reflected:032b}"[::-1], 2)


class OggOpusDemuxer:
    """Incremental Ogg parser for one Opus logical stream, reporting OpusEvents.

    Bytes accumulate until a whole page is present (<= 65,307 bytes), then the page is
    CRC-checked: corrupt or truncated data is detected page by page, and resync scans
    for the next "OggS" whose page checks out. A new BOS page carrying an OpusHead
    starts a new stream (chained Ogg, or a client restarting its recorder).
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._serial: int | None = None
        self._seq = -1
        self._packet_no = 0
        self._partial: bytearray | None = None
        self._synced = True
        self._resynced = False
        self._complained_no_head = False

    def feed(self, data: bytes, out: list[OpusEvent]) -> None:
        buf = self._buf
        buf += data
        pos = 0
        while len(buf) - pos >= 27:
            if buf[pos : pos + 4] != b"OggS" or buf[pos + 4] != 0:
                if self._synced:
                    self._error(out, 415, "corrupt Ogg data: lost page sync, resyncing")
                    self._synced, self._resynced = False, True
                nxt = buf.find(b"OggS", pos + 1)
                if nxt < 0:
                    pos = len(buf) - 3
                    break
                pos = nxt
                continue
            header_len = 27 + buf[pos + 26]
            if len(buf) - pos < header_len:
                break
            total = header_len + sum(buf[pos + 27 : pos + header_len])
            if len(buf) - pos < total:
                break
            page = bytes(buf[pos : pos + total])
            if ogg_crc(page) != int.from_bytes(page[22:26], "little"):
                if self._synced:
                    self._error(out, 415, "corrupt Ogg page (CRC mismatch), resyncing")
                    self._synced, self._resynced = False, True
                pos += 1
                continue
            self._synced = True
            pos += total
            self._page(page, out)
        del buf[:pos]

    def _page(self, page: bytes, out: list[OpusEvent]) -> None:
        flags = page[5]
        granule = int.from_bytes(page[6:14], "little", signed=True)
        serial = int.from_bytes(page[14:18], "little")
        seq = int.from_bytes(page[18:22], "little")
        lacing = page[27 : 27 + page[26]]
        body = page[27 + page[26] :]
        if not lacing:
            return
        if flags & 0x02:  # BOS: a new logical stream
            if not body.startswith(b"OpusHead"):
                return  # some other codec's stream; not ours
            self._serial, self._seq, self._packet_no, self._partial = serial, seq - 1, 0, None
        if serial != self._serial:
            if self._serial is None and not self._complained_no_head:
                self._error(out, 415, "Ogg stream has no Opus header (OpusHead) page")
                self._complained_no_head = True
            return
        continued = bool(flags & 0x01)
        if seq != self._seq + 1:
            if not self._resynced:  # a resync was already reported for this gap
                self._error(out, 415, f"{seq - self._seq - 1} Ogg page(s) missing")
            self._partial = None
        self._resynced = False
        self._seq = seq
        if self._partial is not None and not continued:
            self._partial = None  # the previous page promised a continuation that never came
        skip_first = continued and self._partial is None
        packet = self._partial if self._partial is not None else bytearray()
        completed = False
        pos = 0
        for lv in lacing:
            packet += body[pos : pos + lv]
            pos += lv
            if lv == 255:
                continue
            if skip_first:
                skip_first = False
            else:
                self._emit(bytes(packet), out)
                completed = True
            packet = bytearray()
        self._partial = packet if (lacing and lacing[-1] == 255 and not skip_first) else None
        if self._partial is not None and len(self._partial) > MAX_PACKET:
            self._error(out, 413, f"Ogg packet exceeds {MAX_PACKET} bytes; dropped")
            self._partial = None
        if completed and granule != -1 and self._packet_no > 2:
            out.append(("granule", granule, bool(flags & 0x04)))

    def _emit(self, packet: bytes, out: list[OpusEvent]) -> None:
        n, self._packet_no = self._packet_no, self._packet_no + 1
        if n == 0:
            out.append(("head", packet))
        elif n >= 2:  # n == 1 is OpusTags
            out.append(("packet", packet, 0))

    @staticmethod
    def _error(out: list[OpusEvent], code: int, message: str) -> None:
        out.append(("error", MediaError(code, message)))
