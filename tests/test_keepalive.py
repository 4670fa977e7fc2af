"""Idle keep-alive connections outlast the client's pool expiry (``HTTP_KEEPALIVE_SECONDS``).

httpx drops a pooled connection after 5 s idle, and uvicorn closed it after 5 s
too: a client that reused a connection just as the (busy) server closed it got
a connection reset instead of an answer -- seen as ``httpx.ReadError`` from a
plain upload in the crowded-fleet test.  The gateway now holds idle connections
longer than clients do, and still closes them in the end.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from tests.fixtures_uploads import GatewayProcess

REQUEST = b"GET /health HTTP/1.1\r\nHost: sluice\r\n\r\n"


def _answer(sock: socket.socket) -> bytes:
    """One whole response to ``GET /health`` (its body is a short JSON object)."""
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    return data


def _connect(gw: GatewayProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    sock.sendall(REQUEST)
    assert _answer(sock).startswith(b"HTTP/1.1 200")
    return sock


def test_a_connection_idle_past_the_clients_expiry_is_still_served(
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    gw = gateway_factory()
    with _connect(gw) as sock:
        time.sleep(5.5)  # past httpx's keepalive_expiry and uvicorn's own default
        sock.sendall(REQUEST)
        assert _answer(sock).startswith(b"HTTP/1.1 200")


def test_an_idle_connection_is_closed_after_the_setting(
    gateway_factory: Callable[..., GatewayProcess],
) -> None:
    gw = gateway_factory(HTTP_KEEPALIVE_SECONDS="1")
    with _connect(gw) as sock:
        time.sleep(2.5)
        sock.settimeout(2)  # well before the 5 s that clients and uvicorn default to
        assert sock.recv(1) == b""  # the server closed it (EOF, not a timeout)
