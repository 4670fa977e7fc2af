"""Leases on running jobs, and the reaper that recovers lapsed ones.

A worker that starts a job takes a short lease on it in the ``jobs`` row
(``lease_owner``, ``lease_expires_at``) and renews it every third of its
length.  If the worker dies (SIGKILL, OOM, lost host), the lease lapses within
``JOB_LEASE_SECONDS`` and the reaper that runs in *every* worker:

* marks the job ``retrying`` (or ``failed`` with ``worker_lost`` once its
  attempts are used up: a document that kills workers is not retried forever,
  or ``cancelled`` if that was asked for), in one transaction with clearing
  the lease, so exactly one reaper wins;
* releases ARQ's in-progress key for it (:meth:`JobQueue.requeue_lost`), which
  would otherwise block the job for the whole job timeout (ARQ #343).

A lapsed lease is not enough to take a job away: the reaper leaves alone the
jobs of a worker that still sends its heartbeat to Redis (``sluice:workers``,
written every third of a lease by each worker's maintenance loop, which needs
no Postgres).  Such a worker is alive but cut off from Postgres (an outage, a
network partition to the database); it renews the lease as soon as it can and
carries on, without the job losing an attempt.  A worker reaps its *own* lapsed
leases of jobs it no longer runs (a lease left behind by a bug cannot stick).

The lease owner is a fencing token: every write of a running job checks it, so
a worker that lost its lease (stalled, partitioned) cannot overwrite the work
of the one that took over.  :func:`resync_queue` re-enqueues jobs that the
table says are waiting but that ARQ does not hold (an enqueue lost between the
commit and Redis, a flushed Redis).
"""

from __future__ import annotations

from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from app.core.logging import get_logger
from app.core.outage import is_redis_outage
from app.core.queue import QUEUE_EPOCH_KEY, WORKER_SLOTS_KEY, WORKERS_KEY
from app.jobs.events import publish_event
from app.jobs.model import JobStatus, ProgressEvent
from app.jobs.transitions import record_progress
from workers.context import WorkerContext

log = get_logger("sluice.worker.lease")

RESYNC_GRACE_SECONDS = 60


class LeaseLost(Exception):
    """This worker no longer holds the job's lease; another one owns the job."""


async def acquire(
    db: asyncpg.Pool, job_id: str, owner: str, lease_seconds: float
) -> asyncpg.Record | None:
    """Take the lease of a waiting job (or of a running one whose lease lapsed).

    One statement: counts the attempt, marks the document ``processing`` and
    returns the job and document columns the run needs; None if the job is not
    runnable (finished, cancelled, gone, or leased by a live worker).
    """
    return await db.fetchrow(
        """
        WITH j AS (
            UPDATE jobs SET lease_owner = $2,
                            lease_expires_at = now() + make_interval(secs => $3),
                            attempts = attempts + 1
            WHERE id = $1::uuid
              AND (status IN ('queued', 'retrying')
                   OR (status = 'running'
                       AND (lease_expires_at IS NULL OR lease_expires_at < now())))
            RETURNING attempts, priority, document_id, cancel_requested, overall_progress
        ), mark AS (
            UPDATE documents SET status = 'processing', updated_at = now()
            FROM j WHERE documents.id = j.document_id AND NOT j.cancel_requested
        )
        SELECT j.attempts, j.priority, j.cancel_requested, j.overall_progress,
               d.id::text AS id, d.owner_id,
               d.filename, d.document_type, d.content_type, d.size_bytes, d.object_key,
               d.checksum_sha256, d.processing_options
        FROM j JOIN documents d ON d.id = j.document_id
        """,
        job_id,
        owner,
        lease_seconds,
    )


async def renew(db: asyncpg.Pool, job_id: str, owner: str, lease_seconds: float) -> bool:
    """Extend our lease; False if it is no longer ours."""
    row = await db.fetchval(
        """
        UPDATE jobs SET lease_expires_at = now() + make_interval(secs => $3)
        WHERE id = $1::uuid AND lease_owner = $2 AND status = 'running'
        RETURNING true
        """,
        job_id,
        owner,
        lease_seconds,
    )
    return bool(row)


async def _publish(ctx: WorkerContext, events: list[ProgressEvent]) -> None:
    for event in events:
        try:
            await publish_event(ctx.redis, event)
        except Exception as exc:
            log.warning(
                "event_publish_failed", job_id=event.job_id, exc_info=not is_redis_outage(exc)
            )


async def live_workers(ctx: WorkerContext) -> list[str]:
    """Ids of the workers that sent a heartbeat within one lease, this one excluded."""
    since_ms = int((ctx.clock() - ctx.lease_seconds) * 1000)
    found = await ctx.redis.zrangebyscore(WORKERS_KEY, since_ms, "+inf")
    ids = (w.decode() if isinstance(w, bytes) else str(w) for w in found)
    return [w for w in ids if w != ctx.worker_id]


