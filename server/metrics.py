"""Prometheus metrics (``DUPLEX_METRICS``), in one `CollectorRegistry` per app.

What the hot paths pay: an input message costs one integer increment (`InputBudget`
counts what it admits); an outgoing message one call of the session's `SessionTap`,
which does a type lookup and returns for everything but a handful of per-turn events
and, until a response's first text and audio have gone out, its chunks. Counters of
messages are added to Prometheus in bulk, at each ``response.done`` and at the close.
Live sessions are counted when scraped, from the app's `SessionRegistry`.

Latencies are measured where the messages leave the session (so they include any
queueing before the socket):

* end-of-turn overhead: the last input message admitted (its budget's clock) to
  ``turn.ended`` (needs the input rate limits on, as by default);
* provider time to first token / first audio: ``response.started`` to the response's
  first text delta / first audio chunk;
* response latency as the user perceives it: end of the user's speech to the first
  reply audio. The end of speech is taken as ``speech.stopped`` minus the turn
  detection's ``stop_ms`` (the silence the server waits for before it knows the turn is
  over, which the user waits through too), or ``speech.stopped`` itself for manual turns.
"""

from __future__ import annotations

import hmac
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, cast

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, start_http_server
from pydantic import BaseModel

from duplex.protocol import (
    ChunkEvent,
    ErrorEvent,
    ProviderReconnect,
    ResponseDone,
    ResponseStarted,
    SpeechStarted,
    SpeechStopped,
    TurnEnded,
)
from server.state.base import StateStore

if TYPE_CHECKING:
    from server.config import Settings
    from server.rate import InputBudget

log = logging.getLogger(__name__)

#: Server-side overheads: tens of microseconds to tens of milliseconds.
FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
#: What a user waits for: 50 ms to 30 s.
LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)

#: A live session as the collector sees it: (mode, provider).
LiveSessions = Callable[[], Iterable[tuple[str, str]]]


class _LiveCollector:
    """``duplex_live_sessions{mode,provider}``, counted at scrape time."""

    def __init__(self, live: LiveSessions) -> None:
        self._live = live

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "duplex_live_sessions", "Sessions connected now", labels=["mode", "provider"]
        )

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts: dict[tuple[str, str], int] = {}
        for key in self._live():
            counts[key] = counts.get(key, 0) + 1
        family = GaugeMetricFamily(
            "duplex_live_sessions", "Sessions connected now", labels=["mode", "provider"]
        )
        for (mode, provider), n in sorted(counts.items()):
            family.add_metric([mode, provider], n)
        yield family


