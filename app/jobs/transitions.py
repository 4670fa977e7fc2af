"""The one way any process changes a job's visible state.

Two shapes, one rule -- *record in the transaction, publish after commit*:

* :class:`JobChanges` -- changes made inside a transaction the caller holds
  (with :func:`job_transaction`, or its own): :meth:`JobChanges.record` writes
  each change, :meth:`JobChanges.publish` sends them once the transaction has
  committed, so no reader of Redis ever sees a state the table does not hold;
* :func:`change_job` -- one change in its own statement, published at once
  (worker progress, lease expiry).

Both write through one ``UPDATE`` that bumps the job's ``seq`` with the new
state, so sequence numbers only grow and agree with the table.  A failed
publish is logged, never raised: the table stays the truth, and resuming
subscribers fall back to its snapshot.

The execution ledger (``job_runs``) is written here as well: a worker opens a
run when it takes a job's lease (:func:`start_run`, one insert) and closes it
inside the transaction of the state the run ended in (:func:`end_run`, one
update), so "exactly once" can be counted from executions rather than trusted
from a status.  A run whose worker died is closed ``lost`` by whoever ends the
lease: the reaper (:func:`close_open_runs`) or the next :func:`start_run`.

Reading a job's state as an event lives here too (:func:`job_snapshot`,
:func:`job_snapshots`; :func:`event_from_row` over :data:`JOB_EVENT_COLUMNS`),
so the columns an event is made of are spelled once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypedDict, Unpack

import asyncpg
from redis.asyncio import Redis

from app.core.db import Queryable
from app.core.logging import get_logger
from app.core.outage import is_redis_outage
from app.jobs.events import publish_event
from app.jobs.model import TERMINAL_STATUSES, JobStatus, ProgressEvent, RunOutcome, Stage

log = get_logger(__name__)

JOB_EVENT_COLUMNS = """
    id::text AS job_id, seq, status, stage, stage_progress, overall_progress, message,
    extract(epoch FROM updated_at)::float8 AS ts, owner_id, document_id::text AS document_id,
    error_code, error_message
"""
"""The ``jobs`` columns a :class:`ProgressEvent` is built from (:func:`event_from_row`);
select them from ``jobs`` unaliased."""


def event_from_row(
    row: asyncpg.Record | Mapping[str, Any], details: dict[str, Any] | None = None
) -> ProgressEvent:
    """Build the event (or snapshot) for a row selected with :data:`JOB_EVENT_COLUMNS`."""
    return ProgressEvent(
        job_id=row["job_id"],
        seq=row["seq"],
        status=JobStatus(row["status"]),
        stage=None if row["stage"] is None else Stage(row["stage"]),
        stage_progress=round(float(row["stage_progress"]), 4),
        overall_progress=round(float(row["overall_progress"]), 4),
        message=row["message"],
        ts=row["ts"],
        owner_id=row["owner_id"],
        document_id=row["document_id"],
        error_code=row["error_code"],
        error_message=row["error_message"],
        details=details or {},
    )


async def job_snapshot(db: Queryable, job_id: str) -> ProgressEvent | None:
    """The job's current state as an event (not published), or None if unknown."""
    row = await db.fetchrow(f"SELECT {JOB_EVENT_COLUMNS} FROM jobs WHERE id = $1::uuid", job_id)
    return event_from_row(row) if row is not None else None


async def job_snapshots(db: Queryable, job_ids: Collection[str]) -> dict[str, ProgressEvent]:
    """Current states of the existing jobs among ``job_ids`` (any owner), by id, in one query.

    Every id must be a valid UUID.
    """
    rows = await db.fetch(
        f"SELECT {JOB_EVENT_COLUMNS} FROM jobs WHERE id = ANY($1::uuid[])", list(job_ids)
    )
    return {row["job_id"]: event_from_row(row) for row in rows}


class Change(TypedDict, total=False):
    """The fields of one state change; a field left out keeps its current value."""

    status: JobStatus
    stage: str
    stage_progress: float
    overall_progress: float
    message: str
    error_code: str
    error_message: str
    details: dict[str, Any]
    """Sent with the event only (not stored)."""
    only_if_status: Collection[str]
    """Apply the change only while the job is in one of these statuses."""


