"""Leases on running jobs, and the reaper that recovers lapsed ones.

A worker that starts a job takes a short lease on it in the ``jobs`` row
(``lease_owner``, ``lease_expires_at``) and renews it every third of its
length.  If the worker dies (SIGKILL, OOM, lost host), the lease lapses within
``JOB_LEASE_SECONDS`` and the reaper that runs in *every* worker:

* marks the job ``retrying`` (or ``failed`` with ``worker_lost`` once its
  attempts are used up: a document that kills workers is not retried forever,
  or ``cancelled`` if that was asked for), in one transaction with clearing
  the lease, so exactly one reaper wins;
* closes the dead worker's run in the execution ledger as ``lost``;
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
of the one that took over.  The heartbeats, and the resync of jobs the queue
lost, are the fleet's (``workers/fleet.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

from app.core.db import Queryable
from app.core.logging import get_logger
from app.core.queue import WORKERS_KEY
from app.jobs.model import DocumentStatus, JobStatus, ProgressEvent
from app.jobs.transitions import (
    JOB_EVENT_COLUMNS,
    JobChanges,
    close_open_runs,
    event_from_row,
    job_transaction,
)
from workers.context import WorkerContext

log = get_logger("sluice.worker.lease")

STILL_RUNNING = (JobStatus.RUNNING,)
"""A leased run writes its job only while the job is still ``running``: any
other status means a cancel or the reaper ended it (the lease is gone)."""


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


_RUNNABLE = """
    id = $1::uuid
    AND (status IN ('queued', 'retrying')
         OR (status = 'running' AND (lease_expires_at IS NULL OR lease_expires_at < now())))
"""
"""A job a worker may take: waiting, or running under a lapsed lease."""

_DOCUMENT_COLUMNS = """
    d.id::text AS id, d.owner_id, d.filename, d.document_type, d.content_type, d.size_bytes,
    d.object_key, d.checksum_sha256, d.processing_options
