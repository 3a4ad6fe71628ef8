"""Audio ingest and codecs: client audio in any accepted input format becomes fixed VAD frames.

Plain library code (numpy arrays and bytes in, values out; no asyncio). Errors are
:class:`media.errors.MediaError` with wire codes: 400 malformed or inconsistent with the
declared format, 413 too large, 415 unsupported or undecodable.

Pipeline: ``make_decoder`` (Opus in WebM/Ogg, G.711) -> int16 PCM -> ``PcmFramer``
(``StreamResampler`` over libswresample, then fixed-size frames at the VAD rate).
"""

from __future__ import annotations

import io
import math
import wave
import zlib
from fractions import Fraction
from typing import Protocol

import av
import numpy as np
from av.error import BlockingIOError as _AvAgain
from av.error import EOFError as _AvEOF
from av.error import FFmpegError
from av.filter import Graph

from media.errors import MediaError

SUPPORTED_RATES: tuple[int, ...] = (8000, 16000, 24000, 32000, 44100, 48000)
SUPPORTED_CHANNELS: tuple[int, ...] = (1, 2)
FRAME_MS_CHOICES: tuple[int, ...] = (10, 20, 30)
INPUT_FORMATS: tuple[str, ...] = ("pcm16", "opus", "mulaw", "alaw")
OPUS_RATE = 48000
# Floor for audio_level_dbfs: silence would be -inf, which JSON cannot carry.
MIN_DBFS = -120.0

_LAYOUTS = {1: "mono", 2: "stereo"}


def check_pcm_format(sample_rate: int, channels: int) -> None:
    """Reject declared input rates/channels outside the wire protocol's set (MediaError 400)."""
    if sample_rate not in SUPPORTED_RATES:
        raise MediaError(
            400,
            f"unsupported input sample_rate {sample_rate!r}; supported: "
            f"{', '.join(map(str, SUPPORTED_RATES))}",
        )
    if channels not in SUPPORTED_CHANNELS:
        raise MediaError(400, f"unsupported input channels {channels!r}; supported: 1 or 2")


def duration_ms(n_samples: int, rate: int) -> float:
    """Duration of ``n_samples`` per-channel samples at ``rate`` Hz, in milliseconds."""
    return n_samples * 1000.0 / rate


def audio_level_dbfs(pcm: np.ndarray) -> float:
    """RMS level of int16 audio relative to full scale, floored at ``MIN_DBFS`` (JSON-safe)."""
    if pcm.size == 0:
        return MIN_DBFS
    x = pcm.astype(np.float64)
    rms = math.sqrt(float(np.dot(x.ravel(), x.ravel())) / x.size)
    if rms == 0.0:
        return MIN_DBFS
    return max(MIN_DBFS, 20.0 * math.log10(rms / 32768.0))


def pcm_to_wav_bytes(pcm: np.ndarray, rate: int, channels: int) -> bytes:
    """Wrap int16 interleaved PCM in a WAV container (for providers/tools that want files)."""
    data = np.ascontiguousarray(pcm, dtype="<i2")
    if data.size % channels:
        raise ValueError(f"{data.size} samples do not divide into {channels} channels")
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(data.tobytes())
    return out.getvalue()


def wav_bytes_to_pcm(data: bytes) -> tuple[np.ndarray, int, int]:
    """Read a 16-bit PCM WAV file into (int16 interleaved samples, rate, channels)."""
    try:
        with wave.open(io.BytesIO(data), "rb") as w:
            if w.getsampwidth() != 2:
                raise MediaError(415, f"WAV sample width {8 * w.getsampwidth()} bit; only 16-bit")
            rate, channels = w.getframerate(), w.getnchannels()
            frames = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as e:
        raise MediaError(415, f"not a readable PCM WAV file: {e}") from None
    usable = len(frames) - len(frames) % (2 * channels)
    return np.frombuffer(frames[:usable], dtype="<i2").astype(np.int16), rate, channels


