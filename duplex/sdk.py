"""Python client for Duplex: async first, with a thin sync wrapper for scripts.

One ``Client`` per server; ``await client.connect(...)`` opens a duplex session
over one WebSocket. ``session.ask()`` is the simple path for text; the
``send_*`` methods and ``events()`` expose the whole protocol.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import httpx
import websockets
from websockets.asyncio.client import ClientConnection

from duplex.protocol import SERVER_MESSAGE_TYPES, UNAVAILABLE, parse_server_message

log = logging.getLogger(__name__)


class DuplexError(Exception):
    """An ``error`` message from the server, or a failed request."""

    def __init__(self, code: int, message: str, *, fatal: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.fatal = fatal


class AuthError(DuplexError):
    """401: the token was missing or wrong."""


class NotFoundError(DuplexError):
    """404: no such session for this token."""


class ConflictError(DuplexError):
    """409: the session belongs to another endpoint (one opened on ``/v1/realtime``)."""


class ConnectionLost(DuplexError):
    """The connection closed while something was waiting for the server."""


def error_for(code: int, message: str, *, fatal: bool = False) -> DuplexError:
    cls = {401: AuthError, 404: NotFoundError, 409: ConflictError}.get(code, DuplexError)
    return cls(code, message, fatal=fatal)


@dataclass(frozen=True)
class Reconnect:
    """How a session reconnects after its socket drops: exponential backoff from
    ``initial_delay_s`` to ``max_delay_s`` with jitter (each wait is 50-100 % of the
    step), giving up after ``max_wait_s`` (keep it within the server's resume grace).

    The session keeps its last ``resend_max_messages`` sent messages, at most
    ``resend_max_bytes`` of them (binary audio as is, JSON as its UTF-8 text; the
    defaults hold about 30 s of 16 kHz audio), and after a resume sends again those
    the server had not received (docs/clients.md "Reconnecting"). 0 keeps none."""

    initial_delay_s: float = 0.1
    max_delay_s: float = 2.0
    max_wait_s: float = 30.0
    connect_timeout_s: float = 5.0
    resend_max_messages: int = 1000
    resend_max_bytes: int = 1024 * 1024


#: The SDK's own event (``seq`` 0) when input the server did not receive cannot be sent
#: again: ``reason`` "not_held" (the resend buffer no longer held it; ``lost`` messages)
#: or "unknown" (the server that ran the session died: it cannot tell what arrived).
INPUT_LOST = "input.lost"

#: Close codes after which the session is over: no reconnect (normal close, policy, a
#: fatal server error, and 4001: the session was resumed on another connection). Any
#: other close resumes: 1006 (the network), 1012 (a draining or moved server), 1013.
FINAL_CLOSE_CODES = frozenset({1000, 1008, 1011, 4001})

#: The close code that ends the session on the server at once (`Session.close`: done with
#: it). A socket closed meaning to come back uses `CLOSE_COMING_BACK`: the server then
#: keeps the session for its resume grace period (docs/protocol.md "Resuming a session").
CLOSE_DONE = 1000
CLOSE_COMING_BACK = 1001


@dataclass
class Message:
    """An answer as it grows: ``content`` holds everything so far."""

    content: str = ""
    role: str = "assistant"
    id: str = ""
    reference: dict[str, Any] = field(default_factory=dict)
    audio: bytearray = field(default_factory=bytearray)
    finish_reason: str | None = None
    #: The ``tool.output`` messages of this response (``call_id``, ``name``, ``output``).
    tool_outputs: list[dict[str, Any]] = field(default_factory=list)
    #: The ``warning`` messages of this response (``code``, ``message``, ...).
    warnings: list[dict[str, Any]] = field(default_factory=list)


class Client:
    def __init__(self, url: str = "ws://127.0.0.1:8000/v1/duplex", token: str | None = None):
        self.url = url
        self.token = token
        parts = urlsplit(url)
        scheme = "https" if parts.scheme == "wss" else "http"
        self.http_base = urlunsplit((scheme, parts.netloc, "", "", ""))
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.AsyncClient(base_url=self.http_base, headers=headers, timeout=30)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def connect(
        self,
        *,
        session_id: str | None = None,
        on_event: Callable[[dict[str, Any]], None] | None = None,
        reconnect: Reconnect | None = Reconnect(),
        **config: Any,
    ) -> Session:
        """Open a duplex session (new, or ``session_id`` continued); ``config`` is a
        ``session.update`` config (mode, provider, instructions, variables, ...).

        When the socket drops, the session reconnects by itself and resumes after the last
        ``seq`` it handed over (``reconnect=None``: it does not)."""
        ws = await self._open({"session_id": session_id} if session_id else {})
        session = Session(self, ws, on_event, reconnect)
        await session._start()
        if config:
            await session.update(**config)
        return session

    async def _open(self, query: dict[str, Any], timeout: float | None = None) -> ClientConnection:
        url = self.url + ("?" + urlencode(query) if query else "")
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return await websockets.connect(
            url, additional_headers=headers, max_size=None, open_timeout=timeout
        )

    async def _rest(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise error_for(response.status_code, str(detail))
        return response.json() if response.content else None


class Session:
    def __init__(
        self,
        client: Client,
        ws: ClientConnection,
        on_event: Callable[[dict[str, Any]], None] | None,
        reconnect: Reconnect | None = None,
    ) -> None:
        self.client = client
        self.ws = ws
        self.id = ""
        self.info: dict[str, Any] = {}
        #: The last ``seq`` handed to the caller: a resume continues after it.
        self.last_seq = 0
        #: How many times the session reconnected and resumed.
        self.resumes = 0
        self._reconnect = reconnect
        self._connected = asyncio.Event()
        self._connected.set()
        self._closing = False
        #: The server's hint (``session.reconnect``) for the first wait of the next resume.
        self._retry_after_s: float | None = None
        self._on_event = on_event
        self._subscribers: list[asyncio.Queue[dict[str, Any] | None]] = []
        self._waiters: list[tuple[Callable[[dict[str, Any]], bool], asyncio.Future[Any]]] = []
        self._reader: asyncio.Task[None] | None = None
        self._closed_error: DuplexError | None = None
        #: Messages sent on this session, counted as the server counts what it received
        #: (``session.resumed`` ``input_received``): every text and binary frame.
        self.sent = 0
        #: Messages sent again after resumes, and messages reported lost (``input.lost``).
        self.resent = 0
        self.input_lost = 0
        #: The last messages sent, ``(number, data)``, for a resume to send again.
        self._unconfirmed: deque[tuple[int, str | bytes]] = deque()
        self._unconfirmed_bytes = 0
        #: Held while a message is numbered and sent, and while a resume sends again.
        self._send_lock = asyncio.Lock()

    async def _start(self) -> None:
        first = await self._expect(lambda e: e["type"] in ("session.created", "error"), start=True)
        if first["type"] == "error":
            raise error_for(first["code"], first["message"], fatal=True)
        self.id = first["session"]["id"]
        self.info = first["session"]

    # ---- receiving ------------------------------------------------------------------

    async def _read(self) -> None:
        try:
            while True:
                try:
                    async for raw in self.ws:
                        event = json.loads(raw)
                        if event.get("type") in SERVER_MESSAGE_TYPES:
                            parse_server_message(raw)  # typed validation: raises if bad
                        else:
                            # A newer server's message: passed on as it is, not a failure.
                            log.debug("unknown server message type %r", event.get("type"))
                        self._dispatch(event)
                except websockets.ConnectionClosed:
                    pass
                code = self.ws.close_code or 1006
                if self._closing or self._reconnect is None or code in FINAL_CLOSE_CODES:
                    self._closed_error = ConnectionLost(code, f"connection closed ({code})")
                    break
                await self._resume(self._reconnect, code)
        except DuplexError as exc:
            self._closed_error = exc
        except Exception as exc:
            self._closed_error = ConnectionLost(1006, f"reader failed: {exc!r}")
        finally:
            self._connected.set()  # senders waiting for a reconnect see the error
            for _, fut in self._waiters:
                if not fut.done():
                    fut.set_exception(self._closed_error or ConnectionLost(1006, "closed"))
            self._waiters.clear()
            for queue in self._subscribers:
                queue.put_nowait(None)

    async def _resume(self, policy: Reconnect, code: int) -> None:
        """Reconnect with backoff and resume after ``last_seq``; raises when giving up."""
        self._connected.clear()
        log.info("session %s: lost (%d), resuming after seq %d", self.id, code, self.last_seq)
        deadline = time.monotonic() + policy.max_wait_s
        step = policy.initial_delay_s
        if self._retry_after_s is not None:  # the server said when (a drain, a move)
            step = min(max(step, self._retry_after_s), policy.max_delay_s)
            self._retry_after_s = None
        while True:
            await asyncio.sleep(step * random.uniform(0.5, 1.0))
            try:
                async with asyncio.timeout(policy.connect_timeout_s):
                    ws = await self.client._open(
                        {"session_id": self.id, "last_seq": self.last_seq},
                        policy.connect_timeout_s,
                    )
                    first = json.loads(await ws.recv())
            except (OSError, TimeoutError, websockets.WebSocketException) as exc:
                log.info("session %s: resume attempt failed: %r", self.id, exc)
            else:
                if first["type"] == "error" and first["code"] == UNAVAILABLE:
                    # Not here, not now (a replica draining, or the session still held by
                    # one): try again, like an HTTP 503 to the handshake.
                    await ws.close(CLOSE_COMING_BACK)
                    log.info("session %s: resume refused (503), retrying", self.id)
                elif first["type"] == "error":
                    await ws.close()
                    raise error_for(first["code"], first["message"], fatal=True)
                else:
                    try:
                        async with self._send_lock:  # new input waits for what is resent
                            self.ws = ws
                            self._dispatch(first)
                            await self._resend(ws, first)
                    except websockets.ConnectionClosed as exc:
                        log.info("session %s: lost while resending: %r", self.id, exc)
                    else:
                        self.resumes += 1
                        self._connected.set()
                        return
            if time.monotonic() + step > deadline:
                raise ConnectionLost(code, f"could not resume within {policy.max_wait_s:g} s")
            step = min(step * 2, policy.max_delay_s)

    async def _resend(self, ws: ClientConnection, resumed: dict[str, Any]) -> None:
        """Send again what the server did not receive: the messages after its
        ``input_received``, if still held; else tell the caller (`INPUT_LOST`)."""
        received = resumed.get("input_received")
        if received is not None and received > self.sent:  # another client fed it too
            log.warning("session %s: server received %d of %d", self.id, received, self.sent)
            self.sent = received
        held_from = self._unconfirmed[0][0] if self._unconfirmed else self.sent + 1
        if received is not None and received + 1 >= held_from:
            again = [data for number, data in self._unconfirmed if number > received]
            for data in again:
                await ws.send(data)
            self.resent += len(again)
            if again:
                log.info("session %s: resent %d message(s)", self.id, len(again))
            return
        lost = None if received is None else self.sent - received
        if lost is None and self.sent == 0:
            return
        if lost is not None:
            self.input_lost += lost
        log.warning("session %s: input lost (%s)", self.id, lost if lost else "unknown")
        self._dispatch(
            {
                "type": INPUT_LOST,
                "seq": 0,
                "reason": "unknown" if received is None else "not_held",
                "input_received": received,
                "sent": self.sent,
                "lost": lost,
            }
        )
        # Number on from what the server has (it counts from 0 again when it could not
        # tell): nothing older is resent later.
        self.sent = received or 0
        self._unconfirmed.clear()
        self._unconfirmed_bytes = 0

    def _keep(self, number: int, data: str | bytes) -> None:
        """Hold a sent message for a resume, within the resend bounds."""
        policy = self._reconnect
        if policy is None or policy.resend_max_messages <= 0:
            return
        size = len(data)  # JSON from json.dumps is ASCII: characters are bytes
        self._unconfirmed.append((number, data))
        self._unconfirmed_bytes += size
        while self._unconfirmed and (
            len(self._unconfirmed) > policy.resend_max_messages
            or self._unconfirmed_bytes > policy.resend_max_bytes
        ):
            self._unconfirmed_bytes -= len(self._unconfirmed.popleft()[1])

    def _dispatch(self, event: dict[str, Any]) -> None:
        seq = event.get("seq") or 0
        if seq:  # 0: connection-level (session.resumed and its errors), never replayed
            if seq <= self.last_seq:
                return  # handed over already (a resume replays from the server's outbox)
            self.last_seq = seq
        if event["type"] in ("session.updated", "session.resumed"):
            self.info = event["session"]
        elif event["type"] == "session.reconnect":
            # The server closes with 1012 once its answers in flight are done; the resume
            # that follows waits about this long first.
            self._retry_after_s = event.get("retry_after_ms", 0) / 1000
        if self._on_event is not None:
            self._on_event(event)
        for queue in self._subscribers:
            if queue.full():
                queue.get_nowait()
                log.warning("events() consumer too slow: oldest event dropped")
            queue.put_nowait(event)
        for matcher, fut in list(self._waiters):
            if not fut.done() and matcher(event):
                fut.set_result(event)

    async def _expect(
        self, matcher: Callable[[dict[str, Any]], bool], *, start: bool = False
    ) -> dict[str, Any]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiters.append((matcher, fut))
        if start:
            self._reader = asyncio.create_task(self._read())
        elif self._reader is None or self._reader.done():
            raise self._closed_error or ConnectionLost(1006, "not connected")
        try:
            return await fut
        finally:
            self._waiters = [(m, f) for m, f in self._waiters if f is not fut]

    async def events(self, maxsize: int = 1000) -> AsyncIterator[dict[str, Any]]:
        """Every server message from now on, as dicts with ``type`` and ``seq``."""
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize)
        self._subscribers.append(queue)
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            self._subscribers.remove(queue)

    # ---- sending --------------------------------------------------------------------

    async def send(self, message: dict[str, Any]) -> None:
        await self._send(json.dumps(message))

    async def _send(self, data: str | bytes) -> None:
        """Send on the current socket, numbered and held for a resume (`_resend`); while
        the session reconnects, wait for it. A send the drop cut is sent again by the
        resume if the server lacks it: this returns once the session is back."""
        await self._connected.wait()
        if self._closed_error is not None and (self._reader is None or self._reader.done()):
            raise self._closed_error
        async with self._send_lock:
            ws = self.ws
            self.sent += 1
            self._keep(self.sent, data)
            try:
                await ws.send(data)
                return
            except websockets.ConnectionClosed as exc:
                if self._reconnect is None or self._closing:
                    raise ConnectionLost(_close_code(exc), f"connection lost: {exc}") from None
                if self.ws is ws:  # let the reader notice the drop and start resuming
                    self._connected.clear()
        await self._connected.wait()  # resumed (and resent if need be), or over
        if self._closed_error is not None:
            raise self._closed_error

    async def update(self, **config: Any) -> dict[str, Any]:
        msg_id = uuid.uuid4().hex
        waiter = asyncio.ensure_future(
            self._expect(lambda e: e["type"] == "session.updated" or _is_error_for(e, msg_id))
        )
        await asyncio.sleep(0)
        await self.send({"type": "session.update", "id": msg_id, "config": config})
        event = await waiter
        if event["type"] == "error":
            raise error_for(event["code"], event["message"])
        return event["session"]

    async def send_text(self, text: str, *, final: bool = True, request_id: str | None = None):
        message: dict[str, Any] = {"type": "input.text", "text": text, "final": final}
        if request_id:
            message["request_id"] = request_id
        await self.send(message)

    async def send_audio(self, pcm: bytes) -> None:
        """PCM (or the configured codec's bytes) as one binary frame."""
        await self._send(pcm)

    async def send_frame(
        self,
        data: bytes,
        mime_type: str = "image/jpeg",
        *,
        width: int | None = None,
        height: int | None = None,
    ) -> None:
        message: dict[str, Any] = {
            "type": "input.image",
            "data": base64.b64encode(data).decode(),
            "mime_type": mime_type,
        }
        if width and height:
            message |= {"width": width, "height": height}
        await self.send(message)

    async def send_video(
        self,
        data: bytes,
        mime_type: str,
        chunk_index: int,
        *,
        is_key_frame: bool | None = None,
        final: bool = False,
    ) -> None:
        """One chunk of a video stream or file; ``final`` marks its last chunk."""
        message: dict[str, Any] = {
            "type": "input.video",
            "data": base64.b64encode(data).decode(),
            "mime_type": mime_type,
            "chunk_index": chunk_index,
        }
        if is_key_frame is not None:
            message["is_key_frame"] = is_key_frame
        if final:
            message["final"] = True
        await self.send(message)

    async def commit(self, request_id: str | None = None) -> None:
        await self.send(
            {"type": "input.commit", **({"request_id": request_id} if request_id else {})}
        )

    async def cancel(self) -> None:
        await self.send({"type": "response.cancel"})

    async def report_playback(self, response_id: str, played_ms: float) -> None:
        await self.send({"type": "playback", "response_id": response_id, "played_ms": played_ms})

    async def send_tool_result(self, call_id: str, output: Any) -> None:
        await self.send({"type": "tool.result", "call_id": call_id, "output": output})

    # ---- asking ---------------------------------------------------------------------

    def ask(self, question: str, stream: bool = True) -> Any:
        """``stream=True``: an async iterator of growing ``Message``s; ``False``: an
        awaitable of the whole ``Message``. Server errors raise ``DuplexError``."""
        if stream:
            return self._ask_stream(question)
        return self._ask_whole(question)

    async def _ask_whole(self, question: str) -> Message:
        last = Message()
        async for message in self._ask_stream(question):
            last = message
        return last

    async def _ask_stream(self, question: str) -> AsyncIterator[Message]:
        request_id = uuid.uuid4().hex
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._subscribers.append(queue)
        try:
            await self.send_text(question, request_id=request_id)
            message = Message()
            response_id = None
            while (event := await queue.get()) is not None:
                kind = event["type"]
                if kind == "response.started" and event.get("request_id") == request_id:
                    response_id = message.id = event["response_id"]
                elif kind == "error" and (event.get("fatal") or response_id is None):
                    raise error_for(
                        event["code"], event["message"], fatal=event.get("fatal", False)
                    )
                elif response_id is None or event.get("response_id") != response_id:
                    continue
                elif kind == "chunk":
                    if event.get("delta"):
                        message.content += event["delta"]
                    if event.get("media", {}).get("mime_type", "").startswith("audio/"):
                        message.audio += base64.b64decode(event["media"]["data"])
                    if event.get("metadata"):
                        message.reference.update(event["metadata"])
                    yield message
                elif kind == "tool.output":
                    message.tool_outputs.append(
                        {k: event[k] for k in ("call_id", "name", "output")}
                    )
                    yield message
                elif kind == "warning":
                    message.warnings.append(
                        {k: v for k, v in event.items() if k not in ("type", "seq")}
                    )
                    yield message
                elif kind == "response.done":
                    message.finish_reason = event["finish_reason"]
                    yield message
                    return
            raise self._closed_error or ConnectionLost(1006, "connection closed")
        finally:
            self._subscribers.remove(queue)

    # ---- REST -----------------------------------------------------------------------

    async def messages(self) -> list[dict[str, Any]]:
        body = await self.client._rest("GET", f"/v1/sessions/{self.id}/messages")
        return body["messages"]

    async def clear(self) -> None:
        await self.client._rest("DELETE", f"/v1/sessions/{self.id}/messages")

    async def fork(self) -> str:
        """A new session id with an independent copy of this session's history."""
        body = await self.client._rest("POST", f"/v1/sessions/{self.id}/fork")
        return body["id"]

    async def close(self) -> None:
        """End the session: close 1000 tells the server it is done (it ends the session
        at once and keeps nothing for a resume)."""
        self._closing = True
        await self.ws.close(CLOSE_DONE)
        if not self._connected.is_set() and self._reader is not None:
            self._reader.cancel()  # between reconnect attempts: stop trying
        if self._reader is not None:
            await asyncio.wait([self._reader])  # its outcome is in `_closed_error`


def _is_error_for(event: dict[str, Any], msg_id: str) -> bool:
    return event["type"] == "error" and event.get("id") == msg_id


class SyncClient:
    """Blocking wrapper for scripts: the async client runs on a private event loop thread."""

    def __init__(self, url: str = "ws://127.0.0.1:8000/v1/duplex", token: str | None = None):
        import threading

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._client = self._call(_make_client(url, token))

    def _call(self, coro: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def connect(self, **kwargs: Any) -> SyncSession:
        return SyncSession(self, self._call(self._client.connect(**kwargs)))

    def close(self) -> None:
        self._call(self._client.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _make_client(url: str, token: str | None) -> Client:
    return Client(url, token)  # httpx's client must be made on the loop that uses it


class SyncSession:
    """The blocking face of ``Session``: the same methods, without ``await``."""

    def __init__(self, owner: SyncClient, session: Session) -> None:
        self._owner = owner
        self.session = session
        self.id = session.id

    def ask(self, question: str, timeout: float | None = 120) -> Message:
        return self._owner._call(self.session.ask(question, stream=False), timeout)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.session, name)
        if not asyncio.iscoroutinefunction(method):
            return method
        return lambda *a, **k: self._owner._call(method(*a, **k))


def _close_code(exc: websockets.ConnectionClosed) -> int:
    return exc.rcvd.code if exc.rcvd is not None else 1006