async def _write(
    db: Queryable,
    job_id: str,
    *,
    status: JobStatus | None = None,
    stage: str | None = None,
    stage_progress: float | None = None,
    overall_progress: float | None = None,
    message: str | None = None,
    error_code: str | None = None,
    error_message: str | None = None,
    details: dict[str, Any] | None = None,
    only_if_status: Collection[str] | None = None,
) -> ProgressEvent | None:
    """Write one state change (not published); the event, or None if nothing changed.

    Fields left as ``None`` keep their current value.  With ``only_if_status``
    the change applies only while the job is in one of those statuses (so a
    late progress report cannot resurrect a cancelled job).  Every write bumps
    ``seq``, so sequence numbers only grow and agree with the table.
    """
    terminal = status is not None and status in TERMINAL_STATUSES
    row = await db.fetchrow(
        f"""
        UPDATE jobs SET
            status = COALESCE($2, status),
            stage = COALESCE($3, stage),
            stage_progress = COALESCE($4, stage_progress),
            overall_progress = COALESCE($5, overall_progress),
            message = COALESCE($6, message),
            error_code = COALESCE($7, error_code),
            error_message = COALESCE($8, error_message),
            started_at = CASE WHEN $2 = 'running' THEN COALESCE(started_at, now())
                              ELSE started_at END,
            queued_at = CASE WHEN $2 = 'queued' THEN COALESCE(queued_at, now()) ELSE queued_at END,
            finished_at = CASE WHEN $9 THEN now() ELSE finished_at END,
            seq = seq + 1,
            updated_at = clock_timestamp()
        WHERE id = $1::uuid AND ($10::text[] IS NULL OR status = ANY($10::text[]))
        RETURNING {JOB_EVENT_COLUMNS}
        """,
        job_id,
        None if status is None else str(status),
        None if stage is None else str(stage),
        stage_progress,
        overall_progress,
        message,
        error_code,
        error_message,
        terminal,
        None if only_if_status is None else [str(s) for s in only_if_status],
    )
    return None if row is None else event_from_row(row, details)


async def publish_events(redis: Redis | None, events: Collection[ProgressEvent]) -> None:
    """Publish recorded events in order; failures are logged (the table holds the truth)."""
    if redis is None:
        return
    for event in events:
        try:
            await publish_event(redis, event)
        except Exception as exc:
            log.warning(
                "event_publish_failed",
                job_id=event.job_id,
                seq=event.seq,
                exc_info=not is_redis_outage(exc),  # an outage needs no traceback
            )


class JobChanges:
    """Job state changes recorded on one connection's open transaction.

    Invariant: nothing is published before :meth:`publish`, which the owner of
    the transaction calls after it commits (and skips if it rolled back).
    """

    def __init__(self, conn: Queryable) -> None:
        self.conn = conn
        self.events: list[ProgressEvent] = []

    async def record(self, job_id: str, **change: Unpack[Change]) -> ProgressEvent | None:
        """Write one change (see :class:`Change` for the fields); None if skipped."""
        event = await _write(self.conn, job_id, **change)
        if event is not None:
            self.events.append(event)
        return event

    async def publish(self, redis: Redis | None) -> None:
        """Send the recorded events; call only after the transaction committed."""
        events, self.events = self.events, []
        await publish_events(redis, events)


@asynccontextmanager
async def job_transaction(pool: asyncpg.Pool, redis: Redis | None) -> AsyncIterator[JobChanges]:
    """A transaction whose job changes are published once it commits.

    If the block raises, the transaction rolls back and nothing is published.
    """
    async with pool.acquire() as conn:
        async with conn.transaction():
            changes = JobChanges(conn)
            yield changes
        await changes.publish(redis)


async def change_job(
    db: Queryable, redis: Redis | None, job_id: str, **change: Unpack[Change]
) -> ProgressEvent | None:
    """One change in its own statement, published at once; None if skipped.

    ``db`` must not be inside a transaction the caller will still roll back:
    use :class:`JobChanges` there.
    """
    event = await _write(db, job_id, **change)
    if event is not None:
        await publish_events(redis, [event])
    return event


# -- the execution ledger ------------------------------------------------------------------


async def start_run(
    db: Queryable, job_id: str, *, attempt: int, worker_id: str, lease_token: str
) -> int:
    """Record that ``lease_token`` (of ``worker_id``) starts executing the job; the run's id.

    Call right after taking the job's lease.  A run of the job still open is
    closed ``lost`` in the same statement: taking the lease means its worker
    no longer holds it.
    """
    run_id = await db.fetchval(
        """
        WITH lost AS (
            UPDATE job_runs SET ended_at = clock_timestamp(), outcome = 'lost'
            WHERE job_id = $1::uuid AND ended_at IS NULL
        )
        INSERT INTO job_runs (job_id, attempt, worker_id, lease_token)
        VALUES ($1::uuid, $2, $3, $4) RETURNING id
        """,
        job_id,
        attempt,
        worker_id,
        lease_token,
    )
    return int(run_id)


async def end_run(db: Queryable, run_id: int | None, outcome: RunOutcome) -> None:
    """Close run ``run_id`` with ``outcome`` (in the transaction of the state it ended
    in); a run already closed (``lost``: someone took the lease over) keeps its outcome."""
    if run_id is None:
        return
    await db.execute(
        "UPDATE job_runs SET ended_at = clock_timestamp(), outcome = $2 "
        "WHERE id = $1 AND ended_at IS NULL",
        run_id,
        str(outcome),
    )


async def close_open_runs(db: Queryable, job_id: str) -> None:
    """Close the job's open runs as ``lost`` (its lease was just taken from a dead worker)."""
    await db.execute(
        "UPDATE job_runs SET ended_at = clock_timestamp(), outcome = 'lost' "
        "WHERE job_id = $1::uuid AND ended_at IS NULL",
        job_id,
    )