class StreamResampler:
    """Stateful int16 resampler/remixer over libswresample, for continuous streams.

    Continuous state (filter history) means chunk boundaries leave no clicks and the
    concatenated output is bit-identical however the input was chunked (see tests).

    Built on a PyAV filter graph (abuffer -> aresample -> aformat -> abuffersink) rather
    than ``av.AudioResampler``: the same libswresample, but ``AudioResampler`` drains its
    sink until EAGAIN on every call and PyAV reports EAGAIN by raising (~10 µs per
    call). aresample emits at most one frame per input frame, so one pull per push is
    enough; we pull again only if the output lags the input by more than ``_slack``.
    ``filter_size=16`` (FFmpeg default 32) roughly halves the DSP cost; it is plenty for
    speech and VAD. Output lags input by ~0.5 ms (filter delay) until :meth:`flush`.
    """

    def __init__(
        self,
        in_rate: int,
        in_channels: int,
        out_rate: int,
        out_channels: int = 1,
        *,
        filter_size: int = 16,
    ) -> None:
        for name, ch in (("in_channels", in_channels), ("out_channels", out_channels)):
            if ch not in _LAYOUTS:
                raise ValueError(f"{name} must be 1 or 2, not {ch!r}")
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"rates must be positive, got {in_rate} -> {out_rate}")
        self.in_rate = in_rate
        self.in_channels = in_channels
        self.out_rate = out_rate
        self.out_channels = out_channels
        self._filter_size = filter_size
        self._in_block = 2 * in_channels
        self._out_block = 2 * out_channels
        self._time_base = Fraction(1, in_rate)
        self._slack = out_rate // 100
        self.passthrough = in_rate == out_rate and in_channels == out_channels
        self._build()

    def _build(self) -> None:
        self._in_total = 0
        self._out_total = 0
        if self.passthrough:
            return
        # The Graph owns the filter contexts: it must outlive them (PyAV segfaults otherwise).
        graph = Graph()
        self._src = graph.add(
            "abuffer",
            sample_rate=str(self.in_rate),
            sample_fmt="s16",
            channel_layout=_LAYOUTS[self.in_channels],
            time_base=f"1/{self.in_rate}",
        )
        resample = graph.add("aresample", filter_size=str(self._filter_size))
        fmt = graph.add(
            "aformat",
            sample_rates=str(self.out_rate),
            sample_fmts="s16",
            channel_layouts=_LAYOUTS[self.out_channels],
        )
        self._sink = graph.add("abuffersink")
        self._src.link_to(resample)
        resample.link_to(fmt)
        fmt.link_to(self._sink)
        graph.configure()
        self._graph = graph

    def push(self, pcm: np.ndarray) -> np.ndarray:
        """Convert int16 interleaved samples; returns what is ready (int16 interleaved)."""
        if pcm.dtype != np.int16:
            raise ValueError(f"expected int16 PCM, got {pcm.dtype}")
        data = memoryview(np.ascontiguousarray(pcm)).cast("B")
        return np.frombuffer(self.push_bytes(data), dtype=np.int16)

    def push_bytes(self, data: bytes | bytearray | memoryview) -> bytes:
        """Like :meth:`push` on raw s16le bytes (saves array round-trips on the ingest path)."""
        n = len(data) // self._in_block
        if n * self._in_block != len(data):
            raise ValueError(
                f"{len(data)} bytes is not a whole number of {self._in_block}-byte samples"
            )
        if n == 0:
            return b""
        if self.passthrough:
            self._in_total += n
            return bytes(data)
        frame = av.AudioFrame(format="s16", layout=_LAYOUTS[self.in_channels], samples=n)
        frame.planes[0].update(data)
        frame.sample_rate = self.in_rate
        frame.time_base = self._time_base
        frame.pts = self._in_total
        self._in_total += n
        self._src.push(frame)
        return self._pull(draining=False)

    def _pull(self, draining: bool) -> bytes:
        parts: list[bytes] = []
        while True:
            try:
                frame = self._sink.pull()
            except (_AvAgain, _AvEOF):
                break
            n = frame.samples
            self._out_total += n
            parts.append(bytes(memoryview(frame.planes[0])[: n * self._out_block]))
            expected = self._in_total * self.out_rate // self.in_rate
            if not draining and expected - self._out_total <= self._slack:
                break
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def flush(self) -> np.ndarray:
        """Emit the filter's tail (end of stream) and reset, ready for a new stream."""
        if self.passthrough:
            self._build()
            return np.empty(0, dtype=np.int16)
        self._src.push(None)
        tail = self._pull(draining=True)
        self._build()
        return np.frombuffer(tail, dtype=np.int16)


