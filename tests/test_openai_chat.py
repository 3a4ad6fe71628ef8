"""OpenAIChatProvider, the SSE parser and the STT/TTS stages against the local fake."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import wave
from collections.abc import AsyncIterator
from contextlib import aclosing

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from duplex.protocol import ImageFrame, Message, SessionConfig, StreamChunk, ToolSpec
from server.providers.base import AudioClip, ProviderError, TurnRequest
from server.providers.openai_chat import OpenAIChatProvider, SSEEvent, SSEParser
from server.providers.speech_stages import SentenceSplitter, SpeechToText, TextToSpeech
from tests.fakes.openai_http import (
    ChatReply,
    FakeOpenAI,
    FakeToolCall,
    error_reply,
    run_fake,
)

KEY = "sk-test-0123456789"
CHAT = "/v1/chat/completions"


def make_request(
    text: str = "Hello?",
    *,
    history: list[Message] | None = None,
    tools: list[ToolSpec] | None = None,
    config: SessionConfig | None = None,
    frames: list[ImageFrame] | None = None,
    audio: AudioClip | None = None,
    instructions: str = "Be brief.",
) -> TurnRequest:
    return TurnRequest(
        session_id="sess_1",
        turn_id="turn_1",
        response_id="resp_1",
        config=config or SessionConfig(),
        instructions=instructions,
        history=history or [],
        text=text,
        audio=audio,
        frames=frames or [],
        tools=tools or [],
    )


async def collect(stream: AsyncIterator[StreamChunk]) -> list[StreamChunk]:
    async with asyncio.timeout(10):
        return [chunk async for chunk in stream]


def text_of(chunks: list[StreamChunk]) -> str:
    return "".join(c.delta or "" for c in chunks)


# --------------------------------------------------------------------------------------
# SSE parser


def _serialise(events: list[tuple[str | None, list[str]]], newline: str, comments: bool) -> bytes:
    out = "\ufeff" if comments else ""
    for name, lines in events:
        if comments:
            out += f": keep-alive{newline}"
        if name is not None:
            out += f"event: {name}{newline}"
        out += "".join(f"data: {line}{newline}" for line in lines)
        out += newline
    return out.encode()


_line = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=12
)
_events = st.lists(
    st.tuples(
        st.none() | st.text(alphabet="abcxyz", min_size=1, max_size=5),
        st.lists(_line, min_size=1, max_size=3),
    ),
    max_size=6,
)


@settings(max_examples=150, deadline=None)
@given(
    events=_events,
    newline=st.sampled_from(["\n", "\r\n", "\r"]),
    comments=st.booleans(),
    data=st.data(),
)
def test_sse_parser_gives_the_same_events_for_any_split(
    events: list[tuple[str | None, list[str]]], newline: str, comments: bool, data: st.DataObject
) -> None:
    raw = _serialise(events, newline, comments)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=12)))
    parser = SSEParser()
    got: list[SSEEvent] = []
    start = 0
    for cut in [*cuts, len(raw)]:
        got.extend(parser.feed(raw[start:cut]))
        start = cut
    got.extend(parser.close())
    expected = [SSEEvent(data="\n".join(lines), event=name or "message") for name, lines in events]
    assert got == expected


def test_sse_parser_fields_and_comments() -> None:
    parser = SSEParser()
    raw = (
        b": comment\n"
        b"data:no space\n\n"
        b"data\n\n"  # a field without colon: empty data line
        b'id: 7\nevent: ping\ndata: {"a": 1}\ndata: second\n\n'
        b"retry: 100\nunknown: x\n\n"  # no data: nothing dispatched
        b"data: [DONE]\n\n"
        b"data: unterminated"
    )
    events = parser.feed(raw) + parser.close()
    assert events == [
        SSEEvent(data="no space"),
        SSEEvent(data=""),
        SSEEvent(data='{"a": 1}\nsecond', event="ping", id="7"),
        SSEEvent(data="[DONE]", id="7"),
    ]


def test_sse_parser_splits_inside_utf8_and_crlf() -> None:
    raw = "data: Grüße 🎉\r\n\r\n".encode()
    parser = SSEParser()
    events = [e for b in raw for e in parser.feed(bytes([b]))]
    assert events == [SSEEvent(data="Grüße 🎉")]


# --------------------------------------------------------------------------------------
# Chat streaming


async def test_text_streams_as_deltas_with_usage() -> None:
    text = "Grüße aus Köln 🎉 — ça va? Everything is fine here."
    async with run_fake(api_key=KEY, seed=3, max_piece_bytes=5) as fake:
        fake.script(ChatReply(text=text))
        provider = OpenAIChatProvider(base_url=fake.url, api_key=KEY, model="fake-model")
        try:
            chunks = await collect(provider.stream(make_request("Hi there")))
        finally:
            await provider.aclose()
        [sent] = fake.requests_to(CHAT)
    assert text_of(chunks) == text
    assert sum(1 for c in chunks if c.delta) > 5  # streamed, not one piece
    assert all(c.response_id == "resp_1" for c in chunks)
    final = chunks[-1]
    assert final.finish_reason == "stop"
    assert final.metadata is not None and final.metadata["usage"]["total_tokens"] > 0
    body = sent.json
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["model"] == "fake-model"
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
    ]
    assert "tools" not in body
    assert sent.headers["authorization"] == f"Bearer {KEY}"


async def test_crlf_streams_are_parsed_too() -> None:
    async with run_fake(seed=5, line_ending="\r\n", max_piece_bytes=3) as fake:
        fake.script(ChatReply(text="Line endings differ between servers."))
        provider = OpenAIChatProvider(base_url=fake.url)
        chunks = await collect(provider.stream(make_request()))
        await provider.aclose()
    assert text_of(chunks) == "Line endings differ between servers."
    assert chunks[-1].finish_reason == "stop"


async def test_model_tools_and_whitelisted_options_are_sent() -> None:
    config = SessionConfig(
        model="override-model",
        provider_options={"temperature": 0.2, "max_tokens": 50, "not_an_option": True},
    )
    tools = [
        ToolSpec(
            name="get_weather",
            description="Weather for a city.",
            parameters={"type": "object", "properties": {"city": {"type": "string"}}},
        )
    ]
    async with run_fake() as fake:
        fake.script(ChatReply(text="ok"))
        provider = OpenAIChatProvider(base_url=fake.url)
        await collect(provider.stream(make_request(tools=tools, config=config)))
        await provider.aclose()
        body = fake.requests_to(CHAT)[0].json
    assert body["model"] == "override-model"
    assert body["temperature"] == 0.2
    assert body["max_tokens"] == 50
    assert "not_an_option" not in body
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]


async def test_tool_call_arguments_over_many_chunks_are_accumulated() -> None:
    arguments = json.dumps({"city": "Zürich", "days": [1, 2, 3], "note": "a " * 40})
    call = FakeToolCall(name="get_weather", arguments=arguments, pieces=40)
    async with run_fake(seed=11) as fake:
        fake.script(ChatReply(text="Let me check.", tool_calls=[call]))
        provider = OpenAIChatProvider(base_url=fake.url)
        chunks = await collect(provider.stream(make_request()))
        await provider.aclose()
    assert text_of(chunks) == "Let me check."
    final = chunks[-1]
    assert final.finish_reason == "tool_calls"
    assert final.tool_calls is not None
    [got] = final.tool_calls
    assert (got.id, got.name, got.arguments) == (call.id, "get_weather", arguments)
    assert [c for c in chunks if c.tool_calls] == [final]  # one chunk, at the end


async def test_parallel_interleaved_calls_are_told_apart_by_index() -> None:
    calls = [
        FakeToolCall(name="lookup", arguments='{"q": "first query"}', pieces=6),
        FakeToolCall(name="lookup", arguments='{"q": "second query"}', pieces=6),
    ]
    async with run_fake(seed=2) as fake:
        fake.script(ChatReply(tool_calls=calls, interleave_calls=True))
        provider = OpenAIChatProvider(base_url=fake.url)
        chunks = await collect(provider.stream(make_request()))
        await provider.aclose()
    assert chunks[-1].tool_calls is not None
    assert [(c.id, c.arguments) for c in chunks[-1].tool_calls] == [
        (calls[0].id, '{"q": "first query"}'),
        (calls[1].id, '{"q": "second query"}'),
    ]


async def test_incomplete_tool_call_is_dropped_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = FakeToolCall(name="get_weather", arguments='{"city": "Par')
    async with run_fake() as fake:
        fake.script(ChatReply(text="Checking", tool_calls=[broken]))
        provider = OpenAIChatProvider(base_url=fake.url)
        chunks = await collect(provider.stream(make_request()))
        await provider.aclose()
    final = chunks[-1]
    assert final.tool_calls is None
    assert final.finish_reason == "stop"
    assert final.metadata is not None
    assert any("not valid JSON" in w for w in final.metadata["warnings"])
    assert any("dropping incomplete" in r.getMessage() for r in caplog.records)


async def test_malformed_chunks_are_skipped_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    text = "Still readable after broken chunks."
    async with run_fake(seed=9) as fake:
        fake.script(ChatReply(text=text, malformed=2))
        provider = OpenAIChatProvider(base_url=fake.url)
        chunks = await collect(provider.stream(make_request()))
        await provider.aclose()
    assert text_of(chunks) == text
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].metadata is not None
    assert chunks[-1].metadata["malformed_chunks"] == 2
    assert sum("malformed SSE" in r.getMessage() for r in caplog.records) == 2


async def test_finish_reasons_are_mapped() -> None:
    async with run_fake() as fake:
        fake.script(
            ChatReply(text="cut", finish_reason="length"),
            ChatReply(text="hidden", finish_reason="content_filter"),
        )
        provider = OpenAIChatProvider(base_url=fake.url)
        length = await collect(provider.stream(make_request()))
        filtered = await collect(provider.stream(make_request()))
        await provider.aclose()
    assert length[-1].finish_reason == "length"
    assert filtered[-1].finish_reason == "stop"
    assert filtered[-1].metadata is not None and filtered[-1].metadata["content_filter"] is True


async def test_stream_cut_before_the_end_is_an_error() -> None:
    async with run_fake() as fake:
        fake.script(ChatReply(text="one two three four", stop_after_events=3))
        provider = OpenAIChatProvider(base_url=fake.url)
        with pytest.raises(ProviderError, match="ended before"):
            await collect(provider.stream(make_request()))
        await provider.aclose()


async def test_non_streaming_answer_is_accepted() -> None:
    """A server that ignores ``stream: true`` still works (seen with some proxies)."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            json={
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": "whole",
                            "tool_calls": [
                                {
                                    "id": "call_1",
                                    "type": "function",
                                    "function": {"name": "f", "arguments": "{}"},
                                }
                            ],
                        },
                        "finish_reason": "tool_calls",
                    }
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            },
        )

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        provider = OpenAIChatProvider(base_url="http://upstream/v1", client=client)
        chunks = await collect(provider.stream(make_request()))
    assert text_of(chunks) == "whole"
    assert chunks[-1].tool_calls is not None and chunks[-1].tool_calls[0].id == "call_1"
    assert chunks[-1].metadata is not None and chunks[-1].metadata["usage"]["total_tokens"] == 2


