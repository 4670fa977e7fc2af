"""The fleet as the dashboard shows it: live workers with their slots and running
jobs, and the WebSocket servers' reports with their totals.

Workers are read from the registry they write (``workers/fleet.py``
``heartbeat``): :data:`~app.core.queue.WORKERS_KEY` (zset, score = last
heartbeat in ms) and :data:`~app.core.queue.WORKER_SLOTS_KEY` (hash).  A worker
whose heartbeat is older than two leases is gone (the heartbeat prunes such
entries the same way) and is not shown.  Running jobs come from the jobs table,
the truth: ``lease_owner`` is the worker id holding the job.  WebSocket servers
come from :func:`app.core.fleet.read_ws_reports` (stale reports are skipped).

Invariant: every read is bounded -- the registry holds one entry per worker,
the running jobs are at most the fleet's slots (capped at
:data:`MAX_RUNNING_SHOWN` all the same).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime

import asyncpg
from redis.asyncio import Redis

from app.core.fleet import WsInstanceReport, read_ws_reports
from app.core.queue import WORKER_SLOTS_KEY, WORKERS_KEY, Priority
from app.core.schemas import Readiness
from app.jobs.model import Stage
from app.jobs.ops_schemas import Fleet, RunningJob, WorkerView, WsStats, WsTotals

MAX_RUNNING_SHOWN = 10_000

_RUNNING = """
    SELECT id::text AS job_id, owner_id, stage, priority, lease_owner, lease_expires_at
    FROM jobs WHERE status = 'running'
    ORDER BY lease_expires_at NULLS LAST
    LIMIT $1
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def fleet(
    db: asyncpg.Pool,
    redis: Redis,
    *,
    now: float,
    lease_seconds: float,
    dependencies: Readiness,
) -> Fleet:
    """Workers, their running jobs, the WebSocket servers and ``dependencies``."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zrangebyscore(
            WORKERS_KEY, int((now - 2 * lease_seconds) * 1000), "+inf", withscores=True
        )
        pipe.hgetall(WORKER_SLOTS_KEY)
        alive, slots = await pipe.execute()
    rows = await db.fetch(_RUNNING, MAX_RUNNING_SHOWN)
    by_worker: dict[str, list[RunningJob]] = defaultdict(list)
    for row in rows:
        by_worker[row["lease_owner"] or ""].append(
            RunningJob(
                job_id=row["job_id"],
                owner_id=row["owner_id"],
                stage=None if row["stage"] is None else Stage(row["stage"]),
                priority=Priority(row["priority"]),
                lease_expires_at=row["lease_expires_at"],
            )
        )
    slot_of = {_text(k): v for k, v in slots.items()}
    workers = []
    for member, score in sorted(alive, key=lambda pair: -pair[1]):
        worker_id = _text(member)
        workers.append(
            WorkerView(
                worker_id=worker_id,
                last_heartbeat_at=datetime.fromtimestamp(score / 1000, UTC),
                heartbeat_age_seconds=round(max(0.0, now - score / 1000), 3),
                slots=int(slot_of.get(worker_id, 0)),
                running=by_worker.pop(worker_id, []),
            )
        )
    orphans = [job for jobs in by_worker.values() for job in jobs]
    return Fleet(
        workers=workers,
        ws_servers=await read_ws_reports(redis, now=now),
        dependencies=dependencies,
        unassigned_running=orphans,
    )


def ws_totals(reports: list[WsInstanceReport]) -> WsStats:
    """The live WebSocket servers and their sums."""
    return WsStats(
        instances=reports,
        total=WsTotals(
            instances=len(reports),
            connections=sum(r.connections for r in reports),
            authenticated=sum(r.authenticated for r in reports),
            subscriptions=sum(r.subscriptions for r in reports),
            messages_per_second=round(sum(r.messages_per_second for r in reports), 3),
        ),
    )


async def ws_stats(redis: Redis, *, now: float) -> WsStats:
    """``GET /api/v1/ws/stats``: every live WebSocket server's report and the totals."""
    return ws_totals(await read_ws_reports(redis, now=now))
