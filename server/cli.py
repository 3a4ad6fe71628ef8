"""`duplex serve` runs the server; `duplex client` talks to one from a terminal."""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
from importlib import metadata
from typing import Any

from pydantic import ValidationError

from duplex.terminal import add_arguments as add_client_arguments
from duplex.terminal import run as run_client
from server.config import Settings
from server.logs import configure_logging

STORE_HELP = (
    "state store URL (default: $DUPLEX_STORE_URL or memory://): memory:// (in this process), "
    "sqlite:///relative.db or sqlite:////absolute.db (kept across restarts), "
    "redis://host:port/db, rediss://host:port/db (TLS) or unix:///path/redis.sock "
    "(shared by replicas; pip install 'duplex[redis]')"
)


class CliError(Exception):
    """A problem the user can fix (a setting, a flag): printed as one line, exit code 2."""


def _version() -> str:
    try:
        return metadata.version("duplex")
    except metadata.PackageNotFoundError:  # run from a source tree without installing
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="duplex", description=__doc__)
    version = f"duplex {_version()}"
    parser.add_argument("--version", action="version", version=version)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--host", help="bind address (default: $DUPLEX_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: $DUPLEX_PORT or 8000)")
    serve.add_argument(
        "--token",
        action="append",
        help="API token[:tenant]; repeatable (default: $DUPLEX_API_TOKENS, else a dev token "
        "is generated and printed)",
    )
    serve.add_argument("--store", help=STORE_HELP)
    serve.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="(default: $DUPLEX_LOG_LEVEL or info)",
    )
    serve.add_argument(
        "--log-format", choices=["text", "json"], help="text (default) or JSON lines"
    )
    serve.add_argument(
        "--allow-anonymous", action="store_true", help="accept connections without a token"
    )
    serve.add_argument(
        "--workers",
        type=int,
        help="server processes on the port (default 1); more than 1 needs a shared store",
    )
    serve.add_argument(
        "--tools",
        action="append",
        metavar="MODULE:ATTR",
        help="server-side tools: a ToolRegistry, or a function that registers tools on one; "
        "repeatable (adds to DUPLEX_TOOLS)",
    )

    client = sub.add_parser(
        "client",
        help="connect, send, print the events as they arrive",
        description="Connect to a Duplex server, send text, a WAV, a video file or the "
        "microphone, and print every event with the time since start.",
    )
    client.add_argument("--version", action="version", version=version)
    add_client_arguments(client)

    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        return asyncio.run(run_client(args))
    except CliError as exc:
        print(f"duplex {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _serve(args: argparse.Namespace) -> int:
    from server.auth import TokenAuth
    from server.serving import supervise, workers_refusal

    overrides: dict[str, Any] = {}
    if args.host:
        overrides["host"] = args.host
    if args.port:
        overrides["port"] = args.port
    if args.token:
        overrides["api_tokens"] = ",".join(args.token)
    if args.store:
        overrides["store_url"] = args.store
    if args.log_format:
        overrides["log_format"] = args.log_format
    if args.log_level:
        overrides["log_level"] = args.log_level
    if args.allow_anonymous:
        overrides["allow_anonymous"] = True
    if args.workers:
        overrides["workers"] = args.workers
    settings = _settings(overrides)
    if args.tools:
        settings.tools = ",".join([settings.tools, *args.tools]).strip(",")
    if settings.workers == 1:
        return _run(settings)
    refusal = workers_refusal(settings)
    if refusal is not None:
        print(f"duplex serve: {refusal}", file=sys.stderr)
        return 2
    generated = TokenAuth.from_settings(settings).generated
    if generated:  # one dev token for every worker
        settings.api_tokens = f"{generated}:dev"
        _print_dev_token(settings, generated)
    return supervise(settings, _run_worker)


def _run_worker(settings: Settings) -> None:
    """One of ``--workers N`` (a spawned process): the server on a SO_REUSEPORT socket.
    A configured replica id gets the worker's pid: leases tell the workers apart."""
    if settings.replica_id:
        settings.replica_id = f"{settings.replica_id}-{os.getpid()}"
    try:
        code = _run(settings, reuse_port=True)
    except CliError as exc:
        print(f"duplex serve: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)


def _run(settings: Settings, *, reuse_port: bool = False) -> int:
    from server.allocator import fix_mmap_threshold
    from server.app import create_app
    from server.serving import serve

    configure_logging(settings.log_level, settings.log_format)
    fix_mmap_threshold()  # see server/allocator.py: freed memory goes back to the system
    try:
        app = create_app(settings)
    except (ValueError, OSError, sqlite3.Error) as exc:  # store URL, tokens file, --tools
        raise CliError(f"cannot start: {exc}") from None
    generated = app.state.duplex.auth.generated
    if generated:
        _print_dev_token(settings, generated)
    # JSON: uvicorn's loggers go through the root handler instead of their own.
    options = {**({"log_config": None} if settings.log_format == "json" else {})}
    serve(app, settings, {**options, **uvicorn_options(settings)}, reuse_port=reuse_port)
    return 0


def _print_dev_token(settings: Settings, token: str) -> None:
    print(f"Dev token (no token configured): {token}", flush=True)
    print(
        f"Try: duplex client --url ws://{settings.host}:{settings.port}/v1/duplex "
        f'--token {token} --text "hello"',
        flush=True,
    )


def _settings(overrides: dict[str, Any]) -> Settings:
    """Settings from the environment and the flags; a bad value is one line naming it."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors()[:3]:
            if not err["loc"]:  # a check across settings names them in its message
                problems.append(err["msg"].removeprefix("Value error, "))
                continue
            name = str(err["loc"][0])
            flag = _FLAGS.get(name)
            where = f"DUPLEX_{name.upper()}" + (f" (or {flag})" if flag else "")
            problems.append(f"{where}: {err['msg']}")  # never the value: it may be a secret
        raise CliError("bad setting " + "; ".join(problems)) from None


_FLAGS = {
    "host": "--host",
    "port": "--port",
    "api_tokens": "--token",
    "store_url": "--store",
    "log_level": "--log-level",
    "log_format": "--log-format",
    "tools": "--tools",
    "workers": "--workers",
}


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The protocol options every Duplex server runs with (the tests' servers too).

    The WebSocket protocol is Duplex's direct path when this uvicorn and websockets have
    the internals it uses, else uvicorn's stock protocol (`server/ws_protocol.py`).
    Call it once per server: the HTTP protocol class it returns counts that server's
    connections (see server/http_protocol.py; uvicorn's ``limit_concurrency`` is not
    used: it ignores WebSocket upgrades and idle connections).
    """
    from server.http_protocol import ConnectionLimits, http_protocol
    from server.ws_protocol import websocket_protocol

    limits = ConnectionLimits(
        max_total=settings.max_connections,
        max_per_client=settings.max_connections_per_client,
        header_timeout_s=settings.header_timeout_s,
    )
    return {
        "http": http_protocol(limits),
        "ws": websocket_protocol(),
        "ws_per_message_deflate": settings.ws_per_message_deflate,
        # Room above our own limit, so oversize messages get a 413 error, not a dropped socket.
        "ws_max_size": settings.max_message_bytes * 2,
    }


if __name__ == "__main__":
    sys.exit(main())