# --------------------------------------------------------------------------------------
# Errors


async def test_429_carries_retry_after_and_upstream_message() -> None:
    async with run_fake() as fake:
        fake.script(error_reply(429, "Rate limit reached for gpt-4o-mini.", retry_after=7))
        provider = OpenAIChatProvider(base_url=fake.url)
        with pytest.raises(ProviderError) as info:
            await collect(provider.stream(make_request()))
        await provider.aclose()
    err = info.value
    assert err.code == 502
    assert err.upstream_status == 429
    assert err.retry_after == 7
    assert err.upstream_code == "rate_limit_exceeded"
    assert err.message == "upstream 429: Rate limit reached for gpt-4o-mini."
    assert not err.fatal


async def test_500_is_a_provider_error() -> None:
    async with run_fake() as fake:
        fake.script(error_reply(500))
        provider = OpenAIChatProvider(base_url=fake.url)
        with pytest.raises(ProviderError) as info:
            await collect(provider.stream(make_request()))
        await provider.aclose()
    assert info.value.upstream_status == 500
    assert info.value.code == 502
    assert "had an error while processing" in info.value.message
    assert info.value.retry_after is None


async def test_401_for_a_wrong_key_is_fatal() -> None:
    async with run_fake(api_key=KEY) as fake:
        provider = OpenAIChatProvider(base_url=fake.url, api_key="sk-wrong-key-123456")
        with pytest.raises(ProviderError) as info:
            await collect(provider.stream(make_request()))
        await provider.aclose()
    assert info.value.upstream_status == 401
    assert info.value.upstream_code == "invalid_api_key"
    assert info.value.message.startswith("upstream 401: Incorrect API key provided")
    assert info.value.fatal


