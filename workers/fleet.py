"""The fleet: what every worker does besides running jobs, so that workers find
each other and no waiting job is lost.

:func:`maintenance_loop` runs every third of a lease in each worker:

* :func:`heartbeat` -- this worker's entry in the worker registry (Redis,
  ``sluice:workers``) with its job slots; the reaper spares the jobs of a worker
  whose heartbeat it sees, and ARQ's ``queue_read_limit`` follows the fleet's
  slots (ARQ #171);
* the lease reaper (:func:`workers.lease.reap_expired`);
* every :data:`RESYNC_EVERY_SECONDS`, :func:`resync_queue`.

:func:`watch_queue_epoch` notices within :data:`EPOCH_CHECK_SECONDS` that Redis
lost its data (:func:`claim_new_epoch`) and resyncs the queue at once.
:func:`leave` takes the worker out of the registry when it stops.

:func:`resync_queue` is what makes the one enqueue-failure policy safe: every
route commits a job ``queued`` first and then calls
:meth:`~app.core.queue.JobQueue.enqueue_or_defer`, which gives up quietly when
Redis is away; the job row stays ``queued`` and the next resync enqueues it.
It also re-enqueues jobs a flushed or failed-over Redis lost, and releases jobs
ARQ still marks started although their worker could not report the end.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from arq.worker import Worker

from app.core.logging import get_logger
from app.core.outage import is_database_outage, is_redis_outage
from app.core.queue import QUEUE_EPOCH_KEY, WORKER_SLOTS_KEY, WORKERS_KEY, read_limit_for
from workers import lease
from workers.context import WorkerContext

log = get_logger("sluice.worker")

RESYNC_EVERY_SECONDS = 60.0
RESYNC_GRACE_SECONDS = 60
"""A waiting job changed this recently is left to the enqueue under way."""
EPOCH_CHECK_SECONDS = 5.0
"""How often each worker checks that Redis still holds the queue (one SET NX; 0.2
of the 2 commands/s an idle worker may send, see ``workers/wake.py``)."""


async def maintenance_tick(ctx: WorkerContext, worker: Worker | None, *, resync: bool) -> None:
    """One round of the background duties every worker shares."""
    max_jobs = ctx.settings.max_concurrent_tasks
    fleet = await heartbeat(ctx, max_jobs)
    if worker is not None:
        worker.queue_read_limit = read_limit_for(fleet.slots, max_jobs)
    await lease.reap_expired(ctx, alive=fleet.alive)
    if resync:
        await resync_queue(ctx)


async def maintenance_loop(ctx: WorkerContext, worker: Worker | None) -> None:
    """:func:`maintenance_tick` every third of a lease, until cancelled; a failed
    round (an outage) is logged and the next one tried."""
    interval = ctx.lease_seconds / 3
    last_resync = 0.0
    while True:
        now = time.monotonic()
        try:
            await maintenance_tick(ctx, worker, resync=now - last_resync >= RESYNC_EVERY_SECONDS)
            if now - last_resync >= RESYNC_EVERY_SECONDS:
                last_resync = now
        except Exception as exc:  # a dependency hiccup must not stop recovery for good
            outage = is_redis_outage(exc) or is_database_outage(exc)
            if is_redis_outage(exc):
                ctx.set_redis_up(False)
            log.warning("maintenance_failed", error=type(exc).__name__, exc_info=not outage)
        await asyncio.sleep(interval)


async def watch_queue_epoch(ctx: WorkerContext) -> None:
    """Resync the queue from the jobs table as soon as Redis has lost its data."""
    while True:
        try:
            if await claim_new_epoch(ctx):
                requeued = await resync_queue(ctx, grace_seconds=0)
                log.warning("queue_state_lost_resynced", requeued=len(requeued))
            ctx.set_redis_up(True)
        except Exception as exc:  # Redis (or Postgres) away: try again next round
            if is_redis_outage(exc):
                ctx.set_redis_up(False)
            log.info("epoch_check_failed", error=type(exc).__name__)
        await asyncio.sleep(EPOCH_CHECK_SECONDS)


async def resync_queue(
    ctx: WorkerContext, *, grace_seconds: float = RESYNC_GRACE_SECONDS
) -> list[str]:
    """Enqueue waiting jobs that ARQ does not hold; returns the ids enqueued.

    This is what makes :meth:`~app.core.queue.JobQueue.enqueue_or_defer` (the
    gateway's one enqueue-failure policy) safe: a job committed ``queued`` whose
    enqueue failed (Redis away) is enqueued here, within
    ``RESYNC_EVERY_SECONDS + grace_seconds`` of Redis coming back.  Jobs a
    flushed Redis lost are enqueued the same way.

    ``grace_seconds`` spares jobs changed that recently (their enqueue may be
    under way); 0 after Redis lost its data, when no enqueue can be trusted.
    Idempotent: ARQ refuses a second job with the same id, and a job that runs
    anyway is taken only through :func:`workers.lease.acquire`, which lets one
    worker hold it.
    """
    rows = await ctx.db.fetch(
        """
        SELECT id::text AS id, priority,
               (lease_owner IS NULL OR lease_expires_at < now()) AS lease_free
        FROM jobs
        WHERE status IN ('queued', 'retrying')
          AND updated_at <= now() - make_interval(secs => $1)
        ORDER BY updated_at LIMIT 5000
        """,
        float(grace_seconds),
    )
    enqueued = []
    for row in rows:
        if await ctx.queue.is_queued(row["id"]):
            # Waiting, yet marked started in ARQ for that long with no lease taken:
            # its worker died between the pick-up and the lease, or could not tell
            # ARQ how the run ended (Redis was down then), and ARQ would hold it for
            # the whole job timeout.  The age is the in-progress key's, not the
            # row's: a job that waited long in a crowded queue and was picked up a
            # moment ago (its worker about to take the lease) is left alone.  Not
            # after a data loss (grace 0), nor while a worker holds its lease.
            if (
                grace_seconds >= RESYNC_GRACE_SECONDS
                and row["lease_free"]
                and await _started_long_ago(ctx, row["id"], grace_seconds)
            ):
                await ctx.queue.requeue_lost(row["id"], row["priority"])
                log.warning("stuck_job_released", job_id=row["id"])
            continue
        if await ctx.queue.enqueue(row["id"], row["priority"]):
            enqueued.append(row["id"])
            log.warning("lost_job_requeued", job_id=row["id"])
    return enqueued


async def _started_long_ago(ctx: WorkerContext, job_id: str, seconds: float) -> bool:
    age = await ctx.queue.started_seconds_ago(job_id, ctx.in_progress_seconds)
    return age is not None and age >= seconds


@dataclass(frozen=True)
class FleetView:
    """What one heartbeat saw of the fleet."""

    slots: int
    """Job slots of the live workers, this one included."""
    alive: list[str]
    """Workers (this one excluded) that sent a heartbeat within one lease."""


async def heartbeat(ctx: WorkerContext, max_jobs: int) -> FleetView:
    """Record this worker as alive; return the fleet as the registry shows it.

    One round trip of five commands, not a transaction (an idle worker's Redis
    budget, see ``workers/wake.py``): removing the dead by score is safe however
    other workers' heartbeats interleave (a fresh heartbeat has a fresh score),
    and a worker that heartbeats between the read and the removal loses only its
    slot count until its next heartbeat.
    """
    now_ms = int(ctx.clock() * 1000)
    stale = now_ms - int(ctx.lease_seconds * 2000)
    live_since = now_ms - int(ctx.lease_seconds * 1000)
    async with ctx.redis.pipeline(transaction=False) as pipe:
        pipe.zadd(WORKERS_KEY, {ctx.worker_id: now_ms})
        pipe.hset(WORKER_SLOTS_KEY, ctx.worker_id, str(max_jobs))
        pipe.zrange(WORKERS_KEY, 0, -1, withscores=True)
        pipe.zremrangebyscore(WORKERS_KEY, "-inf", stale)
        pipe.hgetall(WORKER_SLOTS_KEY)
        _, _, seen, _, slots = await pipe.execute()
    beats = {_text(w): score for w, score in seen}
    dead = [w for w, score in beats.items() if score <= stale]
    if dead:
        await ctx.redis.hdel(WORKER_SLOTS_KEY, *dead)  # type: ignore[misc]
    alive_slots = {_text(k): v for k, v in slots.items() if _text(k) not in set(dead)}
    return FleetView(
        slots=sum(int(v) for v in alive_slots.values()),
        alive=[w for w, score in beats.items() if score >= live_since and w != ctx.worker_id],
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def leave(ctx: WorkerContext) -> None:
    """Take this worker out of the registry (it is stopping)."""
    async with ctx.redis.pipeline(transaction=True) as pipe:
        pipe.zrem(WORKERS_KEY, ctx.worker_id)
        pipe.hdel(WORKER_SLOTS_KEY, ctx.worker_id)
        await pipe.execute()


async def claim_new_epoch(ctx: WorkerContext) -> bool:
    """True if Redis had lost its data and this worker is the one to resync.

    :data:`~app.core.queue.QUEUE_EPOCH_KEY` is written once per Redis data set
    (``SET NX``); its absence means a FLUSHALL, a failover to a replica that
    lagged, or a restart without persistence.  Exactly one caller per loss
    gets True (and a fresh worker against a fresh Redis resyncs once).
    """
    marker = f"{ctx.worker_id}:{int(ctx.clock() * 1000)}"
    return bool(await ctx.redis.set(QUEUE_EPOCH_KEY, marker, nx=True))
