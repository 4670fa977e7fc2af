"""What a client can do to its jobs: read, list, cancel, retry; processing metrics.

HTTP-free: the gateway's handlers parse a request, call one of these and
render what it returns; the WebSocket server and the uploads package call
:func:`request_cancel`.  Every lookup is scoped to the caller: another user's
job is a 404 like a missing or malformed id (:func:`app.core.db.fetch_owned`).
State changes go through :mod:`app.jobs.transitions` (recorded in the
transaction, published after commit); a job made ``queued`` is enqueued after
commit with :meth:`~app.core.queue.JobQueue.enqueue_or_defer`, so a Redis
outage then leaves it queued for the workers' resync instead of failing the
request.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import msgspec
from redis.asyncio import Redis

from app.core.db import fetch_owned
from app.core.errors import Conflict
from app.core.logging import get_logger
from app.core.pagination import Keyset, Where, fetch_page
from app.core.queue import Priority, queue_depth_by_priority, workers_alive
from app.core.schemas import Page
from app.jobs.context import JobsContext, object_exists
from app.jobs.model import (
    RETRYABLE_STATUSES,
    DocumentStatus,
    JobStatus,
    ProgressEvent,
    Stage,
)
from app.jobs.ops_schemas import AdminJobListQuery, AdminJobView
from app.jobs.schemas import JobListQuery, JobView, ProcessingMetrics, StageTiming
from app.jobs.transitions import job_snapshot, job_transaction

log = get_logger(__name__)

WORKER_ALIVE_WINDOW_SECONDS = 60.0


# --- reading ------------------------------------------------------------------------------

_JOB_SELECT = """
    SELECT j.id::text AS job_id, j.document_id::text AS document_id, j.status, j.priority,
           j.stage, j.stage_progress, j.overall_progress, j.message, j.seq, j.attempts,
           j.error_code, j.error_message, j.warnings, j.stage_timings, j.result,
           j.cancel_requested,
           (j.status = 'running' AND j.lease_expires_at < now()) AS lease_expired,
           j.created_at, j.queued_at, j.started_at, j.finished_at, j.updated_at
    FROM jobs j
"""
_JOB_KEYSET = Keyset("j.created_at", "j.id", id_field="job_id")


def job_view(row: asyncpg.Record | dict[str, Any], max_attempts: int) -> JobView:
    data = dict(row)
    data["status"] = JobStatus(data["status"])
    data["priority"] = Priority(data["priority"])
    data["stage"] = None if data["stage"] is None else Stage(data["stage"])
    data["stage_progress"] = round(float(data["stage_progress"]), 4)
    data["overall_progress"] = round(float(data["overall_progress"]), 4)
    data["lease_expired"] = bool(data["lease_expired"])
    data["stage_timings"] = {  # rows written before timings kept every run hold a number
        k: v if isinstance(v, list) else [v] for k, v in data["stage_timings"].items()
    }
    return JobView(max_attempts=max_attempts, **data)


async def get_job(ctx: JobsContext, job_id: str, owner_id: str) -> JobView:
    row = await fetch_owned(
        ctx.db,
        f"{_JOB_SELECT} WHERE j.id = $1 AND j.owner_id = $2",
        job_id,
        owner_id,
        not_found="job",
    )
    return job_view(row, ctx.settings.task_retry_max_attempts)


def _job_filters(where: Where, query: JobListQuery) -> Where:
    """``where`` with the listing's status, priority and document filters."""
    if query.status is not None:
        where.add("j.status = {}", str(query.status))
    if query.priority is not None:
        where.add("j.priority = {}", str(query.priority))
    if query.document_id is not None:
        where.add("j.document_id = {}", query.document_id)
    return where


