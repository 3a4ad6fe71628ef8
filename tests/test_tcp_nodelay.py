"""Server sockets send without Nagle's delay, whoever bound them.

The tests' servers, like ``uvicorn --workers`` or ``--fd``, listen on a socket bound
outside the event loop (protocol number 0), on which the loop does not set
``TCP_NODELAY``: a small event written after another then waited for the client's
delayed ACK (about 40 ms, seen as the ASM relay's speech events arriving late).
"""

from __future__ import annotations

import socket

import pytest

from tests.conftest import TOKEN
from tests.wsutil import connect


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_accepted_sockets_have_no_delay(server_factory, loop):
    server = server_factory(uvicorn_kwargs={"loop": loop})
    async with connect(server, TOKEN) as c:
        await c.recv()
        assert server.server is not None
        connections = list(server.server.server_state.connections)
        assert connections
        for protocol in connections:
            sock = protocol.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
