"""The job function: one attempt's lifecycle, from taking the lease to its ending.

:func:`process_document` is what ARQ runs.  For one attempt, :class:`JobRun`

1. takes the job's lease (``workers/lease.py``), opening its run in the
   ledger and making it ``running``, in one statement (:func:`workers.lease.start`);
   a job that is no longer waiting (cancelled, finished, or running under a
   live lease elsewhere) is skipped, so a duplicate delivery never runs a job twice;
2. renews the lease in the background and runs the steps
   (``workers/steps.py``) under the ``MAX_PROCESSING_TIME_MINUTES`` bound;
   the steps record progress and check for cancellation (and for a lost lease)
   at every stage, page and batch boundary, and once more under a row lock
   right before the index commit;
3. rides out a Postgres or S3 outage without spending an attempt
   (``workers/outages.py``): the job waits until the dependency answers,
   renews its lease and runs the steps again from their checkpoints
   (``workers/checkpoints.py``); a final state that could not be written is
   written once the database is back;
4. ends (``workers/endings.py``): completed by the index step (or as a
   duplicate; while an identical document is being processed, handed back
   unspent to look again shortly: ``workers/dedup.py``); ``cancelled``
   once a cancel was seen (its partial outputs removed); on
   :class:`~app.core.errors.TransientError` (or a bug) retried with exponential
   backoff (ARQ ``Retry``, the priority offset re-applied) up to
   ``TASK_RETRY_MAX_ATTEMPTS``; on :class:`~app.core.errors.PermanentError`
   failed at once; on shutdown handed back to the queue without spending an
   attempt.

Every job state change goes through :mod:`app.jobs.transitions`, and so does
the execution ledger: a run is opened with the lease and closed with the
ending's transaction (``job_runs``).  The
invariants of progress and timings are stated in ``workers/attempt.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import structlog
from arq import Retry

from app.core.errors import CancelRequested, PermanentError, TransientError
from app.core.logging import get_logger
from app.core.outage import is_database_outage, is_storage_outage
from app.jobs.model import RunOutcome
from app.jobs.transitions import end_run, publish_events
from workers import lease
from workers.attempt import Attempt, Outcome
from workers.context import WorkerContext
from workers.endings import (
    DuplicateRunning,
    RetryLater,
    defer_for_duplicate,
    finish_cancelled,
    finish_failed,
    release_for_shutdown,
    retry_or_fail,
)
from workers.lease import LeaseLost
from workers.outages import Backoff, await_database, await_storage
from workers.steps import run_stages

__all__ = ["JobRun", "Outcome", "RetryLater", "process_document"]

log = get_logger("sluice.worker.pipeline")

OUTAGE_RETRY_SECONDS = 5.0
"""Postgres unreachable before the job was taken: ARQ retries it this much later."""


class JobRun:
    """One attempt at one job: :meth:`run` it once."""

    def __init__(self, ctx: WorkerContext, job_id: str) -> None:
        self.ctx = ctx
        self.job_id = job_id
        self.attempt = Attempt(ctx, job_id)
        self._storage_backoff = Backoff()
        """Between S3 probes; it keeps growing across the outages of one run."""

    async def run(self) -> Outcome:
        """Take the lease, run the steps under the time bound, end the attempt."""
        try:
            early = await self._start()
            if early is not None:
                return early
            outcome = await self._run_started()
            if outcome is Outcome.LEASE_LOST:  # unless its new owner closed it already
                await end_run(self.ctx.db, self.attempt.run_id, RunOutcome.LOST)
            return outcome
        finally:
            structlog.contextvars.unbind_contextvars("job_id", "attempt")

    async def _start(self) -> Outcome | None:
        """Take the lease and record the start; the outcome if the attempt ends there.

        One statement (:func:`workers.lease.start`): lease, ledger run and the
        ``running`` state; its event is published once it has committed."""
        ctx, attempt = self.ctx, self.attempt
        try:
            started = await self._take()
        except Exception as exc:
            if not lease.reply_may_be_lost(exc):
                raise  # Postgres unreachable before the start was sent: hand the job back
            # The start may have committed before the connection went (its reply
            # lost): wait the outage out, then take up our own start if it did.
            await await_database(ctx, self.job_id, exc)
            started = await lease.started_by(ctx.db, self.job_id, attempt.token)
            if started is None:
                started = await self._take()
        if started is None:
            log.info("job_not_runnable", job_id=self.job_id)
            return Outcome.SKIPPED
        attempt.take(started.row)
        attempt.run_id = started.run_id
        structlog.contextvars.bind_contextvars(job_id=self.job_id, attempt=attempt.number)
        if started.event is None:  # a cancel was asked for before it started
            return await finish_cancelled(attempt, "cancelled before processing started")
        await publish_events(ctx.redis, [started.event])
        return None

    async def _take(self) -> lease.Started | None:
        ctx = self.ctx
        return await lease.start(
            ctx.db,
            self.job_id,
            self.attempt.token,
            ctx.lease_seconds,
            worker_id=ctx.worker_id,
            max_attempts=ctx.settings.task_retry_max_attempts,
        )

    async def _run_started(self) -> Outcome:
        ctx = self.ctx
        ctx.running.add(self.job_id)
        ctx.metrics.running.inc()
        work = asyncio.create_task(self._ride_outages(), name=f"job-{self.job_id}")
        renewer = asyncio.create_task(self._renew(work), name=f"lease-{self.job_id}")
        try:
            return await self._bounded(work)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self.attempt.lease_lost and current is not None and not current.cancelling():
                log.warning("lease_lost", job_id=self.job_id)
                return Outcome.LEASE_LOST
            await asyncio.shield(release_for_shutdown(self.attempt))
            raise
        except Exception as exc:
            return await self._end(exc)
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            ctx.running.discard(self.job_id)
            ctx.metrics.running.dec()
            self.attempt.cleanup_files()

    async def _bounded(self, work: asyncio.Task[Outcome]) -> Outcome:
        """``await work`` within ``MAX_PROCESSING_TIME_MINUTES`` (past it: a permanent error)."""
        limit = self.ctx.max_processing_seconds
        try:
            async with asyncio.timeout(limit) as deadline:
                return await work
        except TimeoutError:
            if not deadline.expired():
                raise
            raise PermanentError(
                f"processing took longer than {limit:g} s (MAX_PROCESSING_TIME_MINUTES)",
                code="processing_timeout",
                details={"limit_seconds": limit},
            ) from None

    async def _end(self, exc: Exception) -> Outcome:
        """The ending for what stopped the steps."""
        if isinstance(exc, LeaseLost):
            log.warning("lease_lost", job_id=self.job_id)
            return Outcome.LEASE_LOST
        if isinstance(exc, CancelRequested):
            return await finish_cancelled(self.attempt, "cancelled")
        if isinstance(exc, DuplicateRunning):
            return await defer_for_duplicate(self.attempt, exc)
        if isinstance(exc, PermanentError):
            return await finish_failed(self.attempt, exc)
        if isinstance(exc, TransientError):
            return await retry_or_fail(self.attempt, exc)
        # a bug or an unforeseen dependency failure
        log.error("job_crashed", job_id=self.job_id, exc_info=exc)
        return await retry_or_fail(
            self.attempt,
            TransientError(f"{type(exc).__name__}: {str(exc)[:300]}", code="internal_error"),
        )

    async def _ride_outages(self) -> Outcome:
        """The steps; a lost Postgres or S3 pauses them instead of failing the attempt.

        Once the database is back the lease is renewed (still ours: the reaper
        spared a worker whose heartbeat it saw) and the steps run again from
        their checkpoints, so nothing done is redone or written twice.
        """
        ctx, attempt = self.ctx, self.attempt
        resumed = False
        while True:
            try:
                if resumed:
                    if not await lease.renew(ctx.db, self.job_id, attempt.token, ctx.lease_seconds):
                        raise attempt.lost()
                    await attempt.check()
                return await run_stages(attempt)
            except Exception as exc:
                if attempt.database_rides.rides(exc):
                    await await_database(ctx, self.job_id, exc)
                elif is_storage_outage(exc):
                    await await_storage(
                        ctx, self.job_id, exc, check=attempt.check, backoff=self._storage_backoff
                    )
                else:
                    raise
                resumed = True

    async def _renew(self, work: asyncio.Task[Outcome]) -> None:
        """Renew the lease every third of it; cancel ``work`` once it is lost.

        Not once the attempt's final transaction has begun (a completion): that
        transaction releases the lease itself, and its own fence finds a lease
        truly lost, so a renewal that lands on its commit must not turn a
        completed job into a ``lease_lost`` outcome."""
        ctx, attempt = self.ctx, self.attempt
        interval = ctx.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            try:
                ok = await lease.renew(ctx.db, self.job_id, attempt.token, ctx.lease_seconds)
            except Exception as exc:  # Postgres briefly away: try again next tick
                outage = is_database_outage(exc)
                log.warning("lease_renew_failed", job_id=self.job_id, exc_info=not outage)
                continue
            if not ok:
                if not attempt.ending:
                    attempt.lease_lost = True
                    work.cancel()
                return


async def process_document(ctx: dict[str, Any], job_id: str) -> str:
    """The ARQ job function (registered as :data:`~app.core.queue.PROCESS_FUNCTION`)."""
    wctx: WorkerContext = ctx["sluice"]
    try:
        outcome = await JobRun(wctx, job_id).run()
    except RetryLater as retry:
        wctx.metrics.jobs.labels(retry.outcome).inc()
        raise Retry(defer=retry.defer_ms / 1000) from None
    except Exception as exc:
        if not is_database_outage(exc):
            raise
        # Postgres was away before the job was taken (or its start recorded):
        # leave it queued in ARQ; the table still says it is waiting.  Once due it
        # takes back its place (ARQ's score at pick-up: its priority and its age).
        log.warning("database_unavailable_job_deferred", job_id=job_id, error=type(exc).__name__)
        wctx.metrics.jobs.labels(Outcome.REQUEUED).inc()
        defer = OUTAGE_RETRY_SECONDS
        if isinstance(ctx.get("score"), int):
            defer = await wctx.queue.hand_back(job_id, ctx["score"], defer)
        raise Retry(defer=defer) from None
    wctx.metrics.jobs.labels(outcome).inc()
    return str(outcome)