async def list_jobs(ctx: JobsContext, owner_id: str, query: JobListQuery) -> Page[JobView]:
    """The caller's jobs, newest first, filtered by status, priority and document."""
    where = _job_filters(Where().add("j.owner_id = {}", owner_id), query)
    page = await fetch_page(
        ctx.db, _JOB_SELECT, where, keyset=_JOB_KEYSET, cursor=query.cursor, limit=query.limit
    )
    max_attempts = ctx.settings.task_retry_max_attempts
    return Page[JobView](
        items=[job_view(r, max_attempts) for r in page.rows], next_cursor=page.next_cursor
    )


async def list_all_jobs(ctx: JobsContext, query: AdminJobListQuery) -> Page[AdminJobView]:
    """Every user's jobs (the admin view), newest first, filtered like :func:`list_jobs`
    and by ``owner_id``; each item also names its owner."""
    where = Where()
    if query.owner_id is not None:
        where.add("j.owner_id = {}", query.owner_id)
    where = _job_filters(where, query)
    select = _JOB_SELECT.replace("SELECT j.id::text", "SELECT j.owner_id, j.id::text", 1)
    page = await fetch_page(
        ctx.db, select, where, keyset=_JOB_KEYSET, cursor=query.cursor, limit=query.limit
    )
    max_attempts = ctx.settings.task_retry_max_attempts
    items = []
    for row in page.rows:
        data = dict(row)
        owner = data.pop("owner_id")
        view = job_view(data, max_attempts)
        items.append(AdminJobView(owner_id=owner, **msgspec.structs.asdict(view)))
    return Page[AdminJobView](items=items, next_cursor=page.next_cursor)


# --- cancel and retry ---------------------------------------------------------------------


async def request_cancel(
    db: asyncpg.Pool, redis: Redis | None, job_id: str, owner_id: str
) -> ProgressEvent:
    """Cancel a job on behalf of its owner; the one cancel path for every front end.

    A job that has not started (``awaiting_upload``, ``queued``, ``retrying``)
    ends ``cancelled`` at once, and so does its document; a ``running`` one
    gets ``cancel_requested`` and its worker ends it at the next stage or batch
    boundary.  Cancelling an already-cancelled job returns its state again
    (idempotent, nothing recorded); a completed or failed job is a
    :class:`Conflict`.  Unknown, malformed and foreign ids are all 404.
    """
    async with job_transaction(db, redis) as changes:
        conn = changes.conn
        row = await fetch_owned(
            conn,
            "SELECT status FROM jobs WHERE id = $1 AND owner_id = $2",
            job_id,
            owner_id,
            not_found="job",
            for_update=True,
        )
        status = JobStatus(row["status"])
        if status == JobStatus.CANCELLED:
            snapshot = await job_snapshot(conn, job_id)
            assert snapshot is not None
            return snapshot
        if status.terminal:
            raise Conflict(
                f"job already {status}", code="job_finished", details={"status": str(status)}
            )
        await conn.execute("UPDATE jobs SET cancel_requested = true WHERE id = $1::uuid", job_id)
        if status == JobStatus.RUNNING:
            event = await changes.record(job_id, message="cancellation requested")
        else:
            event = await changes.record(
                job_id, status=JobStatus.CANCELLED, message="cancelled before processing started"
            )
            await conn.execute(
                "UPDATE documents SET status = $2, updated_at = now() "
                "WHERE id = (SELECT document_id FROM jobs WHERE id = $1::uuid)",
                job_id,
                str(DocumentStatus.CANCELLED),
            )
    assert event is not None
    return event


async def cancel_job(ctx: JobsContext, job_id: str, owner_id: str) -> JobView:
    """:func:`request_cancel`; a job that had not started also leaves the ARQ queue."""
    event = await request_cancel(ctx.db, ctx.redis, job_id, owner_id)
    if event.status == JobStatus.CANCELLED:
        try:  # workers skip a cancelled job anyway: this only saves them the look
            await ctx.queue.abort(job_id)
        except Exception:
            log.warning("queue_abort_failed", job_id=job_id, exc_info=True)
    return await get_job(ctx, job_id, owner_id)


