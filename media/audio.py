"""Audio ingest and codecs: client audio in any accepted input format becomes fixed VAD frames.

Plain library code (numpy arrays and bytes in, values out; no asyncio). Errors are
:class:`media.errors.MediaError` with wire codes: 400 malformed or inconsistent with the
declared format, 413 too large, 415 unsupported or undecodable.

Pipeline: ``make_decoder`` (Opus in WebM/Ogg, G.711) -> int16 PCM -> ``PcmFramer``
(``media.resample.StreamResampler``, then fixed-size frames at the VAD rate).
The Opus containers are demuxed by ``media.webm`` and ``media.ogg``, the packets
decoded by ``media.opus``; ``OpusStreamDecoder`` here ties them together.
"""

from __future__ import annotations

import io
import math
import wave
from typing import Protocol

import av
import numpy as np

from media.ebml import EBML_MAGIC
from media.errors import MediaError
from media.ogg import OggOpusDemuxer
from media.opus import OPUS_RATE, OpusEvent, OpusPacketDecoder
from media.opus import parse_opus_head as parse_opus_head  # re-exported
from media.resample import StreamResampler as StreamResampler  # re-exported
from media.webm import WebmOpusDemuxer

#: Any integer input rate from MIN_RATE to MAX_RATE Hz is accepted (the resampler takes
#: any rate); these common ones are what the tests sweep.
SUPPORTED_RATES: tuple[int, ...] = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000, 96000)
MIN_RATE, MAX_RATE = 8000, 96000
SUPPORTED_CHANNELS: tuple[int, ...] = (1, 2)
FRAME_MS_CHOICES: tuple[int, ...] = (10, 20, 30)
INPUT_FORMATS: tuple[str, ...] = ("pcm16", "opus", "mulaw", "alaw")
# Floor for audio_level_dbfs: silence would be -inf, which JSON cannot carry.
MIN_DBFS = -120.0


def check_pcm_format(sample_rate: int, channels: int) -> None:
    """Reject declared input rates/channels outside the wire protocol's range (MediaError 400)."""
    if not (isinstance(sample_rate, int) and MIN_RATE <= sample_rate <= MAX_RATE):
        raise MediaError(
            400,
            f"unsupported input sample_rate {sample_rate!r}; "
            f"use an integer from {MIN_RATE} to {MAX_RATE} Hz",
        )
    if channels not in SUPPORTED_CHANNELS:
        raise MediaError(400, f"unsupported input channels {channels!r}; supported: 1 or 2")


def duration_ms(n_samples: int, rate: int) -> float:
    """Duration of ``n_samples`` per-channel samples at ``rate`` Hz, in milliseconds."""
    return n_samples * 1000.0 / rate


_LEVEL_BLOCK = 16384  # samples: a 64 KiB int32 temporary


def audio_level_dbfs(pcm: np.ndarray) -> float:
    """RMS level of int16 audio relative to full scale, floored at ``MIN_DBFS`` (JSON-safe)."""
    if pcm.size == 0:
        return MIN_DBFS
    # Exact sum of squares: each square fits int32, a block's sum int64. In blocks, so
    # no temporary as large as a turn (in a busy server, fresh pages: ~4x the work).
    # No BLAS call either (it would wake a thread pool that then spins for ~100 ms).
    x = pcm.ravel()
    total = 0
    for i in range(0, x.size, _LEVEL_BLOCK):
        total += int(np.square(x[i : i + _LEVEL_BLOCK], dtype=np.int32).sum(dtype=np.int64))
    rms = math.sqrt(total / x.size)
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


