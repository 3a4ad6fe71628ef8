"""Per-turn provider over the OpenAI-compatible ``/chat/completions`` streaming API.

One implementation serves OpenAI, vLLM, llama.cpp's server, Ollama and any
other server speaking the same protocol, so it is written against the wire
format (httpx + our own SSE parser) rather than a vendor SDK: we control
timeouts, cancellation and how tolerant parsing is.

History convention (the session stores messages this way; see also
:mod:`server.tools`):

* ``Message(role="user" | "assistant" | "system", content=...)`` map one to one;
* an assistant message with ``metadata["tool_calls"] = [{"id", "name",
  "arguments"}, ...]`` is the model's request for tools (``content`` is the text
  it said along with it, possibly empty);
* ``Message(role="tool", content=<output>, metadata={"tool_call_id": id})`` is the
  result of one call; tool messages without ``tool_call_id`` are skipped because
  the upstream would reject the conversation;
* history messages whose ``metadata["turn_id"]`` equals ``request.turn_id`` are the
  tool exchange of the turn being answered: they go *after* the turn's user
  content, which is rebuilt from the request (text, frames, audio) on every hop.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from duplex.protocol import ImageFrame, Message, StreamChunk, ToolCall
from server.providers.base import AudioClip, ProviderError, TurnRequest, UnaryProvider
from server.providers.tool_calls import ToolCallAccumulator

logger = logging.getLogger(__name__)

__all__ = [
    "PASSTHROUGH_OPTIONS",
    "OpenAIChatProvider",
    "SSEEvent",
    "SSEParser",
    "build_messages",
    "provider_error_from_response",
    "wav_bytes",
]

#: ``SessionConfig.provider_options`` keys forwarded to the request body as they are.
PASSTHROUGH_OPTIONS = frozenset(
    {
        "temperature",
        "top_p",
        "max_tokens",
        "max_completion_tokens",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "stop",
        "tool_choice",
        "parallel_tool_calls",
        "reasoning_effort",
        "user",
    }
)


# --------------------------------------------------------------------------------------
# Server-sent events


@dataclass(frozen=True, slots=True)
class SSEEvent:
    data: str
    event: str = "message"
    id: str | None = None


class SSEParser:
    """Incremental ``text/event-stream`` parser (WHATWG rules) fed raw bytes.

    Network reads split the stream anywhere: inside a UTF-8 character, between
    ``\\r`` and ``\\n``, inside a field name. Lines are therefore cut from the
    *byte* buffer and decoded only when complete, and a trailing ``\\r`` is held
    back until the next byte shows whether a ``\\n`` follows.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self._last_id: str | None = None
        self._first_line = True

    def feed(self, data: bytes) -> list[SSEEvent]:
        self._buffer += data
        return self._drain(final=False)

    def close(self) -> list[SSEEvent]:
        """End of stream: a last line without terminator still counts; an event
        without its blank line is discarded (as browsers do)."""
        events = self._drain(final=True)
        self._data, self._event = [], ""
        return events

    def _drain(self, *, final: bool) -> list[SSEEvent]:
        events: list[SSEEvent] = []
        buf = self._buffer
        start = 0
        n = len(buf)
        while start < n:
            lf = buf.find(b"\n", start)
            cr = buf.find(b"\r", start)
            if lf < 0 and cr < 0:
                break
            if cr >= 0 and (lf < 0 or cr < lf):
                if cr + 1 == n and not final:
                    break  # may be the first half of \r\n
                end, nxt = cr, cr + 2 if cr + 1 < n and buf[cr + 1] == 0x0A else cr + 1
            else:
                end, nxt = lf, lf + 1
            event = self._line(bytes(buf[start:end]))
            if event is not None:
                events.append(event)
            start = nxt
        if final and start < n:
            self._line(bytes(buf[start:]))
            start = n
        del buf[:start]
        return events

    def _line(self, raw: bytes) -> SSEEvent | None:
        line = raw.decode("utf-8", errors="replace")
        if self._first_line:
            self._first_line = False
            line = line.removeprefix("\ufeff")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # comment / keep-alive
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._last_id = value
        # "retry" and unknown fields: nothing to do for a one-shot HTTP stream.
        return None

    def _dispatch(self) -> SSEEvent | None:
        if not self._data:
            self._event = ""
            return None
        event = SSEEvent(
            data="\n".join(self._data), event=self._event or "message", id=self._last_id
        )
        self._data, self._event = [], ""
        return event


# --------------------------------------------------------------------------------------
# Errors


def _retry_after(response: httpx.Response) -> float | None:
    for header in ("retry-after-ms", "retry-after"):
        value = response.headers.get(header)
        if value is None:
            continue
        try:
            seconds = float(value)
        except ValueError:
            continue  # an HTTP date: rare for these APIs, not worth parsing
        return seconds / 1000 if header == "retry-after-ms" else seconds
    return None


