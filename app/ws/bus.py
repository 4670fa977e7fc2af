"""The process's one Redis pub/sub connection, with confirmed subscriptions.

:class:`ChannelBus` subscribes a channel while some local connection needs it
(a job's channel for progress subscribers, a user's channel and
``sluice:system`` for /notifications).  :meth:`ChannelBus.add` returns only
once Redis has confirmed every channel, so nothing published afterwards can be
missed.  Every message is handed to ``on_message(channel, payload)``.

Pub/sub is at-most-once: if the connection drops the bus reconnects with
backoff, re-subscribes everything wanted and then calls ``on_resubscribed``
so its owner can replay what may have been missed meanwhile.  A connection
that answers no keepalive ``PING`` for three intervals counts as dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from app.core.errors import ServiceUnavailable
from app.core.logging import get_logger
from app.ws.metrics import WsMetrics

log = get_logger(__name__)

SUBSCRIBE_TIMEOUT = 5.0
"""Seconds to wait for Redis to confirm a subscription (or the first connection)."""


class ChannelBus:
    """The process's one Redis pub/sub connection, with confirmed subscriptions."""

    def __init__(
        self,
        redis_factory: Callable[[], Redis],
        on_message: Callable[[str, bytes], None],
        on_resubscribed: Callable[[], Awaitable[None]],
        *,
        metrics: WsMetrics,
        keepalive: float = 10.0,
    ) -> None:
        self._factory = redis_factory
        self._on_message = on_message
        self._on_resubscribed = on_resubscribed
        self._metrics = metrics
        self._keepalive = keepalive
        self._wanted: set[str] = set()
        self._confirmed: set[str] = set()
        self._outstanding: dict[str, int] = {}
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._redis: Redis | None = None
        self._pubsub: PubSub | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        self._delay = 0.1
        self._last_seen = 0.0
        self.connected = False

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ws-pubsub")
        try:
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
                await self._ready.wait()
        except TimeoutError:
            raise ServiceUnavailable(
                "redis pub/sub is unreachable", code="redis_unavailable"
            ) from None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._background):
            task.cancel()
        await self._disconnect()

    async def add(self, channels: Iterable[str]) -> None:
        """Subscribe (if not already) and wait until Redis confirms every channel."""
        channels = list(channels)
        new = [c for c in dict.fromkeys(channels) if c not in self._wanted]
        self._wanted.update(new)
        self._metrics.channels.set(len(self._wanted))
        waits = [
            self._waiter(c) for c in self._wanted.intersection(channels) if c not in self._confirmed
        ]
        if new and self.connected:
            await self._send("SUBSCRIBE", new)
        if waits:
            try:
                async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
                    await asyncio.gather(*waits)
            except TimeoutError:
                raise ServiceUnavailable(
                    "subscription was not confirmed by redis", code="redis_unavailable"
                ) from None

    def remove(self, channels: Iterable[str]) -> None:
        gone = [c for c in channels if c in self._wanted]
        if not gone:
            return
        self._wanted.difference_update(gone)
        self._confirmed.difference_update(gone)
        self._metrics.channels.set(len(self._wanted))
        if self.connected:
            self._spawn(self._send("UNSUBSCRIBE", gone))

    def _waiter(self, channel: str) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(channel, []).append(fut)
        return fut

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send(self, command: str, channels: list[str]) -> None:
        pubsub = self._pubsub
        if pubsub is None:
            return
        if command == "SUBSCRIBE":
            for c in channels:
                self._outstanding[c] = self._outstanding.get(c, 0) + 1
        try:
            await pubsub.execute_command(command, *channels)
        except (RedisError, OSError):
            log.warning("pubsub_command_failed", command=command, exc_info=True)

    async def _disconnect(self) -> None:
        pubsub, redis = self._pubsub, self._redis
        self._pubsub = self._redis = None
        self.connected = False
        with contextlib.suppress(Exception):
            if pubsub is not None:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
        with contextlib.suppress(Exception):
            if redis is not None:
                await redis.aclose()

    async def _run(self) -> None:
        first = True
        while True:
            try:
                await self._connect_and_listen(first)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("pubsub_disconnected", error=repr(exc), retry_in=self._delay)
            await self._disconnect()
            first = False
            await asyncio.sleep(self._delay)
            self._delay = min(self._delay * 2, 5.0)

    async def _connect_and_listen(self, first: bool) -> None:
        self._redis = self._factory()
        self._pubsub = self._redis.pubsub()
        await self._pubsub.connect()  # type: ignore[no-untyped-call]
        self._outstanding.clear()
        self._confirmed.clear()
        self.connected = True
        self._delay = 0.1
        if self._wanted:
            await self._send("SUBSCRIBE", sorted(self._wanted))
        if not first:
            self._metrics.redis_reconnects.inc()
            self._spawn(self._resubscribed(list(self._wanted)))
        self._ready.set()
        log.info("pubsub_connected", channels=len(self._wanted))
        self._last_seen = time.monotonic()
        reader = asyncio.create_task(self._read(self._pubsub), name="ws-pubsub-reader")
        try:
            await self._watch(self._pubsub, reader)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def _read(self, pubsub: PubSub) -> None:
        """Hand every message to :meth:`_handle`, as it arrives.

        A blocking read without a timeout: a per-read timeout meant a timer
        armed and cancelled for every message (2.6x the CPU per message);
        :meth:`_watch` does the keepalive instead, once per interval."""
        while True:
            response = await pubsub.parse_response(block=True)
            self._last_seen = time.monotonic()
            if response is not None:
                self._handle(response)

    async def _watch(self, pubsub: PubSub, reader: asyncio.Task[None]) -> None:
        """Until the reader fails: PING when the connection was quiet for a keepalive
        interval; a connection silent for three intervals counts as dropped."""
        while True:
            done, _ = await asyncio.wait({reader}, timeout=self._keepalive)
            if done:
                reader.result()  # the reader's error, e.g. the connection dropped
                raise ConnectionError("redis pub/sub reader stopped")
            quiet = time.monotonic() - self._last_seen
            if quiet > 3 * self._keepalive:
                raise ConnectionError("redis pub/sub keepalive timed out")
            if quiet >= self._keepalive:
                await pubsub.execute_command("PING")

    def _handle(self, response: Any) -> None:
        if isinstance(response, bytes):  # PONG outside subscribed mode
            return
        kind = response[0]
        if kind == b"message":
            self._metrics.events_received.inc()
            try:
                self._on_message(response[1].decode(), response[2])
            except Exception:
                log.exception("pubsub_dispatch_failed")
        elif kind == b"subscribe":
            channel = response[1].decode()
            left = self._outstanding.get(channel, 1) - 1
            if left > 0:
                self._outstanding[channel] = left
                return
            self._outstanding.pop(channel, None)
            if channel in self._wanted:
                self._confirmed.add(channel)
            for fut in self._waiters.pop(channel, []):
                if not fut.done():
                    fut.set_result(None)

    async def _resubscribed(self, channels: list[str]) -> None:
        try:
            await self.add(channels)
        except ServiceUnavailable:
            return  # the next reconnect will try again
        await self._on_resubscribed()
