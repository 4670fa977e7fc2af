"""How an attempt ends: the job's state after it, written in one transaction.

Every ending frees the lease, writes the stage runs not yet written
(:attr:`~workers.attempt.Attempt.timings`) and records the job's new state
through :class:`~app.jobs.transitions.JobChanges`, published once the
transaction has committed (:func:`transition`).  Each one re-checks the job's
state in its transaction (``only_if_status``, or the lease fence), so a
transaction run again after an outage, or a late ending of a job another
worker took over, changes nothing twice.

* :func:`complete` -- inside the final transaction of the index step or of a
  duplicate (``workers/steps.py``);
* :func:`finish_cancelled`, :func:`finish_failed` -- final; the document keeps
  ``indexed`` if it still has chunks of an earlier job;
* :func:`retry_or_fail` -- ``retrying`` with exponential backoff (ARQ retries
  it after :class:`RetryLater`'s delay; once due, a worker's poll restores its
  priority rank, ``app/core/promotion.py``), or
  ``failed`` once ``TASK_RETRY_MAX_ATTEMPTS`` are spent;
* :func:`release_for_shutdown` -- ``queued`` again without spending an attempt.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from app.core.errors import SluiceError, TransientError
from app.core.logging import get_logger
from app.core.outage import is_database_outage
from app.jobs.model import DocumentStatus, JobStatus, ProgressEvent, Stage
from app.jobs.transitions import JobChanges
from workers import lease
from workers.attempt import WAITING_OR_RUNNING, Attempt, Conn, Outcome, append_timings
from workers.lease import STILL_RUNNING
from workers.outages import await_database

log = get_logger("sluice.worker.pipeline")

Commit = Callable[[Conn, JobChanges], Awaitable[ProgressEvent | None]]
"""One ending's writes, given the transaction's connection and its job changes."""


class RetryLater(Exception):
    """Internal: the attempt ended with a transient error; retry after ``defer_ms``."""

    def __init__(self, defer_ms: int) -> None:
        super().__init__(defer_ms)
        self.defer_ms = defer_ms


async def transition(
    attempt: Attempt, commit: Commit, *, ride: bool = True
) -> ProgressEvent | None:
    """Run ``commit`` in a transaction; publish its job changes after the commit.

    With ``ride``, a lost Postgres is waited out and ``commit`` run again (it is
    one transaction: it either committed or did not, and each ``commit``
    re-checks the job's state under it).  Returns ``commit``'s event.
    """
    ctx = attempt.ctx
    attempt.ending = True
    while True:
        try:
            async with ctx.db.acquire() as conn, conn.transaction():
                changes = JobChanges(conn)
                event = await commit(conn, changes)
            break
        except Exception as exc:
            if not (ride and is_database_outage(exc)):
                raise
            await await_database(ctx, attempt.job_id, exc)
    await changes.publish(ctx.redis)
    return event


async def release(
    conn: Conn,
    attempt: Attempt,
    *,
    warnings: list[Any] | None = None,
    result: dict[str, Any] | None = None,
) -> None:
    """End this run inside the final transaction: free the lease, add the stage
    timings, write ``warnings``/``result`` where given, drop the checkpoints."""
    await conn.execute(
        f"""
        UPDATE jobs SET lease_owner = NULL, lease_expires_at = NULL,
               {append_timings("$2")},
               warnings = COALESCE($3::jsonb, warnings),
               result = COALESCE($4::jsonb, result)
        WHERE id = $1::uuid
        """,
        attempt.job_id,
        attempt.timings,
        warnings,
        result,
    )
    await conn.execute("DELETE FROM job_checkpoints WHERE job_id = $1::uuid", attempt.job_id)


async def complete(
    conn: Conn,
    changes: JobChanges,
    attempt: Attempt,
    *,
    result: dict[str, Any],
    message: str,
    details: dict[str, Any] | None = None,
) -> ProgressEvent | None:
    """Inside the final (fenced) transaction: release the run, record ``completed``."""
    await release(conn, attempt, warnings=attempt.warnings, result=result)
    return await changes.record(
        attempt.job_id,
        status=JobStatus.COMPLETED,
        stage=Stage.INDEX,
        stage_progress=1.0,
        overall_progress=1.0,
        message=message,
        details={**result, **(details or {})},
        only_if_status=STILL_RUNNING,
    )


async def finish_cancelled(attempt: Attempt, message: str) -> Outcome:
    async def commit(conn: Conn, changes: JobChanges) -> ProgressEvent | None:
        await release(conn, attempt)
        event = await changes.record(
            attempt.job_id,
            status=JobStatus.CANCELLED,
            message=message,
            only_if_status=WAITING_OR_RUNNING,
        )
        if event is not None and attempt.doc is not None:
            await lease.settle_document(conn, uuid.UUID(attempt.doc.id), DocumentStatus.CANCELLED)
        return event

    await transition(attempt, commit)
    return Outcome.CANCELLED


async def finish_failed(attempt: Attempt, exc: SluiceError) -> Outcome:
    async def commit(conn: Conn, changes: JobChanges) -> ProgressEvent | None:
        await release(conn, attempt, warnings=attempt.warnings)
        event = await changes.record(
            attempt.job_id,
            status=JobStatus.FAILED,
            error_code=exc.code,
            error_message=exc.message,
            message=f"failed: {exc.message}",
            details=exc.details,
            only_if_status=STILL_RUNNING,
        )
        if event is not None and attempt.doc is not None:
            await lease.settle_document(conn, uuid.UUID(attempt.doc.id), DocumentStatus.FAILED)
        return event

    log.info("job_failed", job_id=attempt.job_id, code=exc.code, error=exc.message)
    await transition(attempt, commit)
    return Outcome.FAILED


async def retry_or_fail(attempt: Attempt, exc: TransientError) -> Outcome:
    """``retrying`` (then raises :class:`RetryLater`), or ``failed`` once the
    attempts are spent; :attr:`Outcome.LEASE_LOST` if the job is no longer ours."""
    ctx = attempt.ctx
    max_attempts = ctx.settings.task_retry_max_attempts
    if attempt.number >= max_attempts:
        exc.message = f"{exc.message} (gave up after {attempt.number} attempts)"
        return await finish_failed(attempt, exc)
    delay = min(ctx.retry_base_seconds * 2 ** (attempt.number - 1), ctx.retry_max_seconds)
    delay *= random.uniform(0.8, 1.2)  # noqa: S311  (jitter, not crypto)

    async def commit(conn: Conn, changes: JobChanges) -> ProgressEvent | None:
        await conn.execute(
            "UPDATE jobs SET lease_owner = NULL, lease_expires_at = NULL, "
            f"{append_timings('$2')} WHERE id = $1::uuid",
            attempt.job_id,
            attempt.timings,
        )
        return await changes.record(
            attempt.job_id,
            status=JobStatus.RETRYING,
            message=f"{exc.message}; retry {attempt.number + 1} of {max_attempts} in {delay:.1f} s",
            details={"error_code": exc.code, "retry_in_seconds": round(delay, 2)},
            only_if_status=STILL_RUNNING,
        )

    if await transition(attempt, commit) is None:
        return Outcome.LEASE_LOST
    log.info("job_retrying", job_id=attempt.job_id, code=exc.code, delay_s=round(delay, 2))
    defer_s = await ctx.queue.schedule_retry(attempt.job_id, attempt.priority, delay)
    raise RetryLater(int(defer_s * 1000))


async def release_for_shutdown(attempt: Attempt) -> None:
    """The worker is stopping: hand the job back without spending an attempt."""

    async def commit(conn: Conn, changes: JobChanges) -> ProgressEvent | None:
        released = await conn.fetchval(
            "UPDATE jobs SET lease_owner = NULL, lease_expires_at = NULL, "
            "attempts = greatest(attempts - 1, 0) "
            "WHERE id = $1::uuid AND lease_owner = $2 AND status = 'running' RETURNING true",
            attempt.job_id,
            attempt.token,
        )
        if not released:
            return None
        return await changes.record(
            attempt.job_id,
            status=JobStatus.QUEUED,
            message="worker shutting down; job requeued",
            only_if_status=STILL_RUNNING,
        )

    try:
        await transition(attempt, commit, ride=False)  # never hold up a shutdown
    except Exception:
        log.warning("release_failed", job_id=attempt.job_id, exc_info=True)
