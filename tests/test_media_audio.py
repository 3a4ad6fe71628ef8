"""Tests for media.audio: PCM framing/resampling, G.711 and streamed Opus (WebM/Ogg) decoding.

All compressed test media is generated here with PyAV (FFmpeg's libopus encoder, the
webm/ogg muxers and the pcm_mulaw/pcm_alaw encoders).
"""

from __future__ import annotations

import io
import math
import os

import av
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from media.audio import (
    ALAW_TO_PCM16,
    MIN_DBFS,
    MULAW_TO_PCM16,
    SUPPORTED_RATES,
    G711Decoder,
    OpusStreamDecoder,
    PcmFramer,
    StreamResampler,
    audio_level_dbfs,
    check_pcm_format,
    duration_ms,
    make_decoder,
    pcm_to_wav_bytes,
    wav_bytes_to_pcm,
)
from media.errors import MediaError

LAYOUT = {1: "mono", 2: "stereo"}


def sine(
    rate: int, seconds: float, freq: float, channels: int = 1, amp: float = 10000
) -> np.ndarray:
    n = round(rate * seconds)
    x = (amp * np.sin(2 * np.pi * freq * np.arange(n) / rate)).astype(np.int16)
    return np.repeat(x, channels) if channels == 2 else x


def noise(rate: int, seconds: float, channels: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(round(rate * seconds) * channels) * 4000).astype(np.int16)


def dominant_freq(x: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x.astype(np.float64) * np.hanning(x.size)))
    return float(np.argmax(spectrum) * rate / x.size)


def frame_all(framer: PcmFramer, data: bytes, sizes: list[int]) -> list[np.ndarray]:
    """Push ``data`` cut at ``sizes`` (bytes, cycled); remaining bytes in one last chunk."""
    frames: list[np.ndarray] = []
    pos = 0
    for size in sizes:
        if pos >= len(data):
            break
        frames += framer.push(data[pos : pos + size])
        pos += size
    if pos < len(data):
        frames += framer.push(data[pos:])
    return frames


class _Unseekable(io.RawIOBase):
    """A write-only sink: makes FFmpeg's Matroska muxer write a live-style, unknown-size Segment."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.data += b
        return len(b)


def encode_opus(container: str, channels: int, seconds: float = 1.0, freq: float = 440.0) -> bytes:
    pcm = sine(48000, seconds, freq, channels)
    sink = _Unseekable()
    # Ogg: ~100 ms pages like a live recorder, not FFmpeg's 1 s default.
    options = {"page_duration": "100000"} if container == "ogg" else {}
    out = av.open(sink, "w", format=container, options=options)
    stream = out.add_stream("libopus", rate=48000, layout=LAYOUT[channels])
    frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout=LAYOUT[channels])
    frame.sample_rate = 48000
    frame.pts = 0
    for packet in stream.encode(frame):
        out.mux(packet)
    for packet in stream.encode(None):
        out.mux(packet)
    out.close()
    return bytes(sink.data)


def _vint(buf: bytes, pos: int) -> tuple[int, int]:
    length = 9 - buf[pos].bit_length()
    return int.from_bytes(buf[pos : pos + length], "big"), length


def with_unknown_size_clusters(webm: bytes) -> bytes:
    """Rewrite every Cluster with an unknown size, as Chrome's MediaRecorder writes them."""
    out = bytearray()
    pos = 0
    while pos < len(webm):
        ident, id_len = _vint(webm, pos)
        size, size_len = _vint(webm, pos + id_len)
        size &= (1 << (7 * size_len)) - 1
        header = webm[pos : pos + id_len + size_len]
        if ident == 0x18538067:  # Segment (already unknown-size): walk its children
            out += header
            pos += id_len + size_len
            continue
        body = webm[pos + id_len + size_len : pos + id_len + size_len + size]
        if ident == 0x1F43B675:
            out += webm[pos : pos + id_len] + b"\x01\xff\xff\xff\xff\xff\xff\xff" + body
        else:
            out += header + body
        pos += id_len + size_len + size
    return bytes(out)


