"""One attempt at one job: the state its steps and its ending share.

:class:`~workers.run.JobRun` makes an :class:`Attempt` for each delivery of a
job and hands it to every step (``workers/steps.py``) and to the ending
(``workers/endings.py``).  It holds the lease token, the document and what the
attempt has measured so far, and it is how a step writes the job while it runs:

* :meth:`Attempt.record` -- progress, through
  :func:`app.jobs.transitions.change_job`, only while the job is still
  ``running`` (:data:`~workers.lease.STILL_RUNNING`; otherwise a cancel or the reaper ended
  it, and the lease is lost);
* :meth:`Attempt.check` -- a stage, page or batch boundary: raises
  :class:`~app.core.errors.CancelRequested` once a cancel was asked for and
  :class:`~workers.lease.LeaseLost` once another worker owns the job.

Invariants: a job's ``overall_progress`` never decreases while it runs, also
across attempts (an attempt starts from the job's progress so far);
``stage_timings`` keeps every run of every stage, ``{stage: [seconds, ...]}``
oldest first: a stage run that finished is written at once
(:meth:`Attempt.stage_done`), one that failed is kept in
:attr:`Attempt.timings` and written by the attempt's ending (a stage skipped
thanks to a checkpoint adds nothing).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Awaitable
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import msgspec
from asyncpg.pool import PoolConnectionProxy

from app.core.errors import CancelRequested
from app.jobs.model import JobStatus, ProgressEvent, Stage
from app.jobs.transitions import change_job
from workers.context import WorkerContext
from workers.lease import STILL_RUNNING, LeaseLost
from workers.outages import DatabaseRides
from workers.stages.common import DocumentInfo

T = TypeVar("T")
Conn = asyncpg.Connection | PoolConnectionProxy

WAITING_OR_RUNNING = (JobStatus.QUEUED, JobStatus.RETRYING, JobStatus.RUNNING)
"""What an attempt may start from (``running``: a lapsed lease taken over), and
what it may end ``cancelled`` from."""
BOUNDARY_CHECK_SECONDS = 0.2
"""How stale a page/batch boundary's view of ``cancel_requested`` may be."""
DOCUMENT_FIELDS = tuple(f.name for f in msgspec.structs.fields(DocumentInfo))


class Outcome(StrEnum):
    """How one attempt ended (the ARQ job's result, and the ``outcome`` label of
    ``sluice_worker_jobs_total``)."""

    COMPLETED = "completed"
    DEDUPLICATED = "deduplicated"
    FAILED = "failed"
    CANCELLED = "cancelled"
    RETRYING = "retrying"
    DEFERRED = "deferred"
    """Handed back unspent: an identical document is being processed (``workers/dedup.py``)."""
    SKIPPED = "skipped"
    LEASE_LOST = "lease_lost"
    REQUEUED = "requeued"


def append_timings(param: str) -> str:
    """SQL ``SET`` item appending ``{stage: [seconds, ...]}`` (the parameter ``param``)
    to each stage's list of runs in ``stage_timings`` (a number left by an older
    version becomes a one-item list)."""
    return f"""stage_timings = stage_timings || (
        SELECT COALESCE(jsonb_object_agg(n.key,
                   CASE jsonb_typeof(stage_timings -> n.key)
                        WHEN 'array' THEN stage_timings -> n.key
                        WHEN 'number' THEN jsonb_build_array(stage_timings -> n.key)
                        ELSE '[]'::jsonb END || n.value), '{{}}'::jsonb)
        FROM jsonb_each({param}::jsonb) AS n)"""