async def reap_expired(ctx: WorkerContext) -> list[str]:
    """Recover running jobs whose lease lapsed and whose worker is gone; returns the
    ids handled.  Needs Redis (the heartbeats): without it, nothing is reaped."""
    max_attempts = ctx.settings.task_retry_max_attempts
    events: list[ProgressEvent] = []
    handled: list[tuple[str, str]] = []
    alive = await live_workers(ctx)
    async with ctx.db.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            """
            UPDATE jobs SET lease_owner = NULL, lease_expires_at = NULL
            WHERE id IN (SELECT id FROM jobs
                         WHERE status = 'running' AND lease_expires_at < now()
                           AND NOT (id = ANY($2::uuid[]))
                           AND NOT (coalesce(regexp_replace(lease_owner, ':[^:]*$', ''), '')
                                    = ANY($1::text[]))
                         ORDER BY lease_expires_at LIMIT 100 FOR UPDATE SKIP LOCKED)
            RETURNING id::text AS id, priority, attempts, cancel_requested,
                      document_id, lease_expires_at
            """,
            alive,
            list(ctx.running),
        )
        for row in rows:
            job_id = row["id"]
            if row["cancel_requested"]:
                event = await record_progress(
                    conn,
                    None,
                    job_id,
                    status=JobStatus.CANCELLED,
                    message="cancelled (its worker stopped responding)",
                    only_if_status=[JobStatus.RUNNING],
                )
                await settle_document(conn, row["document_id"], "cancelled")
            elif row["attempts"] >= max_attempts:
                event = await record_progress(
                    conn,
                    None,
                    job_id,
                    status=JobStatus.FAILED,
                    error_code="worker_lost",
                    error_message=f"worker stopped responding on attempt {row['attempts']} of "
                    f"{max_attempts}; giving up",
                    message="failed: worker lost",
                    only_if_status=[JobStatus.RUNNING],
                )
                await settle_document(conn, row["document_id"], "failed")
            else:
                event = await record_progress(
                    conn,
                    None,
                    job_id,
                    status=JobStatus.RETRYING,
                    message=f"worker stopped responding (lease expired); requeued "
                    f"(attempt {row['attempts']} of {max_attempts})",
                    details={"reason": "lease_expired"},
                    only_if_status=[JobStatus.RUNNING],
                )
            if event is not None:
                if event.terminal:
                    await conn.execute(
                        "DELETE FROM job_checkpoints WHERE job_id = $1::uuid", job_id
                    )
                events.append(event)
                handled.append((job_id, row["priority"]))
    await _publish(ctx, events)
    for job_id, priority in handled:
        # Terminal ones too: their ARQ entry is released and skipped unrun.
        await ctx.queue.requeue_lost(job_id, priority)
        ctx.metrics.reaped.inc()
        log.warning("lease_expired_job_recovered", job_id=job_id)
    return [job_id for job_id, _ in handled]


async def settle_document(
    conn: asyncpg.Connection | PoolConnectionProxy, document_id: Any, failed_status: str
) -> None:
    """A document keeps ``indexed`` if it still has chunks from an earlier job."""
    await conn.execute(
        """
        UPDATE documents SET updated_at = now(),
            status = CASE WHEN EXISTS (SELECT 1 FROM chunks WHERE document_id = $1)
                          THEN 'indexed' ELSE $2 END
        WHERE id = $1
        """,
        document_id,
        failed_status,
    )


async def resync_queue(
    ctx: WorkerContext, *, grace_seconds: float = RESYNC_GRACE_SECONDS
) -> list[str]:
    """Enqueue waiting jobs that ARQ does not hold; returns the ids enqueued.

    ``grace_seconds`` spares jobs changed that recently (their enqueue may be
    under way); 0 after Redis lost its data, when no enqueue can be trusted.
    Idempotent: ARQ refuses a second job with the same id, and a job that runs
    anyway is taken only through :func:`acquire`, which lets one worker hold it.
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
            # Waiting that long, yet marked started in ARQ: its worker could not tell
            # ARQ how the run ended (Redis was down then), and ARQ would hold it for
            # the whole job timeout.  Not after a data loss (grace 0): a worker may
            # just have picked the job up (nor while one holds its lease, taking it).
            if (
                grace_seconds >= RESYNC_GRACE_SECONDS
                and row["lease_free"]
                and await ctx.queue.is_started(row["id"])
            ):
                await ctx.queue.requeue_lost(row["id"], row["priority"])
                log.warning("stuck_job_released", job_id=row["id"])
            continue
        if await ctx.queue.enqueue(row["id"], row["priority"]):
            enqueued.append(row["id"])
            log.warning("lost_job_requeued", job_id=row["id"])
    return enqueued


async def heartbeat(ctx: WorkerContext, max_jobs: int) -> int:
    """Record this worker as alive; return the fleet's total job slots."""
    now_ms = int(ctx.clock() * 1000)
    stale = now_ms - int(ctx.lease_seconds * 2000)
    async with ctx.redis.pipeline(transaction=True) as pipe:
        pipe.zadd(WORKERS_KEY, {ctx.worker_id: now_ms})
        pipe.hset(WORKER_SLOTS_KEY, ctx.worker_id, str(max_jobs))
        pipe.zrangebyscore(WORKERS_KEY, "-inf", stale)
        pipe.zremrangebyscore(WORKERS_KEY, "-inf", stale)
        pipe.hgetall(WORKER_SLOTS_KEY)
        _, _, dead, _, slots = await pipe.execute()
    if dead:
        await ctx.redis.hdel(WORKER_SLOTS_KEY, *dead)  # type: ignore[misc]
    alive = {k: v for k, v in slots.items() if k not in set(dead)}
    return sum(int(v) for v in alive.values())


async def leave(ctx: WorkerContext) -> None:
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