async def test_connection_refused_is_a_provider_error() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    provider = OpenAIChatProvider(base_url=f"http://127.0.0.1:{port}/v1", timeout_s=5)
    with pytest.raises(ProviderError) as info:
        await collect(provider.stream(make_request()))
    await provider.aclose()
    assert info.value.code == 502
    assert info.value.upstream_status is None


async def test_error_inside_the_stream_is_a_provider_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = b'data: {"error": {"message": "model crashed"}}\n\n'
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        provider = OpenAIChatProvider(base_url="http://upstream/v1", client=client)
        with pytest.raises(ProviderError, match="model crashed"):
            await collect(provider.stream(make_request()))


# --------------------------------------------------------------------------------------
# Multimodal content and history


def _pcm(ms: int, rate: int = 16000) -> bytes:
    return b"\x01\x00" * (rate * ms // 1000)


async def test_frames_become_image_parts_and_audio_an_input_audio_part() -> None:
    jpeg = b"\xff\xd8\xff\xe0fake-jpeg-bytes"
    png = b"\x89PNG\r\n\x1a\nfake"
    frames = [ImageFrame(data=jpeg), ImageFrame(data=png, mime_type="image/png")]
    clip = AudioClip(pcm=_pcm(250), sample_rate=16000)
    async with run_fake() as fake:
        provider = OpenAIChatProvider(base_url=fake.url, audio_input=True)
        await collect(provider.stream(make_request("What is this?", frames=frames, audio=clip)))
        without_audio = OpenAIChatProvider(base_url=fake.url, audio_input=False)
        await collect(without_audio.stream(make_request("Again", frames=frames, audio=clip)))
        await provider.aclose()
        await without_audio.aclose()
        first, second = (r.json for r in fake.requests_to(CHAT))
    parts = first["messages"][-1]["content"]
    assert first["messages"][-1]["role"] == "user"
    assert parts[0] == {"type": "text", "text": "What is this?"}
    assert parts[1] == {
        "type": "image_url",
        "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()},
    }
    assert parts[2]["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(png).decode()
    assert parts[3]["type"] == "input_audio"
    assert parts[3]["input_audio"]["format"] == "wav"
    with wave.open(io.BytesIO(base64.b64decode(parts[3]["input_audio"]["data"]))) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        assert w.readframes(w.getnframes()) == clip.pcm
    assert [p["type"] for p in second["messages"][-1]["content"]] == [
        "text",
        "image_url",
        "image_url",
    ]


async def test_history_and_this_turns_tool_exchange_are_ordered() -> None:
    history = [
        Message(role="user", content="Weather in Oslo?"),
        Message(
            role="assistant",
            content="",
            metadata={"tool_calls": [{"id": "call_a", "name": "weather", "arguments": '{"c":1}'}]},
        ),
        Message(role="tool", content='{"t": 3}', metadata={"tool_call_id": "call_a"}),
        Message(role="assistant", content="3 degrees."),
        Message(role="tool", content="orphan"),  # no tool_call_id: skipped
        # This turn's exchange (stamped with the turn id): goes after the user content.
        Message(
            role="assistant",
            content="Checking.",
            metadata={
                "turn_id": "turn_1",
                "tool_calls": [{"id": "call_b", "name": "weather", "arguments": "{}"}],
            },
        ),
        Message(
            role="tool",
            content='{"t": 5}',
            metadata={"turn_id": "turn_1", "tool_call_id": "call_b"},
        ),
    ]
    async with run_fake() as fake:
        provider = OpenAIChatProvider(base_url=fake.url)
        await collect(provider.stream(make_request("And now?", history=history)))
        await provider.aclose()
        messages = fake.requests_to(CHAT)[0].json["messages"]
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"c":1}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": '{"t": 3}'},
        {"role": "assistant", "content": "3 degrees."},
        {"role": "user", "content": "And now?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "call_b",
                    "type": "function",
                    "function": {"name": "weather", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_b", "content": '{"t": 5}'},
    ]


# --------------------------------------------------------------------------------------
# Cancellation


async def test_cancelling_the_consumer_closes_the_upstream_response() -> None:
    hold = asyncio.Event()  # never set: the model "keeps thinking"
    async with run_fake() as fake:
        fake.script(ChatReply(text="first second third", hold_before_last=hold))
        provider = OpenAIChatProvider(base_url=fake.url)
        got_text = asyncio.Event()

        async def consume() -> None:
            async for chunk in provider.stream(make_request()):
                if chunk.delta:
                    got_text.set()

        task = asyncio.create_task(consume())
        async with asyncio.timeout(10):
            await got_text.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            [record] = fake.requests_to(CHAT)
            await record.finished.wait()
        assert record.aborted and not hold.is_set()
        await provider.aclose()


# --------------------------------------------------------------------------------------
# The official openai package against the fake


async def test_official_openai_client_streams_from_the_fake() -> None:
    async with run_fake(api_key=KEY, seed=4) as fake:
        fake.script(
            ChatReply(text="Hello from the fake."),
            ChatReply(tool_calls=[FakeToolCall(name="f", arguments='{"x": [1, 2]}', pieces=5)]),
            ChatReply(text="Not streamed."),
        )
        client = openai.AsyncOpenAI(base_url=fake.url, api_key=KEY, max_retries=0)
        try:
            async with asyncio.timeout(10):
                stream = await client.chat.completions.create(
                    model="fake-model",
                    messages=[{"role": "user", "content": "hi"}],
                    stream=True,
                    stream_options={"include_usage": True},
                )
                pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
                tool_stream = await client.chat.completions.create(
                    model="fake-model", messages=[{"role": "user", "content": "go"}], stream=True
                )
                arguments = ""
                async for c in tool_stream:
                    for delta in c.choices[0].delta.tool_calls or []:
                        arguments += delta.function.arguments or ""
                whole = await client.chat.completions.create(
                    model="fake-model", messages=[{"role": "user", "content": "once"}]
                )
                with pytest.raises(openai.RateLimitError) as limited:
                    fake.script(error_reply(429, retry_after=1))
                    await client.chat.completions.create(
                        model="fake-model", messages=[{"role": "user", "content": "x"}]
                    )
        finally:
            await client.close()
    assert "".join(pieces) == "Hello from the fake."
    assert json.loads(arguments) == {"x": [1, 2]}
    assert whole.choices[0].message.content == "Not streamed."
    assert whole.usage is not None and whole.usage.total_tokens > 0
    assert limited.value.status_code == 429


# --------------------------------------------------------------------------------------
# STT


async def test_transcribe_posts_a_wav_file() -> None:
    clip = AudioClip(pcm=_pcm(500), sample_rate=16000)
    async with run_fake(api_key=KEY) as fake:
        stt = SpeechToText(base_url=fake.url, api_key=KEY, language="en")
        text = await stt.transcribe(clip)
        fake.script_transcript("  turn the lights on ")
        scripted = await stt.transcribe(clip)
        assert await stt.transcribe(AudioClip(pcm=b"", sample_rate=16000)) == ""
        await stt.aclose()
        first = fake.requests_to("/v1/audio/transcriptions")[0]
    assert text == "transcript of 500 ms of audio"
    assert scripted == "turn the lights on"
    assert len(fake.requests_to("/v1/audio/transcriptions")) == 2
    assert first.form["model"] == "gpt-4o-mini-transcribe"
    assert first.form["language"] == "en"
    upload = first.files["file"]
    assert upload.filename.endswith(".wav")
    with wave.open(io.BytesIO(upload.data)) as w:
        assert (w.getframerate(), w.getnchannels()) == (16000, 1)
        assert w.readframes(w.getnframes()) == clip.pcm


async def test_transcribe_error_is_a_provider_error() -> None:
    async with run_fake(api_key=KEY) as fake:
        stt = SpeechToText(base_url=fake.url, api_key="sk-nope-nope-nope")
        with pytest.raises(ProviderError) as info:
            await stt.transcribe(AudioClip(pcm=_pcm(100), sample_rate=16000))
        await stt.aclose()
    assert info.value.upstream_status == 401


# --------------------------------------------------------------------------------------
# TTS


def test_sentence_splitter() -> None:
    splitter = SentenceSplitter(min_chars=10, max_chars=60)
    assert splitter.feed("Hi. ") == []  # too short alone
    assert splitter.feed("How are you today? I am") == ["Hi. How are you today?"]
    assert splitter.feed(" fine, 3.5 degrees") == []  # no boundary inside "3.5"
    assert splitter.feed("!\nNext") == ["I am fine, 3.5 degrees!"]
    assert splitter.flush() == "Next"
    assert splitter.flush() is None
    assert splitter.feed("这是第一句话。这是第二句话。") == ["这是第一句话。这是第二句话。"]
    long = SentenceSplitter(min_chars=10, max_chars=20)
    assert long.feed("one two three four five six") == ["one two three four"]


async def test_speak_streams_whole_samples() -> None:
    text = "Twenty-four kilohertz."
    async with run_fake(speech_pieces=5) as fake:
        tts = TextToSpeech(base_url=fake.url, voice="verse")
        async with asyncio.timeout(10):
            pieces = [p async for p in tts.speak(text)]
        await tts.aclose()
        body = fake.requests_to("/v1/audio/speech")[0].json
    assert len(pieces) >= 2
    assert all(len(p) % 2 == 0 for p in pieces)
    assert sum(map(len, pieces)) == int(24000 * len(text) * 10 / 1000) * 2
    assert body == {
        "model": "gpt-4o-mini-tts",
        "input": text,
        "voice": "verse",
        "response_format": "pcm",
    }


async def test_speak_stream_starts_speech_before_the_text_is_complete() -> None:
    text = "The first sentence is here. The second one follows it. And the end."
    release = asyncio.Event()  # the fake model sends its last words only after this
    async with run_fake(seed=1) as fake:
        fake.script(ChatReply(text=text, hold_before_last=release))
        provider = OpenAIChatProvider(base_url=fake.url)
        tts = TextToSpeech(base_url=fake.url)
        out: list[StreamChunk] = []
        async with asyncio.timeout(10):
            async with aclosing(tts.speak_stream(provider.stream(make_request()))) as stream:
                async for chunk in stream:
                    out.append(chunk)
                    if chunk.media is not None:
                        # If speech waited for the whole text this would never happen
                        # and the timeout would fail the test.
                        release.set()
        await provider.aclose()
        await tts.aclose()
        spoken = [r.json["input"] for r in fake.requests_to("/v1/audio/speech")]
    assert text_of(out) == text
    first_audio = next(i for i, c in enumerate(out) if c.media is not None)
    last_text = max(i for i, c in enumerate(out) if c.delta)
    assert first_audio < last_text
    assert spoken == [
        "The first sentence is here.",
        "The second one follows it.",
        "And the end.",
    ]
    audio = [c.media for c in out if c.media is not None]
    assert all(m.mime_type == "audio/pcm" and m.sample_rate == 24000 for m in audio)
    assert all(m.channels == 1 and len(m.data) % 2 == 0 for m in audio)
    assert sum(len(m.data) for m in audio) == sum(
        int(24000 * len(s) * 10 / 1000) * 2 for s in spoken
    )
    assert out[-1].finish_reason == "stop"
    assert all(c.response_id == "resp_1" for c in out)


@pytest.mark.parametrize("how", ["cancel", "aclose"])
async def test_cancelling_speak_stream_stops_llm_and_tts(how: str) -> None:
    hold = asyncio.Event()  # never set: both upstreams stay mid-stream
    fake = FakeOpenAI(seed=2)
    fake.speech_hold = asyncio.Event()
    async with run_fake(fake):
        fake.script(
            ChatReply(
                text="A first complete sentence. Then more and more text", hold_before_last=hold
            )
        )
        provider = OpenAIChatProvider(base_url=fake.url)
        tts = TextToSpeech(base_url=fake.url)
        got_audio = asyncio.Event()

        async def consume() -> None:
            async for chunk in tts.speak_stream(provider.stream(make_request())):
                if chunk.media is not None:
                    got_audio.set()

        async with asyncio.timeout(10):
            if how == "cancel":  # barge-in: the session cancels the response task
                task = asyncio.create_task(consume())
                await got_audio.wait()
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:  # the consumer stops reading and closes the generator
                stream = tts.speak_stream(provider.stream(make_request()))
                async for chunk in stream:
                    if chunk.media is not None:
                        break
                await stream.aclose()
            [chat] = fake.requests_to(CHAT)
            [speech] = fake.requests_to("/v1/audio/speech")
            await chat.finished.wait()
            await speech.finished.wait()
        assert chat.aborted and speech.aborted
        assert len(fake.requests_to("/v1/audio/speech")) == 1
        await provider.aclose()
        await tts.aclose()


async def test_speak_stream_tts_failure_is_a_provider_error() -> None:
    async with run_fake(api_key=KEY) as fake:
        fake.script(ChatReply(text="A sentence that is long enough. And another one here."))
        provider = OpenAIChatProvider(base_url=fake.url, api_key=KEY)
        tts = TextToSpeech(base_url=fake.url, api_key="sk-bad-bad-bad-bad")
        with pytest.raises(ProviderError) as info:
            await collect(tts.speak_stream(provider.stream(make_request())))
        await provider.aclose()
        await tts.aclose()
    assert info.value.upstream_status == 401