class Attempt:
    """One attempt at one job (see the module docstring)."""

    def __init__(self, ctx: WorkerContext, job_id: str) -> None:
        self.ctx = ctx
        self.job_id = job_id
        self.token = f"{ctx.worker_id}:{uuid.uuid4().hex[:8]}"
        """The lease owner written in the job row: the fence of every write."""
        self.number = 0
        """The job's attempt count, this one included."""
        self.run_id: int | None = None
        """This execution's row in the ``job_runs`` ledger (once the lease is taken)."""
        self.priority = "normal"
        self.doc: DocumentInfo | None = None
        self.lease_lost = False
        self.ending = False
        """Set once the attempt's final transaction has begun: from then on the
        lease is released by that transaction, which fences itself."""
        self.warnings: list[dict[str, Any]] = []
        self.timings: dict[str, list[float]] = {}
        """Stage runs of this attempt not yet written to ``stage_timings``."""
        self.progress_floor = 0.0
        """The job's ``overall_progress`` so far: nothing recorded goes below it."""
        self._last_check = 0.0
        self.database_rides = DatabaseRides()
        """The database errors this attempt waits out instead of failing on."""

    def take(self, row: asyncpg.Record) -> None:
        """Adopt the job and document columns :func:`workers.lease.acquire` returned."""
        self.number, self.priority = row["attempts"], row["priority"]
        self.progress_floor = float(row["overall_progress"])
        self.doc = msgspec.convert({k: row[k] for k in DOCUMENT_FIELDS}, DocumentInfo)

    @property
    def document(self) -> DocumentInfo:
        """The document being processed (set once the lease is taken)."""
        assert self.doc is not None, "the lease has not been taken"
        return self.doc

    def lost(self) -> LeaseLost:
        """Note that the lease is gone; returns the exception to raise."""
        self.lease_lost = True
        return LeaseLost(self.job_id)

    # -- while running -------------------------------------------------------------------

    async def record(
        self, *, stage: Stage, stage_progress: float, overall_progress: float, message: str
    ) -> ProgressEvent:
        """Record (and publish) progress of the running job; never below the floor."""
        self.progress_floor = max(self.progress_floor, overall_progress)
        event = await change_job(
            self.ctx.db,
            self.ctx.redis,
            self.job_id,
            stage=stage,
            stage_progress=stage_progress,
            overall_progress=self.progress_floor,
            message=message,
            only_if_status=STILL_RUNNING,
        )
        if event is None:  # no longer running: the reaper or a cancel got it
            raise self.lost()
        return event

    async def check(self, *, force: bool = True) -> None:
        """Stage/batch boundary: stop if cancelled or if our lease is gone.

        Page and batch boundaries (``force=False``) look at the table at most
        every :data:`BOUNDARY_CHECK_SECONDS`; stage boundaries always do.
        """
        if self.lease_lost:
            raise LeaseLost(self.job_id)
        now = time.monotonic()
        if not force and now - self._last_check < BOUNDARY_CHECK_SECONDS:
            return
        self._last_check = now
        await self.verify(self.ctx.db, lock=False)

    async def verify(self, db: Conn | asyncpg.Pool, *, lock: bool) -> None:
        """Raise unless this worker still holds the lease and nobody asked to cancel;
        with ``lock`` (the fence of a final transaction), also hold the job row
        until ``db``'s transaction ends."""
        row = await db.fetchrow(
            "SELECT cancel_requested, lease_owner, status FROM jobs WHERE id = $1::uuid"
            + (" FOR UPDATE" if lock else ""),
            self.job_id,
        )
        if row is None or row["lease_owner"] != self.token or row["status"] != JobStatus.RUNNING:
            raise self.lost()
        if row["cancel_requested"]:
            raise CancelRequested("cancelled by request")

    # -- stage timings -------------------------------------------------------------------

    async def stage_done(self, stage: Stage, seconds: float) -> None:
        """A stage run finished: observed, and appended to ``stage_timings`` at once."""
        self.ctx.metrics.stage_seconds.labels(str(stage)).observe(seconds)
        await self.ctx.db.execute(
            f"UPDATE jobs SET {append_timings('$2')} WHERE id = $1::uuid",
            self.job_id,
            {str(stage): [round(seconds, 4)]},
        )

    def stage_failed(self, stage: Stage, seconds: float) -> None:
        """A stage run that ended in an error still counts: kept until the attempt's
        ending (failed, retrying, cancelled) writes it with the rest."""
        self.timings.setdefault(str(stage), []).append(round(seconds, 4))

    async def timed(self, stage: Stage, work: Awaitable[T]) -> T:
        """``await work``, timed as one run of ``stage``."""
        started = time.perf_counter()
        try:
            result = await work
        except Exception:
            self.stage_failed(stage, time.perf_counter() - started)
            raise
        await self.stage_done(stage, time.perf_counter() - started)
        return result

    # -- files ---------------------------------------------------------------------------

    def tmp_path(self) -> Path:
        """Where this attempt downloads the document (removed when it ends)."""
        return self.ctx.tmp_dir / f"{self.job_id}-{self.token.rsplit(':', 1)[-1]}.bin"

    def cleanup_files(self) -> None:
        with contextlib.suppress(OSError):
            self.tmp_path().unlink(missing_ok=True)