async def retry_job(ctx: JobsContext, job_id: str, owner_id: str) -> JobView:
    """Queue a ``failed`` or ``cancelled`` job again, under the same id, with fresh attempts.

    Its error, warnings, result and lease are cleared; ``overall_progress`` is
    kept (it never goes back within a job; the new run starts from it).  A job
    whose upload never completed is a :class:`Conflict` (``upload_incomplete``).
    """
    async with job_transaction(ctx.db, ctx.redis) as changes:
        conn = changes.conn
        row = await fetch_owned(
            conn,
            "SELECT j.status, j.priority, d.object_key FROM jobs j "
            "JOIN documents d ON d.id = j.document_id WHERE j.id = $1 AND j.owner_id = $2",
            job_id,
            owner_id,
            not_found="job",
            for_update=True,
            of="j",
        )
        status = JobStatus(row["status"])
        if status not in RETRYABLE_STATUSES:
            raise Conflict(
                f"only failed or cancelled jobs can be retried (job is {status})",
                code="job_not_retryable",
                details={"status": str(status)},
            )
        if not await object_exists(ctx, row["object_key"], operation="retry"):
            raise Conflict(
                "the document's upload never completed; upload it again", code="upload_incomplete"
            )
        await conn.execute(
            """
            UPDATE jobs SET attempts = 0, error_code = NULL, error_message = NULL,
                   cancel_requested = false, lease_owner = NULL, lease_expires_at = NULL,
                   warnings = '[]', result = '{}', queued_at = NULL, started_at = NULL,
                   finished_at = NULL
            WHERE id = $1::uuid
            """,
            job_id,
        )
        await conn.execute(
            "UPDATE documents SET status = $2, updated_at = now() "
            "WHERE id = (SELECT document_id FROM jobs WHERE id = $1::uuid) AND status <> $3",
            job_id,
            str(DocumentStatus.STORED),
            str(DocumentStatus.INDEXED),
        )
        await changes.record(
            job_id,
            status=JobStatus.QUEUED,
            stage_progress=0.0,
            message="queued again (retry requested)",
        )
    await ctx.queue.enqueue_or_defer(job_id, row["priority"])
    return await get_job(ctx, job_id, owner_id)


# --- metrics ------------------------------------------------------------------------------

_STAGE_TIMINGS = """
    SELECT t.key AS stage, count(*) AS n, avg(t.seconds) AS avg,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY t.seconds) AS p95
    FROM jobs j, LATERAL (
        SELECT e.key, (SELECT sum(x::float8) FROM jsonb_array_elements_text(
                   CASE jsonb_typeof(e.value) WHEN 'array' THEN e.value
                        ELSE jsonb_build_array(e.value) END) x) AS seconds
        FROM jsonb_each(j.stage_timings) e) t
    WHERE j.owner_id = $1 AND j.finished_at > now() - interval '24 hours'
    GROUP BY t.key
"""


async def processing_metrics(ctx: JobsContext, owner_id: str) -> ProcessingMetrics:
    """The caller's jobs by status and stage timings; the fleet's queue and workers."""
    by_status = await ctx.db.fetch(
        "SELECT status, count(*) AS n FROM jobs WHERE owner_id = $1 GROUP BY status", owner_id
    )
    timings = await ctx.db.fetch(_STAGE_TIMINGS, owner_id)
    depth, arq_len, alive = await asyncio.gather(
        queue_depth_by_priority(ctx.db),
        ctx.queue.depth(),
        workers_alive(ctx.redis, window_seconds=WORKER_ALIVE_WINDOW_SECONDS, now=ctx.clock()),
    )
    return ProcessingMetrics(
        jobs_by_status={r["status"]: int(r["n"]) for r in by_status},
        stage_timings={
            r["stage"]: StageTiming(
                jobs=int(r["n"]), avg_seconds=round(r["avg"], 4), p95_seconds=round(r["p95"], 4)
            )
            for r in timings
        },
        queue_depth=depth,
        arq_queue_length=arq_len,
        workers_alive=alive,
    )
