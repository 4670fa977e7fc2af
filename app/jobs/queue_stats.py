"""The queue at a glance (``GET /api/v1/admin/queue``): depth and oldest wait per
priority, what ARQ holds ready, and enqueue/completion rates over ten minutes.

Invariants: the jobs table is the truth for counts and ages (ARQ's sorted set
also holds running and deferred jobs); every query reads an index range, never
the whole table -- the per-priority counts read ``jobs_active`` (a partial index
over the active statuses), the rates the recent end of ``jobs_queued_at`` and
``jobs_finished_at`` (``migrations/0007_dashboard.sql``).  Ages and buckets are
measured against the database's clock, so they agree with the timestamps the
rows hold whatever the gateway host's clock says.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg

from app.core.queue import JobQueue, Priority, aging_rule
from app.jobs.ops_schemas import PriorityStats, QueueStats, RateBucket, Rates

BUCKET_SECONDS = 30
BUCKETS = 20
PRIORITY_ORDER = (Priority.CRITICAL, Priority.HIGH, Priority.NORMAL, Priority.LOW)

_BY_PRIORITY = """
    SELECT priority,
           count(*) FILTER (WHERE status = 'queued') AS queued,
           count(*) FILTER (WHERE status = 'retrying') AS retrying,
           count(*) FILTER (WHERE status = 'running') AS running,
           extract(epoch FROM now() - min(COALESCE(queued_at, updated_at))
                   FILTER (WHERE status = 'queued'))::float8 AS oldest
    FROM jobs
    WHERE status IN ('queued', 'retrying', 'running')
    GROUP BY priority
"""
_NOW = "SELECT now()"
_ENQUEUED = """
    SELECT floor(extract(epoch FROM queued_at - $1::timestamptz) / $2)::int AS bucket,
           count(*) AS n
    FROM jobs WHERE queued_at >= $1::timestamptz AND queued_at IS NOT NULL
    GROUP BY bucket
"""
_FINISHED = """
    SELECT floor(extract(epoch FROM finished_at - $1::timestamptz) / $2)::int AS bucket,
           count(*) FILTER (WHERE status = 'completed') AS completed,
           count(*) FILTER (WHERE status = 'failed') AS failed
    FROM jobs WHERE finished_at >= $1::timestamptz AND finished_at IS NOT NULL
    GROUP BY bucket
"""


async def queue_stats(db: asyncpg.Pool, queue: JobQueue) -> QueueStats:
    """Depth, oldest wait and rates per the module docstring."""
    by_priority, rates, ready = await asyncio.gather(
        db.fetch(_BY_PRIORITY), rate_buckets(db), queue.ready()
    )
    rows = {r["priority"]: r for r in by_priority}
    priorities = []
    for priority in PRIORITY_ORDER:
        row = rows.get(str(priority))
        oldest = None if row is None or row["oldest"] is None else round(row["oldest"], 3)
        priorities.append(
            PriorityStats(
                priority=priority,
                queued=int(row["queued"]) if row else 0,
                retrying=int(row["retrying"]) if row else 0,
                running=int(row["running"]) if row else 0,
                oldest_queued_seconds=None if oldest is None else max(0.0, oldest),
            )
        )
    return QueueStats(
        priorities=priorities, ready_in_redis=ready, rates=rates, aging_rule=aging_rule()
    )


def window_start(now: datetime) -> datetime:
    """Start of the oldest of the :data:`BUCKETS` buckets whose last one holds ``now``."""
    epoch = now.timestamp()
    current = epoch - epoch % BUCKET_SECONDS
    return datetime.fromtimestamp(current - (BUCKETS - 1) * BUCKET_SECONDS, UTC)


async def rate_buckets(db: asyncpg.Pool) -> Rates:
    """Jobs enqueued, completed and failed per :data:`BUCKET_SECONDS` bucket."""
    async with db.acquire() as conn:
        now: datetime = await conn.fetchval(_NOW)
        start = window_start(now)
        enqueued = await conn.fetch(_ENQUEUED, start, float(BUCKET_SECONDS))
        finished = await conn.fetch(_FINISHED, start, float(BUCKET_SECONDS))
    buckets = [
        RateBucket(
            start=start + timedelta(seconds=i * BUCKET_SECONDS), enqueued=0, completed=0, failed=0
        )
        for i in range(BUCKETS)
    ]
    for row in enqueued:
        if 0 <= row["bucket"] < BUCKETS:
            buckets[row["bucket"]].enqueued = int(row["n"])
    for row in finished:
        if 0 <= row["bucket"] < BUCKETS:
            buckets[row["bucket"]].completed = int(row["completed"])
            buckets[row["bucket"]].failed = int(row["failed"])
    return Rates(bucket_seconds=BUCKET_SECONDS, buckets=buckets)
