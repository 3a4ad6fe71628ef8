"""A local fake of the OpenAI-compatible HTTP API, served by a real uvicorn.

Faithful to the public wire format where our code (and the official ``openai``
package) depend on it: ``chat.completion.chunk`` SSE with ``data: [DONE]``,
streamed tool-call deltas, usage chunks, OpenAI's error body, multipart
transcriptions and streamed PCM speech. The SSE byte stream is written in
random-sized pieces so clients see arbitrary read boundaries.

Usage::

    async with run_fake(api_key="sk-test") as fake:
        fake.script(ChatReply(text="Hello there."))
        provider = OpenAIChatProvider(base_url=fake.url, api_key="sk-test")
        ...
        assert fake.requests_to("/v1/chat/completions")[0].json["stream"] is True

The server runs in the test's own event loop, so scripted replies can wait on
``asyncio.Event`` objects the test controls (``hold_before_last``,
``speech_hold``), and every request is recorded with whether its response
completed or the client went away (``RecordedRequest.finished``/``aborted``).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import io
import json
import math
import random
import re
import socket
import sys
import time
import uuid
import wave
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

__all__ = [
    "ChatReply",
    "FakeOpenAI",
    "FakeToolCall",
    "RecordedFile",
    "RecordedRequest",
    "error_reply",
    "run_fake",
]

SPEECH_SAMPLE_RATE = 24000


# --------------------------------------------------------------------------------------
# Scripts


@dataclass
class FakeToolCall:
    """One call the fake model makes; ``arguments`` is streamed in ``pieces`` parts."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")
    pieces: int = 8


@dataclass
class ChatReply:
    """One scripted answer of ``/chat/completions`` (consumed in order)."""

    text: str = ""
    #: Content deltas; by default the text is cut into word-sized pieces.
    text_pieces: list[str] | None = None
    tool_calls: list[FakeToolCall] = field(default_factory=list)
    #: Interleave the argument pieces of parallel calls (OpenAI sends them one after
    #: the other; some servers do not).
    interleave_calls: bool = False
    finish_reason: str | None = None
    #: Malformed ``data:`` lines injected among the real ones.
    malformed: int = 0
    #: Sleep between SSE events (a slow model).
    delay_s: float = 0.0
    #: Wait for this event before sending the last content piece and the ending.
    hold_before_last: asyncio.Event | None = None
    #: End the HTTP body after this many events, without finish_reason or [DONE]
    #: (what a proxy that gives up mid-stream looks like to the client).
    stop_after_events: int | None = None
    #: Error answer instead of a completion.
    status: int = 200
    error: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


def error_reply(
    status: int,
    message: str | None = None,
    *,
    retry_after: float | None = None,
    code: str | None = None,
) -> ChatReply:
    """An error answer with OpenAI's body shape and headers."""
    defaults = {
        400: ("invalid_request_error", None, "Bad request."),
        401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
        404: ("invalid_request_error", "model_not_found", "The model does not exist."),
        429: (
            "requests",
            "rate_limit_exceeded",
            "Rate limit reached for requests. Please try again in 1s.",
        ),
        500: ("server_error", None, "The server had an error while processing your request."),
        503: ("server_error", None, "The engine is currently overloaded."),
    }
    kind, default_code, default_message = defaults.get(status, ("server_error", None, "Error."))
    headers = {}
    if retry_after is not None:
        headers["retry-after"] = f"{retry_after:g}"
    return ChatReply(
        status=status,
        error={
            "message": message or default_message,
            "type": kind,
            "param": None,
            "code": code or default_code,
        },
        headers=headers,
    )


# --------------------------------------------------------------------------------------
# Recording


@dataclass
class RecordedFile:
    filename: str
    content_type: str
    data: bytes


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    json: Any = None
    form: dict[str, str] = field(default_factory=dict)
    files: dict[str, RecordedFile] = field(default_factory=dict)
    received_at: float = field(default_factory=time.monotonic)
    #: Set when the response is over, either way.
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    completed: bool = False
    aborted: bool = False