class PcmFramer:
    """Resample + downmix to the VAD rate and cut into fixed frames, carrying remainders.

    Frames depend only on the concatenated input, never on how it was chunked: exactly
    for 16 kHz mono (pure byte framing), and also exactly with resampling because
    libswresample is a streaming filter (verified in tests); before :meth:`flush` the
    resampled stream lags by the filter delay (< 1 ms), so at most one frame is pending.

    ``batch_ms`` > 0 holds input until that much has accumulated before resampling:
    it amortises PyAV's per-call cost (~10-20 µs) at the price of up to ``batch_ms``
    extra latency. Ignored for 16 kHz mono input, which needs no resampler.

    Frames are read-only int16 arrays of ``target_rate * frame_ms / 1000`` samples.
    """

    def __init__(
        self,
        sample_rate: int,
        channels: int,
        target_rate: int = 16000,
        frame_ms: int = 20,
        *,
        batch_ms: int = 0,
    ) -> None:
        check_pcm_format(sample_rate, channels)
        if frame_ms not in FRAME_MS_CHOICES:
            raise ValueError(f"frame_ms must be one of {FRAME_MS_CHOICES}, not {frame_ms!r}")
        if target_rate <= 0 or (target_rate * frame_ms) % 1000:
            raise ValueError(f"target_rate {target_rate} gives no whole {frame_ms} ms frame")
        if batch_ms < 0:
            raise ValueError("batch_ms must be >= 0")
        self.sample_rate = sample_rate
        self.channels = channels
        self.target_rate = target_rate
        self.frame_ms = frame_ms
        self.frame_samples = target_rate * frame_ms // 1000
        self._frame_bytes = 2 * self.frame_samples
        self._block = 2 * channels
        self._resampler = (
            None
            if sample_rate == target_rate and channels == 1
            else StreamResampler(sample_rate, channels, target_rate, 1)
        )
        self._batch_bytes = sample_rate * batch_ms // 1000 * self._block if self._resampler else 0
        self._pending_in = bytearray()
        self._out = bytearray()
        self._in_samples = 0
        self.frames_out = 0

    @property
    def input_ms(self) -> float:
        """The input-audio clock: ms of audio received so far, counted in declared-rate samples."""
        return self._in_samples * 1000.0 / self.sample_rate

    def push(self, data: bytes | bytearray | memoryview) -> list[np.ndarray]:
        """Ingest s16le interleaved bytes; returns the frames completed by this chunk.

        A chunk that is not a whole number of samples raises MediaError(400) and leaves
        the framer untouched, so the next good chunk continues seamlessly.
        """
        n = len(data)
        if n % self._block:
            raise MediaError(
                400,
                f"pcm16 audio chunk of {n} bytes is not a whole number of samples: "
                f"{self.channels}-channel pcm16 samples are {self._block} bytes each",
            )
        if n == 0:
            return []
        self._in_samples += n // self._block
        if self._resampler is None:
            if n == self._frame_bytes and not self._out and type(data) is bytes:
                self.frames_out += 1  # the common case, zero-copy (bytes are immutable)
                return [np.frombuffer(data, np.int16)]
            self._out += data
        elif self._batch_bytes:
            self._pending_in += data
            if len(self._pending_in) >= self._batch_bytes:
                self._out += self._resampler.push_bytes(self._pending_in)
                self._pending_in = bytearray()
        else:
            self._out += self._resampler.push_bytes(data)
        return self._cut()

    def push_pcm(self, pcm: np.ndarray) -> list[np.ndarray]:
        """Ingest already-decoded int16 interleaved samples at the declared rate."""
        if pcm.dtype != np.int16:
            raise ValueError(f"expected int16 PCM, got {pcm.dtype}")
        return self.push(memoryview(np.ascontiguousarray(pcm)).cast("B"))

    def flush(self) -> list[np.ndarray]:
        """End of stream: drain the resampler; the last partial frame is zero-padded.

        The framer stays usable (a new stream continues the same clock).
        """
        if self._resampler is not None:
            if self._pending_in:
                self._out += self._resampler.push_bytes(self._pending_in)
                self._pending_in = bytearray()
            self._out += self._resampler.flush().tobytes()
        frames = self._cut()
        if self._out:
            tail = bytes(self._out) + bytes(self._frame_bytes - len(self._out))
            self._out.clear()
            frame = np.frombuffer(tail, dtype=np.int16)
            frames.append(frame)
            self.frames_out += 1
        return frames

    def _cut(self) -> list[np.ndarray]:
        # One frombuffer per frame: cheaper than reshape + list for the usual 1-2 frames.
        fb = self._frame_bytes
        k = len(self._out) // fb
        if not k:
            return []
        block = bytes(self._out[: k * fb])
        del self._out[: k * fb]
        self.frames_out += k
        fs = self.frame_samples
        return [np.frombuffer(block, np.int16, fs, i * fb) for i in range(k)]


# ---------------------------------------------------------------------------------------
# Compressed input decoders


class AudioDecoder(Protocol):
    """Turns a compressed byte stream into int16 interleaved PCM at ``sample_rate``."""

    sample_rate: int
    channels: int

    def push(self, data: bytes) -> np.ndarray: ...

    def flush(self) -> np.ndarray: ...


def _mulaw_table() -> np.ndarray:
    # ITU-T G.711 mu-law expansion (as in the reference ulaw2linear), 16-bit scaled.
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u >> 4) & 0x07)
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)


def _alaw_table() -> np.ndarray:
    # ITU-T G.711 A-law expansion (as in the reference alaw2linear), 16-bit scaled.
    a = np.arange(256, dtype=np.int32) ^ 0x55
    mant = a & 0x0F
    seg = (a & 0x70) >> 4
    t = np.where(seg > 0, (2 * mant + 33) << (seg + 2), (2 * mant + 1) << 3)
    return np.where(a & 0x80, t, -t).astype(np.int16)


MULAW_TO_PCM16 = _mulaw_table()
ALAW_TO_PCM16 = _alaw_table()
MULAW_TO_PCM16.flags.writeable = False
ALAW_TO_PCM16.flags.writeable = False