"""


@dataclass(frozen=True, slots=True)
class Started:
    """What :func:`start` wrote: the job and document columns (as :func:`acquire`
    returns them), the ledger run it opened, and the ``running`` event to publish."""

    row: asyncpg.Record
    run_id: int
    event: ProgressEvent | None
    """None when a cancel was already asked for: the job was not made ``running``
    (the attempt ends it ``cancelled``)."""


async def start(
    db: asyncpg.Pool,
    job_id: str,
    owner: str,
    lease_seconds: float,
    *,
    worker_id: str,
    max_attempts: int,
) -> Started | None:
    """Take the lease, open the ledger run and make the job ``running``: one statement.

    The one round trip a worker makes to Postgres before a job's work begins,
    atomic where :func:`acquire`, :func:`~app.jobs.transitions.start_run` and the
    ``running`` change were three: the lease (the attempt counted), the run in
    ``job_runs`` (an open run of the job closed ``lost``, as ``start_run`` does),
    the document ``processing`` and the job ``running`` at stage ``validate``
    (its ``seq`` bumped, ``overall_progress`` kept) all commit together or not at
    all.  A job whose cancel was already asked for gets its lease and run but
    keeps its status (no event).  None if the job is not runnable (finished,
    cancelled, gone, or leased by a live worker).  The event is not published:
    the caller does that (after the commit, as every change).
    """
    row = await db.fetchrow(
        f"""
        WITH j AS (
            UPDATE jobs SET
                lease_owner = $2,
                lease_expires_at = now() + make_interval(secs => $3),
                attempts = attempts + 1,
                status = CASE WHEN cancel_requested THEN status ELSE 'running' END,
                stage = CASE WHEN cancel_requested THEN stage ELSE 'validate' END,
                stage_progress = CASE WHEN cancel_requested THEN stage_progress ELSE 0 END,
                message = CASE WHEN cancel_requested THEN message
                          ELSE 'started (attempt ' || (attempts + 1) || ' of ' || $5 || ')' END,
                started_at = CASE WHEN cancel_requested THEN started_at
                                  ELSE COALESCE(started_at, now()) END,
                seq = seq + CASE WHEN cancel_requested THEN 0 ELSE 1 END,
                updated_at = CASE WHEN cancel_requested THEN updated_at
                                  ELSE clock_timestamp() END
            WHERE {_RUNNABLE}
            RETURNING {JOB_EVENT_COLUMNS}, attempts, priority, cancel_requested,
                      document_id AS document_uuid
        ), lost AS (
            UPDATE job_runs SET ended_at = clock_timestamp(), outcome = 'lost'
            WHERE job_id = $1::uuid AND ended_at IS NULL AND EXISTS (SELECT 1 FROM j)
        ), run AS (
            INSERT INTO job_runs (job_id, attempt, worker_id, lease_token)
            SELECT $1::uuid, j.attempts, $4, $2 FROM j RETURNING id
        ), mark AS (
            UPDATE documents SET status = 'processing', updated_at = now()
            FROM j WHERE documents.id = j.document_uuid AND NOT j.cancel_requested
        )
        SELECT j.attempts, j.priority, j.cancel_requested, j.overall_progress, run.id AS run_id,
               j.job_id, j.seq, j.status, j.stage, j.stage_progress, j.message, j.ts,
               j.owner_id AS job_owner_id, j.document_id, j.error_code, j.error_message,
               {_DOCUMENT_COLUMNS}
        FROM j CROSS JOIN run JOIN documents d ON d.id = j.document_uuid
        """,
        job_id,
        owner,
        lease_seconds,
        worker_id,
        str(max_attempts),
    )
    if row is None:
        return None
    event = None
    if not row["cancel_requested"]:
        event = event_from_row({**dict(row), "owner_id": row["job_owner_id"]})
    return Started(row=row, run_id=int(row["run_id"]), event=event)


def reply_may_be_lost(exc: BaseException) -> bool:
    """True if ``exc`` means the connection went *during* a statement (asyncpg's
    ``ConnectionDoesNotExistError``), so the statement may have committed; not
    for a Postgres that refused the connection (nothing was sent)."""
    current: BaseException | None = exc
    for _ in range(8):
        if current is None:
            return False
        if isinstance(current, asyncpg.ConnectionDoesNotExistError):
            return True
        current = current.__cause__ or current.__context__
    return False


async def started_by(db: asyncpg.Pool, job_id: str, owner: str) -> Started | None:
    """What :func:`start` wrote for lease ``owner``, if it committed; None if not.

    A start whose reply was lost (Postgres went away between its commit and the
    answer) must not be taken again -- that would count a second attempt and
    open a second run for one execution.  Its ``running`` event was never
    published, so it is rebuilt here for the caller to publish.
    """
    row = await db.fetchrow(
        f"""
        WITH j AS (
            SELECT {JOB_EVENT_COLUMNS}, attempts, priority, cancel_requested,
                   document_id AS document_uuid
            FROM jobs WHERE id = $1::uuid AND lease_owner = $2
        )
        SELECT j.attempts, j.priority, j.cancel_requested, j.overall_progress, r.id AS run_id,
               j.job_id, j.seq, j.status, j.stage, j.stage_progress, j.message, j.ts,
               j.owner_id AS job_owner_id, j.document_id, j.error_code, j.error_message,
               {_DOCUMENT_COLUMNS}
        FROM j JOIN job_runs r ON r.job_id = $1::uuid AND r.lease_token = $2
                               AND r.ended_at IS NULL
        JOIN documents d ON d.id = j.document_uuid
        """,
        job_id,
        owner,
    )
    if row is None:
        return None
    event = None
    if not row["cancel_requested"]:
        event = event_from_row({**dict(row), "owner_id": row["job_owner_id"]})
    return Started(row=row, run_id=int(row["run_id"]), event=event)


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


async def live_workers(ctx: WorkerContext) -> list[str]:
    """Ids of the workers that sent a heartbeat within one lease, this one excluded."""
    since_ms = int((ctx.clock() - ctx.lease_seconds) * 1000)
    found = await ctx.redis.zrangebyscore(WORKERS_KEY, since_ms, "+inf")
    ids = (w.decode() if isinstance(w, bytes) else str(w) for w in found)
    return [w for w in ids if w != ctx.worker_id]


async def reap_expired(ctx: WorkerContext, *, alive: list[str] | None = None) -> list[str]:
    """Recover running jobs whose lease lapsed and whose worker is gone; returns the
    ids handled.  Needs Redis (the heartbeats): without it, nothing is reaped.
    ``alive``: :func:`live_workers` as the caller's heartbeat just read them."""
    handled: list[tuple[str, str]] = []
    if alive is None:
        alive = await live_workers(ctx)
    async with job_transaction(ctx.db, ctx.redis) as changes:
        rows = await changes.conn.fetch(
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
            if await _reap(changes, row, ctx.settings.task_retry_max_attempts):
                handled.append((row["id"], row["priority"]))
    for job_id, priority in handled:
        # Terminal ones too: their ARQ entry is released and skipped unrun.
        await ctx.queue.requeue_lost(job_id, priority)
        ctx.metrics.reaped.inc()
        log.warning("lease_expired_job_recovered", job_id=job_id)
    return [job_id for job_id, _ in handled]


async def _reap(changes: JobChanges, row: asyncpg.Record, max_attempts: int) -> bool:
    """End one lapsed run (its lease already cleared in ``changes``' transaction):
    ``cancelled`` if that was asked for, ``failed`` (``worker_lost``) once its
    attempts are spent, else ``retrying``.  False if the job was no longer running."""
    job_id, attempts = row["id"], row["attempts"]
    if row["cancel_requested"]:
        event = await changes.record(
            job_id,
            status=JobStatus.CANCELLED,
            message="cancelled (its worker stopped responding)",
            only_if_status=STILL_RUNNING,
        )
        await settle_document(changes.conn, row["document_id"], DocumentStatus.CANCELLED)
    elif attempts >= max_attempts:
        event = await changes.record(
            job_id,
            status=JobStatus.FAILED,
            error_code="worker_lost",
            error_message=f"worker stopped responding on attempt {attempts} of "
            f"{max_attempts}; giving up",
            message="failed: worker lost",
            only_if_status=STILL_RUNNING,
        )
        await settle_document(changes.conn, row["document_id"], DocumentStatus.FAILED)
    else:
        event = await changes.record(
            job_id,
            status=JobStatus.RETRYING,
            message=f"worker stopped responding (lease expired); requeued "
            f"(attempt {attempts} of {max_attempts})",
            details={"reason": "lease_expired"},
            only_if_status=STILL_RUNNING,
        )
    if event is None:
        return False
    await close_open_runs(changes.conn, job_id)  # the dead worker's run, in the ledger
    if event.terminal:
        await changes.conn.execute("DELETE FROM job_checkpoints WHERE job_id = $1::uuid", job_id)
    return True


async def settle_document(db: Queryable, document_id: Any, failed_status: DocumentStatus) -> None:
    """A document keeps ``indexed`` if it still has chunks from an earlier job."""
    await db.execute(
        """
        UPDATE documents SET updated_at = now(),
            status = CASE WHEN EXISTS (SELECT 1 FROM chunks WHERE document_id = $1)
                          THEN 'indexed' ELSE $2 END
        WHERE id = $1
        """,
        document_id,
        str(failed_status),
    )
