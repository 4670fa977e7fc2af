"""The WebSocket progress server (``sluice ws``), on the ``websockets`` asyncio server.

Endpoints on one port:

* ``WS /api/v1/ws/progress`` and ``WS /api/v1/ws/notifications`` -- token in
  ``?token=`` (a bad or expired one is accepted, then closed with 4401 and the
  error code as the reason: browsers see no HTTP status) or in a first
  ``{"type": "auth"}`` message;
* ``GET /health`` (200, or 503 while Redis pub/sub is down) and ``GET /metrics``.

Each connection is a :class:`~app.ws.connection.Connection`: the protocol
decisions come from its :class:`~app.ws.session.ProtocolSession`, which this
module drives and whose actions it performs; commands run in
:class:`~app.ws.commands.Commands`; job fan-out and resume in
:class:`~app.ws.hub.Hub`.  :func:`serve` builds every collaborator once
(pools, the metrics registry, the hub) and passes them in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from redis.asyncio import Redis
from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from app.core.auth import Identity, TokenService
from app.core.db import create_pool
from app.core.errors import SluiceError, Unauthorized
from app.core.fleet import WS_REPORT_SECONDS
from app.core.logging import get_logger
from app.core.looplag import LoopLagProbe
from app.core.outage import is_redis_outage, wait_until_reachable
from app.core.settings import Settings
from app.ws.commands import Commands
from app.ws.connection import Connection
from app.ws.gcpacing import GcPacer
from app.ws.history import HistoryReader
from app.ws.hub import Hub
from app.ws.messages import (
    CLOSE_GOING_AWAY,
    MAX_MESSAGE_BYTES,
    MAX_SUBSCRIPTIONS,
    Endpoint,
    Error,
)
from app.ws.metrics import WsMetrics
from app.ws.report import Counts, Reporter
from app.ws.session import Action, Authenticated, Close, ProtocolSession, Reply, Run
from app.ws.snapshots import SnapshotLoader

log = get_logger(__name__)

PING_SPREAD = 0.25
"""Keepalive periods are spread over the last quarter of the heartbeat interval."""

PATHS: dict[str, Endpoint] = {
    "/api/v1/ws/progress": "progress",
    "/api/v1/ws/notifications": "notifications",
}


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """Tunables that are not deployment settings (tests shrink them)."""

    auth_timeout: float = 5.0
    """Seconds a connection without a query token has to send ``auth``."""
    max_buffer_bytes: int = 1024 * 1024
    """Unsent bytes a connection may accumulate before it is dropped as slow."""
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_subscriptions: int = MAX_SUBSCRIPTIONS
    close_timeout: float = 5.0
    ping_timeout: float | None = None
    """Seconds to wait for a pong; default: the heartbeat interval."""
    report_interval: float = WS_REPORT_SECONDS
    """Seconds between two self-reports in Redis (:mod:`app.ws.report`)."""


_Accepted = tuple[Endpoint, Identity | None, Unauthorized | None]


class WsServer:
    """The server's shared state: collaborators, metrics, open connections, background tasks."""

    def __init__(
        self,
        settings: Settings,
        *,
        hub: Hub,
        commands: Commands,
        tokens: TokenService,
        metrics: WsMetrics,
        options: ServerOptions,
    ) -> None:
        self.settings = settings
        self.hub = hub
        self.commands = commands
        self.tokens = tokens
        self.metrics = metrics
        self.options = options
        self._accepted: weakref.WeakKeyDictionary[ServerConnection, _Accepted] = (
            weakref.WeakKeyDictionary()
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        self.connections: set[Connection] = set()
        self.authenticated: set[Connection] = set()
        self.closed_total = 0
        """Connections closed since start (the GC pacer's garbage estimate)."""
        self.server: Server | None = None
        self.reporter: Reporter | None = None

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def counts(self) -> Counts:
        """The live figures for the self-report (all O(1))."""
        return Counts(
            connections=len(self.connections),
            authenticated=len(self.authenticated),
            subscriptions=self.hub.subscription_count,
            jobs_followed=self.hub.jobs_followed,
            messages_sent=self.metrics.sent_total,
        )

    # -- HTTP side of the handshake --

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if url.path == "/health":
            return self._health(connection)
        if url.path == "/metrics":
            body = generate_latest(self.metrics.registry)
            return _response(connection, HTTPStatus.OK, body, CONTENT_TYPE_LATEST)
        endpoint = PATHS.get(url.path)
        if endpoint is None:
            return _json(
                connection,
                HTTPStatus.NOT_FOUND,
                {"error": "not_found", "message": "no such endpoint"},
            )
        _spread_keepalive(connection)
        identity: Identity | None = None
        rejected: Unauthorized | None = None
        tokens = parse_qs(url.query).get("token")
        if tokens:
            try:
                identity = self.tokens.verify(tokens[0])
            except Unauthorized as exc:  # said after the upgrade: close 4401 with a reason
                rejected = exc
        self._accepted[connection] = (endpoint, identity, rejected)
        return None

    def _health(self, connection: ServerConnection) -> Response:
        healthy = self.hub.healthy
        body = {
            "status": "ok" if healthy else "degraded",
            "redis": "ok" if healthy else "down",
            "connections": len(self.connections),
        }
        return _json(connection, HTTPStatus.OK if healthy else HTTPStatus.SERVICE_UNAVAILABLE, body)

    # -- WebSocket connections --

    async def handle(self, ws: ServerConnection) -> None:
        conn = self._open(ws)
        endpoint = conn.session.endpoint
        try:
            await self._act(conn, conn.session.opened())
            while not conn.session.closed:
                try:
                    data = await ws.recv(decode=False)
                except ConnectionClosed:
                    break
                await self._act(conn, conn.session.receive(data))
            await ws.wait_closed()
        finally:
            conn.stop_timers()
            self.hub.drop(conn)
            if conn.notifications_for is not None:
                self.hub.notifications.stop(conn, conn.notifications_for)
            self.connections.discard(conn)
            self.authenticated.discard(conn)
            self.closed_total += 1
            self.metrics.connections.labels(endpoint=endpoint).dec()

    def _open(self, ws: ServerConnection) -> Connection:
        """Register a just-upgraded connection; arm the auth deadline if it has no token."""
        endpoint, identity, rejected = self._accepted.pop(ws, ("progress", None, None))
        session = ProtocolSession(
            self.tokens,
            endpoint=endpoint,
            connection_id=uuid.uuid4().hex,
            heartbeat_interval=self.settings.websocket_heartbeat_interval,
            identity=identity,
            max_message_bytes=self.options.max_message_bytes,
            rejected=rejected,
        )
        conn = Connection(
            ws,
            session,
            max_buffer_bytes=self.options.max_buffer_bytes,
            metrics=self.metrics,
            spawn=self.spawn,
        )
        self.connections.add(conn)
        self.metrics.connections.labels(endpoint=endpoint).inc()
        if identity is None and rejected is None:
            conn.auth_timer = asyncio.get_running_loop().call_later(
                self.options.auth_timeout,
                lambda: self._act_soon(conn, conn.session.auth_deadline_passed()),
            )
        return conn

    def _act_soon(self, conn: Connection, actions: list[Action]) -> None:
        if actions:
            self.spawn(self._act(conn, actions))

    async def _act(self, conn: Connection, actions: list[Action]) -> None:
        for action in actions:
            match action:
                case Reply(message=message):
                    conn.reply(message)
                case Close(code=code, reason=reason):
                    self.metrics.drops.labels(reason=reason.replace(" ", "_")).inc()
                    await conn.ws.close(code, reason)
                case Authenticated(identity=identity, first=first):
                    await self._authenticated(conn, identity, first)
                case Run(command=command):
                    await self.commands.run(conn, command)

    async def _authenticated(self, conn: Connection, identity: Identity, first: bool) -> None:
        if conn.auth_timer is not None:
            conn.auth_timer.cancel()
            conn.auth_timer = None
        if conn.expiry_timer is not None:
            conn.expiry_timer.cancel()
        if first:
            self.authenticated.add(conn)
        self._arm_expiry(conn, identity.expires_at)
        if first and conn.session.endpoint == "notifications":
            conn.notifications_for = identity.user_id
            try:
                await self.hub.notifications.listen(conn, identity.user_id)
            except SluiceError as exc:  # Redis is down: say so; the client may retry
                conn.reply(Error(code=exc.code, message=exc.message))

    def _arm_expiry(self, conn: Connection, expires_at: float, margin: float = 0.0) -> None:
        """Close ``conn`` when its token expires, unless it was refreshed by then.

        The loop's timers run on the monotonic clock and the token on wall time: a
        timer that fires a hair before ``expires_at`` (as the session sees it) is
        armed again for the rest, so an expired token is always acted on."""
        delay = max(0.0, expires_at - time.time()) + margin
        conn.expiry_timer = asyncio.get_running_loop().call_later(
            delay, self._expiry_due, conn, expires_at
        )

    def _expiry_due(self, conn: Connection, expires_at: float) -> None:
        actions = conn.session.expiry_reached()
        if actions:
            self._act_soon(conn, actions)
            return
        identity = conn.session.identity
        if identity is not None and not conn.session.closed and identity.expires_at == expires_at:
            self._arm_expiry(conn, expires_at, margin=0.01)  # fired early (clock skew)


def _spread_keepalive(connection: ServerConnection) -> None:
    """Give this connection its own keepalive period, in (1 - PING_SPREAD, 1] x the heartbeat.

    With one period for all, connections opened in one burst (a deploy, a
    reconnect storm) ping in one burst every heartbeat forever after: in
    ``bench/ws.py`` the 1,000 connections opened within a second held the loop
    for ~150 ms every 30 s (the p99 stall the loop-lag probe showed after the
    GC passes).  Set before the handshake ends, so the first ping already uses
    it; a dead peer is still found within two heartbeats.
    """
    if connection.ping_interval is not None:
        connection.ping_interval *= 1 - PING_SPREAD * random.random()  # noqa: S311 (jitter)


def _response(
    connection: ServerConnection, status: HTTPStatus, body: bytes, content_type: str
) -> Response:
    response = connection.respond(status, "")
    headers = Headers()
    for key, value in response.headers.raw_items():
        if key.lower() not in ("content-type", "content-length"):
            headers[key] = value
    headers["Content-Type"] = content_type
    headers["Content-Length"] = str(len(body))
    headers["Cache-Control"] = "no-store"
    return Response(response.status_code, response.reason_phrase, headers, body)


def _json(connection: ServerConnection, status: HTTPStatus, body: dict[str, Any]) -> Response:
    return _response(connection, status, msgspec.json.encode(body), "application/json")


@contextlib.asynccontextmanager
async def serve(
    settings: Settings,
    *,
    host: str | None = None,
    port: int | None = None,
    options: ServerOptions | None = None,
    tokens: TokenService | None = None,
    registry: CollectorRegistry | None = None,
) -> AsyncIterator[WsServer]:
    """Run the server until the ``async with`` block ends (then close with 1001).

    ``port=0`` picks a free port (see :attr:`WsServer.port`).  ``registry`` is
    the process's metrics registry (default: a new one, served on ``/metrics``).
    """
    options = options or ServerOptions()
    db = await create_pool(
        settings.database_url.reveal(), max_size=settings.database_pool_size, wait=True
    )
    redis: Redis = Redis.from_url(settings.redis_url.reveal())

    def pubsub_client() -> Redis:
        client: Redis = Redis.from_url(settings.redis_url.reveal(), socket_connect_timeout=5)
        return client

    metrics = WsMetrics(registry if registry is not None else CollectorRegistry(auto_describe=True))
    hub = Hub(
        SnapshotLoader(db),
        HistoryReader(redis),
        pubsub_client,
        metrics=metrics,
        max_subscriptions=options.max_subscriptions,
    )
    state = WsServer(
        settings,
        hub=hub,
        commands=Commands(hub, db, redis, max_subscriptions=options.max_subscriptions),
        tokens=tokens or TokenService(settings.jwt_secret.reveal()),
        metrics=metrics,
        options=options,
    )
    lag = LoopLagProbe(metrics.loop_lag, "ws")
    try:
        await wait_until_reachable(redis.ping, dependency="redis", is_outage=is_redis_outage)
        await hub.start()
        lag.start()
        async with _listening(state, settings, host, port) as server:
            state.server = server
            state.reporter = Reporter(
                redis, state.counts, lag, port=state.port, interval=options.report_interval
            )
            state.reporter.start()
            log.info("ws_server_listening", port=state.port)
            try:
                yield state
            finally:
                await state.reporter.stop()
    finally:
        await lag.stop()
        await hub.close()
        await redis.aclose()
        await db.close()


@contextlib.asynccontextmanager
async def _listening(
    state: WsServer, settings: Settings, host: str | None, port: int | None
) -> AsyncIterator[Server]:
    """The listening socket; on exit every connection is closed with 1001."""
    options = state.options
    heartbeat = settings.websocket_heartbeat_interval
    server = await ws_serve(
        state.handle,
        host if host is not None else settings.websocket_host,
        port if port is not None else settings.websocket_port,
        process_request=state.process_request,
        compression=None,
        ping_interval=heartbeat,
        ping_timeout=options.ping_timeout or heartbeat,
        close_timeout=options.close_timeout,
        max_size=4 * options.max_message_bytes,
        max_queue=32,
    )
    try:
        yield server
    finally:
        server.close(code=CLOSE_GOING_AWAY, reason="server shutting down")
        await server.wait_closed()


async def _main(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serve(settings) as state:
        # Full GC passes on our schedule, not in the middle of the traffic (app/ws/gcpacing.py).
        pacer = GcPacer(lambda: len(state.connections), lambda: state.closed_total)
        pacer.install()
        try:
            await stop.wait()
            log.info("ws_server_stopping")
        finally:
            await pacer.uninstall()


def run(settings: Settings) -> int:
    """Entry point of ``sluice ws``: serve until SIGTERM/SIGINT, then exit 0."""
    _raise_fd_limit()
    # One "connection open/closed" line per client is noise at 10,000 clients.
    logging.getLogger("websockets.server").setLevel(logging.WARNING)
    try:  # uvloop comes with uvicorn[standard]; it cuts the fan-out's latency tail
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    try:
        runner(_main(settings))
    except (SluiceError, OSError, asyncpg.PostgresError) as exc:
        # A dependency is unreachable at startup: one clear line, no traceback.
        log.error("ws_server_failed_to_start", error=str(exc) or repr(exc))
        return 1
    return 0


def _raise_fd_limit() -> None:
    with contextlib.suppress(ValueError, OSError, ImportError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


__all__ = ["ServerOptions", "WsServer", "run", "serve"]
