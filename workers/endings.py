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
* :func:`release_for_shutdown` -- ``queued`` again without spending an attempt;
* :func:`defer_for_duplicate` -- ``queued`` again without spending an attempt,
  retried shortly: an identical document is being processed (``workers/dedup.py``).

Each ending also closes the attempt's run in the execution ledger
(:func:`~app.jobs.transitions.end_run`) in the same transaction, with the
outcome it wrote, or ``lost`` if the job was no longer this attempt's.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from app.core.errors import SluiceError, TransientError
from app.core.logging import get_logger
from app.jobs.model import DocumentStatus, JobStatus, ProgressEvent, RunOutcome, Stage
from app.jobs.transitions import JobChanges, end_run
from workers import lease
from workers.attempt import WAITING_OR_RUNNING, Attempt, Conn, Outcome, append_timings
from workers.lease import STILL_RUNNING
from workers.outages import await_database

log = get_logger("sluice.worker.pipeline")

Commit = Callable[[Conn, JobChanges], Awaitable[ProgressEvent | None]]
"""One ending's writes, given the transaction's connection and its job changes."""


class RetryLater(Exception):
    """Internal: the attempt ended with a transient error (or waits for a duplicate,
    ``outcome`` DEFERRED); ARQ runs the job again after ``defer_ms``."""

    def __init__(self, defer_ms: int, outcome: Outcome = Outcome.RETRYING) -> None:
        super().__init__(defer_ms)
        self.defer_ms = defer_ms
        self.outcome = outcome


class DuplicateRunning(Exception):
    """Internal: a job of the same owner, sha256 and options is running; wait for it."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id


DUPLICATE_WAIT_SECONDS = (0.25, 4.0)
"""First and longest wait before a job looks again at the identical document being
processed (doubling with each wait, so that many copies waiting on one original
do not keep the fleet busy looking)."""


async def close_run(
    conn: Conn, attempt: Attempt, outcome: RunOutcome, event: ProgressEvent | None
) -> None:
    """Close the attempt's ledger run: ``outcome`` if its state change was written
    (``event``), else ``lost`` (the job was no longer this attempt's)."""
    await end_run(conn, attempt.run_id, outcome if event is not None else RunOutcome.LOST)


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
            if not (ride and attempt.database_rides.rides(exc)):
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
    outcome: RunOutcome = RunOutcome.COMPLETED,
) -> ProgressEvent | None:
    """Inside the final (fenced) transaction: release the run, record ``completed``
    (closing the ledger run with ``outcome``)."""
    await release(conn, attempt, warnings=attempt.warnings, result=result)
    event = await changes.record(
        attempt.job_id,
        status=JobStatus.COMPLETED,
        stage=Stage.INDEX,
        stage_progress=1.0,
        overall_progress=1.0,
        message=message,
        details={**result, **(details or {})},
        only_if_status=STILL_RUNNING,
    )
    await close_run(conn, attempt, outcome, event)
    return event


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
        await close_run(conn, attempt, RunOutcome.CANCELLED, event)
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
        await close_run(conn, attempt, RunOutcome.FAILED, event)
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
        event = await changes.record(
            attempt.job_id,
            status=JobStatus.RETRYING,
            message=f"{exc.message}; retry {attempt.number + 1} of {max_attempts} in {delay:.1f} s",
            details={"error_code": exc.code, "retry_in_seconds": round(delay, 2)},
            only_if_status=STILL_RUNNING,
        )
        await close_run(conn, attempt, RunOutcome.RETRYING, event)
        return event

    if await transition(attempt, commit) is None:
        return Outcome.LEASE_LOST
    log.info("job_retrying", job_id=attempt.job_id, code=exc.code, delay_s=round(delay, 2))
    defer_s = await ctx.queue.schedule_retry(attempt.job_id, attempt.priority, delay)
    raise RetryLater(int(defer_s * 1000))


async def _hand_back(
    conn: Conn, changes: JobChanges, attempt: Attempt, message: str, outcome: RunOutcome
) -> ProgressEvent | None:
    """Free the lease and make the job ``queued`` again, the attempt not counted."""
    released = await conn.fetchval(
        "UPDATE jobs SET lease_owner = NULL, lease_expires_at = NULL, "
        "attempts = greatest(attempts - 1, 0) "
        "WHERE id = $1::uuid AND lease_owner = $2 AND status = 'running' RETURNING true",
        attempt.job_id,
        attempt.token,
    )
    event = None
    if released:
        event = await changes.record(
            attempt.job_id, status=JobStatus.QUEUED, message=message, only_if_status=STILL_RUNNING
        )
    await close_run(conn, attempt, outcome, event)
    return event


async def release_for_shutdown(attempt: Attempt) -> None:
    """The worker is stopping: hand the job back without spending an attempt."""

    async def commit(conn: Conn, changes: JobChanges) -> ProgressEvent | None:
        message = "worker shutting down; job requeued"
        return await _hand_back(conn, changes, attempt, message, RunOutcome.REQUEUED)

    try:
        await transition(attempt, commit, ride=False)  # never hold up a shutdown
    except Exception:
        log.warning("release_failed", job_id=attempt.job_id, exc_info=True)


async def defer_for_duplicate(attempt: Attempt, running: DuplicateRunning) -> Outcome:
    """An identical document (same owner, sha256 and options) is being processed by
    job ``running.job_id``: hand the job back without spending an attempt and look
    again after :data:`DUPLICATE_WAIT_SECONDS` (then it ends deduplicated, or runs if
    the other one failed).  Raises :class:`RetryLater`; :attr:`Outcome.LEASE_LOST`
    if the job is no longer ours."""

    waits = 0

    async def commit(conn: Conn, changes: JobChanges) -> ProgressEvent | None:
        nonlocal waits
        waits = await conn.fetchval(
            "SELECT count(*) FROM job_runs WHERE job_id = $1::uuid AND outcome = 'deferred'",
            attempt.job_id,
        )
        message = f"waiting for job {running.job_id}, which is processing an identical document"
        return await _hand_back(conn, changes, attempt, message, RunOutcome.DEFERRED)

    if await transition(attempt, commit) is None:
        return Outcome.LEASE_LOST
    first, longest = DUPLICATE_WAIT_SECONDS
    delay = min(first * 2**waits, longest)
    log.info("job_deferred_for_duplicate", job_id=attempt.job_id, running=running.job_id)
    defer_s = await attempt.ctx.queue.schedule_retry(attempt.job_id, attempt.priority, delay)
    raise RetryLater(int(defer_s * 1000), Outcome.DEFERRED)