class _TrackedStream(StreamingResponse):
    """A streamed body that records whether it completed or the client left.

    Unlike Starlette's StreamingResponse (whose behaviour depends on the ASGI
    spec version the server announces) it always watches for ``http.disconnect``
    and always closes the body generator, so a test can wait for "the client
    aborted" deterministically.
    """

    def __init__(
        self,
        body: AsyncIterator[bytes],
        record: RecordedRequest,
        media_type: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(body, status_code=200, headers=headers, media_type=media_type)
        self._body = body
        self._record = record

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async with contextlib.aclosing(self._body) as body:  # type: ignore[type-var]
                async for piece in body:
                    await send({"type": "http.response.body", "body": piece, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            self._record.completed = True

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        tasks = [asyncio.ensure_future(pump()), asyncio.ensure_future(watch())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._record.aborted = not self._record.completed
            self._record.finished.set()


# --------------------------------------------------------------------------------------
# The fake


class FakeOpenAI:
    """Scripted OpenAI-compatible server state; serve it with :func:`run_fake`."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        seed: int | None = None,
        max_piece_bytes: int = 23,
        line_ending: str = "\n",
        keepalive_comments: bool = True,
        speech_pieces: int = 4,
        speech_ms_per_char: float = 10.0,
        speech_delay_s: float = 0.0,
    ) -> None:
        self.api_key = api_key
        self.rng = random.Random(seed)
        self.max_piece_bytes = max_piece_bytes
        self.line_ending = line_ending
        self.keepalive_comments = keepalive_comments
        self.speech_pieces = speech_pieces
        self.speech_ms_per_char = speech_ms_per_char
        self.speech_delay_s = speech_delay_s
        #: Wait for this after the first piece of each speech answer.
        self.speech_hold: asyncio.Event | None = None
        self.chat_replies: deque[ChatReply] = deque()
        self.transcripts: deque[str] = deque()
        self.requests: list[RecordedRequest] = []
        self._holds: set[asyncio.Event] = set()
        self.url = ""
        self.app = self._build_app()

    # -- scripting -------------------------------------------------------------------

    def script(self, *replies: ChatReply) -> None:
        self.chat_replies.extend(replies)

    def script_transcript(self, *texts: str) -> None:
        self.transcripts.extend(texts)

    def requests_to(self, path: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == path]

    def release_all(self) -> None:
        """Let every held stream finish (used at shutdown)."""
        for reply in self.chat_replies:
            if reply.hold_before_last is not None:
                reply.hold_before_last.set()
        for hold in self._holds:
            hold.set()
        if self.speech_hold is not None:
            self.speech_hold.set()

    # -- app -------------------------------------------------------------------------

    def _build_app(self) -> FastAPI:
        app = FastAPI()
        app.add_api_route("/v1/models", self._models, methods=["GET"])
        app.add_api_route("/v1/chat/completions", self._chat, methods=["POST"])
        app.add_api_route("/v1/audio/transcriptions", self._transcriptions, methods=["POST"])
        app.add_api_route("/v1/audio/speech", self._speech, methods=["POST"])
        return app

    async def _record(self, request: Request, *, parse_json: bool) -> RecordedRequest:
        body = await request.body()
        record = RecordedRequest(
            method=request.method,
            path=request.url.path,
            headers={k.lower(): v for k, v in request.headers.items()},
        )
        if parse_json:
            try:
                record.json = json.loads(body) if body else None
            except json.JSONDecodeError:
                record.json = None
        else:
            record.form, record.files = _parse_multipart(
                request.headers.get("content-type", ""), body
            )
        self.requests.append(record)
        return record

    def _auth_error(self, record: RecordedRequest) -> Response | None:
        if self.api_key is None:
            return None
        header = record.headers.get("authorization", "")
        if header == f"Bearer {self.api_key}":
            return None
        given = header.removeprefix("Bearer ")
        masked = f"{given[:3]}***{given[-4:]}" if len(given) > 8 else "***"
        return _finish(
            record,
            _error_response(
                error_reply(
                    401,
                    f"Incorrect API key provided: {masked}. You can find your API key at "
                    "https://platform.openai.com/account/api-keys.",
                )
            ),
        )

    async def _models(self, request: Request) -> Response:
        record = await self._record(request, parse_json=True)
        return _finish(
            record,
            JSONResponse(
                {
                    "object": "list",
                    "data": [{"id": "fake-model", "object": "model", "owned_by": "fake"}],
                }
            ),
        )

    async def _chat(self, request: Request) -> Response:
        record = await self._record(request, parse_json=True)
        if (denied := self._auth_error(record)) is not None:
            return denied
        body = record.json
        if not isinstance(body, dict):
            return _finish(
                record,
                _error_response(
                    error_reply(400, "We could not parse the JSON body of your request.")
                ),
            )
        if not body.get("model"):
            return _finish(
                record, _error_response(error_reply(400, "you must provide a model parameter"))
            )
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return _finish(
                record,
                _error_response(error_reply(400, "'messages' must be a non-empty array")),
            )
        reply = self.chat_replies.popleft() if self.chat_replies else self._default_reply(body)
        if reply.status != 200:
            return _finish(record, _error_response(reply))
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return _TrackedStream(
                self._sse(reply, body["model"], include_usage),
                record,
                media_type="text/event-stream; charset=utf-8",
                headers={"cache-control": "no-cache", "x-request-id": _rid(), **reply.headers},
            )
        return _finish(
            record, JSONResponse(_completion(reply, body["model"]), headers=reply.headers)
        )

    @staticmethod
    def _default_reply(body: dict[str, Any]) -> ChatReply:
        last = body["messages"][-1].get("content")
        if isinstance(last, list):
            last = " ".join(p.get("text", "") for p in last if isinstance(p, dict))
        return ChatReply(text=f"You said: {last}")

    async def _sse(self, reply: ChatReply, model: str, include_usage: bool) -> AsyncIterator[bytes]:
        """The event stream, written in random-sized byte pieces."""
        end = self.line_ending
        events = _chunk_events(reply, model, include_usage, self.rng)
        last_content = max(
            (i for i, e in enumerate(events) if isinstance(e, dict) and _has_content(e)),
            default=len(events) - 1,
        )
        pending = b""
        if reply.stop_after_events is not None:
            events = events[: reply.stop_after_events]
        for i, event in enumerate(events):
            if i == last_content and reply.hold_before_last is not None:
                # Flush what we have first so the client sees everything before the hold.
                async for piece in self._pieces(pending):
                    yield piece
                pending = b""
                self._holds.add(reply.hold_before_last)
                await reply.hold_before_last.wait()
            if self.keepalive_comments and self.rng.random() < 0.2:
                pending += f": keep-alive{end}{end}".encode()
            if isinstance(event, str):
                data = event  # raw (malformed or [DONE])
            else:
                data = json.dumps(event, ensure_ascii=False)
                if not data.isascii():
                    try:
                        data.encode()
                    except UnicodeEncodeError:  # a lone surrogate: sent escaped, as JSON allows
                        data = json.dumps(event)
            pending += f"data: {data}{end}{end}".encode()
            if reply.delay_s:
                async for piece in self._pieces(pending):
                    yield piece
                pending = b""
                await asyncio.sleep(reply.delay_s)
        async for piece in self._pieces(pending):
            yield piece

    async def _pieces(self, data: bytes) -> AsyncIterator[bytes]:
        pos = 0
        while pos < len(data):
            size = self.rng.randint(1, self.max_piece_bytes)
            yield data[pos : pos + size]
            pos += size
            await asyncio.sleep(0)

    async def _transcriptions(self, request: Request) -> Response:
        record = await self._record(request, parse_json=False)
        if (denied := self._auth_error(record)) is not None:
            return denied
        if not record.form.get("model"):
            return _finish(
                record, _error_response(error_reply(400, "you must provide a model parameter"))
            )
        upload = record.files.get("file")
        if upload is None:
            return _finish(record, _error_response(error_reply(400, "file is required")))
        try:
            with wave.open(io.BytesIO(upload.data), "rb") as w:
                duration_ms = w.getnframes() / w.getframerate() * 1000
        except (wave.Error, EOFError):
            return _finish(
                record,
                _error_response(
                    error_reply(400, "Invalid file format. Supported formats: ['wav', ...]")
                ),
            )
        text = (
            self.transcripts.popleft()
            if self.transcripts
            else f"transcript of {round(duration_ms)} ms of audio"
        )
        if record.form.get("response_format") == "text":
            return _finish(record, PlainTextResponse(text))
        return _finish(record, JSONResponse({"text": text}))

    async def _speech(self, request: Request) -> Response:
        record = await self._record(request, parse_json=True)
        if (denied := self._auth_error(record)) is not None:
            return denied
        body = record.json if isinstance(record.json, dict) else {}
        for required in ("model", "input", "voice"):
            if not body.get(required):
                return _finish(
                    record, _error_response(error_reply(400, f"'{required}' is required"))
                )
        fmt = body.get("response_format", "mp3")
        if fmt not in ("pcm", "wav"):
            return _finish(
                record, _error_response(error_reply(400, f"the fake cannot encode {fmt!r}"))
            )
        pcm = _tone(len(body["input"]) * self.speech_ms_per_char)
        if fmt == "wav":
            out = io.BytesIO()
            with wave.open(out, "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(SPEECH_SAMPLE_RATE)
                w.writeframes(pcm)
            pcm = out.getvalue()
        return _TrackedStream(
            self._speech_pieces(pcm),
            record,
            media_type="audio/pcm" if fmt == "pcm" else "audio/wav",
        )

    async def _speech_pieces(self, data: bytes) -> AsyncIterator[bytes]:
        # Odd piece sizes on purpose: clients must re-align samples themselves.
        count = max(1, self.speech_pieces)
        size = max(1, -(-len(data) // count) | 1)
        for index, pos in enumerate(range(0, len(data), size)):
            if index == 1 and self.speech_hold is not None:
                await self.speech_hold.wait()
            if index and self.speech_delay_s:
                await asyncio.sleep(self.speech_delay_s)
            yield data[pos : pos + size]


# --------------------------------------------------------------------------------------
# Wire format helpers


def _rid() -> str:
    return f"req_{uuid.uuid4().hex}"


def _finish(record: RecordedRequest, response: Response) -> Response:
    record.completed = True
    record.finished.set()
    return response


def _error_response(reply: ChatReply) -> Response:
    return JSONResponse(
        {"error": reply.error},
        status_code=reply.status,
        headers={"x-request-id": _rid(), **reply.headers},
    )


def _has_content(event: dict[str, Any]) -> bool:
    return any((c.get("delta") or {}).get("content") for c in event.get("choices", []))


def _split_text(text: str) -> list[str]:
    return re.findall(r"\s*\S+", text) + (
        [text[len(text.rstrip()) :]] if text != text.rstrip() else []
    )


def _split(text: str, pieces: int) -> list[str]:
    if not text:
        return [""]
    pieces = max(1, min(pieces, len(text)))
    step = -(-len(text) // pieces)
    return [text[i : i + step] for i in range(0, len(text), step)]


def _usage(reply: ChatReply) -> dict[str, Any]:
    completion = max(1, len(reply.text) // 4) + sum(len(c.arguments) // 4 for c in reply.tool_calls)
    return {
        "prompt_tokens": 11,
        "completion_tokens": completion,
        "total_tokens": 11 + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }


def _finish_reason(reply: ChatReply) -> str:
    return reply.finish_reason or ("tool_calls" if reply.tool_calls else "stop")


def _chunk_events(
    reply: ChatReply, model: str, include_usage: bool, rng: random.Random
) -> list[dict[str, Any] | str]:
    """The ``chat.completion.chunk`` objects (and raw lines) of one streamed reply."""
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            out["usage"] = None
        return out

    events: list[dict[str, Any] | str] = [
        chunk({"role": "assistant", "content": "", "refusal": None})
    ]
    pieces = reply.text_pieces if reply.text_pieces is not None else _split_text(reply.text)
    events.extend(chunk({"content": piece}) for piece in pieces if piece)

    per_call: list[list[dict[str, Any]]] = []
    for index, call in enumerate(reply.tool_calls):
        deltas = [
            {
                "tool_calls": [
                    {
                        "index": index,
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": ""},
                    }
                ]
            }
        ]
        deltas.extend(
            {"tool_calls": [{"index": index, "function": {"arguments": part}}]}
            for part in _split(call.arguments, call.pieces)
            if part
        )
        per_call.append(deltas)
    if reply.interleave_calls:
        while any(per_call):
            for deltas in per_call:
                if deltas:
                    events.append(chunk(deltas.pop(0)))
    else:
        events.extend(chunk(delta) for deltas in per_call for delta in deltas)

    for _ in range(reply.malformed):
        position = rng.randint(1, len(events))
        events.insert(position, '{"id": "chatcmpl-broken", "choices": [{"delta": {"content": "x')
    events.append(chunk({}, _finish_reason(reply)))
    if include_usage:
        events.append(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [],
                "usage": _usage(reply),
            }
        )
    events.append("[DONE]")
    return events


def _completion(reply: ChatReply, model: str) -> dict[str, Any]:
    """The non-streamed ``chat.completion`` object for ``stream: false`` requests."""
    message: dict[str, Any] = {"role": "assistant", "content": reply.text or None, "refusal": None}
    if reply.tool_calls:
        message["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in reply.tool_calls
        ]
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_fake",
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": _finish_reason(reply),
            }
        ],
        "usage": _usage(reply),
    }


def _parse_multipart(
    content_type: str, body: bytes
) -> tuple[dict[str, str], dict[str, RecordedFile]]:
    """Minimal ``multipart/form-data`` parser (python-multipart is not a dependency)."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    form: dict[str, str] = {}
    files: dict[str, RecordedFile] = {}
    if not content_type.startswith("multipart/form-data") or match is None:
        return form, files
    delimiter = b"--" + match.group(1).encode()
    for section in body.split(delimiter)[1:]:
        if section.startswith(b"--"):
            break
        section = section.removeprefix(b"\r\n").removesuffix(b"\r\n")
        head, _, content = section.partition(b"\r\n\r\n")
        headers: dict[str, str] = {}
        for line in head.decode("utf-8", errors="replace").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        disposition = headers.get("content-disposition", "")
        name_match = re.search(r'(?<![a-z])name="([^"]*)"', disposition)
        if name_match is None:
            continue
        file_match = re.search(r'filename="([^"]*)"', disposition)
        if file_match is not None:
            files[name_match.group(1)] = RecordedFile(
                filename=file_match.group(1),
                content_type=headers.get("content-type", "application/octet-stream"),
                data=content,
            )
        else:
            form[name_match.group(1)] = content.decode("utf-8", errors="replace")
    return form, files


def _tone(duration_ms: float, frequency: float = 440.0) -> bytes:
    samples = int(SPEECH_SAMPLE_RATE * duration_ms / 1000)
    pcm = array.array(
        "h",
        (
            int(0.3 * 32767 * math.sin(2 * math.pi * frequency * n / SPEECH_SAMPLE_RATE))
            for n in range(samples)
        ),
    )
    if sys.byteorder == "big":
        pcm.byteswap()
    return pcm.tobytes()


# --------------------------------------------------------------------------------------
# Serving


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.stop = asyncio.Event()

    def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]
        # Tests own the process's signal handlers; the fake must not take Ctrl-C.
        return contextlib.nullcontext()

    async def main_loop(self) -> None:
        # uvicorn polls ``should_exit`` every 100 ms; tests start and stop many
        # servers, so wait on an event instead (one tick sets the default headers).
        await self.on_tick(0)
        await self.stop.wait()


@contextlib.asynccontextmanager
async def run_fake(fake: FakeOpenAI | None = None, **kwargs: Any) -> AsyncIterator[FakeOpenAI]:
    """Serve ``fake`` (or ``FakeOpenAI(**kwargs)``) on a loopback port in this event loop.

    ``fake.url`` is the base URL to give clients (``http://127.0.0.1:PORT/v1``).
    """
    fake = fake if fake is not None else FakeOpenAI(**kwargs)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        fake.app,
        http="h11",
        ws="none",
        lifespan="off",
        log_config=None,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=2,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("fake OpenAI server stopped during startup")
            await asyncio.sleep(0.005)
        fake.url = f"http://127.0.0.1:{port}/v1"
        yield fake
    finally:
        fake.release_all()
        server.should_exit = True
        server.stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()
