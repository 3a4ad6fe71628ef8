"""The libswresample (PyAV filter graph) resampler Duplex used before media/resample.py,
kept as the baseline of ``python -m bench.bench_audio --resamplers``; not used by the server.
"""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
from av.error import BlockingIOError as _AvAgain
from av.error import EOFError as _AvEOF
from av.filter import Graph

from media.resample import StreamResampler

_LAYOUTS = {1: "mono", 2: "stereo"}
#: At most this much audio per filter-graph frame: the graph keeps buffers sized for the
#: largest frame it was given, for as long as it lives.
MAX_PUSH_MS = 100


class PyavResampler:
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
        self._max_push = max(1, in_rate * MAX_PUSH_MS // 1000)
        self.passthrough = in_rate == out_rate and in_channels == out_channels
        self._build()

    def _build(self) -> None:
        self._in_total = 0
        self._out_total = 0
        if self.passthrough:
            return
        # The Graph owns the filter contexts: it must outlive them (PyAV segfaults otherwise).
        graph = Graph()
        # One thread: libavfilter otherwise starts a pool of a thread per core for every
        # graph (~0.2 ms, most of the construction cost) that audio filters never use.
        graph.threads = 1
        self._src = graph.add(
            "abuffer",
            sample_rate=str(self.in_rate),
            sample_fmt="s16",
            channel_layout=_LAYOUTS[self.in_channels],
            time_base=f"1/{self.in_rate}",
        )
        # Resample in int16 (libswresample would convert to float and back): its buffers,
        # sized by the largest frame pushed, are half as big, and the result is as
        # clean at 16-bit output (a 1 kHz sine: 82-100 dB SNR either way). Measured:
        # 127 -> 91 KB per 16 -> 24 kHz stream fed 100 ms pieces.
        resample = graph.add(
            "aresample", filter_size=str(self._filter_size), internal_sample_fmt="s16p"
        )
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

    push = StreamResampler.push  # the same array wrapper around `push_bytes`

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
        most = self._max_push
        if n > most:  # in slices: the filters keep buffers as large as the largest frame
            with memoryview(data) as view:
                step = most * self._in_block
                return b"".join([self._push(view[i : i + step]) for i in range(0, len(data), step)])
        return self._push(data)

    def _push(self, data: bytes | bytearray | memoryview) -> bytes:
        n = len(data) // self._in_block
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

    def restart(self) -> None:
        """Begin a new stream without rebuilding (a rebuild costs 0.06-0.3 ms; this one
        push). Silence the length of two filters clears the old stream's history; what
        comes out is dropped. The new stream then comes out after ~the filter delay
        (< 1 ms) of silence, as if it had followed silence; nothing of the old one."""
        if self.passthrough:
            return
        span = self._filter_size * max(1, -(-self.in_rate // self.out_rate))
        self.push_bytes(bytes(2 * span * self._in_block))
        self._pull(draining=True)

    def flush(self) -> np.ndarray:
        """Emit the filter's tail (end of stream) and reset, ready for a new stream."""
        if self.passthrough:
            self._build()
            return np.empty(0, dtype=np.int16)
        self._src.push(None)
        tail = self._pull(draining=True)
        self._build()
        return np.frombuffer(tail, dtype=np.int16)
