"""create_app(settings): the FastAPI app, its routes and the resources it owns."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass, fields
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from duplex.protocol import ConfigLimits, JsonLimits
from server import api_docs, chat_api, client_token_api, http_api, ws
from server.allocator import HeapTrimmer
from server.auth import TokenAuth
from server.client_tokens import ClientTokens
from server.config import Settings
from server.decode_budget import PixelBudget
from server.limits import SessionLimits
from server.logs import install_redaction
from server.metrics import Metrics, session_taps
from server.metrics import from_settings as metrics_from_settings
from server.metrics import router as metrics_router
from server.modes.catalog import builtin_modes
from server.providers.catalog import ProviderCatalog
from server.realtime_door import routes as realtime_routes
from server.registry import SessionRegistry
from server.replica import Replica
from server.session import SessionServices
from server.state.base import StoreUnavailable
from server.state.open import open_store
from server.state.resilient import ResilientStore
from server.tools import ToolRegistry, load_tools

#: Middle-generation collections between full ones (CPython's default is 10). Cyclic
#: garbage old enough to reach the oldest generation (a closed session's objects) waits
#: for the next full collection: about every 700,000 allocations of tracked objects
#: instead of 70,000, seconds to tens of seconds under load.
_FULL_GC_EVERY = 100

log = logging.getLogger("duplex")

STATIC_DIR = Path(__file__).parent / "static"


@dataclass
class AppState:
    settings: Settings
    auth: TokenAuth
    services: SessionServices
    registry: SessionRegistry
    replica: Replica
    client_tokens: ClientTokens
    metrics: Metrics | None = None
    trimmer: HeapTrimmer | None = None


def _entries(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def create_app(settings: Settings | None = None, *, tools: ToolRegistry | None = None) -> FastAPI:
    settings = settings or Settings()
    install_redaction()  # no token in any log line, uvicorn's access log included
    auth = TokenAuth.from_settings(settings)
    trimmer = HeapTrimmer(settings.malloc_trim_s, settings.malloc_trim_after_close_s)
    registry = SessionRegistry(on_remove=trimmer.session_ended)
    metrics = metrics_from_settings(settings, registry.modes_and_providers)
    store = open_store(
        settings.store_url,
        ttl_s=settings.store_ttl_s,
        max_sessions=settings.store_max_sessions,
        max_messages=settings.store_max_messages,
    )
    if not settings.store_url.startswith("memory:"):  # across a network or on a disk
        store = ResilientStore(
            store,
            timeout_s=settings.store_timeout_s,
            backlog_max_writes=settings.store_backlog_max_writes,
            backlog_max_bytes=settings.store_backlog_max_bytes,
            max_messages=settings.store_max_messages,
        )
    if metrics is not None:  # outermost: the latency callers see
        store = metrics.timed_store(store)
    services = SessionServices(
        store=store,
        providers=ProviderCatalog.from_settings(settings),
        tools=tools if tools is not None else load_tools(_entries(settings.tools)),
        limits=SessionLimits(
            output_queue_size=settings.output_queue_size,
            output_stall_timeout_s=settings.output_stall_timeout_s,
            max_pending_turns=settings.max_pending_turns,
            max_image_pixels=settings.max_image_pixels,
            decode_wait_s=settings.decode_wait_s,
            vad_idle_history_ms=settings.vad_idle_history_ms,
            tool_hop_limit=settings.tool_hop_limit,
            client_tool_timeout_s=settings.client_tool_timeout_s,
            persist_interval_ms=settings.persist_interval_ms,
            persist_min_chars=settings.persist_min_chars,
            json=JsonLimits(max_depth=settings.max_json_depth),
            config=ConfigLimits(
                **{f.name: getattr(settings, f.name) for f in fields(ConfigLimits)}
            ),
            close_timeout_s=2 * settings.store_timeout_s + 1,
            outbox_max_messages=settings.outbox_max_messages,
            outbox_max_bytes=settings.outbox_max_bytes,
            outbox_max_age_s=settings.outbox_max_age_s,
            outbox_flush_ms=settings.outbox_flush_ms,
            resume_grace_s=settings.resume_grace_s,
        ),
        modes=builtin_modes(),
        decode_budget=PixelBudget(max(settings.max_decode_pixels, settings.max_image_pixels)),
        tap=session_taps(metrics, log_responses=settings.log_format == "json"),
    )
    client_tokens = ClientTokens(settings.client_secret_key, settings.client_token_ttl_s, store)
    replica = Replica(settings, store)
    state = AppState(settings, auth, services, registry, replica, client_tokens, metrics, trimmer)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if auth.generated:
            log.warning("no API token configured; generated a dev token: %s", auth.generated)
        # Everything loaded so far lives for the whole run: keep it out of the GC's
        # full collections, which otherwise pause every session at once. And make full
        # collections rarer: each one walks every session's objects (80 ms at 400
        # sessions, measured), a pause every session feels as latency.
        gc.freeze()
        thresholds = gc.get_threshold()
        gc.set_threshold(thresholds[0], thresholds[1], _FULL_GC_EVERY)
        trimming = asyncio.ensure_future(trimmer.run())
        try:
            with ExitStack() as stack:
                if metrics is not None and settings.metrics == "port":
                    app.state.metrics_port = stack.enter_context(
                        metrics.listener(settings.metrics_host, settings.metrics_port)
                    )
                yield
        finally:
            trimming.cancel()
        gc.set_threshold(*thresholds)
        await services.providers.aclose()
        await services.outbox_writer.aclose()
        await state.replica.aclose()
        await store.close()

    app = api_docs.make_app(settings.api_docs, title="Duplex", version="0.1.0", lifespan=lifespan)
    app.state.duplex = state
    app.state.realtime = realtime_routes.setup(settings, client_tokens)
    app.add_exception_handler(RequestValidationError, http_api.invalid_body)

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(request: Request, exc: StoreUnavailable) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503)

    app.include_router(http_api.router)
    app.include_router(ws.router)
    app.include_router(chat_api.router)
    app.include_router(realtime_routes.router)
    app.include_router(client_token_api.router)
    if metrics is not None and settings.metrics == "on":
        app.include_router(metrics_router)
    if STATIC_DIR.is_dir():
        app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="demo")
    return app