class Metrics:
    """Every Duplex metric, registered in this app's own registry."""

    def __init__(self, live: LiveSessions) -> None:
        self.registry = r = CollectorRegistry()
        self.messages_received = Counter(
            "duplex_messages_received", "Client messages admitted (text and binary)", registry=r
        )
        self.messages_sent = Counter("duplex_messages_sent", "Server messages sent", registry=r)
        self.errors = Counter(
            "duplex_errors", "Error messages sent (refused connections too)", ["code"], registry=r
        )
        self.responses = Counter(
            "duplex_responses", "Responses finished", ["finish_reason"], registry=r
        )
        self.barge_ins = Counter(
            "duplex_barge_ins", "Responses cut off by the user speaking", registry=r
        )
        self.provider_reconnects = Counter(
            "duplex_provider_reconnects", "Realtime provider connections reopened", registry=r
        )
        self.end_of_turn = Histogram(
            "duplex_end_of_turn_overhead_seconds",
            "Last input message admitted -> turn.ended sent",
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.first_token = Histogram(
            "duplex_provider_first_token_seconds",
            "response.started -> first text delta sent",
            ["provider"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_audio = Histogram(
            "duplex_provider_first_audio_seconds",
            "response.started -> first audio chunk sent",
            ["provider"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.response_latency = Histogram(
            "duplex_response_latency_seconds",
            "End of the user's speech -> first reply audio sent (user-perceived)",
            ["provider"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.store_operations = Histogram(
            "duplex_store_operation_seconds",
            "State store calls, by operation",
            ["operation"],
            buckets=FAST_BUCKETS,
            registry=r,
        )
        r.register(_LiveCollector(live))  # type: ignore[arg-type]
        # Labelled children, looked up once (`labels()` takes a lock and validates).
        self._by_provider: dict[str, tuple[Any, Any, Any]] = {}
        self._by_reason: dict[str, Any] = {}

    def provider_latencies(self, provider: str) -> tuple[Any, Any, Any]:
        """(first token, first audio, response latency) histograms of ``provider``."""
        found = self._by_provider.get(provider)
        if found is None:
            found = self._by_provider[provider] = (
                self.first_token.labels(provider),
                self.first_audio.labels(provider),
                self.response_latency.labels(provider),
            )
        return found

    def count_response(self, finish_reason: str) -> None:
        child = self._by_reason.get(finish_reason)
        if child is None:
            child = self._by_reason[finish_reason] = self.responses.labels(finish_reason)
        child.inc()

    def count_error(self, code: int) -> None:
        self.errors.labels(str(code)).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def timed_store(self, store: StateStore) -> StateStore:
        return cast(StateStore, TimedStore(store, self.store_operations))

    @contextmanager
    def listener(self, host: str, port: int) -> Iterator[int]:
        """Serve the metrics on their own port (a thread of prometheus-client's); yields
        the bound port (``port`` 0 picks a free one)."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        log.info("metrics on http://%s:%d/metrics", host, server.server_port)
        try:
            yield server.server_port
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)


class TimedStore:
    """A state store whose every coroutine method is timed into
    ``duplex_store_operation_seconds{operation}`` (methods added later are covered too)."""

    def __init__(self, store: StateStore, histogram: Histogram) -> None:
        self._store = store
        self._histogram = histogram
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not inspect.iscoroutinefunction(attr):
            return attr
        child = self._histogram.labels(name)
        clock = time.perf_counter

        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = clock()
            try:
                return await attr(*args, **kwargs)
            finally:
                child.observe(clock() - started)

        timed.__name__ = name
        with self._lock:
            self.__dict__[name] = timed  # found before __getattr__ from now on
        return timed


class SessionTap:
    """Watches one session's outgoing messages: metrics, and one log line per response.

    Called for every message as it leaves the session, so it returns at once for all
    but a few types (see the module docstring)."""

    __slots__ = (
        "_audio_due",
        "_count",
        "_log_responses",
        "_metrics",
        "_received",
        "_sent",
        "_session",
        "_speech_end",
        "_spoke_over",
        "_started",
        "_text_due",
        "_turn_id",
        "input",
    )

    def __init__(self, metrics: Metrics | None, session: Any, log_responses: bool) -> None:
        self._metrics = metrics
        self._session = session
        #: The connection's input budget (set by the WebSocket door): its count of admitted
        #: messages and its clocks.
        self.input: InputBudget | None = None
        self._received = 0
        self._count = 0  # messages sent
        self._sent = 0  # of which added to the counter
        self._speech_end: float | None = None
        self._started: float | None = None
        self._text_due = False
        self._audio_due = False
        self._turn_id: str | None = None
        self._spoke_over = False  # the user started speaking while a response streamed
        self._log_responses = log_responses

    def __call__(self, message: BaseModel) -> None:
        self._count += 1
        cls = type(message)
        try:
            if cls is ChunkEvent:  # most messages: one check, nothing once the firsts are out
                if self._text_due or self._audio_due:
                    self._chunk(message)
                return
            handler = _HANDLERS.get(cls)
            if handler is not None:
                handler(self, message)
        except Exception:  # a fault in measuring must not end the session
            self._session.log.exception("metrics: %s not counted", cls.__name__)

    def attach_input(self, budget: InputBudget) -> None:
        """Count and time input from ``budget`` (a connection's) from now on; a resumed
        session gets a new one per connection."""
        self.flush()
        self.input = budget
        self._received = 0

    # ---- per message type -----------------------------------------------------------

    def _chunk(self, chunk: Any) -> None:
        now = time.monotonic()
        metrics = self._metrics
        first_token, first_audio, latency = (
            metrics.provider_latencies(self._session.config.provider)
            if metrics is not None
            else (None, None, None)
        )
        if self._text_due and chunk.delta:
            self._text_due = False
            if metrics is not None and self._started is not None:
                first_token.observe(now - self._started)
        media = chunk.media
        if self._audio_due and media is not None and media.mime_type.startswith("audio/"):
            self._audio_due = False
            if metrics is not None:
                if self._started is not None:
                    first_audio.observe(now - self._started)
                if self._speech_end is not None:
                    latency.observe(now - self._speech_end)
            self._speech_end = None

    def _response_started(self, message: Any) -> None:
        self._started = time.monotonic()
        self._text_due = self._audio_due = True
        self._turn_id = message.turn_id
        self._spoke_over = False

    def _response_done(self, message: Any) -> None:
        self._text_due = self._audio_due = False
        metrics = self._metrics
        reason = message.finish_reason
        if metrics is not None:
            metrics.count_response(reason)
            # Interrupted with the user speaking over it (not cut by a lost provider).
            if reason == "interrupted" and self._spoke_over:
                metrics.barge_ins.inc()
            self.flush()
        if self._log_responses:
            elapsed = None if self._started is None else time.monotonic() - self._started
            self._session.log.info(
                "response %s done: %s",
                message.response_id,
                reason,
                extra={
                    "turn_id": self._turn_id,
                    "response_id": message.response_id,
                    "finish_reason": reason,
                    "elapsed_ms": None if elapsed is None else round(elapsed * 1000, 1),
                },
            )
        self._started = None
        self._speech_end = None

    def _speech_started(self, message: Any) -> None:
        if self._started is not None:
            self._spoke_over = True

    def _speech_stopped(self, message: Any) -> None:
        td = self._session.config.turn_detection
        # With stop_ms "auto" the silence is learned per session: 800 ms here.
        lag = td.fixed_stop_ms / 1000 if td.type == "vad" else 0.0
        self._speech_end = time.monotonic() - lag

    def _turn_ended(self, message: Any) -> None:
        budget = self.input
        if self._metrics is None or budget is None:
            return
        # The input clock of the kind of message that ended the turn (a clock only moves
        # while its rate limit is on).
        bucket = budget.audio if message.audio_end_ms is not None else budget.messages
        if bucket.rate > 0:
            self._metrics.end_of_turn.observe(max(0.0, time.monotonic() - bucket.stamp))

    def _error(self, message: Any) -> None:
        if self._metrics is not None:
            self._metrics.count_error(message.code)

    def _reconnect(self, message: Any) -> None:
        if self._metrics is not None:
            self._metrics.provider_reconnects.inc()

    # ---- bulk counters --------------------------------------------------------------

    def flush(self) -> None:
        """Add the messages counted since the last flush (idempotent)."""
        metrics = self._metrics
        if metrics is None:
            return
        sent = self._count
        if sent > self._sent:
            metrics.messages_sent.inc(sent - self._sent)
            self._sent = sent
        budget = self.input
        if budget is not None and budget.received > self._received:
            metrics.messages_received.inc(budget.received - self._received)
            self._received = budget.received


_HANDLERS: dict[type, Callable[[SessionTap, Any], None]] = {
    ResponseStarted: SessionTap._response_started,
    ResponseDone: SessionTap._response_done,
    SpeechStarted: SessionTap._speech_started,
    SpeechStopped: SessionTap._speech_stopped,
    TurnEnded: SessionTap._turn_ended,
    ErrorEvent: SessionTap._error,
    ProviderReconnect: SessionTap._reconnect,
}


def session_taps(
    metrics: Metrics | None, log_responses: bool
) -> Callable[[Any], SessionTap] | None:
    """The factory `SessionServices.tap` takes: None when neither metrics nor response
    logs are on (sessions then pay nothing at all)."""
    if metrics is None and not log_responses:
        return None
    return lambda session: SessionTap(metrics, session, log_responses)


def from_settings(settings: Settings, live: LiveSessions) -> Metrics | None:
    return None if settings.metrics == "off" else Metrics(live)


router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics_endpoint(request: Request) -> Response:
    """The main port's ``/metrics`` (``DUPLEX_METRICS=on``): bearer ``metrics_token``."""
    app = request.app.state.duplex
    expected = app.settings.metrics_token or ""
    scheme, _, value = (request.headers.get("authorization") or "").partition(" ")
    given = value.strip() if scheme.lower() == "bearer" else ""
    if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(401, "missing or invalid metrics token")
    return Response(app.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
