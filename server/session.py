"""Sessions, usable in-process without the server.

``BaseSession`` holds identity, variables and history; ``DuplexSession`` takes
streamed input and produces a stream of server messages through a bounded
queue; ``UnarySession`` answers one message at a time. The socket layer
(``ws.py``) only translates frames to calls on a ``DuplexSession``.

A ``DuplexSession`` hands its input to a mode (``server/modes/``) built by the factory
``SessionServices.modes`` names for ``config.mode``; the mode reaches back only through
a ``SessionPort``. This module imports no mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from duplex.protocol import (
    BAD_REQUEST,
    CONFLICT,
    INTERNAL,
    NOT_FOUND,
    RATE_LIMITED,
    ClientMessage,
    ConfigLimits,
    ErrorEvent,
    ImageFrame,
    InputAudio,
    InputCommit,
    InputImage,
    InputText,
    InputVideo,
    Message,
    Ping,
    Playback,
    Pong,
    ProtocolError,
    ResponseCancel,
    SessionConfig,
    SessionCreated,
    SessionInfo,
    SessionResume,
    SessionUpdate,
    SessionUpdated,
    StreamChunk,
    TextChunk,
    ToolEvent,
    ToolResult,
    VideoChunk,
    WarningEvent,
    describe_validation_error,
    encode_server_message,
    new_id,
)
from server.decode_budget import PixelBudget
from server.fifo import Fifo
from server.idempotency import TurnLocks
from server.limits import SessionLimits
from server.logs import SessionLog
from server.modes.base import Mode, ModeFactory, SessionPort
from server.outbox import Outbox, OutboxWriter
from server.providers.catalog import ProviderCatalog
from server.state.base import DUPLEX_ENDPOINT, OutboxEntry, SessionRecord, StateStore
from server.tools import ToolRegistry
from server.turn_runner import Turn, TurnRunner

log = logging.getLogger(__name__)

_VAR = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def substitute(template: str, variables: dict[str, str]) -> str:
    """Replace ``{{name}}`` with the variable's value; unknown names stay as written."""
    return _VAR.sub(lambda m: variables.get(m.group(1), m.group(0)), template)


@dataclass
class SessionServices:
    """What a session needs from the app: one object, passed down.

    ``modes`` maps ``SessionConfig.mode`` to the factory of that mode (the app passes
    ``server.modes.catalog.builtin_modes()``); ``UnarySession`` needs none.
    """

    store: StateStore
    providers: ProviderCatalog
    tools: ToolRegistry = field(default_factory=ToolRegistry)
    limits: SessionLimits = field(default_factory=SessionLimits)
    turn_locks: TurnLocks = field(default_factory=TurnLocks)
    modes: Mapping[str, ModeFactory] = field(default_factory=dict)
    #: Copies every session's outbox to the store in shared batches (made from the above).
    outbox_writer: OutboxWriter = None  # type: ignore[assignment]
    #: Decoded image pixels in flight across the app (server/decode_budget.py).
    decode_budget: PixelBudget = field(default_factory=lambda: PixelBudget(40_000_000))

    #: Builds a session's watcher of its outgoing messages (server/metrics.py
    #: `session_taps`: metrics, response log lines); None: nothing watches.
    tap: Callable[[DuplexSession], Callable[[BaseModel], None]] | None = None

    def __post_init__(self) -> None:
        if self.outbox_writer is None:
            self.outbox_writer = OutboxWriter(self.store, self.limits)


