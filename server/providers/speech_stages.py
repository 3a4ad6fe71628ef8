"""Optional STT and TTS stages around a text-only per-turn provider.

With them a plain chat model can hold a voice conversation: the user's audio
turn is transcribed first (``SpeechToText``), and the reply text is spoken
sentence by sentence while it is still being generated (``TextToSpeech``), so
the first audio plays long before the model has finished writing.

Both speak the OpenAI-compatible audio API (``/audio/transcriptions``,
``/audio/speech``) over httpx.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import httpx

from duplex.protocol import Media, StreamChunk, ToolEvent, ToolExecution
from server.providers.base import AudioClip, ProviderError, closing_stream
from server.providers.openai_chat import (
    OpenAIHTTPClient,
    provider_error_from_response,
    wav_bytes,
)

logger = logging.getLogger(__name__)

__all__ = ["SentenceSplitter", "SpeechToText", "TextToSpeech"]

#: ``/audio/speech`` with ``response_format: "pcm"`` returns 24 kHz s16le mono.
TTS_SAMPLE_RATE = 24000


class SpeechToText(OpenAIHTTPClient):
    """Transcribe a finished user turn via ``POST /audio/transcriptions``."""

    def __init__(
        self,
        base_url: str = "https://api.openai.com/v1",
        api_key: str | None = None,
        model: str = "gpt-4o-mini-transcribe",
        *,
        language: str | None = None,
        prompt: str | None = None,
        timeout_s: float = 60,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout_s, client)
        self.model = model
        self.language = language
        self.prompt = prompt

    async def transcribe(self, clip: AudioClip) -> str:
        """The transcript text (stripped); an empty clip gives "" without a request."""
        if not clip.pcm:
            return ""
        data = {"model": self.model, "response_format": "json"}
        if self.language:
            data["language"] = self.language
        if self.prompt:
            data["prompt"] = self.prompt
        files = {"file": ("turn.wav", wav_bytes(clip), "audio/wav")}
        try:
            response = await self._http().post(
                f"{self.base_url}/audio/transcriptions",
                data=data,
                files=files,
                headers=self._auth_headers(),
                timeout=self._timeout,
            )
        except httpx.TimeoutException as exc:
            raise ProviderError(f"transcription timeout: {type(exc).__name__}") from exc
        except httpx.HTTPError as exc:
            raise ProviderError(f"transcription connection failed: {exc!r}") from exc
        if not response.is_success:
            raise provider_error_from_response(response, response.content)
        try:
            payload = response.json()
        except ValueError:
            # response_format "text" servers (and some proxies) send the bare text.
            return response.text.strip()
        text = payload.get("text") if isinstance(payload, dict) else None
        if not isinstance(text, str):
            raise ProviderError("transcription response has no text")
        return text.strip()


class SentenceSplitter:
    """Cut streamed text into speakable pieces.

    A piece ends at ``.``/``!``/``?`` followed by whitespace, at CJK full stops,
    or at a newline — but only once it has ``min_chars`` characters, so that
    "Hi." or "Dr." is not sent alone (each TTS request costs a round trip and
    tiny pieces sound choppy). Text without punctuation is cut at a space after
    ``max_chars`` to bound latency.
    """

    _BOUNDARY = re.compile(r"[.!?…]+[\"'”’)\]]*\s+|[。！？]+|\n+")

    def __init__(self, min_chars: int = 20, max_chars: int = 300) -> None:
        self.min_chars = min_chars
        self.max_chars = max_chars
        self._buffer = ""

    def feed(self, text: str) -> list[str]:
        self._buffer += text
        pieces: list[str] = []
        search_from = 0
        while True:
            match = self._BOUNDARY.search(self._buffer, search_from)
            if match is None:
                break
            candidate = self._buffer[: match.end()].strip()
            if len(candidate) >= self.min_chars:
                pieces.append(candidate)
                self._buffer = self._buffer[match.end() :]
                search_from = 0
            else:
                search_from = match.end()
        if len(self._buffer) >= self.max_chars:
            cut = self._buffer.rfind(" ", 0, self.max_chars)
            cut = cut if cut > 0 else self.max_chars
            piece = self._buffer[:cut].strip()
            self._buffer = self._buffer[cut:]
            if piece:
                pieces.append(piece)
        return pieces

    def flush(self) -> str | None:
        """Whatever is left (any length), e.g. at the end of the reply."""
        piece, self._buffer = self._buffer.strip(), ""
        return piece or None


class _End:
    """Marks the end of the merged output queue."""


_Speech = tuple[str, str] | StreamChunk | None


class TextToSpeech(OpenAIHTTPClient):
    """Speak text via ``POST /audio/speech`` as raw 24 kHz s16le mono PCM."""

    sample_rate = TTS_SAMPLE_RATE

    def __init__(
        self,
        base_url: str = "https://api.openai.com/v1",
        api_key: str | None = None,
        model: str = "gpt-4o-mini-tts",
        voice: str = "alloy",
        *,
        instructions: str | None = None,
        speed: float | None = None,
        min_sentence_chars: int = 20,
        timeout_s: float = 60,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout_s, client)
        self.model = model
        self.voice = voice
        self.instructions = instructions
        self.speed = speed
        self.min_sentence_chars = min_sentence_chars

    async def speak(self, text: str) -> AsyncIterator[bytes]:
        """Stream the PCM of ``text`` as it arrives, in whole samples (even lengths)."""
        body: dict[str, Any] = {
            "model": self.model,
            "input": text,
            "voice": self.voice,
            "response_format": "pcm",
        }
        if self.instructions:
            body["instructions"] = self.instructions
        if self.speed is not None:
            body["speed"] = self.speed
        try:
            async with self._http().stream(
                "POST",
                f"{self.base_url}/audio/speech",
                json=body,
                headers=self._auth_headers(),
                timeout=self._timeout,
            ) as response:
                if not response.is_success:
                    raise provider_error_from_response(response, await response.aread())
                carry = b""
                async for raw in response.aiter_bytes():
                    data = carry + raw
                    cut = len(data) - len(data) % 2
                    carry = data[cut:]
                    if cut:
                        yield data[:cut]
        except httpx.TimeoutException as exc:
            raise ProviderError(f"speech timeout: {type(exc).__name__}") from exc
        except httpx.HTTPError as exc:
            raise ProviderError(f"speech connection failed: {exc!r}") from exc

    async def speak_stream(
        self, chunks: AsyncIterator[StreamChunk | ToolEvent]
    ) -> AsyncIterator[StreamChunk | ToolEvent]:
        """Pass ``chunks`` through and add their speech, sentence by sentence.

        Text chunks are yielded as soon as they arrive. Each complete sentence is
        sent to TTS while the text keeps streaming, and its audio is yielded as
        ``StreamChunk(media=Media("audio/pcm", sample_rate=24000, channels=1))``
        pieces, sentences in order. Pending text is also spoken when the reply
        pauses for tools (a ``tool_calls`` chunk or a ``ToolExecution`` event) so "let
        me check" is heard while the tool runs; tool events pass through as they
        come. The chunk carrying ``finish_reason`` comes last, after all audio.

        Closing this generator (``aclose``, or cancelling the task iterating it,
        e.g. on barge-in) stops the upstream ``chunks`` and any TTS request at
        once; use ``contextlib.aclosing`` so that happens promptly. Failures of
        either side raise ProviderError.
        """
        out: asyncio.Queue[StreamChunk | ToolEvent | _End] = asyncio.Queue()
        # Work for the voice task, in order: (text to speak, response id), or a
        # chunk to emit once all earlier speech is out, or None for "done".
        speech: asyncio.Queue[_Speech] = asyncio.Queue()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._read_text(chunks, out, speech))
                tg.create_task(self._voice(speech, out))
                while True:
                    item = await out.get()
                    if isinstance(item, _End):
                        break
                    yield item
        except BaseExceptionGroup as group:
            raise _first_error(group) from None

    async def _read_text(
        self,
        chunks: AsyncIterator[StreamChunk | ToolEvent],
        out: asyncio.Queue[StreamChunk | ToolEvent | _End],
        speech: asyncio.Queue[_Speech],
    ) -> None:
        splitter = SentenceSplitter(self.min_sentence_chars)
        response_id = ""
        async with closing_stream(chunks):
            async for chunk in chunks:
                response_id = chunk.response_id or response_id
                if not isinstance(chunk, StreamChunk):
                    if isinstance(chunk, ToolExecution):
                        rest = splitter.flush()
                        if rest:
                            speech.put_nowait((rest, response_id))
                    out.put_nowait(chunk)
                    continue
                if chunk.delta:
                    for sentence in splitter.feed(chunk.delta):
                        speech.put_nowait((sentence, response_id))
                pauses = bool(chunk.tool_calls)
                if pauses or chunk.finish_reason is not None:
                    rest = splitter.flush()
                    if rest:
                        speech.put_nowait((rest, response_id))
                if chunk.finish_reason is None:
                    out.put_nowait(chunk)
                    continue
                # The ending goes after the audio; its text (if any) goes now.
                text_part = chunk.model_copy(
                    update={
                        "finish_reason": None,
                        "metadata": None,
                        "error": None,
                        "interrupted": None,
                    }
                )
                if any(
                    getattr(text_part, f) is not None
                    for f in ("delta", "content", "media", "tool_calls")
                ):
                    out.put_nowait(text_part)
                speech.put_nowait(
                    StreamChunk(
                        response_id=chunk.response_id,
                        finish_reason=chunk.finish_reason,
                        metadata=chunk.metadata,
                        error=chunk.error,
                        interrupted=chunk.interrupted,
                    )
                )
        rest = splitter.flush()
        if rest:
            speech.put_nowait((rest, response_id))
        speech.put_nowait(None)

    async def _voice(
        self,
        speech: asyncio.Queue[_Speech],
        out: asyncio.Queue[StreamChunk | ToolEvent | _End],
    ) -> None:
        while True:
            item = await speech.get()
            if item is None:
                out.put_nowait(_End())
                return
            if isinstance(item, StreamChunk):
                out.put_nowait(item)
                continue
            text, response_id = item
            if not any(ch.isalnum() for ch in text):
                continue  # "…", "—", an emoji: nothing to say, and some servers answer 400
            async with aclosing(self.speak(text)) as audio:
                async for pcm in audio:
                    out.put_nowait(
                        StreamChunk(
                            response_id=response_id,
                            media=Media(
                                mime_type="audio/pcm",
                                data=pcm,
                                sample_rate=self.sample_rate,
                                channels=1,
                            ),
                        )
                    )


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The exception to raise from a failed TaskGroup: a ProviderError if there is one."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    for exc in leaves:
        if isinstance(exc, ProviderError):
            return exc
    return leaves[0] if leaves else ProviderError("speech stage failed")
