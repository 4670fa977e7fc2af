"""The seams of one attempt: its checkpoints, its lease renewal, its metrics.

:func:`~workers.checkpoints.checkpointed` is how a step's output survives its
attempt: produced once and stored, handed back (with the job's progress moved
to the stage's end) to every later run, never stored when the step ended the
job, produced again when what is stored cannot be read.  Every save is fenced
by the lease.  A lease renewal that lands on the attempt's own final commit
does not turn the completed job into a lost lease.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from app.jobs.model import JobStatus, Stage
from app.jobs.transitions import JobChanges, change_job, job_snapshot
from tests import fixtures_pipeline as fx
from tests.fixtures_pipeline import MakeJob
from workers import endings, lease
from workers.attempt import WAITING_OR_RUNNING, Attempt
from workers.checkpoints import checkpointed, load, save
from workers.context import WorkerContext, WorkerMetrics
from workers.parse import Parsed
from workers.progress import stage_end
from workers.run import JobRun, Outcome

embedder = fx.embedder
make_job = fx.make_job
worker_ctx = fx.worker_ctx

PARSED = Parsed(chunks=[], warnings=[{"code": "page_extract_failed", "page": 2}], pages=3, chars=9)


async def running_attempt(ctx: WorkerContext, make_job: MakeJob) -> Attempt:
    """An attempt holding the lease of a fresh job that is ``running``."""
    job = await make_job(b"%PDF-1.4 not processed here", store=False)
    attempt = Attempt(ctx, job.job_id)
    row = await lease.acquire(ctx.db, job.job_id, attempt.token, ctx.lease_seconds)
    assert row is not None
    attempt.take(row)
    started = await change_job(
        ctx.db, None, job.job_id, status=JobStatus.RUNNING, only_if_status=WAITING_OR_RUNNING
    )
    assert started is not None
    return attempt


async def test_checkpointed_produces_once_and_hands_the_output_back_later(
    worker_ctx: WorkerContext, make_job: MakeJob
) -> None:
    attempt = await running_attempt(worker_ctx, make_job)
    produced: list[Parsed] = []

    async def produce() -> Parsed:
        produced.append(PARSED)
        return PARSED

    first = await checkpointed(attempt, Stage.CHUNK, Parsed, produce, resumed="resumed")
    assert first == PARSED and len(produced) == 1
    assert set(await load(attempt, Stage.CHUNK)) == {0}

    async def must_not_run() -> Parsed:
        raise AssertionError("the stored output was produced again")

    again = await checkpointed(attempt, Stage.CHUNK, Parsed, must_not_run, resumed="resumed")
    assert again == PARSED
    snap = await job_snapshot(worker_ctx.db, attempt.job_id)
    assert snap is not None
    assert (snap.stage, snap.stage_progress, snap.message) == ("chunk", 1.0, "resumed")
    assert snap.overall_progress == pytest.approx(stage_end(Stage.CHUNK))


async def test_checkpointed_stores_nothing_when_the_step_ended_the_job(
    worker_ctx: WorkerContext, make_job: MakeJob
) -> None:
    attempt = await running_attempt(worker_ctx, make_job)

    async def ended() -> Parsed | None:
        return None

    assert await checkpointed(attempt, Stage.CHUNK, Parsed, ended, resumed="resumed") is None
    assert await load(attempt, Stage.CHUNK) == {}


async def test_an_unreadable_checkpoint_is_produced_again_and_replaced(
    worker_ctx: WorkerContext, make_job: MakeJob
) -> None:
    attempt = await running_attempt(worker_ctx, make_job)
    await save(attempt, Stage.CHUNK, 0, b"\xc1 an older format")

    async def produce() -> Parsed:
        return PARSED

    assert await checkpointed(attempt, Stage.CHUNK, Parsed, produce, resumed="r") == PARSED

    async def must_not_run() -> Parsed:
        raise AssertionError("the replaced output was produced again")

    assert await checkpointed(attempt, Stage.CHUNK, Parsed, must_not_run, resumed="r") == PARSED


async def test_a_worker_without_the_lease_saves_nothing(
    worker_ctx: WorkerContext, make_job: MakeJob
) -> None:
    attempt = await running_attempt(worker_ctx, make_job)
    stranger = Attempt(worker_ctx, attempt.job_id)  # another token: not the lease owner
    await save(stranger, Stage.EMBED, 0, b"vectors")
    assert await load(attempt, Stage.EMBED) == {}
    await save(attempt, Stage.EMBED, 0, b"vectors")
    assert await load(attempt, Stage.EMBED) == {0: b"vectors"}


def test_worker_metrics_are_registered_once_per_registry() -> None:
    """The process builds one :class:`WorkerMetrics` on its registry; a second one
    on the same registry fails loudly instead of splitting the counts."""
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    metrics.jobs.labels("completed").inc()
    assert registry.get_sample_value("sluice_worker_jobs_total", {"outcome": "completed"}) == 1
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        WorkerMetrics(registry)


async def test_a_renewal_after_the_final_commit_keeps_the_completion(
    worker_ctx: WorkerContext, make_job: MakeJob, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A renewal tick that comes after the index transaction committed (here: while
    its events are published) finds the lease released -- by this very attempt,
    which completed the job: the attempt still ends ``completed``."""
    job = await make_job(b"A short note about lease renewals. " * 8, "txt")

    class SlowPublish(JobChanges):
        async def publish(self, redis: Any) -> None:
            await asyncio.sleep(worker_ctx.lease_seconds / 3 * 1.5)  # a renewal tick lands here
            await super().publish(redis)

    monkeypatch.setattr(endings, "JobChanges", SlowPublish)
    assert await JobRun(worker_ctx, job.job_id).run() == Outcome.COMPLETED
    snap = await job_snapshot(worker_ctx.db, job.job_id)
    assert snap is not None and snap.status == JobStatus.COMPLETED