@pytest.fixture(scope="module")
def opus_media() -> dict[tuple[str, int], bytes]:
    return {(c, ch): encode_opus(c, ch) for c in ("webm", "ogg") for ch in (1, 2)}


def decode_chunks(decoder, chunks: list[bytes]) -> tuple[np.ndarray, list[MediaError]]:
    out, errors = [], []
    for chunk in chunks:
        try:
            out.append(decoder.push(chunk))
        except MediaError as e:
            errors.append(e)
    out.append(decoder.flush())
    return np.concatenate(out), errors


def random_chunks(data: bytes, rng: np.random.Generator, max_size: int = 400) -> list[bytes]:
    chunks, pos = [], 0
    while pos < len(data):
        size = int(rng.integers(1, max_size))
        chunks.append(data[pos : pos + size])
        pos += size
    return chunks


# ---------------------------------------------------------------------------------------
# PCM framing


def test_passthrough_frames_are_the_input_cut_into_frames():
    pcm = noise(16000, 1.0, 1)
    framer = PcmFramer(16000, 1)
    frames = frame_all(framer, pcm.tobytes(), [640, 7 * 2, 2, 3000, 640])
    assert len(frames) == 50
    assert np.array_equal(np.concatenate(frames), pcm)
    assert all(f.dtype == np.int16 and f.shape == (320,) for f in frames)
    assert framer.input_ms == 1000.0
    assert framer.frames_out == 50
    assert framer.flush() == []


