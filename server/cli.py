"""`duplex serve` runs the server; `duplex client` talks to one from a terminal."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from duplex.terminal import add_arguments as add_client_arguments
from duplex.terminal import run as run_client
from server.config import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="duplex", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--token", action="append", help="API token[:tenant]; repeatable")
    serve.add_argument("--store", help="state store URL: memory:// or sqlite:///path")
    serve.add_argument("--log-level", help="debug, info, warning, error")
    serve.add_argument(
        "--allow-anonymous", action="store_true", help="accept connections without a token"
    )
    serve.add_argument(
        "--tools",
        action="append",
        metavar="MODULE:ATTR",
        help="server-side tools: a ToolRegistry, or a function that registers tools on one; "
        "repeatable (adds to DUPLEX_TOOLS)",
    )

    client = sub.add_parser("client", help="connect, send, print the events as they arrive")
    add_client_arguments(client)

    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    return asyncio.run(run_client(args))


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.allocator import fix_mmap_threshold
    from server.app import create_app

    overrides: dict[str, Any] = {}
    if args.host:
        overrides["host"] = args.host
    if args.port:
        overrides["port"] = args.port
    if args.token:
        overrides["api_tokens"] = ",".join(args.token)
    if args.store:
        overrides["store_url"] = args.store
    if args.log_level:
        overrides["log_level"] = args.log_level
    if args.allow_anonymous:
        overrides["allow_anonymous"] = True
    settings = Settings(**overrides)
    if args.tools:
        settings.tools = ",".join([settings.tools, *args.tools]).strip(",")
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    fix_mmap_threshold()  # see server/allocator.py: freed memory goes back to the system
    try:
        app = create_app(settings)
    except ValueError as exc:  # a --tools entry point that cannot be loaded
        print(f"duplex serve: {exc}", file=sys.stderr)
        return 2
    generated = app.state.duplex.auth.generated
    if generated:
        print(f"Dev token (no token configured): {generated}", flush=True)
        print(
            f"Try: duplex client --url ws://{settings.host}:{settings.port}/v1/duplex "
            f'--token {generated} --text "hello"',
            flush=True,
        )
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        **uvicorn_options(settings),
    )
    return 0


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
