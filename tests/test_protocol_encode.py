"""Server-message encoding: the direct audio-chunk encoder writes exactly what pydantic
would, chunk events carry their chunk unchanged, and reply audio converts as before."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from duplex.protocol import (
    ChunkEvent,
    Media,
    StreamChunk,
    ToolCall,
    _encode_audio_chunk,
    chunk_event,
    encode_server_message,
    parse_server_message,
)
from media.audio import StreamResampler
from server.reply_audio import ReplyAudio

PCM = (np.arange(2400, dtype=np.int16) * 13).astype("<i2").tobytes()


def pydantic_json(event: ChunkEvent) -> str:
    return event.model_dump_json(exclude_none=True)


def audio_event(seq: int = 7, response_id: str = "resp_0123abcd", **media: object) -> ChunkEvent:
    fields = {"mime_type": "audio/pcm", "data": PCM, "sample_rate": 24000, "channels": 1}
    event = chunk_event(StreamChunk(response_id=response_id, media=Media(**(fields | media))))
    event.seq = seq
    return event


@pytest.mark.parametrize(
    "event",
    [
        audio_event(),
        audio_event(seq=1, data=b""),
        audio_event(seq=2**40, data=b"\x00\x01\x02"),  # odd length: base64 padding
        audio_event(data=PCM[:4798]),
        audio_event(sample_rate=None),
        audio_event(channels=None),
        audio_event(sample_rate=None, channels=None),
        audio_event(sample_rate=8000, channels=2),
        audio_event(mime_type="audio/pcm;rate=24000"),
        audio_event(response_id=""),
    ],
    ids=lambda e: f"{e.media.mime_type} {e.media.sample_rate} {e.media.channels} {e.seq}",
)
def test_direct_audio_encoding_equals_pydantic(event: ChunkEvent) -> None:
    text = _encode_audio_chunk(event)
    assert text is not None, "this shape should take the direct encoder"
    assert text == pydantic_json(event) == encode_server_message(event)
    assert parse_server_message(text) == event


@pytest.mark.parametrize(
    "event",
    [
        audio_event(response_id='resp_"quoted"'),
        audio_event(response_id="resp_back\\slash"),
        audio_event(response_id="resp_\u00e9t\u00e9"),
        audio_event(response_id="resp_\n\x00\x1f"),
        audio_event(mime_type='audio/"pcm"'),
        audio_event(width=320, height=240),
        audio_event(width=320),
        ChunkEvent(seq=3, response_id="r", delta="hi ", media=Media(mime_type="a", data=b"x")),
        ChunkEvent(seq=3, response_id="r", media=Media(mime_type="a", data=b"x"), metadata={}),
        ChunkEvent(seq=3, response_id="r", media=Media(mime_type="a", data=b"x"), error="e"),
        ChunkEvent(seq=3, response_id="r", media=Media(mime_type="a", data=b"x"), interrupted=True),
        ChunkEvent(
            seq=3,
            response_id="r",
            media=Media(mime_type="a", data=b"x"),
            tool_calls=[ToolCall(id="c", name="n")],
            finish_reason="tool_calls",
        ),
        ChunkEvent(seq=4, response_id="r", delta="text only"),
        ChunkEvent(seq=5, response_id="r", finish_reason="stop", metadata={"usage": {"x": 1}}),
        ChunkEvent(seq=6, response_id="r", interrupted=True),
    ],
)
def test_other_chunks_go_through_pydantic(event: ChunkEvent) -> None:
    assert _encode_audio_chunk(event) is None
    assert encode_server_message(event) == pydantic_json(event)


@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(max_size=64),
    response_id=st.text(max_size=24),
    mime_type=st.sampled_from(["audio/pcm", "audio/opus", "x\\y", 'a"b', "\u00e9"]),
    sample_rate=st.none() | st.integers(0, 10**6),
    channels=st.none() | st.integers(0, 8),
    seq=st.integers(0, 2**62),
)
def test_encoding_equals_pydantic_for_any_audio_chunk(
    data: bytes,
    response_id: str,
    mime_type: str,
    sample_rate: int | None,
    channels: int | None,
    seq: int,
) -> None:
    media = Media(mime_type=mime_type, data=data, sample_rate=sample_rate, channels=channels)
    event = chunk_event(StreamChunk(response_id=response_id, media=media))
    event.seq = seq
    assert encode_server_message(event) == pydantic_json(event)
    assert json.loads(encode_server_message(event))["seq"] == seq


def test_chunk_event_keeps_every_field_and_the_media_object() -> None:
    media = Media(mime_type="audio/pcm", data=PCM, sample_rate=24000, channels=1)
    chunks = [
        StreamChunk(response_id="r", media=media),
        StreamChunk(response_id="r", delta="a", content="b", metadata={"kind": "x", "n": [1]}),
        StreamChunk(tool_calls=[ToolCall(id="c", name="f", arguments="{}")]),
        StreamChunk(response_id="r", finish_reason="stop", interrupted=True, error="boom"),
    ]
    for chunk in chunks:
        event = chunk_event(chunk)
        assert type(event) is ChunkEvent and event.type == "chunk" and event.seq == 0
        assert {k: getattr(event, k) for k in StreamChunk.model_fields} == chunk.__dict__
        assert event.media is chunk.media
    assert chunk_event(chunks[1]).metadata is not chunks[1].metadata  # a copy, as before


def test_reply_audio_matches_a_stream_resampler_and_counts_ms() -> None:
    rng = np.random.default_rng(3)
    pieces = [
        (rng.standard_normal(n) * 3000).astype("<i2").tobytes() for n in (2, 1600, 7, 1600, 800)
    ]
    reply = ReplyAudio(24000)
    reference = StreamResampler(16000, 1, 24000, 1)
    out: list[bytes] = []
    held = 0
    for piece in pieces:
        media = reply.convert(Media(mime_type="audio/pcm", data=piece, sample_rate=16000))
        expected = reference.push(np.frombuffer(piece, dtype="<i2")).astype("<i2").tobytes()
        if media is None:  # the first 2 samples are still in the filter
            assert expected == b""
            held += 1
            continue
        assert (media.mime_type, media.sample_rate, media.channels) == ("audio/pcm", 24000, 1)
        assert media.data == expected
        out.append(media.data)
    assert held == 1 and len(out) == 4
    assert reply.ms_sent == pytest.approx(sum(map(len, out)) / 2 / 24)


def test_a_response_hears_nothing_of_the_previous_one() -> None:
    """Each response has its own resampler (they are too small to keep or pool), so a new
    response hears nothing of the previous one, even one cut off mid-stream."""
    rng = np.random.default_rng(4)
    loud = (rng.standard_normal(1600) * 20000).astype("<i2").tobytes()
    silence = bytes(3200)
    first = ReplyAudio(24000)
    assert first.convert(Media(mime_type="audio/pcm", data=loud, sample_rate=16000))
    second = ReplyAudio(24000)
    got = second.convert(Media(mime_type="audio/pcm", data=silence, sample_rate=16000))
    assert got is not None and not any(got.data)
    # 100 ms less the filter's half (8 samples at 16 kHz) still in it: 2388 samples.
    assert len(got.data) == 2 * (2400 - 12)
    assert second._resampler is not first._resampler


def test_reply_audio_passes_audio_at_the_output_rate_through() -> None:
    reply = ReplyAudio(24000)
    media = Media(mime_type="audio/pcm", data=PCM, sample_rate=24000, channels=1)
    assert reply.convert(media) is media
    assert reply.ms_sent == pytest.approx(100.0)
    unconverted = ReplyAudio(None)
    other = Media(mime_type="audio/pcm", data=PCM, sample_rate=16000)
    assert unconverted.convert(other) is other
    assert unconverted.ms_sent == pytest.approx(150.0)