def provider_error_from_response(response: httpx.Response, body: bytes) -> ProviderError:
    """Map a non-2xx upstream response to a ProviderError.

    Understands OpenAI's ``{"error": {"message", "type", "code"}}`` body and the
    looser shapes of compatible servers (``{"error": "text"}``, ``{"detail": ...}``).
    """
    status = response.status_code
    message = ""
    code: str | None = None
    try:
        parsed = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        parsed = None
    if isinstance(parsed, dict):
        error = parsed.get("error", parsed.get("detail"))
        if isinstance(error, dict):
            message = str(error.get("message") or "")
            raw_code = error.get("code") or error.get("type")
            code = str(raw_code) if raw_code is not None else None
        elif isinstance(error, str):
            message = error
    if not message:
        message = body.decode("utf-8", errors="replace").strip()[:300] or response.reason_phrase
    return ProviderError(
        f"upstream {status}: {message}",
        code=502,
        upstream_status=status,
        upstream_code=code,
        retry_after=_retry_after(response),
        fatal=status in (401, 403, 404),
    )


# --------------------------------------------------------------------------------------
# Request building


def wav_bytes(clip: AudioClip) -> bytes:
    """Mono s16le PCM wrapped in a WAV container (what the audio APIs accept)."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(clip.sample_rate)
        w.writeframes(clip.pcm)
    return out.getvalue()


def _image_part(frame: ImageFrame) -> dict[str, Any]:
    encoded = base64.b64encode(frame.data).decode("ascii")
    return {"type": "image_url", "image_url": {"url": f"data:{frame.mime_type};base64,{encoded}"}}


def _history_message(message: Message) -> dict[str, Any] | None:
    if message.role == "tool":
        call_id = message.metadata.get("tool_call_id")
        if not call_id:
            logger.warning("skipping tool message %s without tool_call_id", message.id)
            return None
        return {"role": "tool", "tool_call_id": call_id, "content": message.content}
    calls = message.metadata.get("tool_calls") if message.role == "assistant" else None
    if calls:
        return {
            "role": "assistant",
            "content": message.content or None,
            "tool_calls": [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": call.get("arguments") or "{}"},
                }
                for call in calls
            ],
        }
    return {"role": message.role, "content": message.content}


def build_messages(request: TurnRequest, *, audio_input: bool) -> list[dict[str, Any]]:
    """The ``messages`` array for one call (see the module docstring for the order)."""
    messages: list[dict[str, Any]] = []
    if request.instructions:
        messages.append({"role": "system", "content": request.instructions})
    this_turn: list[dict[str, Any]] = []
    for message in request.history:
        mapped = _history_message(message)
        if mapped is None:
            continue
        if message.metadata.get("turn_id") == request.turn_id:
            this_turn.append(mapped)
        else:
            messages.append(mapped)

    parts: list[dict[str, Any]] = []
    if request.text:
        parts.append({"type": "text", "text": request.text})
    parts.extend(_image_part(frame) for frame in request.frames)
    if audio_input and request.audio is not None and request.audio.pcm:
        encoded = base64.b64encode(wav_bytes(request.audio)).decode("ascii")
        parts.append({"type": "input_audio", "input_audio": {"data": encoded, "format": "wav"}})
    if parts == [{"type": "text", "text": request.text}]:
        # Plain string content: the form every compatible server understands.
        messages.append({"role": "user", "content": request.text})
    elif parts:
        messages.append({"role": "user", "content": parts})
    messages.extend(this_turn)
    return messages


# --------------------------------------------------------------------------------------
# The provider

_FINISH = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
}


class OpenAIHTTPClient:
    """Client handling shared by every OpenAI-compatible HTTP caller (chat, STT, TTS):
    use the caller's ``httpx.AsyncClient`` (the server shares one), or own one and
    close it in ``aclose``."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        timeout_s: float,
        client: httpx.AsyncClient | None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self._timeout = httpx.Timeout(timeout_s, connect=min(10.0, timeout_s))
        self._client = client
        self._owns_client = client is None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout)
        return self._client

    def _auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    async def aclose(self) -> None:
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None