class BaseSession:
    """Identity, variables and history, backed by the state store."""

    def __init__(self, record: SessionRecord, config: SessionConfig, services: SessionServices):
        self.record = record
        self.config = config
        self.services = services
        self.log = SessionLog(log, record.id, record.tenant)

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def store(self) -> StateStore:
        return self.services.store

    @property
    def providers(self) -> ProviderCatalog:
        return self.services.providers

    @property
    def tools(self) -> ToolRegistry:
        return self.services.tools

    @property
    def limits(self) -> SessionLimits:
        return self.services.limits

    @property
    def turn_locks(self) -> TurnLocks:
        return self.services.turn_locks

    @property
    def variables(self) -> dict[str, str]:
        return self.record.variables

    async def set_var(self, name: str, value: str) -> None:
        self.record.variables[name] = value
        await self.store.update_session(self.record)

    def get_var(self, name: str, default: str | None = None) -> str | None:
        return self.record.variables.get(name, default)

    def instructions(self) -> str:
        return substitute(self.config.instructions, self.record.variables)

    async def messages(self) -> list[Message]:
        return await self.store.load_messages(self.id)

    async def clear(self) -> None:
        await self.store.clear_messages(self.id)

    @staticmethod
    async def _load(
        services: SessionServices,
        tenant: str,
        session_id: str | None,
        config: SessionConfig | None,
        endpoint: str | None = None,
    ) -> tuple[SessionRecord, SessionConfig]:
        """The record and config of a new session, or of ``session_id`` continued."""
        record = await load_or_create_record(
            services.store, tenant, session_id, config or SessionConfig(), endpoint
        )
        if session_id and config is None:
            config = _stored_config(record)
        return record, config or SessionConfig()

    async def _fork_record(self) -> SessionRecord:
        record = SessionRecord(
            id=new_id("sess"),
            tenant=self.record.tenant,
            name=self.record.name,
            variables=dict(self.record.variables),
            config=self.config.model_dump(),
            parent_id=self.id,
        )
        await self.store.fork(self.id, record)
        return record

    async def _save_record(self) -> None:
        self.record.config = self.config.model_dump()
        self.record.variables = dict(self.config.variables) | self.record.variables
        await self.store.update_session(self.record)


def checked_config(
    base: SessionConfig, patch: dict[str, Any], limits: ConfigLimits
) -> SessionConfig:
    """``patch`` merged into ``base``, within ``limits`` and sure to store and load again;
    raise ProtocolError(400) otherwise. Every door that sets a config goes through here."""
    try:
        config = base.merged(patch, limits)
        # What is stored must load again: the stores keep JSON, the wire echoes it.
        SessionConfig.model_validate_json(config.model_dump_json())
    except ValidationError as exc:
        raise ProtocolError(
            BAD_REQUEST, f"invalid session config: {describe_validation_error(exc)}"
        ) from None
    except ValueError as exc:  # the serialiser's own limits
        raise ProtocolError(BAD_REQUEST, f"session config cannot be stored: {exc}") from None
    return config


def _stored_config(record: SessionRecord) -> SessionConfig:
    """The config a stored session continues with; a fatal 500 that says so if it cannot
    be loaded or written out (stored before the config limits existed)."""
    try:
        config = SessionConfig.model_validate(record.config or {})
        SessionConfig.model_validate_json(config.model_dump_json())
    except ValueError as exc:  # ValidationError, or the serialiser's own limits
        log.warning("[%s] stored config cannot be loaded: %s", record.id, str(exc)[:200])
        raise ProtocolError(
            INTERNAL, "the stored session config cannot be loaded", fatal=True
        ) from None
    return config


def check_variables(limits: ConfigLimits, variables: dict[str, str]) -> None:
    """Raise ProtocolError(400) unless ``variables`` (all a session keeps) are within caps."""
    try:
        limits.check_variables(variables)
    except ValueError as exc:
        raise ProtocolError(BAD_REQUEST, f"invalid session variables: {exc}") from None


def check_endpoint(record: SessionRecord, endpoint: str | None) -> None:
    """Raise a fatal ProtocolError(409) unless ``endpoint`` may continue the session: only
    the endpoint that opened it does (its outbox is in that endpoint's wire format, and
    its connection reads it). None: any (the REST API)."""
    if endpoint is not None and record.endpoint != endpoint:
        raise ProtocolError(
            CONFLICT,
            f"session {record.id!r} belongs to {record.endpoint}: it cannot be continued or "
            f"resumed on {endpoint}",
            fatal=True,
        )


