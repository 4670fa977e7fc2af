"""The WebSocket progress server (``sluice ws``), on the ``websockets`` asyncio server.

Endpoints on one port:

* ``WS /api/v1/ws/progress`` and ``WS /api/v1/ws/notifications`` -- token in
  ``?token=`` (a bad or expired one is accepted, then closed with 4401 and the
  error code as the reason: browsers see no HTTP status) or in a first
  ``{"type": "auth"}`` message;
* ``GET /health`` (200, or 503 while Redis pub/sub is down) and ``GET /metrics``.

Each connection is a :class:`Connection`: the protocol decisions come from
:class:`~app.ws.protocol.Session`, job fan-out and resume from
:class:`~app.ws.hub.Hub`.  Outgoing frames are written without waiting; a
connection whose unsent data passes ``max_buffer_bytes`` is closed with 4429
(it can reconnect and resume with ``since``), so a client that stops reading
costs bounded memory and never delays anyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio import Redis
from websockets.asyncio.server import Server, ServerConnection, broadcast
from websockets.asyncio.server import serve as ws_serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from app.core.auth import Identity, TokenService
from app.core.db import create_pool
from app.core.errors import Conflict, NotFound, SluiceError, Unauthorized
from app.core.logging import get_logger
from app.core.outage import is_redis_outage, wait_until_reachable
from app.core.settings import Settings
from app.jobs.service import request_cancel
from app.ws.hub import FollowResult, Hub
from app.ws.protocol import (
    CLOSE_GOING_AWAY,
    CLOSE_SLOW_CONSUMER,
    MAX_MESSAGE_BYTES,
    MAX_SUBSCRIPTIONS,
    Action,
    Authenticated,
    CancelJob,
    Close,
    Command,
    Endpoint,
    Error,
    GetJobStatus,
    JobCancelled,
    JobFeed,
    JobStatusResponse,
    Reply,
    Run,
    ServerMessage,
    Session,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
    encode,
)

log = get_logger(__name__)

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


class Connection:
    """One client connection: the hub's :class:`~app.ws.hub.Peer`."""

    __slots__ = (
        "__weakref__",
        "_server",
        "auth_timer",
        "corked",
        "credit",
        "dropped",
        "expiry_timer",
        "feeds",
        "notifications_for",
        "session",
        "ws",
    )

    def __init__(self, ws: ServerConnection, session: Session, server: WsServer) -> None:
        self.ws = ws
        self.session = session
        self._server = server
        self.feeds: dict[str, JobFeed] = {}
        self.dropped = False
        self.corked: list[bytes] | None = None
        """Frames held back to be written together (one syscall for a subscribe's burst)."""
        self.credit = 0
        """Buffered bytes allowed beyond the limit while a catch-up burst drains."""
        self.auth_timer: asyncio.TimerHandle | None = None
        self.expiry_timer: asyncio.TimerHandle | None = None
        self.notifications_for: str | None = None

    @property
    def user_id(self) -> str:
        identity = self.session.identity
        assert identity is not None
        return identity.user_id

    def push(self, frame: bytes, *, catch_up: bool = False) -> None:
        if self.corked is not None:
            self.corked.append(frame)
        else:
            self._write((frame,), catch_up=catch_up)

    def cork(self) -> None:
        """Hold frames back until :meth:`uncork` (call both without awaiting in between)."""
        if self.corked is None:
            self.corked = []

    def uncork(self) -> None:
        frames, self.corked = self.corked, None
        if frames:
            self._write(frames, catch_up=True)

    def _write(self, frames: tuple[bytes, ...] | list[bytes], *, catch_up: bool) -> None:
        ws = self.ws
        if self.dropped or ws.protocol.state is not State.OPEN:
            return
        if len(frames) == 1:
            broadcast((ws,), frames[0], text=True)
        else:  # frame them all, then one write
            for frame in frames:
                ws.protocol.send_text(frame)
            ws.transport.write(b"".join(ws.protocol.data_to_send()))
        buffered = ws.transport.get_write_buffer_size()
        limit = self._server.options.max_buffer_bytes
        if catch_up:
            # A replay burst is bounded by the history length; allow it on top of the limit.
            self.credit = max(self.credit, buffered)
        elif buffered <= limit:
            self.credit = 0
        elif buffered > limit + self.credit:
            self.dropped = True
            self._server.metrics.drops.labels(reason="slow_consumer").inc()
            log.warning(
                "slow_consumer_dropped",
                connection_id=self.session.connection_id,
                buffered=buffered,
            )
            self._server.spawn(ws.close(CLOSE_SLOW_CONSUMER, "slow consumer"))

    def reply(self, message: ServerMessage) -> None:
        self.push(encode(message))
        self._server.metrics.messages_sent.inc()


