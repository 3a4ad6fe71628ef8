"""Shared fixtures: a real uvicorn server on a loopback port, in a background thread."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from server.app import create_app
from server.cli import uvicorn_options
from server.config import Settings

TOKEN = "test-token-a"
OTHER_TOKEN = "test-token-b"


@dataclass
class RunningServer:
    base: str  # http://127.0.0.1:PORT
    app: Any
    server: uvicorn.Server | None = None

    @property
    def ws_url(self) -> str:
        return self.base.replace("http", "ws", 1) + "/v1/duplex"


def start_server(
    settings: Settings,
    uvicorn_kwargs: dict[str, Any] | None = None,
    sndbuf: int | None = None,
    **app_kwargs: Any,
) -> tuple[RunningServer, uvicorn.Server, threading.Thread]:
    app = create_app(settings, **app_kwargs)
    sock = socket.socket()
    if sndbuf is not None:  # accepted connections inherit it (a fixed kernel send buffer)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    options = uvicorn_options(settings) | (uvicorn_kwargs or {})
    config = uvicorn.Config(app, log_level="warning", lifespan="on", **options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.01)
    return RunningServer(f"http://127.0.0.1:{port}", app, server), server, thread


def stop_server(server: uvicorn.Server, thread: threading.Thread) -> None:
    server.should_exit = True
    thread.join(timeout=10)


def make_settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "api_tokens": f"{TOKEN}:tenant-a,{OTHER_TOKEN}:tenant-b",
        "echo_pace": 0.0,
        "max_message_bytes": 256 * 1024,
    }
    base.update(overrides)
    return Settings(**base)


@pytest.fixture(scope="module")
def live_server() -> Iterator[RunningServer]:
    running, server, thread = start_server(make_settings())
    yield running
    stop_server(server, thread)


@pytest.fixture
def server_factory() -> Iterator[Any]:
    """Start servers with custom settings inside one test; all stopped at the end."""
    started: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(**overrides: Any) -> RunningServer:
        app_kwargs = overrides.pop("app_kwargs", {})
        uvicorn_kwargs = overrides.pop("uvicorn_kwargs", None)
        sndbuf = overrides.pop("sndbuf", None)
        running, server, thread = start_server(
            make_settings(**overrides), uvicorn_kwargs, sndbuf, **app_kwargs
        )
        started.append((server, thread))
        return running

    yield start
    for server, thread in started:
        stop_server(server, thread)


def store_url(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """The URL of a fresh store of ``kind`` (memory, sqlite, redis) for one test."""
    if kind == "redis":
        return request.getfixturevalue("redis_url")
    return "memory://" if kind == "memory" else f"sqlite:///{tmp_path}/s.db"


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """A real redis-server on a loopback port, for the shared-store tests."""
    import shutil
    import subprocess

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (scripts/test installs it)")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)