async def load_or_create_record(
    store: StateStore,
    tenant: str,
    session_id: str | None,
    config: SessionConfig,
    endpoint: str | None = None,
) -> SessionRecord:
    """The tenant's session ``session_id`` (404 when unknown or foreign; 409 when it belongs
    to another endpoint than ``endpoint``), or a new one of ``endpoint``."""
    if session_id:
        record = await store.get_session(session_id, tenant)
        if record is None or record.tenant != tenant:
            raise ProtocolError(NOT_FOUND, f"unknown session {session_id!r}", fatal=True)
        check_endpoint(record, endpoint)
        return record
    record = SessionRecord(
        id=new_id("sess"),
        tenant=tenant,
        config=config.model_dump(),
        endpoint=endpoint or DUPLEX_ENDPOINT,
    )
    await store.create_session(record)
    return record


async def _take_input_count(services: SessionServices, record: SessionRecord) -> int | None:
    """The input count a clean close left in ``record``, cleared in the store: it holds
    for the live session that starts now only (one that dies leaves no count)."""
    received = record.input_received
    if received is not None:
        record.input_received = None
        await services.store.update_session(record)
    return received


_CLOSE = object()


class DuplexSession(BaseSession):
    """Streamed input in, a stream of server messages out.

    Output policy: messages go through a queue of ``output_queue_size``. When it
    is full, producers wait (the provider stream and input handling pause, so
    memory stays bounded); if the consumer takes nothing for
    ``output_stall_timeout_s`` the session ends with a fatal ``error`` 429.

    Every message is numbered (``seq``) and recorded in the outbox as it is sent. A
    session whose connection went is *detached* (`detach`): it runs on for a grace
    period, its output going to the outbox only, until a resume claims it (`claim_output`)
    or the grace period ends it.
    """

    def __init__(
        self,
        record: SessionRecord,
        config: SessionConfig,
        services: SessionServices,
        *,
        outbox: list[OutboxEntry] | None = None,
        input_received: int | None = 0,
    ):
        super().__init__(record, config, services)
        self._out: Fifo[Any] = Fifo(services.limits.output_queue_size)
        self._seq = outbox[-1].seq if outbox else 0
        #: Client messages received (`take_input`); unknown (None) after a reopen whose
        #: previous owner died, until the first message counted from 0 after it.
        self._received = input_received or 0
        self._received_known = input_received is not None
        self._outbox: Outbox | None = None
        if services.limits.outbox_max_messages > 0:
            self._outbox = Outbox(record.id, services.outbox_writer, services.limits, outbox)
        self._drain: asyncio.Task[None] | None = None  # the output's reader while detached
        self._grace: asyncio.TimerHandle | None = None
        #: The connection serving this session now (owned by the socket layer).
        self.connection: Any = None
        #: Held while a connection takes the session's output over (server/resume.py).
        self.claim_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._rest: asyncio.Task[None] | None = None  # see `send_audio_nowait`
        self._send_now: Callable[[str], bool] | None = None  # see `attach_output`
        self._encode: Callable[[BaseModel], str] = encode_server_message
        self._consumer_waiting = False
        self.error: ErrorEvent | None = None
        #: The WebSocket close code after a clean end (1012 when drained or moved).
        self.close_code = 1000
        self.done = asyncio.Event()
        #: Sees every message as it leaves (`SessionServices.tap`); the door may reach it.
        self.tap: Any = services.tap(self) if services.tap is not None else None
        self._port = SessionPort(
            id=self.id,
            config=config,
            log=self.log,
            store=services.store,
            providers=services.providers,
            tools=services.tools,
            limits=services.limits,
            turn_locks=services.turn_locks,
            decode_budget=services.decode_budget,
            emit=self.emit,
            emit_nowait=self.emit_nowait,
            emit_error=self.emit_error,
            output_room=self.output_room,
            spawn=self.spawn,
            instructions=self.instructions,
            messages=self.messages,
        )
        self._check_mode(config)
        self._unwatch = services.store.watch(record.id, self._store_changed)
        self._mode: Mode = self._make_mode()

    # ---- lifecycle ------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        services: SessionServices,
        *,
        tenant: str,
        session_id: str | None = None,
        config: SessionConfig | None = None,
        endpoint: str = DUPLEX_ENDPOINT,
    ) -> DuplexSession:
        """Create a new session, or continue ``session_id`` (the tenant's own only, opened
        by ``endpoint``)."""
        record, config = await cls._load(services, tenant, session_id, config, endpoint)
        await _take_input_count(services, record)  # a new live session counts from 0
        session = cls(record, config, services)
        await session.emit(SessionCreated(session=session.info()))
        return session

    @classmethod
    async def reopen(
        cls,
        services: SessionServices,
        *,
        tenant: str,
        session_id: str,
        endpoint: str = DUPLEX_ENDPOINT,
    ) -> DuplexSession:
        """Continue ``session_id`` after its live session ended, for a resume: numbering
        and outbox pick up where the store's copy of the outbox ends. No greeting is sent."""
        record, config = await cls._load(services, tenant, session_id, None, endpoint)
        limits = services.limits
        entries: list[OutboxEntry] = []
        if limits.outbox_max_messages > 0:
            entries = await services.store.load_outbox(
                session_id, max_age_s=limits.outbox_max_age_s
            )
        received = await _take_input_count(services, record)
        return cls(record, config, services, outbox=entries, input_received=received)

    def info(self) -> SessionInfo:
        return SessionInfo(
            id=self.id,
            mode=self.config.mode,
            provider=self.config.provider,
            config=self.config.model_dump(),
        )

    async def close(self, *, resumable: bool = True) -> None:
        """End the session: an answer in progress is stopped and stored as it stood
        (bounded by ``close_timeout_s``). ``resumable=False`` (the client closed with 1000:
        nobody will resume it): the outbox is dropped, here and in the store, instead of
        written."""
        if self._closed:
            return
        self._closed = True
        if self._grace is not None:
            self._grace.cancel()
        with contextlib.suppress(Exception):
            await self._mode.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            _, stuck = await asyncio.wait(
                set(self._tasks), timeout=self.services.limits.close_timeout_s
            )
            for task in stuck:
                self.log.error("task %s did not stop at close", task.get_name())
        self._unwatch()
        self._force_put(_CLOSE)
        if self._outbox is not None:
            if resumable:
                await self._outbox.close()
            else:
                await self._outbox.discard(self._seq)
        await self._save_input_count()  # before `done`: a replica taking over reads it
        if self.tap is not None:
            self.tap.flush()
        self.done.set()
        # Nothing of a closed session may wait for a full GC pass (rare: see server/app.py):
        # drop the references that make cycles, so it is freed when its last user lets go.
        self._mode = _CLOSED_MODE
        # The port holds the session's bound methods; a closed session keeps an empty one.
        self._port = SessionPort.__new__(SessionPort)
        self._send_now = None
        self._rest = None
        # The connection's link holds its writer task, whose traceback (cancelled) holds
        # this session: no resume takes a closed session's output (server/resume.py).
        self.connection = None

    @property
    def closed(self) -> bool:
        """True once the session ends or has failed (no more output is queued)."""
        return self._closed or self.error is not None

    @property
    def busy(self) -> bool:
        """A response is being produced or a turn waits for one (a drain waits for it)."""
        return self._mode.busy

    @property
    def responding(self) -> bool:
        """A response has started and its ``response.done`` is not sent yet."""
        return self._mode.responding

    def cut_response(self) -> None:
        """End the response in flight as interrupted (see `Mode.cut_response`)."""
        self._mode.cut_response()

    async def fork(self) -> DuplexSession:
        record = await self._fork_record()
        session = DuplexSession(record, self.config.model_copy(deep=True), self.services)
        await session.emit(SessionCreated(session=session.info()))
        return session

    def _store_changed(self, available: bool) -> None:
        """The state store went down (or came back): the session goes on either way, and
        the client is told with a ``warning``."""
        if available:
            self.log.info("state store is back: history saved")
            warning = WarningEvent(
                code="store_restored",
                message="state store is back: the session's history is saved again",
            )
        else:
            warning = WarningEvent(
                code="store_unavailable",
                message="state store unavailable: the session goes on; its history is kept "
                "in memory and saved when the store is back",
            )
        if not self.emit_nowait(warning):
            self.log.warning("output queue full: client not told (%s)", warning.code)

    # ---- output ---------------------------------------------------------------------

    def attach_output(
        self,
        send_now: Callable[[str], bool] | None,
        encode: Callable[[BaseModel], str] | None = None,
    ) -> None:
        """Let `emit` write straight to the connection when nothing is queued before the
        message and the consumer of `frames` waits: one loop turn less per message.
        ``send_now(text)`` returns False when it cannot send at once (backpressure).
        ``encode`` replaces `encode_server_message` for `frames` and the outbox (another
        door's wire format, e.g. the OpenAI Realtime door's)."""
        self._send_now = send_now
        self._encode = encode or encode_server_message

    def emit_nowait(self, message: BaseModel) -> bool:
        """`emit` without waiting: False (nothing done) if the output queue is full."""
        if self.closed:
            return True
        send_now = self._send_now
        if send_now is not None and self._consumer_waiting and self._out.empty():
            seq = message.seq = self._seq + 1  # type: ignore[attr-defined]
            text = self._encode(message)
            if send_now(text):
                self._seq = seq
                if self._outbox is not None:
                    self._outbox.record(seq, text, message)
                if self.tap is not None:
                    self.tap(message)
                return True
        try:
            self._out.put_nowait(message)  # seq is assigned when it is taken out
        except asyncio.QueueFull:
            return False
        return True

    def output_room(self) -> int:
        """How many messages `emit_nowait` can take now."""
        return self._out.maxsize - self._out.qsize()

    async def emit(self, message: BaseModel) -> None:
        """Send or queue one server message; waits while the output queue is full."""
        if self.emit_nowait(message):
            return
        try:
            async with asyncio.timeout(self.services.limits.output_stall_timeout_s):
                await self._out.put(message)
        except TimeoutError:
            self.log.warning("output queue full for too long: closing")
            await self.fail(RATE_LIMITED, "client is not reading: output queue full")

    async def emit_error(
        self, code: int, message: str, *, id: str | None = None, fatal: bool = False
    ) -> None:
        if fatal:
            await self.fail(code, message, id=id)
        else:
            await self.emit(ErrorEvent(code=code, message=message, id=id))

    async def fail(self, code: int, message: str, *, id: str | None = None) -> None:
        """End the session with a fatal error, delivered ahead of the close.

        The close runs in its own task: ``fail`` is often called from inside a task
        the close must cancel and wait for.
        """
        if self.closed:
            return
        self.error = ErrorEvent(code=code, message=message, id=id, fatal=True)
        self._force_put(self.error)
        self._closer = asyncio.ensure_future(self.close())

    def _force_put(self, item: Any) -> None:
        while True:
            try:
                self._out.put_nowait(item)
                return
            except asyncio.QueueFull:
                self._out.get_nowait()  # closing: the oldest unsent message goes

    async def response(self) -> AsyncIterator[BaseModel]:
        """Every server message, in order, each with its ``seq``; ends when the session does."""
        while (item := await self._next_out()) is not _CLOSE:
            self._stamp(item)
            yield item

    async def frames(self) -> AsyncIterator[str]:
        """`response` as JSON text frames (what a connection writes). Neither the message
        nor its frame stays referenced here while the next is awaited: with the direct
        path (`attach_output`) the next may come much later, or never."""
        while True:
            item = await self._next_out()
            if item is _CLOSE:
                return
            text = self._stamp(item)
            del item
            yield text
            del text

    async def _next_out(self) -> Any:
        """The next message to send, or ``_CLOSE`` once the session has ended."""
        self._consumer_waiting = True
        try:
            item = await self._out.get()
        finally:
            self._consumer_waiting = False
        if item is _CLOSE and self.tap is not None:
            self.tap.flush()
        return item

    def _stamp(self, message: Any) -> str:
        """Number a message as it leaves, and record it in the outbox."""
        seq = self._seq = self._seq + 1
        message.seq = seq
        text = self._encode(message)
        if self._outbox is not None:
            self._outbox.record(seq, text, message)
        if self.tap is not None:
            self.tap(message)
        return text

    # ---- continuity (server/resume.py drives these) ---------------------------------------

    @property
    def last_seq(self) -> int:
        """The ``seq`` of the last message sent (0: none yet)."""
        return self._seq

    def advance_seq(self, seq: int) -> None:
        """Number the next message after ``seq`` at least (a resumed session whose store
        outbox is gone goes on from the client's ``last_seq``)."""
        self._seq = max(self._seq, seq)

    def acknowledge(self, seq: int) -> None:
        """The client's WebSocket stack read every message up to ``seq`` (a pong to a
        delivery ping, server/ws_protocol.py): the outbox lets go of them."""
        if self._outbox is not None:
            self._outbox.release(seq)

    def sent_after(self, last_seq: int) -> list[OutboxEntry]:
        """The outbox's messages with ``seq > last_seq``, in order."""
        return self._outbox.after(last_seq) if self._outbox is not None else []

    def take_input(self) -> bool:
        """Count one client message as received (``input_received`` of a resume, see
        docs/protocol.md "Resending input"); False, and not counted, once the session
        is closed: a client resending from its count sends it again elsewhere."""
        if self.closed:
            return False
        self._received += 1
        self._received_known = True
        return True

    @property
    def input_received(self) -> int | None:
        """The client messages received, or None when a previous owner died with the
        count (then counting starts again at 0 with the next message)."""
        return self._received if self._received_known else None

    async def _save_input_count(self) -> None:
        """Keep the count at a clean close, for a resume that reopens the session (here
        or on another replica); a store that lost the session is not written to."""
        self.record.input_received = self.input_received
        try:
            async with asyncio.timeout(self.limits.close_timeout_s):
                if await self.store.get_session(self.id) is not None:
                    await self.store.update_session(self.record)
        except Exception as exc:  # an outage, or another replica fenced us out
            self.log.warning("input count not saved: %r", exc)

    def detach(self, grace_s: float, on_end: Callable[[], None]) -> None:
        """The connection went: run on for ``grace_s``, output going to the outbox only
        (the output queue never fills: nothing waits for a reader), then close.
        ``on_end()`` runs once the session has ended while detached."""
        self._send_now = None
        self.connection = None
        self._drain = asyncio.ensure_future(self._discard(on_end))
        self._grace = asyncio.get_running_loop().call_later(grace_s, self._grace_over)
        self.log.info("detached: waiting %.0f s for a resume", grace_s)

    async def _discard(self, on_end: Callable[[], None]) -> None:
        async for _ in self.frames():
            pass
        await self.done.wait()  # the outbox is in the store
        on_end()

    def _grace_over(self) -> None:
        self._grace = None
        self.log.info("no resume within the grace period: closing")
        self._closer = asyncio.ensure_future(self.close())

    async def claim_output(self) -> None:
        """End the detached state (if any) so that a new connection reads the output."""
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        drain, self._drain = self._drain, None
        if drain is not None:
            drain.cancel()
            await asyncio.wait([drain])

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        """A background task owned by the session: cancelled at close, faults are fatal."""
        task = asyncio.ensure_future(coro)
        task.set_name(f"{self.id}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or self._closed:
            return
        exc = task.exception()
        if exc is not None:
            self.log.error("task %s failed", task.get_name(), exc_info=exc)
            self._failing = asyncio.ensure_future(
                self.fail(INTERNAL, f"internal error: {type(exc).__name__}")
            )

    # ---- input ----------------------------------------------------------------------

    async def handle(self, message: ClientMessage) -> None:
        """Dispatch one parsed client message; bad input answers ``error``, never raises."""
        try:
            await self._dispatch(message)
        except ProtocolError as exc:
            await self.emit_error(exc.code, exc.message, id=message.id, fatal=exc.fatal)

    async def _dispatch(self, message: ClientMessage) -> None:
        match message:
            case InputText():
                await self.send_text(
                    TextChunk(message.text, message.final, message.request_id), message.id
                )
            case InputAudio():
                await self.send_audio(message.audio, message.id)
            case InputImage():
                await self.send_frame(
                    ImageFrame(
                        message.data,
                        message.mime_type,
                        message.width,
                        message.height,
                        message.frame_num,
                        message.timestamp,
                    ),
                    message.id,
                )
            case InputVideo():
                await self.send_video_chunk(
                    VideoChunk(
                        message.data,
                        message.mime_type,
                        message.chunk_index,
                        message.timestamp,
                        message.width,
                        message.height,
                        message.final,
                    ),
                    message.id,
                )
            case InputCommit():
                await self.commit(message.request_id, message.id)
            case ResponseCancel():
                await self.cancel(message.id)
            case Playback():
                if self._outbox is not None:
                    self._outbox.heard(message.response_id, message.played_ms)
                await self._mode.on_playback(message.response_id, message.played_ms)
            case ToolResult():
                await self._mode.on_tool_result(message.call_id, message.output, message.id)
            case SessionUpdate():
                await self.update(message.config, message.id)
            case Ping():
                await self.emit(Pong(id=message.id))
            case SessionResume():
                raise ProtocolError(
                    BAD_REQUEST, "session.resume is only accepted as a connection's first message"
                )

    def _check_open(self) -> None:
        if self.closed:
            raise ProtocolError(BAD_REQUEST, "the session is closed", fatal=True)

    async def send_text(self, chunk: TextChunk, msg_id: str | None = None) -> None:
        self._check_open()
        await self._mode.on_text(chunk, msg_id)

    async def send_audio(self, pcm: bytes, msg_id: str | None = None) -> None:
        """Audio in the session's input format (``config.input_audio``: PCM s16le unless
        configured otherwise)."""
        self._check_open()
        await self._mode.on_audio(pcm, msg_id)

    def send_audio_nowait(self, pcm: bytes) -> bool:
        """Take audio (one binary message) without waiting, for the server's direct receive path.

        What cannot finish at once (a turn's end, an error to report) continues in a
        task; until it is done this returns False, and `settle` waits for it, so input
        keeps its order. False means nothing was done: use `send_audio`.
        """
        if self.closed or self._rest is not None or not self._mode.direct_audio:
            return False
        try:
            rest = self._mode.on_audio_nowait(pcm)
        except Exception:  # a bug, not bad input: end this session, not the connection's
            self.log.exception("internal error handling audio")
            rest = self.fail(INTERNAL, "internal error")
        if rest is not None:
            self._rest = self.spawn(self._finish(rest), "input")
        return True

    async def _finish(self, rest: Coroutine[Any, Any, None]) -> None:
        try:
            await rest
        except ProtocolError as exc:
            await self.emit_error(exc.code, exc.message, fatal=exc.fatal)
        finally:
            self._rest = None

    async def settle(self) -> None:
        """Wait until input taken by `send_audio_nowait` is fully handled."""
        if self._rest is not None:
            await self._rest

    async def send_frame(self, frame: ImageFrame, msg_id: str | None = None) -> None:
        self._check_open()
        await self._mode.on_frame(frame, msg_id)

    async def send_video_chunk(self, chunk: VideoChunk, msg_id: str | None = None) -> None:
        self._check_open()
        await self._mode.on_video(chunk, msg_id)

    async def commit(self, request_id: str | None = None, msg_id: str | None = None) -> None:
        self._check_open()
        await self._mode.on_commit(request_id, msg_id)

    async def send_audio_clip(self, pcm: bytes, msg_id: str | None = None) -> None:
        """A recorded clip (session input format) for the user's next turn, not heard by
        turn detection."""
        self._check_open()
        await self._mode.on_audio_clip(pcm, msg_id)

    async def respond(
        self, text: str, context: list[Message] | None = None, *, store_answer: bool = False
    ) -> str:
        """An out-of-band response (see `Mode.on_respond`); returns its turn id."""
        self._check_open()
        return await self._mode.on_respond(text, context, store_answer=store_answer)

    async def cancel(self, msg_id: str | None = None) -> None:
        self._check_open()
        await self._mode.on_cancel(msg_id)

    async def update(self, patch: dict[str, Any], msg_id: str | None = None) -> None:
        """Apply a ``session.update``: deep-merged, validated, then the mode adapts.

        Nothing changes unless all of it is valid and within the limits."""
        limits = self.services.limits.config
        config = checked_config(self.config, patch, limits)
        self._check_mode(config)
        self._check_provider(config)
        check_variables(limits, self.record.variables | config.variables)
        old = self.config
        self.config = self._port.config = config  # the mode reads it through its port
        if "variables" in patch:
            self.record.variables.update(config.variables)
        await self._save_record()
        if config.mode != old.mode:
            await self._mode.close()
            self._mode = self._make_mode()
        else:
            try:
                await self._mode.reconfigure(old)
            except ProtocolError:
                # Not applied: keep (and report) the settings in effect.
                self.config = old
                await self._save_record()
                await self._mode.reconfigure(config)
                raise
        await self.emit(SessionUpdated(session=self.info()))

    def _check_mode(self, config: SessionConfig) -> None:
        if config.mode not in self.services.modes:
            raise ProtocolError(
                BAD_REQUEST,
                f"mode {config.mode!r} is not available "
                f"(available: {', '.join(sorted(self.services.modes)) or 'none'})",
            )

    def _check_provider(self, config: SessionConfig) -> None:
        providers = self.services.providers
        if config.mode == "vad" and providers.get_unary(config.provider) is None:
            raise ProtocolError(
                BAD_REQUEST,
                f"provider {config.provider!r} cannot answer turns in vad mode "
                f"(available: {', '.join(sorted(providers.unary))})",
            )
        if config.mode == "asm" and config.provider not in providers.realtime:
            raise ProtocolError(
                BAD_REQUEST,
                f"provider {config.provider!r} is not a realtime provider "
                f"(available: {', '.join(sorted(providers.realtime)) or 'none'})",
            )

    def _make_mode(self) -> Mode:
        return self.services.modes[self.config.mode](self._port)


class _ClosedMode(Mode):
    """What a closed session forwards to: late reports are ignored, and it holds no
    session (a mode that did would keep the closed session in a cycle)."""

    def __init__(self) -> None:
        pass

    async def on_playback(self, response_id: str, played_ms: float) -> None:
        pass

    async def on_tool_result(self, call_id: str, output: Any, msg_id: str | None) -> None:
        pass


_CLOSED_MODE = _ClosedMode()


class UnarySession(BaseSession):
    """One message in, one answer out: the same turn pipeline without a socket."""

    @classmethod
    async def open(
        cls,
        services: SessionServices,
        *,
        tenant: str,
        session_id: str | None = None,
        config: SessionConfig | None = None,
    ) -> UnarySession:
        """Create a new session, or continue ``session_id`` (the tenant's own, and not one
        opened on /v1/realtime: 409, as on /v1/duplex)."""
        record, config = await cls._load(services, tenant, session_id, config, DUPLEX_ENDPOINT)
        return cls(record, config, services)

    async def execute_stream(
        self, role: str, content: str
    ) -> AsyncIterator[StreamChunk | ToolEvent]:
        """Stream the answer to one message (chunks and tool events); history is stored
        when it ends."""
        if role != "user":
            await self.store.append_messages(self.id, [Message(role=role, content=content)])  # type: ignore[arg-type]
            return
        provider = self.services.providers.get_unary(self.config.provider)
        if provider is None:
            raise ProtocolError(BAD_REQUEST, f"unknown provider {self.config.provider!r}")
        runner = TurnRunner(self, provider, Turn(turn_id=new_id("turn"), text=content))
        reason = "error"
        last: StreamChunk | None = None  # a chunk with finish_reason waits for the record
        try:
            async for chunk in runner.chunks():
                if last is not None:
                    yield last
                    last = None
                if chunk.finish_reason:
                    last = chunk
                else:
                    yield chunk
            reason = runner.finish_reason or "stop"
            await runner.record(reason)  # durable before the caller sees the end
            if last is not None:
                yield last
        except asyncio.CancelledError:
            reason = "cancelled"
            raise
        finally:
            await runner.record(reason)  # once: a no-op after the record above

    async def execute(self, role: str, content: str) -> Message:
        """The whole answer as one assistant message."""
        started = time.monotonic()
        parts: list[str] = []
        async for chunk in self.execute_stream(role, content):
            if isinstance(chunk, StreamChunk) and chunk.delta:
                parts.append(chunk.delta)
        return Message(
            role="assistant",
            content="".join(parts),
            metadata={"elapsed_s": round(time.monotonic() - started, 3)},
        )

    async def fork(self) -> UnarySession:
        record = await self._fork_record()
        return UnarySession(record, self.config.model_copy(deep=True), self.services)