class G711Decoder:
    """mu-law / A-law bytes -> int16 via a 256-entry table (one sample per byte, stateless).

    The tables come from the G.711 expansion formula at import; tests check them against
    FFmpeg's pcm_mulaw/pcm_alaw decoders for all 256 codes. A table lookup needs no
    codec context per session and costs one numpy gather per chunk.
    """

    def __init__(self, law: str, sample_rate: int, channels: int) -> None:
        if law not in ("mulaw", "alaw"):
            raise ValueError(f"law must be 'mulaw' or 'alaw', not {law!r}")
        check_pcm_format(sample_rate, channels)
        self.law = law
        self.sample_rate = sample_rate
        self.channels = channels
        self._table = MULAW_TO_PCM16 if law == "mulaw" else ALAW_TO_PCM16

    def push(self, data: bytes) -> np.ndarray:
        if len(data) % self.channels:
            raise MediaError(
                400,
                f"{self.law} audio chunk of {len(data)} bytes is not a whole number of "
                f"{self.channels}-channel samples",
            )
        return self._table[np.frombuffer(data, dtype=np.uint8)]

    def flush(self) -> np.ndarray:
        return np.empty(0, dtype=np.int16)


# --- Opus ----------------------------------------------------------------------------

_OPUS_CODEC = "libopus" if "libopus" in av.codecs_available else "opus"
_MAX_PACKET = 1 << 16  # Opus packets are <= 61,440 bytes (48 frames x 1275 + TOC).


def parse_opus_head(head: bytes) -> tuple[int, int]:
    """Validate an OpusHead (RFC 7845 §5.1); returns (channels, pre_skip)."""
    if len(head) < 19 or head[:8] != b"OpusHead":
        raise MediaError(415, "Opus stream header is not a valid OpusHead")
    if head[8] >> 4:
        raise MediaError(415, f"unsupported OpusHead version {head[8]}")
    channels, family = head[9], head[18]
    if family != 0 or channels not in (1, 2):
        raise MediaError(
            415,
            f"unsupported Opus channel mapping (family {family}, {channels} channels); "
            "only mono and stereo",
        )
    return channels, int.from_bytes(head[10:12], "little")


def _remix(pcm: np.ndarray, src: int, dst: int) -> np.ndarray:
    if src == dst:
        return pcm
    if src == 2:  # stereo -> mono: average
        return ((pcm[0::2].astype(np.int32) + pcm[1::2]) >> 1).astype(np.int16)
    return np.repeat(pcm, 2)  # mono -> stereo


class _OpusStream:
    """One Opus logical stream: OpusHead -> PyAV decoder; packets -> int16 at 48 kHz.

    libavcodec applies the OpusHead pre-skip itself (extradata sets the codec delay).
    """

    def __init__(self, head: bytes, out_channels: int) -> None:
        self.channels, self.pre_skip = parse_opus_head(head)
        self._out_channels = out_channels
        self._ctx = av.CodecContext.create(_OPUS_CODEC, "r")
        self._ctx.extradata = head
        self.out_total = 0  # per-channel samples emitted (after pre-skip)
        self.start_granule: int | None = None  # Ogg only (RFC 7845 §4.5)

    def decode(self, packet: bytes) -> np.ndarray:
        try:
            frames = self._ctx.decode(av.Packet(packet))
        except FFmpegError as e:
            raise MediaError(415, f"undecodable Opus packet ({len(packet)} bytes): {e}") from None
        parts = []
        for f in frames:
            if f.layout.nb_channels != self.channels:
                raise MediaError(415, "Opus decoder output does not match the OpusHead channels")
            if f.format.name == "s16":
                pcm = np.frombuffer(f.planes[0], dtype=np.int16, count=f.samples * self.channels)
            else:  # float output (FFmpeg's native decoder)
                x = f.to_ndarray().reshape(-1, f.samples) if f.format.is_planar else f.to_ndarray()
                x = x.T.ravel() if f.format.is_planar else x.ravel()
                pcm = np.clip(np.rint(x * 32768.0), -32768, 32767).astype(np.int16)
            parts.append(pcm)
        pcm = parts[0] if len(parts) == 1 else np.concatenate(parts or [np.empty(0, np.int16)])
        self.out_total += pcm.size // self.channels
        return _remix(pcm, self.channels, self._out_channels)


class _Corrupt(Exception):
    """Internal: container structure is broken at the current position."""

    def __init__(self, message: str, code: int = 415) -> None:
        super().__init__(message)
        self.code = code


# Ogg (RFC 3533): CRC-32 with polynomial 0x04C11DB7, MSB-first, init 0, no final xor, over
# the page with its CRC field zeroed. zlib.crc32 is the bit-reflected variant, so feed it
# bit-reversed bytes (init/xor cancelled) and bit-reverse the result: C speed.
_BITREV8 = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def _ogg_crc(page: bytes) -> int:
    data = (page[:22] + b"\0\0\0\0" + page[26:]).translate(_BITREV8)
    reflected = zlib.crc32(data, 0xFFFFFFFF) ^ 0xFFFFFFFF
    return int(f"{reflected:032b}"[::-1], 2)


_Event = tuple  # ("head", bytes) | ("packet", bytes, trim) | ("granule", int, bool)