@pytest.mark.parametrize("rate", SUPPORTED_RATES)
@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("frame_ms", [10, 20, 30])
def test_every_format_gives_fixed_frames_and_correct_clock(rate, channels, frame_ms):
    seconds = 0.9
    pcm = sine(rate, seconds, 1000.0, channels)
    framer = PcmFramer(rate, channels, frame_ms=frame_ms)
    frames = frame_all(framer, pcm.tobytes(), [rate // 50 * 2 * channels])
    frames += framer.flush()
    # The clip's true duration (0.9 s is not a whole number of samples at 11025 Hz).
    clip_ms = len(pcm) // channels * 1000 / rate
    assert framer.input_ms == pytest.approx(clip_ms)
    expected = math.ceil(clip_ms / frame_ms)
    assert len(frames) == expected == framer.frames_out
    assert {f.shape for f in frames} == {(16 * frame_ms,)}
    mono = np.concatenate(frames)
    # Content survives resampling and downmix: 1 kHz tone at (nearly) the same level.
    assert dominant_freq(mono, 16000) == pytest.approx(1000.0, abs=20)
    middle = mono[1600:-1600].astype(np.float64)
    assert np.sqrt(np.mean(middle**2)) == pytest.approx(10000 / math.sqrt(2), rel=0.05)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rate=st.sampled_from(SUPPORTED_RATES),
    channels=st.sampled_from([1, 2]),
    frame_ms=st.sampled_from([10, 20, 30]),
    sizes=st.lists(st.integers(1, 2400), min_size=1, max_size=40),
    seed=st.integers(0, 2**16),
)
def test_frames_do_not_depend_on_chunking(rate, channels, frame_ms, sizes, seed):
    pcm = noise(rate, 0.35, channels, seed)
    data = pcm.tobytes()
    block = 2 * channels
    byte_sizes = [s * block for s in sizes]  # chunk sizes in whole samples (1 sample .. 2400)

    whole = PcmFramer(rate, channels, frame_ms=frame_ms)
    ref = whole.push(data)
    chunked = PcmFramer(rate, channels, frame_ms=frame_ms)
    got = frame_all(chunked, data, byte_sizes)

    if rate == 16000 and channels == 1:
        assert len(got) == len(ref)
    # Before flush the resampler may hold back its filter delay: at most one frame apart.
    assert abs(len(got) - len(ref)) <= 1
    n = min(len(got), len(ref))
    assert all(np.array_equal(a, b) for a, b in zip(got[:n], ref[:n], strict=True))
    # After flush the streams are bit-identical.
    ref += whole.flush()
    got += chunked.flush()
    assert len(got) == len(ref)
    assert all(np.array_equal(a, b) for a, b in zip(got, ref, strict=True))
    assert chunked.input_ms == whole.input_ms == pytest.approx(pcm.size / channels * 1000 / rate)
    # push_bytes hands over the same frames as one bytes object per chunk.
    as_bytes = PcmFramer(rate, channels, frame_ms=frame_ms)
    pos, out = 0, []
    for size in byte_sizes * (len(data) // sum(byte_sizes) + 1):
        if pos >= len(data):
            break
        out.append(as_bytes.push_bytes(data[pos : pos + size]))
        pos += size
    flushed = as_bytes.flush()
    assert all(type(b) is bytes and len(b) % (32 * frame_ms) == 0 for b in out)
    assert b"".join(out) + b"".join(f.tobytes() for f in flushed) == b"".join(
        f.tobytes() for f in ref
    )
    assert as_bytes.frames_out == len(ref)


@pytest.mark.parametrize("rate,channels", [(16000, 1), (48000, 2), (44100, 1)])
def test_partial_sample_chunk_is_rejected_and_nothing_is_lost(rate, channels):
    data = noise(rate, 0.5, channels).tobytes()
    cut = 4 * 2 * channels * 37
    ref = PcmFramer(rate, channels)
    expected = ref.push(data[:cut]) + ref.push(data[cut:]) + ref.flush()

    framer = PcmFramer(rate, channels)
    frames = framer.push(data[:cut])
    clock = framer.input_ms
    bad_sizes = [1, 3] if channels == 1 else [1, 2, 3, 6]
    for bad in bad_sizes:
        with pytest.raises(MediaError) as info:
            framer.push(b"\x01" * bad)
        assert info.value.code == 400
        assert f"{bad} bytes" in info.value.message
        assert f"{2 * channels} bytes" in info.value.message
        assert framer.input_ms == clock
    frames += framer.push(data[cut:]) + framer.flush()
    assert len(frames) == len(expected)
    assert all(np.array_equal(a, b) for a, b in zip(frames, expected, strict=True))


def test_push_bytes_passes_whole_frames_through_without_a_copy():
    data = noise(16000, 0.2, 1).tobytes()  # 10 frames of 640 bytes
    framer = PcmFramer(16000, 1)
    one = data[:640]
    assert framer.push_bytes(one) is one
    three = data[640:2560]
    assert framer.push_bytes(three) is three  # nothing pending: zero-copy, any frame count
    assert framer.push_bytes(data[2560:2570]) == b""  # a remainder is held back...
    out = framer.push_bytes(data[2570:3840])  # ...and completes the next frames
    assert out == data[2560:3840]
    rest = framer.push_bytes(bytearray(data[3840:]))  # not bytes: copied, still framed
    assert type(rest) is bytes and rest == data[3840:]
    assert framer.frames_out == 10 and framer.input_ms == 200.0
    assert framer.push_bytes(b"") == b""
    with pytest.raises(MediaError):
        framer.push_bytes(b"\x01")
    assert framer.frames_out == 10 and framer.input_ms == 200.0


def test_push_pcm_matches_push_bytes():
    pcm = noise(24000, 0.3, 2)
    a, b = PcmFramer(24000, 2), PcmFramer(24000, 2)
    fa = a.push(pcm.tobytes()) + a.flush()
    fb = b.push_pcm(pcm[: 1001 * 2]) + b.push_pcm(pcm[1001 * 2 :]) + b.flush()
    assert all(np.array_equal(x, y) for x, y in zip(fa, fb, strict=True))
    with pytest.raises(MediaError) as info:
        b.push_pcm(np.zeros(3, np.int16))
    assert info.value.code == 400
    with pytest.raises(ValueError):
        b.push_pcm(np.zeros(4, np.float32))


def test_batching_changes_latency_not_output():
    data = noise(48000, 0.5, 2).tobytes()
    plain, batched = PcmFramer(48000, 2), PcmFramer(48000, 2, batch_ms=100)
    step = 960 * 4  # 20 ms
    fp, fbat, held = [], [], []
    for i in range(0, len(data), step):
        fp += plain.push(data[i : i + step])
        fbat += batched.push(data[i : i + step])
        held.append(len(fp) - len(fbat))
    assert held[:4] == [0, 1, 2, 3] or held[:4] == [1, 2, 3, 4]  # held back until 100 ms
    assert max(held) <= 5
    fp += plain.flush()
    fbat += batched.flush()
    assert len(fp) == len(fbat) == 25
    assert all(np.array_equal(x, y) for x, y in zip(fp, fbat, strict=True))
    assert batched.input_ms == plain.input_ms == 500.0


@pytest.mark.parametrize(
    "rate,channels",
    [(7999, 1), (96001, 1), (192000, 1), (16000, 0), (16000, 3), (0, 1), (16000.5, 1)],
)
def test_unsupported_declared_format_is_a_400(rate, channels):
    with pytest.raises(MediaError) as info:
        PcmFramer(rate, channels)
    assert info.value.code == 400
    assert ("sample_rate" in info.value.message) or ("channels" in info.value.message)
    with pytest.raises(MediaError):
        make_decoder("pcm16", rate, channels)


@pytest.mark.parametrize("rate", [8000, 11025, 12345, 22050, 37800, 88200, 96000])
def test_any_integer_rate_from_8_to_96_khz_is_accepted(rate):
    """espeak-ng writes 22,050 Hz, old recorders 11,025, pro gear 88.2/96 kHz."""
    pcm = sine(rate, 0.5, 1000.0)
    framer = PcmFramer(rate, 1, frame_ms=20)
    frames = framer.push(pcm.tobytes()) + framer.flush()
    assert dominant_freq(np.concatenate(frames), 16000) == pytest.approx(1000.0, abs=20)
    assert make_decoder("mulaw", rate, 1) is not None


def test_bad_server_parameters_are_value_errors():
    with pytest.raises(ValueError):
        PcmFramer(16000, 1, frame_ms=25)
    with pytest.raises(ValueError):
        PcmFramer(16000, 1, target_rate=44100, frame_ms=10 + 5)
    with pytest.raises(ValueError):
        StreamResampler(16000, 3, 24000)


def test_unsupported_input_format_is_a_415():
    with pytest.raises(MediaError) as info:
        make_decoder("flac", 48000, 1)
    assert info.value.code == 415
    assert "flac" in info.value.message and "opus" in info.value.message
    assert make_decoder("pcm16", 16000, 1) is None
    check_pcm_format(44100, 2)


# ---------------------------------------------------------------------------------------
# StreamResampler


@pytest.mark.parametrize(
    "in_rate,in_ch,out_rate,out_ch",
    [(16000, 1, 24000, 1), (24000, 1, 48000, 2), (44100, 2, 8000, 1)],
)
def test_stream_resampler_is_chunk_invariant(in_rate, in_ch, out_rate, out_ch):
    pcm = noise(in_rate, 0.4, in_ch, seed=3)
    whole = StreamResampler(in_rate, in_ch, out_rate, out_ch)
    ref = np.concatenate([whole.push(pcm), whole.flush()])
    chunked = StreamResampler(in_rate, in_ch, out_rate, out_ch)
    rng = np.random.default_rng(5)
    parts, pos = [], 0
    while pos < pcm.size:
        n = int(rng.integers(1, 700)) * in_ch
        parts.append(chunked.push(pcm[pos : pos + n]))
        pos += n
    parts.append(chunked.flush())
    got = np.concatenate(parts)
    assert np.array_equal(got, ref)
    assert got.size // out_ch == pytest.approx(pcm.size // in_ch * out_rate / in_rate, abs=1)
    # Reusable after flush (a new stream).
    again = np.concatenate([chunked.push(pcm), chunked.flush()])
    assert np.array_equal(again, ref)


def test_stream_resampler_output_content_and_passthrough():
    tone = sine(24000, 0.5, 440.0)
    up = StreamResampler(24000, 1, 48000, 2)
    out = np.concatenate([up.push(tone), up.flush()])
    assert out.size == 2 * 48000 // 2
    assert np.array_equal(out[0::2], out[1::2])
    assert dominant_freq(out[0::2], 48000) == pytest.approx(440.0, abs=5)
    same = StreamResampler(16000, 1, 16000, 1)
    assert same.passthrough
    assert np.array_equal(same.push(tone), tone)
    with pytest.raises(ValueError):
        same.push(tone.astype(np.float32))


@pytest.mark.parametrize("in_rate,out_rate", [(16000, 24000), (48000, 16000), (44100, 8000)])
def test_stream_resampler_restart_forgets_the_old_stream(in_rate, out_rate):
    old = noise(in_rate, 0.1, 1, seed=7) * 8
    tone = sine(in_rate, 0.2, 440.0)
    fresh = StreamResampler(in_rate, 1, out_rate, 1).push(tone)
    reused = StreamResampler(in_rate, 1, out_rate, 1)
    reused.push(old)
    reused.restart()
    zeros = reused.push(np.zeros(in_rate // 10, np.int16))
    assert zeros.size and not zeros.any()  # silence after restart is exact silence
    again = reused.push(tone)
    assert dominant_freq(again, out_rate) == pytest.approx(440.0, abs=5)
    assert abs(again.size - fresh.size) <= 16  # the same stream, a filter delay later


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads via /proc")
def test_stream_resamplers_start_no_threads():
    """libavfilter gives each graph a pool of one thread per core unless told otherwise:
    with one resampler per response, that was most of a resampler's cost."""
    before = len(os.listdir("/proc/self/task"))
    kept = [StreamResampler(16000, 1, 24000, 1) for _ in range(4)]
    assert len(os.listdir("/proc/self/task")) == before
    assert all(r.push(noise(16000, 0.1, 1, seed=1)).size for r in kept)


# ---------------------------------------------------------------------------------------
# G.711


def _pyav_codec(name: str, mode: str, rate: int = 8000):
    ctx = av.CodecContext.create(name, mode)
    ctx.sample_rate = rate
    ctx.layout = "mono"
    ctx.format = "s16"
    return ctx


@pytest.mark.parametrize("law,table", [("mulaw", MULAW_TO_PCM16), ("alaw", ALAW_TO_PCM16)])
def test_g711_tables_match_ffmpeg_for_every_code(law, table):
    dec = _pyav_codec(f"pcm_{law}", "r")
    frames = dec.decode(av.Packet(bytes(range(256))))
    ffmpeg = np.concatenate([f.to_ndarray().ravel() for f in frames])
    assert np.array_equal(table, ffmpeg)
    assert np.array_equal(G711Decoder(law, 8000, 1).push(bytes(range(256))), ffmpeg)


@pytest.mark.parametrize("law", ["mulaw", "alaw"])
def test_g711_round_trip_through_framer(law):
    tone = sine(8000, 0.5, 300.0)
    enc = _pyav_codec(f"pcm_{law}", "w")
    frame = av.AudioFrame.from_ndarray(tone.reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = 8000
    encoded = b"".join(bytes(p) for p in enc.encode(frame)) + b"".join(
        bytes(p) for p in enc.encode(None)
    )
    assert len(encoded) == tone.size
    decoder = make_decoder(law, 8000, 1)
    decoded = np.concatenate(
        [decoder.push(encoded[i : i + 77]) for i in range(0, len(encoded), 77)]
    )
    err = decoded.astype(np.float64) - tone
    snr = 10 * np.log10(np.sum(tone.astype(np.float64) ** 2) / np.sum(err**2))
    assert snr > 30  # G.711 gives ~38 dB on a loud tone
    framer = PcmFramer(decoder.sample_rate, decoder.channels)
    frames = framer.push_pcm(decoded) + framer.flush()
    assert len(frames) == 25
    assert dominant_freq(np.concatenate(frames), 16000) == pytest.approx(300.0, abs=10)


def test_g711_stereo_rejects_partial_sample():
    decoder = make_decoder("alaw", 8000, 2)
    with pytest.raises(MediaError) as info:
        decoder.push(b"\x55" * 3)
    assert info.value.code == 400
    assert decoder.push(b"\x55" * 4).size == 4


# ---------------------------------------------------------------------------------------
# Opus in WebM / Ogg


@pytest.mark.parametrize("container", ["webm", "ogg"])
@pytest.mark.parametrize("channels", [1, 2])
def test_opus_streamed_in_random_chunks_matches_source(opus_media, container, channels):
    data = opus_media[(container, channels)]
    assert data[:4] == (b"OggS" if container == "ogg" else bytes.fromhex("1a45dfa3"))
    decoder = make_decoder("opus", 48000, channels)
    assert isinstance(decoder, OpusStreamDecoder)
    chunks = random_chunks(data, np.random.default_rng(1))
    pcm, errors = decode_chunks(decoder, chunks)
    assert errors == []
    # Same as decoding in one piece: chunking is invisible.
    oneshot = make_decoder("opus", 48000, channels)
    assert np.array_equal(pcm, np.concatenate([oneshot.push(data), oneshot.flush()]))
    # Duration: encoder padding is trimmed (Ogg end granule / WebM DiscardPadding).
    assert abs(pcm.size // channels - 48000) <= 960
    left = pcm[0::channels]
    assert dominant_freq(left, 48000) == pytest.approx(440.0, abs=3)
    expected = sine(48000, 1.0, 440.0)[: left.size]
    lag = int(np.argmax(np.correlate(left[4800:9600].astype(float), expected[4800:9600], "full")))
    assert abs(lag - (4800 - 1)) <= 2  # aligned with the source (pre-skip removed)
    if channels == 2:
        assert np.abs(pcm[0::2].astype(int) - pcm[1::2]).max() < 600


def test_ffmpeg_native_opus_decoder_fallback_agrees_with_libopus(opus_media, monkeypatch):
    """Wheels without libopus fall back to FFmpeg's own decoder (float output)."""
    import media.audio

    data = opus_media[("ogg", 2)]
    ref = make_decoder("opus", 48000, 2)
    expected = np.concatenate([ref.push(data), ref.flush()])
    monkeypatch.setattr(media.audio, "_OPUS_CODEC", "opus")
    native = make_decoder("opus", 48000, 2)
    got = np.concatenate([native.push(data), native.flush()])
    assert got.shape == expected.shape
    assert np.abs(got.astype(int) - expected).max() <= 64  # decoders differ by rounding


def test_opus_decodes_into_the_framer(opus_media):
    decoder = make_decoder("opus", 16000, 1)
    framer = PcmFramer(decoder.sample_rate, decoder.channels)
    frames = []
    for chunk in random_chunks(opus_media[("webm", 1)], np.random.default_rng(2), 900):
        frames += framer.push_pcm(decoder.push(chunk))
    frames += framer.push_pcm(decoder.flush()) + framer.flush()
    assert framer.input_ms == pytest.approx(1000, abs=20)
    assert len(frames) == pytest.approx(50, abs=1)
    assert dominant_freq(np.concatenate(frames), 16000) == pytest.approx(440.0, abs=10)


def test_opus_channel_count_follows_the_declaration(opus_media):
    as_stereo = make_decoder("opus", 48000, 2)
    pcm = np.concatenate([as_stereo.push(opus_media[("ogg", 1)]), as_stereo.flush()])
    assert pcm.size == 2 * 48000 and np.array_equal(pcm[0::2], pcm[1::2])
    as_mono = make_decoder("opus", 48000, 1)
    mono = np.concatenate([as_mono.push(opus_media[("webm", 2)]), as_mono.flush()])
    assert mono.size == 48000


def test_webm_with_unknown_size_clusters(opus_media):
    live = with_unknown_size_clusters(opus_media[("webm", 1)])
    assert b"\x1f\x43\xb6\x75\x01\xff\xff\xff\xff\xff\xff\xff" in live
    pcm, errors = decode_chunks(
        make_decoder("opus", 48000, 1), random_chunks(live, np.random.default_rng(3))
    )
    ref = make_decoder("opus", 48000, 1)
    assert errors == []
    assert np.array_equal(pcm, np.concatenate([ref.push(opus_media[("webm", 1)]), ref.flush()]))


@pytest.mark.parametrize(
    "container,expected", [("matroska", "no Opus audio track"), ("ogg", "OpusHead")]
)
def test_other_codec_in_the_container_is_a_415(container, expected):
    sink = _Unseekable()
    out = av.open(sink, "w", format=container)
    stream = out.add_stream("flac", rate=16000, layout="mono")
    frame = av.AudioFrame.from_ndarray(sine(16000, 0.5, 440.0).reshape(1, -1), "s16", "mono")
    frame.sample_rate, frame.pts = 16000, 0
    for packet in [*stream.encode(frame), *stream.encode(None)]:
        out.mux(packet)
    out.close()
    pcm, errors = decode_chunks(
        make_decoder("opus", 48000, 1), random_chunks(bytes(sink.data), np.random.default_rng(0))
    )
    assert pcm.size == 0
    assert len(errors) == 1 and errors[0].code == 415 and expected in errors[0].message


@pytest.mark.parametrize("container", ["webm", "ogg"])
def test_opus_without_header_is_a_415_and_a_new_stream_works(opus_media, container):
    data = opus_media[(container, 1)]
    decoder = make_decoder("opus", 48000, 1)
    with pytest.raises(MediaError) as info:
        decoder.push(data[len(data) // 2 :])
    assert info.value.code == 415
    pcm, errors = decode_chunks(decoder, random_chunks(data, np.random.default_rng(4)))
    assert errors == [] and pcm.size == 48000


@pytest.mark.parametrize(
    "container,damage", [("webm", "insert"), ("ogg", "insert"), ("ogg", "overwrite")]
)
def test_opus_corrupt_bytes_report_415_and_decoding_continues(opus_media, container, damage):
    # Overwriting bytes inside a WebM block is undetectable (Opus has no checksum);
    # Ogg pages are CRC-protected, and inserted bytes break either container's structure.
    data = bytearray(opus_media[(container, 1)])
    rng = np.random.default_rng(7)
    start = len(data) // 3
    junk = rng.integers(0, 256, 40, dtype=np.uint8).tobytes()
    data[start : start + (40 if damage == "overwrite" else 0)] = junk
    chunks = random_chunks(bytes(data), rng)
    pcm, errors = decode_chunks(make_decoder("opus", 48000, 1), chunks)
    assert errors and all(e.code in (413, 415) for e in errors)
    # The stream recovered: most of it is there, and the tail is still the 440 Hz tone.
    assert pcm.size > 48000 * 0.6
    assert dominant_freq(pcm[-24000:], 48000) == pytest.approx(440.0, abs=3)


@pytest.mark.parametrize("container", ["webm", "ogg"])
def test_opus_truncated_chunk_then_resume(opus_media, container):
    data = opus_media[(container, 1)]
    chunks = random_chunks(data, np.random.default_rng(8), 700)
    k = len(chunks) // 2
    chunks[k] = chunks[k][: len(chunks[k]) // 2]  # the rest of this chunk never arrives
    decoder = make_decoder("opus", 48000, 1)
    pcm, errors = decode_chunks(decoder, chunks)
    assert errors and {e.code for e in errors} <= {413, 415}
    assert pcm.size > 48000 * 0.5
    assert dominant_freq(pcm[-24000:], 48000) == pytest.approx(440.0, abs=3)


@pytest.mark.parametrize("container", ["webm", "ogg"])
def test_opus_garbage_then_a_restarted_stream_decodes_fully(opus_media, container):
    data = opus_media[(container, 1)]
    decoder = make_decoder("opus", 48000, 1)
    first_half = decoder.push(data[: len(data) // 2])
    assert first_half.size > 0
    with pytest.raises(MediaError) as info:
        for junk in np.random.default_rng(9).integers(0, 256, (5, 300), dtype=np.uint8):
            decoder.push(junk.tobytes())
    assert info.value.code in (413, 415)
    # The client restarts its recorder: a fresh stream with a header decodes completely.
    out, errors = [], []
    for chunk in random_chunks(data, np.random.default_rng(10)):
        try:
            out.append(decoder.push(chunk))
        except MediaError as e:
            errors.append(e)
    out.append(decoder.flush())
    restarted = np.concatenate(out)
    ref = make_decoder("opus", 48000, 1)
    expected = np.concatenate([ref.push(data), ref.flush()])
    assert restarted.size >= expected.size
    assert np.array_equal(restarted[-expected.size :], expected)


def test_webm_recorder_restart_mid_block(opus_media):
    data = opus_media[("webm", 1)]
    decoder = make_decoder("opus", 48000, 1)
    before = decoder.push(data[: len(data) // 2 + 7])  # stops inside a SimpleBlock
    with pytest.raises(MediaError) as info:
        decoder.push(data[:3000])  # a new recorder: starts with the EBML header
    assert info.value.code == 415 and "restarted" in info.value.message
    after = np.concatenate([decoder.push(data[3000:]), decoder.flush()])
    ref = make_decoder("opus", 48000, 1)
    assert before.size > 0
    assert np.array_equal(after, np.concatenate([ref.push(data), ref.flush()]))


def test_audio_decoded_before_an_error_is_returned_by_the_next_push(opus_media):
    data = opus_media[("ogg", 1)]
    decoder = make_decoder("opus", 48000, 1)
    good = decoder.push(data[:4000])
    with pytest.raises(MediaError):
        decoder.push(data[4000:6000] + b"OggS\x00" + bytes(40))  # good pages, then a bogus one
    carried = decoder.push(b"")
    assert carried.size > 0
    ref = make_decoder("opus", 48000, 1)
    clean = ref.push(data[:6000])
    assert np.array_equal(np.concatenate([good, carried])[: clean.size], clean)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    container=st.sampled_from(["webm", "ogg"]),
    edits=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), max_size=12),
    drop=st.lists(st.integers(0, 200), max_size=3),
    seed=st.integers(0, 2**16),
)
def test_opus_fuzz_only_media_errors(opus_media, container, edits, drop, seed):
    """Any damage (flipped bytes, lost chunks) yields MediaError 413/415 or audio, never a crash."""
    data = bytearray(opus_media[(container, 2)])
    for where, value in edits:
        data[min(int(where * len(data)), len(data) - 1)] = value
    chunks = random_chunks(bytes(data), np.random.default_rng(seed), 600)
    chunks = [c for i, c in enumerate(chunks) if i not in drop]
    decoder = make_decoder("opus", 48000, 2)
    pcm, errors = decode_chunks(decoder, chunks)
    assert pcm.dtype == np.int16 and pcm.size % 2 == 0
    assert all(e.code in (413, 415) for e in errors)


# ---------------------------------------------------------------------------------------
# Helpers


def test_wav_round_trip_and_errors():
    pcm = noise(24000, 0.1, 2)
    wav = pcm_to_wav_bytes(pcm, 24000, 2)
    back, rate, channels = wav_bytes_to_pcm(wav)
    assert (rate, channels) == (24000, 2) and np.array_equal(back, pcm)
    with pytest.raises(MediaError) as info:
        wav_bytes_to_pcm(b"RIFF not really")
    assert info.value.code == 415


def test_level_and_duration():
    assert audio_level_dbfs(sine(16000, 0.1, 1000.0, amp=32767)) == pytest.approx(-3.01, abs=0.05)
    assert audio_level_dbfs(sine(16000, 0.1, 1000.0, amp=3277)) == pytest.approx(-23.01, abs=0.1)
    assert audio_level_dbfs(np.zeros(100, np.int16)) == MIN_DBFS
    assert audio_level_dbfs(np.zeros(0, np.int16)) == MIN_DBFS
    # Extremes: (-32768)**2 overflows int16 and a long sum of them int32; the sum is exact.
    assert audio_level_dbfs(np.full(3_000_000, -32768, np.int16)) == 0.0
    assert duration_ms(320, 16000) == 20.0
    assert duration_ms(441, 44100) == 10.0
