"""Running Duplex under uvicorn: a graceful drain on SIGTERM, and N worker processes.

uvicorn's own shutdown (on SIGTERM or SIGINT) stops listening and closes every
WebSocket with 1012 about 0.1 s later, cutting answers mid-sentence. `DrainingServer`
puts Duplex's drain first: the first signal only starts `Replica.drain` while uvicorn
keeps serving (so ``/readyz`` answers 503 and new sessions are refused with 503, which
a load balancer reads as "try another replica"); once the drain is over, uvicorn's
usual shutdown runs on whatever is left. A second signal skips the rest of the drain.

``--workers N`` runs N such servers as processes, each binding the port with
SO_REUSEPORT (the kernel spreads connections among them), under a supervisor that
forwards SIGTERM/SIGINT to every worker, waits for their drains, and restarts a worker
that dies on its own. Workers are whole servers: each builds its own app, connection
limits and protocol classes, and they share only the store.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn

from server.config import Settings
from server.replica import Replica

log = logging.getLogger(__name__)

#: A worker that exits within this long of its start is failing to start: stop all.
_START_FAILURE_S = 5.0
#: uvicorn's own shutdown, once the drain is over, waits at most this long.
_AFTER_DRAIN_S = 5.0


class DrainingServer(uvicorn.Server):
    """uvicorn's server with Duplex's drain before uvicorn's own shutdown."""

    def __init__(self, config: uvicorn.Config, replica: Replica) -> None:
        super().__init__(config)
        self.replica = replica
        self._drain: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.replica.draining or self.should_exit:  # a second signal: stop now
            super().handle_exit(sig, frame)
            return
        self._captured_signals.append(sig)  # re-raised by uvicorn after the shutdown
        self.replica.start_draining()  # readiness off at once; the drain starts on a tick

    async def on_tick(self, counter: int) -> bool:
        if self.replica.draining and self._drain is None:
            self._drain = asyncio.create_task(self.replica.drain())
        if self._drain is not None and self._drain.done():
            self.should_exit = True
        return await super().on_tick(counter)


def serve(
    app: Any, settings: Settings, options: dict[str, Any], *, reuse_port: bool = False
) -> None:
    """Run ``app`` until a signal ends it (after the drain)."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        # After the drain: what uvicorn still waits for (connections, tasks) is bounded.
        timeout_graceful_shutdown=_AFTER_DRAIN_S,
        **options,
    )
    server = DrainingServer(config, app.state.duplex.replica)
    sockets = [_reuse_port_socket(settings.host, settings.port)] if reuse_port else None
    server.run(sockets=sockets)


def _reuse_port_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def workers_refusal(settings: Settings) -> str | None:
    """Why ``--workers N`` cannot run with these settings (one line), if it cannot."""
    if settings.workers > 1 and settings.store_url.split(":", 1)[0] == "memory":
        return (
            f"--workers {settings.workers} needs a shared store (--store redis://... or "
            "sqlite:///...): the in-memory store would be one per process"
        )
    return None


WorkerMain = Callable[[Settings], None]


def supervise(settings: Settings, worker_main: WorkerMain) -> int:
    """Run ``settings.workers`` processes of ``worker_main(settings)`` until a signal;
    the exit code is 0 after a signal, else the failing worker's."""
    ctx = multiprocessing.get_context("spawn")
    stopping: list[int] = []

    def start() -> tuple[Any, float]:
        process = ctx.Process(target=_worker_entry, args=(worker_main, settings), daemon=False)
        process.start()
        return process, time.monotonic()

    workers = [start() for _ in range(settings.workers)]

    def forward(sig: int, frame: FrameType | None) -> None:
        stopping.append(sig)
        for process, _ in workers:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            if stopping and not any(p.is_alive() for p, _ in workers):
                return 0
            for index, (process, started) in enumerate(workers):
                if process.is_alive() or stopping:
                    continue
                code = process.exitcode
                if time.monotonic() - started < _START_FAILURE_S:
                    print(
                        f"duplex serve: worker exited with code {code} at startup; stopping",
                        file=sys.stderr,
                    )
                    forward(signal.SIGTERM, None)
                    for other, _ in workers:
                        other.join(timeout=settings.drain_timeout_s + 10)
                    return code or 1
                log.warning(
                    "worker %d (pid %s) exited with %s: restarting", index, process.pid, code
                )
                workers[index] = start()
            multiprocessing.connection.wait([p.sentinel for p, _ in workers], timeout=0.5)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _worker_entry(worker_main: WorkerMain, settings: Settings) -> None:
    os.setpgrp()  # a terminal's Ctrl-C reaches the supervisor only, which forwards it once
    worker_main(settings)