class OpenAIChatProvider(OpenAIHTTPClient, UnaryProvider):
    """Streams one turn from ``{base_url}/chat/completions``.

    Text deltas are yielded as they arrive; tool calls are accumulated and
    yielded once, complete, in the final chunk (``finish_reason="tool_calls"``).
    The final chunk's ``metadata`` may hold ``usage``, ``warnings`` (dropped
    calls, skipped malformed chunks) and ``content_filter: true``.
    """

    def __init__(
        self,
        base_url: str = "https://api.openai.com/v1",
        api_key: str | None = None,
        model: str = "gpt-4o-mini",
        audio_input: bool = False,
        timeout_s: float = 60,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(base_url, api_key, timeout_s, client)
        self.model = model
        self.audio_input = audio_input
        self.timeout_s = timeout_s

    def headers(self) -> dict[str, str]:
        return {"Accept": "text/event-stream", **self._auth_headers()}

    def build_body(self, request: TurnRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": request.config.model or self.model,
            "messages": build_messages(request, audio_input=self.audio_input),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.tools:
            body["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": tool.name,
                        "description": tool.description,
                        "parameters": tool.parameters,
                    },
                }
                for tool in request.tools
            ]
        for key, value in request.config.provider_options.items():
            if key in PASSTHROUGH_OPTIONS:
                body[key] = value
        return body

    async def stream(self, request: TurnRequest) -> AsyncIterator[StreamChunk]:
        body = self.build_body(request)
        url = f"{self.base_url}/chat/completions"
        try:
            async with self._http().stream(
                "POST", url, json=body, headers=self.headers(), timeout=self._timeout
            ) as response:
                if not response.is_success:
                    raise provider_error_from_response(response, await response.aread())
                if response.headers.get("content-type", "").startswith("application/json"):
                    # A server that ignored ``stream: true`` and answered in one piece.
                    chunks = self._read_whole(response, request.response_id)
                else:
                    chunks = self._read(response, request.response_id)
                async for chunk in chunks:
                    yield chunk
        except httpx.TimeoutException as exc:
            raise ProviderError(f"upstream timeout: {type(exc).__name__}") from exc
        except httpx.HTTPError as exc:
            raise ProviderError(f"upstream connection failed: {exc!r}") from exc

    async def _read(self, response: httpx.Response, response_id: str) -> AsyncIterator[StreamChunk]:
        parser = SSEParser()
        accumulator = ToolCallAccumulator()
        malformed = 0
        finish: str | None = None
        usage: dict[str, Any] | None = None
        done = False

        async for raw in response.aiter_bytes():
            for event in parser.feed(raw):
                if event.data.strip() == "[DONE]":
                    done = True
                    break
                try:
                    payload = json.loads(event.data)
                except json.JSONDecodeError:
                    malformed += 1
                    logger.warning("skipping malformed SSE data: %.200r", event.data)
                    continue
                if not isinstance(payload, dict):
                    malformed += 1
                    logger.warning("skipping SSE data that is not an object: %.200r", event.data)
                    continue
                if "error" in payload and not payload.get("choices"):
                    # vLLM, llama.cpp and proxies report failures inside the stream.
                    error = payload["error"]
                    message = error.get("message") if isinstance(error, dict) else str(error)
                    raise ProviderError(f"upstream error in stream: {message}")
                if isinstance(payload.get("usage"), dict):
                    usage = payload["usage"]
                for choice in payload.get("choices") or []:
                    if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                        continue
                    delta = choice.get("delta") or {}
                    content = delta.get("content") if isinstance(delta, dict) else None
                    if isinstance(content, str) and content:
                        yield StreamChunk(response_id=response_id, delta=content)
                    tool_deltas = delta.get("tool_calls") if isinstance(delta, dict) else None
                    if isinstance(tool_deltas, list):
                        accumulator.feed(tool_deltas)
                    if choice.get("finish_reason"):
                        finish = str(choice["finish_reason"])
            if done:
                break
        if not done:
            parser.close()
            if finish is None:
                raise ProviderError("upstream stream ended before the response was complete")

        yield self._final(response_id, finish, usage, accumulator, malformed)

    async def _read_whole(
        self, response: httpx.Response, response_id: str
    ) -> AsyncIterator[StreamChunk]:
        body = await response.aread()
        try:
            payload = json.loads(body)
            choice = payload["choices"][0]
            message = choice.get("message") or {}
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError) as exc:
            raise ProviderError(f"upstream sent an unreadable completion: {exc!r}") from exc
        accumulator = ToolCallAccumulator()
        if isinstance(message.get("content"), str) and message["content"]:
            yield StreamChunk(response_id=response_id, delta=message["content"])
        for index, call in enumerate(message.get("tool_calls") or []):
            if isinstance(call, dict):
                accumulator.feed({**call, "index": index})
        usage = payload.get("usage") if isinstance(payload.get("usage"), dict) else None
        yield self._final(response_id, choice.get("finish_reason"), usage, accumulator, 0)

    @staticmethod
    def _final(
        response_id: str,
        finish: str | None,
        usage: dict[str, Any] | None,
        accumulator: ToolCallAccumulator,
        malformed: int,
    ) -> StreamChunk:
        metadata: dict[str, Any] = {}
        warnings: list[str] = []
        calls: list[ToolCall] = []
        if accumulator:
            calls, dropped = accumulator.complete()
            warnings.extend(f"dropped {reason}" for reason in dropped)
        if malformed:
            warnings.append(f"skipped {malformed} malformed stream chunk(s)")
            metadata["malformed_chunks"] = malformed
        if finish == "content_filter":
            metadata["content_filter"] = True
        if usage is not None:
            metadata["usage"] = usage
        if warnings:
            metadata["warnings"] = warnings
        if calls:
            return StreamChunk(
                response_id=response_id,
                tool_calls=calls,
                finish_reason="tool_calls",
                metadata=metadata or None,
            )
        reason = _FINISH.get(finish or "stop", "stop")
        if reason == "tool_calls":
            reason = "stop"  # announced calls, none usable: warnings say why
        return StreamChunk(
            response_id=response_id,
            finish_reason=reason,  # type: ignore[arg-type]
            metadata=metadata or None,
        )
