"""The WebSocket server's self-report in Redis (read by ``GET /api/v1/ws/stats``).

:class:`Reporter` writes one :class:`~app.core.fleet.WsInstanceReport` every
:data:`~app.core.fleet.WS_REPORT_SECONDS` and removes it when the server stops.
Every figure is read from a counter kept as it changes (connections,
authenticated connections, subscriptions, jobs followed, messages sent), so a
report costs O(1) whatever the number of connections: nothing walks them.

A Redis outage never stops the server: a report that cannot be written within
the interval is skipped (logged once per outage, and once when reports resume);
the next interval tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.core.fleet import WS_REPORT_SECONDS, WsInstanceReport, publish_ws_report, remove_ws_report
from app.core.logging import get_logger
from app.core.looplag import LoopLagProbe

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Counts:
    """The server's live figures at one instant."""

    connections: int
    authenticated: int
    subscriptions: int
    jobs_followed: int
    messages_sent: int


class Reporter:
    """Publishes this server's report until :meth:`stop`, then removes it."""

    def __init__(
        self,
        redis: Redis,
        counts: Callable[[], Counts],
        lag: LoopLagProbe,
        *,
        port: int,
        interval: float = WS_REPORT_SECONDS,
    ) -> None:
        self._redis = redis
        self._counts = counts
        self._lag = lag
        self._interval = interval
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.port = port
        self.instance = f"{self.host}:{self.pid}:{port}"
        self.started_at = time.time()
        self._last_sent = 0
        self._last_at = time.monotonic()
        self._failing = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="ws-report")

    async def stop(self) -> None:
        """Stop reporting and take the report out of Redis (best effort, bounded)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(self._interval):
                await remove_ws_report(self._redis, self.instance)

    def build(self) -> WsInstanceReport:
        """This interval's report (resets the messages/s and loop-lag windows)."""
        counts = self._counts()
        now = time.monotonic()
        elapsed = now - self._last_at
        rate = (counts.messages_sent - self._last_sent) / elapsed if elapsed > 0 else 0.0
        self._last_sent, self._last_at = counts.messages_sent, now
        lag = self._lag.take()
        return WsInstanceReport(
            instance=self.instance,
            host=self.host,
            pid=self.pid,
            port=self.port,
            started_at=self.started_at,
            reported_at=time.time(),
            connections=counts.connections,
            authenticated=counts.authenticated,
            subscriptions=counts.subscriptions,
            jobs_followed=counts.jobs_followed,
            messages_sent=counts.messages_sent,
            messages_per_second=round(rate, 3),
            loop_lag_p99_ms=None if lag is None else round(lag.p99_ms, 3),
        )

    async def publish_once(self) -> bool:
        """Write one report; False (logged once per outage) when Redis is unreachable."""
        report = self.build()
        try:
            async with asyncio.timeout(self._interval):
                await publish_ws_report(self._redis, report)
        except (RedisError, OSError, TimeoutError) as exc:
            if not self._failing:
                log.warning("ws_report_skipped", error=repr(exc))
                self._failing = True
            return False
        if self._failing:
            log.info("ws_report_resumed")
            self._failing = False
        return True

    async def _run(self) -> None:
        while True:
            await self.publish_once()
            await asyncio.sleep(self._interval)