class WsServer:
    """The server's shared state: collaborators, metrics, background tasks."""

    def __init__(
        self,
        settings: Settings,
        *,
        db: asyncpg.Pool,
        redis: Redis,
        hub: Hub,
        tokens: TokenService,
        options: ServerOptions,
    ) -> None:
        self.settings = settings
        self.db = db
        self.redis = redis
        self.hub = hub
        self.metrics = hub.metrics
        self.tokens = tokens
        self.options = options
        self._accepted: weakref.WeakKeyDictionary[
            ServerConnection, tuple[Endpoint, Identity | None, Unauthorized | None]
        ] = weakref.WeakKeyDictionary()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.connections: set[Connection] = set()
        self.server: Server | None = None

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

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
        endpoint, identity, rejected = self._accepted.pop(ws, ("progress", None, None))
        session = Session(
            self.tokens,
            endpoint=endpoint,
            connection_id=uuid.uuid4().hex,
            heartbeat_interval=self.settings.websocket_heartbeat_interval,
            identity=identity,
            max_message_bytes=self.options.max_message_bytes,
            rejected=rejected,
        )
        conn = Connection(ws, session, self)
        self.connections.add(conn)
        self.metrics.connections.labels(endpoint=endpoint).inc()
        loop = asyncio.get_running_loop()
        try:
            if identity is None and rejected is None:
                conn.auth_timer = loop.call_later(
                    self.options.auth_timeout,
                    lambda: self._act_soon(conn, conn.session.auth_deadline_passed()),
                )
            await self._act(conn, session.opened())
            while not session.closed:
                try:
                    data = await ws.recv(decode=False)
                except ConnectionClosed:
                    break
                await self._act(conn, session.receive(data))
            await ws.wait_closed()
        finally:
            for timer in (conn.auth_timer, conn.expiry_timer):
                if timer is not None:
                    timer.cancel()
            self.hub.drop(conn)
            if conn.notifications_for is not None:
                self.hub.stop_notifications(conn, conn.notifications_for)
            self.connections.discard(conn)
            self.metrics.connections.labels(endpoint=endpoint).dec()

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
                    await self._run(conn, command)

    async def _authenticated(self, conn: Connection, identity: Identity, first: bool) -> None:
        if conn.auth_timer is not None:
            conn.auth_timer.cancel()
            conn.auth_timer = None
        if conn.expiry_timer is not None:
            conn.expiry_timer.cancel()
        delay = max(0.0, identity.expires_at - time.time())
        conn.expiry_timer = asyncio.get_running_loop().call_later(
            delay, lambda: self._act_soon(conn, conn.session.expiry_reached())
        )
        if first and conn.session.endpoint == "notifications":
            conn.notifications_for = identity.user_id
            try:
                await self.hub.listen_notifications(conn, identity.user_id)
            except SluiceError as exc:  # Redis is down: say so; the client may retry
                conn.reply(Error(code=exc.code, message=exc.message))

    async def _run(self, conn: Connection, command: Command) -> None:
        try:
            match command:
                case Subscribe():
                    await self._subscribe(conn, command)
                case Unsubscribe(job_ids=job_ids):
                    self.hub.unfollow(conn, job_ids)
                    conn.reply(Unsubscribed(job_ids=list(dict.fromkeys(job_ids)), id=command.id))
                case GetJobStatus(job_id=job_id):
                    snapshot = await self.hub.snapshot(job_id, conn.user_id)
                    if snapshot is None:
                        raise NotFound("job not found", code="job_not_found")
                    conn.reply(JobStatusResponse(job_id=job_id, data=snapshot, id=command.id))
                case CancelJob(job_id=job_id):
                    event = await request_cancel(self.db, self.redis, job_id, conn.user_id)
                    conn.reply(JobCancelled(job_id=job_id, data=event, id=command.id))
        except (NotFound, Conflict) as exc:
            target: str | None = getattr(command, "job_id", None)
            conn.reply(
                Error(
                    code=exc.code,
                    message=exc.message,
                    job_id=target,
                    details=exc.details or None,
                    id=command.id,
                )
            )
        except SluiceError as exc:
            conn.reply(Error(code=exc.code, message=exc.message, id=command.id))
        except Exception:
            log.exception("command_failed", command=type(command).__name__)
            conn.reply(
                Error(code="internal_error", message="the command failed; try again", id=command.id)
            )

    async def _subscribe(self, conn: Connection, command: Subscribe) -> None:
        def ready(result: FollowResult) -> None:
            conn.cork()  # the acknowledgement and every catch-up frame go out in one write
            for job_id in result.not_found:
                conn.reply(
                    Error(
                        code="job_not_found", message="job not found", job_id=job_id, id=command.id
                    )
                )
            for job_id in result.limit_exceeded:
                conn.reply(
                    Error(
                        code="too_many_subscriptions",
                        message=f"a connection may follow at most "
                        f"{self.options.max_subscriptions} jobs",
                        job_id=job_id,
                        id=command.id,
                    )
                )
            if result.job_ids:
                conn.reply(
                    Subscribed(
                        job_ids=result.job_ids, recovered=result.recovered or None, id=command.id
                    )
                )

        try:
            await self.hub.follow(
                conn, conn.user_id, command.job_ids, command.since, on_ready=ready
            )
        finally:
            conn.uncork()


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
) -> AsyncIterator[WsServer]:
    """Run the server until the ``async with`` block ends (then close with 1001).

    ``port=0`` picks a free port (see :attr:`WsServer.port`).
    """
    options = options or ServerOptions()
    db = await create_pool(
        settings.database_url.reveal(), max_size=settings.database_pool_size, wait=True
    )
    redis: Redis = Redis.from_url(settings.redis_url.reveal())

    def pubsub_client() -> Redis:
        client: Redis = Redis.from_url(settings.redis_url.reveal(), socket_connect_timeout=5)
        return client

    hub = Hub(db, redis, pubsub_client, max_subscriptions=options.max_subscriptions)
    state = WsServer(
        settings,
        db=db,
        redis=redis,
        hub=hub,
        tokens=tokens or TokenService(settings.jwt_secret.reveal()),
        options=options,
    )
    try:
        await wait_until_reachable(redis.ping, dependency="redis", is_outage=is_redis_outage)
        await hub.start()
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
        state.server = server
        log.info("ws_server_listening", port=state.port)
        try:
            yield state
        finally:
            server.close(code=CLOSE_GOING_AWAY, reason="server shutting down")
            await server.wait_closed()
    finally:
        await hub.close()
        await redis.aclose()
        await db.close()


async def _main(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serve(settings):
        gc.freeze()  # startup objects never need collecting; keeps GC pauses short
        await stop.wait()
        log.info("ws_server_stopping")


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