class PcmFramer:
    """Resample + downmix to the VAD rate and cut into fixed frames, carrying remainders.

    Frames depend only on the concatenated input, never on how it was chunked: exactly
    for 16 kHz mono (pure byte framing), and also exactly with resampling because
    the resampler is a streaming filter (verified in tests); before :meth:`flush` the
    resampled stream lags by half the filter (0.5-1 ms), so at most one frame is pending.

    ``batch_ms`` > 0 holds input until that much has accumulated before resampling:
    it amortises the resampler's per-call cost (a few µs) at the price of up to ``batch_ms``
    extra latency. Ignored for 16 kHz mono input, which needs no resampler.

    Frames are read-only int16 arrays of ``target_rate * frame_ms / 1000`` samples
    (:meth:`push`), or those samples as one ``bytes`` per call (:meth:`push_bytes`).
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
        self._in_samples = 0  # not counting `_passed`
        self._frames_cut = 0
        # `push_bytes` hands a chunk of exactly this size straight back while no
        # remainder is pending (16 kHz mono only; -1 otherwise), counting it in `_passed`.
        self._pass_size = -1 if self._resampler else self._frame_bytes
        self._passed = 0

    @property
    def input_ms(self) -> float:
        """The input-audio clock: ms of audio received so far, counted in declared-rate samples."""
        return (self._in_samples + self._passed * self.frame_samples) * 1000.0 / self.sample_rate

    @property
    def frames_out(self) -> int:
        """Frames handed out so far."""
        return self._frames_cut + self._passed

    def push(self, data: bytes | bytearray | memoryview) -> list[np.ndarray]:
        """Ingest s16le interleaved bytes; returns the frames completed by this chunk.

        A chunk that is not a whole number of samples raises MediaError(400) and leaves
        the framer untouched, so the next good chunk continues seamlessly.
        """
        return self._split(self.push_bytes(data))

    def push_bytes(self, data: bytes | bytearray | memoryview) -> bytes:
        """Like :meth:`push`, but the completed frames come back as one ``bytes`` of int16
        samples at the target rate (a whole number of frames; ``b""`` if none).

        ``bytes`` of whole frames of 16 kHz mono, with no remainder pending, come back
        as they are: no copy, no numpy; one frame (a client sending 20 ms messages) is
        the cheapest path of all.
        """
        if len(data) == self._pass_size and type(data) is bytes:
            self._passed += 1
            return data  # zero-copy: bytes are immutable
        n = len(data)
        if n % self._block:
            raise MediaError(
                400,
                f"pcm16 audio chunk of {n} bytes is not a whole number of samples: "
                f"{self.channels}-channel pcm16 samples are {self._block} bytes each",
            )
        if n == 0:
            return b""
        self._in_samples += n // self._block
        if self._resampler is None:
            if not self._out and not n % self._frame_bytes and type(data) is bytes:
                self._frames_cut += n // self._frame_bytes
                return data  # whole frames, zero-copy as above
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
        frames = self._split(self._cut())
        if self._out:
            tail = bytes(self._out) + bytes(self._frame_bytes - len(self._out))
            self._out.clear()
            frame = np.frombuffer(tail, dtype=np.int16)
            frames.append(frame)
            self._frames_cut += 1
        if self._resampler is None:
            self._pass_size = self._frame_bytes
        return frames

    def _cut(self) -> bytes:
        """The whole frames in ``_out``, taken out as one bytes object."""
        size = len(self._out) // self._frame_bytes * self._frame_bytes
        if self._resampler is None:
            self._pass_size = -1 if len(self._out) > size else self._frame_bytes
        if not size:
            return b""
        with memoryview(self._out) as view:
            block = bytes(view[:size])
        del self._out[:size]
        self._frames_cut += size // self._frame_bytes
        return block

    def _split(self, block: bytes) -> list[np.ndarray]:
        # One frombuffer per frame: cheaper than reshape + list for the usual 1-2 frames.
        fb, fs = self._frame_bytes, self.frame_samples
        return [np.frombuffer(block, np.int16, fs, i * fb) for i in range(len(block) // fb)]


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

# The FFmpeg Opus decoder: libopus where the wheel has it, else FFmpeg's own (float output).
_OPUS_CODEC = "libopus" if "libopus" in av.codecs_available else "opus"


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
        self._demux: OggOpusDemuxer | WebmOpusDemuxer | None = None
        self._prefix = b""
        self._stream: OpusPacketDecoder | None = None
        self._carry: list[np.ndarray] = []

    def push(self, data: bytes) -> np.ndarray:
        out, self._carry = self._carry, []
        errors: list[MediaError] = []
        events: list[OpusEvent] = []
        data = bytes(data)
        kind = _sniff(data)
        if (
            self._demux is not None
            and kind is not None
            and (kind != self.container or kind == "webm")
        ):
            if (
                isinstance(self._demux, WebmOpusDemuxer)
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
            self._demux.feed(data, events)
        errors += [event[1] for event in events if event[0] == "error"]
        for event in events:
            if event[0] == "error":
                continue
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
        self._demux = OggOpusDemuxer() if kind == "ogg" else WebmOpusDemuxer()
        self._stream = None
        return data

    def _handle(self, event: OpusEvent, out: list[np.ndarray]) -> None:
        if event[0] == "head":
            self._stream = None  # stays None if this header is invalid
            self._stream = OpusPacketDecoder(event[1], self.channels, _OPUS_CODEC)
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
    if data[:4] == EBML_MAGIC:
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