class _OggDemuxer:
    """Incremental Ogg parser for one Opus logical stream.

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

    def feed(self, data: bytes, events: list[_Event], errors: list[MediaError]) -> None:
        buf = self._buf
        buf += data
        pos = 0
        while len(buf) - pos >= 27:
            if buf[pos : pos + 4] != b"OggS" or buf[pos + 4] != 0:
                if self._synced:
                    errors.append(MediaError(415, "corrupt Ogg data: lost page sync, resyncing"))
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
            if _ogg_crc(page) != int.from_bytes(page[22:26], "little"):
                if self._synced:
                    errors.append(MediaError(415, "corrupt Ogg page (CRC mismatch), resyncing"))
                    self._synced, self._resynced = False, True
                pos += 1
                continue
            self._synced = True
            pos += total
            self._page(page, events, errors)
        del buf[:pos]

    def _page(self, page: bytes, events: list[_Event], errors: list[MediaError]) -> None:
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
                errors.append(MediaError(415, "Ogg stream has no Opus header (OpusHead) page"))
                self._complained_no_head = True
            return
        continued = bool(flags & 0x01)
        if seq != self._seq + 1:
            if not self._resynced:  # a resync was already reported for this gap
                errors.append(MediaError(415, f"{seq - self._seq - 1} Ogg page(s) missing"))
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
                self._emit(bytes(packet), events)
                completed = True
            packet = bytearray()
        self._partial = packet if (lacing and lacing[-1] == 255 and not skip_first) else None
        if self._partial is not None and len(self._partial) > _MAX_PACKET:
            errors.append(MediaError(413, f"Ogg packet exceeds {_MAX_PACKET} bytes; dropped"))
            self._partial = None
        if completed and granule != -1 and self._packet_no > 2:
            events.append(("granule", granule, bool(flags & 0x04)))

    def _emit(self, packet: bytes, events: list[_Event]) -> None:
        n, self._packet_no = self._packet_no, self._packet_no + 1
        if n == 0:
            events.append(("head", packet))
        elif n >= 2:  # n == 1 is OpusTags
            events.append(("packet", packet, 0))


# Matroska / WebM element IDs (RFC 9559), marker bits kept as in the byte stream.
_EBML, _SEGMENT, _CLUSTER, _TRACKS = 0x1A45DFA3, 0x18538067, 0x1F43B675, 0x1654AE6B
_SIMPLE_BLOCK, _BLOCK_GROUP, _BLOCK, _DISCARD_PADDING = 0xA3, 0xA0, 0xA1, 0x75A2
_TRACK_ENTRY, _TRACK_NUMBER, _CODEC_ID, _CODEC_PRIVATE, _DOC_TYPE = 0xAE, 0xD7, 0x86, 0x63A2, 0x4282
_WEBM_ENTER = frozenset({_SEGMENT, _CLUSTER})  # masters we walk into (may be unknown-size)
_WEBM_READ = frozenset({_EBML, _TRACKS, _SIMPLE_BLOCK, _BLOCK_GROUP})  # buffered and parsed
# Known elements we step over without buffering, with the largest size we believe: a
# garbage size on a misread ID must trigger resync, not swallow the stream.
_WEBM_SKIP: dict[int, int] = {
    0x114D9B74: 1 << 20,  # SeekHead
    0x1549A966: 1 << 20,  # Info
    0x1254C367: 1 << 26,  # Tags
    0x1C53BB6B: 1 << 26,  # Cues
    0x1043A770: 1 << 26,  # Chapters
    0x1941A469: 1 << 26,  # Attachments
    0xEC: 1 << 20,  # Void
    0xBF: 4,  # CRC-32
    0xE7: 8,  # Cluster Timestamp
    0xA7: 8,  # Position
    0xAB: 8,  # PrevSize
    0x5854: 1 << 10,  # SilentTracks
    0xAF: 1 << 16,  # EncryptedBlock
}
_MAX_BLOCK = 1 << 16  # a (Simple)Block/BlockGroup; Opus never needs more
_MAX_HEADER_ELEMENT = 1 << 20  # EBML header / Tracks
_EBML_MAGIC = _EBML.to_bytes(4, "big")
_CLUSTER_MAGIC = _CLUSTER.to_bytes(4, "big")


def _vint(
    buf: bytes | bytearray, pos: int, max_len: int, keep_marker: bool
) -> tuple[int, int] | None:
    """EBML variable-length integer at ``pos`` -> (value, length); None if incomplete.

    Unknown size (all value bits set) is returned as -1.
    """
    if pos >= len(buf):
        return None
    first = buf[pos]
    length = 9 - first.bit_length() if first else 9
    if length > max_len:
        raise _Corrupt(f"invalid EBML {'ID' if keep_marker else 'size'} byte 0x{first:02x}")
    if pos + length > len(buf):
        return None
    value = int.from_bytes(buf[pos : pos + length], "big")
    if keep_marker:
        return value, length
    value &= (1 << (7 * length)) - 1
    return (-1 if value == (1 << (7 * length)) - 1 else value), length


def _children(body: bytes):
    """Iterate (id, payload) over a fully buffered master element's children."""
    pos = 0
    while pos < len(body):
        eid = _vint(body, pos, 4, True)
        if eid is None:
            raise _Corrupt("truncated child element")
        size = _vint(body, pos + eid[1], 8, False)
        if size is None or size[0] < 0:
            raise _Corrupt("truncated or unknown-size child element")
        start = pos + eid[1] + size[1]
        if start + size[0] > len(body):
            raise _Corrupt("child element overruns its parent")
        yield eid[0], body[start : start + size[0]]
        pos = start + size[0]


