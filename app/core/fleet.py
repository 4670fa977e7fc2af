"""The fleet registry in Redis: what each running process says about itself.

Workers write their heartbeat to :data:`~app.core.queue.WORKERS_KEY` (a sorted
set, score = last heartbeat in ms) and their job slots to
:data:`~app.core.queue.WORKER_SLOTS_KEY` (``workers/fleet.py``).  WebSocket
servers write one :class:`WsInstanceReport` each to :data:`WS_INSTANCES_KEY`
(a hash: instance id -> msgpack report) every :data:`WS_REPORT_SECONDS`; the
gateway's ``GET /api/v1/ws/stats`` and the dashboard's fleet panel read them
back with :func:`read_ws_reports`.

Invariants: a report older than :data:`WS_STALE_SECONDS` is a server that is
gone (crashed without :func:`remove_ws_report`); readers skip it and prune it.
Reports are small (one per server), so reading them all is one ``HGETALL``.
"""

from __future__ import annotations

import msgspec
from redis.asyncio import Redis

WS_INSTANCES_KEY = "sluice:ws:instances"
WS_REPORT_SECONDS = 2.0
"""How often each WebSocket server writes its report."""
WS_STALE_SECONDS = 3 * WS_REPORT_SECONDS
"""A report older than this belongs to a server that is gone."""


class WsInstanceReport(msgspec.Struct, kw_only=True, frozen=True):
    """One WebSocket server instance, as it reported itself at ``reported_at``."""

    instance: str
    """Unique per process: ``host:pid:port``."""
    host: str
    pid: int
    port: int
    started_at: float
    """Unix seconds."""
    reported_at: float
    """Unix seconds."""
    connections: int
    """Open WebSocket connections."""
    authenticated: int
    """Connections that have authenticated."""
    subscriptions: int
    """Job subscriptions over all connections."""
    jobs_followed: int
    """Distinct jobs with at least one subscriber here."""
    messages_sent: int
    """Messages queued to clients since start."""
    messages_per_second: float
    """Messages queued to clients per second over the last report interval."""
    loop_lag_p99_ms: float | None = None
    """p99 of how late the event loop woke a 5 ms sleep, over the last interval."""


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(WsInstanceReport)


async def publish_ws_report(redis: Redis, report: WsInstanceReport) -> None:
    """Write (replace) this instance's report."""
    await redis.hset(WS_INSTANCES_KEY, report.instance, _encoder.encode(report))  # type: ignore[misc, arg-type]


async def remove_ws_report(redis: Redis, instance: str) -> None:
    """Take this instance out of the registry (it is stopping)."""
    await redis.hdel(WS_INSTANCES_KEY, instance)  # type: ignore[misc]


async def read_ws_reports(redis: Redis, *, now: float) -> list[WsInstanceReport]:
    """The live instances' reports, oldest instance first; stale or unreadable
    entries are pruned."""
    raw: dict[bytes | str, bytes] = await redis.hgetall(WS_INSTANCES_KEY)  # type: ignore[misc]
    live: list[WsInstanceReport] = []
    gone: list[bytes | str] = []
    for key, value in raw.items():
        try:
            report = _decoder.decode(value)
        except msgspec.DecodeError:
            gone.append(key)
            continue
        if now - report.reported_at > WS_STALE_SECONDS:
            gone.append(key)
        else:
            live.append(report)
    if gone:
        await redis.hdel(WS_INSTANCES_KEY, *gone)  # type: ignore[misc, arg-type]
    return sorted(live, key=lambda r: (r.started_at, r.instance))