class _WebmDemuxer:
    """Incremental WebM/Matroska parser extracting one Opus track's frames.

    Walks the element stream flat: Segment and Cluster (unknown-size in MediaRecorder
    output) are entered; EBML header, Tracks and blocks are buffered whole (bounded) and
    parsed; other known elements are skipped by size without buffering. An unknown
    element ID means corruption: report it and resync at the next Cluster, EBML header
    or plausible SimpleBlock of our track. Opus payloads carry no checksum, so garbage
    inside a block is only caught if libopus rejects it.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skip = 0
        self._synced = True
        self._track: int | None = None
        self._tracks: set[int] = set()
        self._complained_no_head = False

    def mid_element(self) -> bool:
        """True if an in-sync stream stopped inside an element (data would be lost)."""
        return self._synced and bool(self._buf or self._skip)

    def feed(self, data: bytes, events: list[_Event], errors: list[MediaError]) -> None:
        buf = self._buf
        buf += data
        pos = 0
        while pos < len(buf):
            if self._skip:
                step = min(self._skip, len(buf) - pos)
                pos += step
                self._skip -= step
                continue
            if not self._synced:
                pos, found = self._resync(pos)
                if not found:
                    break
                self._synced = True
            try:
                step = self._element(buf, pos, events, errors)
            except _Corrupt as e:
                errors.append(MediaError(e.code, f"corrupt WebM data ({e}), resyncing"))
                self._synced = False
                pos += 1
                continue
            if step is None:
                break
            pos += step
        del buf[:pos]

    def _element(
        self, buf: bytearray, pos: int, events: list[_Event], errors: list[MediaError]
    ) -> int | None:
        """Handle the element at ``pos``; returns bytes consumed, None if more data needed."""
        eid = _vint(buf, pos, 4, True)
        if eid is None:
            return None
        size = _vint(buf, pos + eid[1], 8, False)
        if size is None:
            return None
        ident, header = eid[0], eid[1] + size[1]
        if ident in _WEBM_ENTER:
            return header
        if size[0] < 0:
            raise _Corrupt(f"unknown size on element 0x{ident:x}")
        if ident in _WEBM_SKIP:
            if size[0] > _WEBM_SKIP[ident]:
                raise _Corrupt(f"implausible size {size[0]} for element 0x{ident:x}")
            self._skip = size[0]
            return header
        if ident not in _WEBM_READ:
            raise _Corrupt(f"unexpected element 0x{ident:x}")
        limit = _MAX_HEADER_ELEMENT if ident in (_EBML, _TRACKS) else _MAX_BLOCK
        if size[0] > limit:
            raise _Corrupt(f"element 0x{ident:x} of {size[0]} bytes exceeds {limit}", 413)
        if ident == _SIMPLE_BLOCK and size[0] < 4:
            raise _Corrupt(f"SimpleBlock of {size[0]} bytes")
        if ident in (_SIMPLE_BLOCK, _BLOCK_GROUP) and not self._plausible_block(
            buf, pos + header, ident
        ):
            raise _Corrupt("block for an unknown track")
        if len(buf) - pos < header + size[0]:
            return None
        body = bytes(buf[pos + header : pos + header + size[0]])
        try:
            self._parse(ident, body, events, errors)
        except IndexError:
            raise _Corrupt(f"truncated element 0x{ident:x}") from None
        return header + size[0]

    def _plausible_block(self, buf: bytearray, start: int, ident: int) -> bool:
        """Early check on a block's track number, so garbage sizes do not stall the stream."""
        if not self._tracks:
            return True  # reported as "data before header" once parsed
        if ident == _BLOCK_GROUP:
            return start >= len(buf) or buf[start] in (_BLOCK, 0xEC, 0xBF)
        track = _vint(buf, start, 8, False)
        return track is None or track[0] in self._tracks

    def _parse(
        self, ident: int, body: bytes, events: list[_Event], errors: list[MediaError]
    ) -> None:
        if ident == _EBML:
            doctype = dict(_children(body)).get(_DOC_TYPE, b"").rstrip(b"\0")
            if doctype not in (b"webm", b"matroska"):
                raise _Corrupt(f"EBML DocType {doctype!r} is not webm/matroska")
            self._track, self._tracks, self._complained_no_head = None, set(), False
        elif ident == _TRACKS:
            self._parse_tracks(body, events, errors)
        elif self._track is None:
            if not self._complained_no_head:
                errors.append(MediaError(415, "WebM audio data before its Tracks header"))
                self._complained_no_head = True
        elif ident == _SIMPLE_BLOCK:
            self._block(body, 0, events)
        else:  # BlockGroup
            block, padding_ns = None, 0
            for cid, payload in _children(body):
                if cid == _BLOCK:
                    block = payload
                elif cid == _DISCARD_PADDING:
                    padding_ns = int.from_bytes(payload, "big", signed=True)
            if block is not None:
                self._block(block, max(0, round(padding_ns * OPUS_RATE / 1e9)), events)

    def _parse_tracks(self, body: bytes, events: list[_Event], errors: list[MediaError]) -> None:
        codecs = []
        self._tracks = set()
        self._track = None
        head = b""
        for cid, entry in _children(body):
            if cid != _TRACK_ENTRY:
                continue
            fields = dict(_children(entry))
            number = int.from_bytes(fields.get(_TRACK_NUMBER, b""), "big")
            codec = fields.get(_CODEC_ID, b"").rstrip(b"\0").decode("ascii", "replace")
            self._tracks.add(number)
            codecs.append(codec)
            if codec == "A_OPUS" and self._track is None:
                self._track, head = number, fields.get(_CODEC_PRIVATE, b"")
        if self._track is None:
            errors.append(
                MediaError(415, f"WebM stream has no Opus audio track (codecs: {codecs})")
            )
            self._complained_no_head = True  # its blocks are not "before the header"
        else:
            events.append(("head", head))

    def _block(self, body: bytes, trim: int, events: list[_Event]) -> None:
        track, n = _vint(body, 0, 8, False) or (None, 0)
        if track != self._track:
            return
        pos = n + 3  # 16-bit relative timestamp, flags
        lacing = (body[n + 2] >> 1) & 0x03
        frames = self._unlace(body, pos, lacing)
        for i, frame in enumerate(frames):
            events.append(("packet", frame, trim if i == len(frames) - 1 else 0))

    @staticmethod
    def _unlace(body: bytes, pos: int, lacing: int) -> list[bytes]:
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
            first = _vint(body, pos, 8, False)
            if first is None:
                raise _Corrupt("truncated EBML lacing")
            sizes.append(first[0])
            pos += first[1]
            for _ in range(count - 2):
                diff = _vint(body, pos, 8, False)
                if diff is None:
                    raise _Corrupt("truncated EBML lacing")
                sizes.append(sizes[-1] + diff[0] - ((1 << (7 * diff[1] - 1)) - 1))
                pos += diff[1]
        else:  # fixed-size lacing
            if (len(body) - pos) % count:
                raise _Corrupt("fixed lacing does not divide the block")
            sizes = [(len(body) - pos) // count] * (count - 1)
        sizes.append(len(body) - pos - sum(sizes))
        if min(sizes) < 0:
            raise _Corrupt("lace sizes overrun the block")
        frames = []
        for size in sizes:
            frames.append(body[pos : pos + size])
            pos += size
        return frames

    def _resync(self, pos: int) -> tuple[int, bool]:
        """Scan for a Cluster, EBML header or a SimpleBlock of our track whose successor
        element also looks valid; returns (position, found)."""
        buf = self._buf
        while True:
            cands = [
                p
                for p in (
                    buf.find(_CLUSTER_MAGIC, pos),
                    buf.find(_EBML_MAGIC, pos),
                    buf.find(b"\xa3", pos) if self._track is not None else -1,
                )
                if p >= 0
            ]
            if not cands:
                return max(pos, len(buf) - 3), False
            p = min(cands)
            if buf[p] != 0xA3 or buf[p : p + 4] in (_CLUSTER_MAGIC, _EBML_MAGIC):
                return p, True
            verdict = self._check_block_candidate(p)
            if verdict is None:  # need more data to judge, unless a sure sync point follows
                later = [
                    q for q in (buf.find(_CLUSTER_MAGIC, p), buf.find(_EBML_MAGIC, p)) if q >= 0
                ]
                return (min(later), True) if later else (p, False)
            if verdict:
                return p, True
            pos = p + 1

    def _check_block_candidate(self, p: int) -> bool | None:
        buf = self._buf
        try:
            size = _vint(buf, p + 1, 8, False)
            if size is None:
                return None
            if not 4 <= size[0] <= _MAX_BLOCK:
                return False
            track = _vint(buf, p + 1 + size[1], 8, False)
            if track is None:
                return None
            if track[0] != self._track:
                return False
            nxt = p + 1 + size[1] + size[0]
            eid = _vint(buf, nxt, 4, True)
            if eid is None:
                return None
            return eid[0] in _WEBM_ENTER or eid[0] in _WEBM_READ or eid[0] in _WEBM_SKIP
        except _Corrupt:
            return False


class OpusStreamDecoder:
    """Opus in WebM (browser MediaRecorder) or Ogg, streamed in arbitrary chunks -> 48 kHz int16.

    The container is detected from the first bytes ("OggS" vs the EBML magic 1A45DFA3);
    a chunk that starts with the other container's magic, or with a new EBML header,
    restarts demuxing (a client restarting its recorder). Output has the declared channel
    count (a mono stream is duplicated to stereo, stereo averaged to mono).

    Errors: :meth:`push` consumes the whole chunk, then raises at most one MediaError
    (415 corrupt/undecodable, 413 oversized element) summarising what went wrong. Audio
    decoded from that chunk is not lost: the next :meth:`push` or :meth:`flush` returns
    it first. The demuxer resyncs by itself (Ogg: next page with a valid CRC; WebM: next
    Cluster or plausible block). Data before any stream header cannot be decoded; the
    client must restart with a header. Lost data is not concealed: the clock counts
    decoded audio only.
    """

    sample_rate = OPUS_RATE

    def __init__(self, channels: int) -> None:
        if channels not in SUPPORTED_CHANNELS:
            raise MediaError(400, f"unsupported input channels {channels!r}; supported: 1 or 2")
        self.channels = channels
        self.container: str | None = None
        self._demux: _OggDemuxer | _WebmDemuxer | None = None
        self._prefix = b""
        self._stream: _OpusStream | None = None
        self._carry: list[np.ndarray] = []

    def push(self, data: bytes) -> np.ndarray:
        out, self._carry = self._carry, []
        errors: list[MediaError] = []
        events: list[_Event] = []
        data = bytes(data)
        kind = _sniff(data)
        if (
            self._demux is not None
            and kind is not None
            and (kind != self.container or kind == "webm")
        ):
            if (
                isinstance(self._demux, _WebmDemuxer)
                and kind == "webm"
                and self._demux.mid_element()
            ):
                errors.append(
                    MediaError(415, "WebM stream restarted mid-element; partial data dropped")
                )
            self._demux = None
        if self._demux is None:
            data = self._detect(data, errors)
        if self._demux is not None and data:
            self._demux.feed(data, events, errors)
        for event in events:
            try:
                self._handle(event, out)
            except MediaError as e:
                errors.append(e)
        pcm = _concat(out)
        if errors:
            if pcm.size:
                self._carry = [pcm]
            first = errors[0]
            more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
            raise MediaError(first.code, first.message + more)
        return pcm

    def flush(self) -> np.ndarray:
        """End of stream: returns pending audio and forgets the stream (a header must follow)."""
        out, self._carry = self._carry, []
        self._demux, self._stream, self.container, self._prefix = None, None, None, b""
        return _concat(out)

    def _detect(self, data: bytes, errors: list[MediaError]) -> bytes:
        data = self._prefix + data
        if len(data) < 4:
            self._prefix = data
            return b""
        self._prefix = b""
        kind = _sniff(data)
        if kind is None:
            errors.append(
                MediaError(
                    415,
                    f"Opus input must be Ogg or WebM, starting with its header; got bytes "
                    f"{data[:4].hex()} (restart the stream with a header)",
                )
            )
            return b""
        self.container = kind
        self._demux = _OggDemuxer() if kind == "ogg" else _WebmDemuxer()
        self._stream = None
        return data

    def _handle(self, event: _Event, out: list[np.ndarray]) -> None:
        if event[0] == "head":
            self._stream = None  # stays None if this header is invalid
            self._stream = _OpusStream(event[1], self.channels)
            return
        stream = self._stream
        if stream is None:
            return  # the header failed; already reported
        if event[0] == "packet":
            pcm = stream.decode(event[1])
            if event[2]:
                pcm = pcm[: max(0, pcm.size - event[2] * self.channels)]
            out.append(pcm)
            return
        # Ogg granule (RFC 7845 §4.5): find the stream start, then trim the end at EOS.
        granule, eos = event[1], event[2]
        raw = stream.out_total + stream.pre_skip
        if stream.start_granule is None:
            stream.start_granule = 0 if eos else granule - raw
        if eos:
            excess = (stream.start_granule + raw - granule) * self.channels
            while excess > 0 and out:
                cut = min(excess, out[-1].size)
                out[-1] = out[-1][: out[-1].size - cut]
                excess -= cut
                if not out[-1].size:
                    out.pop()


def _sniff(data: bytes) -> str | None:
    if data[:4] == b"OggS":
        return "ogg"
    if data[:4] == _EBML_MAGIC:
        return "webm"
    return None


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    if not parts:
        return np.empty(0, dtype=np.int16)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def make_decoder(fmt: str, sample_rate: int, channels: int) -> AudioDecoder | None:
    """Decoder for a session's declared ``input_audio``; None for pcm16 (no decoding).

    The PcmFramer behind it must use the decoder's ``sample_rate``/``channels`` (Opus
    always decodes at 48 kHz; the declared rate is validated but informational).
    """
    if fmt not in INPUT_FORMATS:
        raise MediaError(
            415, f"unsupported input audio format {fmt!r}; supported: {', '.join(INPUT_FORMATS)}"
        )
    check_pcm_format(sample_rate, channels)
    if fmt == "pcm16":
        return None
    if fmt == "opus":
        return OpusStreamDecoder(channels)
    return G711Decoder(fmt, sample_rate, channels)
