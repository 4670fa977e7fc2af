"""Exactly once under concurrency (issue 12 item 3): identical documents processed at
the same moment are indexed once, and every execution is in the ``job_runs`` ledger.

Runs are real :class:`~workers.run.JobRun` attempts on the real stack and model,
started together with ``asyncio.gather`` so that both validate before either indexes.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from app.gateway.services import Services
from app.jobs.model import JobStatus, RunOutcome
from app.jobs.transitions import change_job, job_snapshot, start_run
from tests.fixtures_pipeline import (
    MadeJob,
    MakeJob,
    make_pdf,
    page_sentence,
    stream_events,
    wait_for_status,
)
from workers import lease
from workers.context import WorkerContext
from workers.endings import RetryLater
from workers.lease import reap_expired
from workers.run import JobRun, Outcome


def _pages(n: int) -> list[list[str]]:
    return [[" ".join(page_sentence(p, i) for i in range(12))] for p in range(1, n + 1)]


async def _attempt(ctx: WorkerContext, job_id: str) -> Outcome:
    """One attempt; a deferral (RetryLater) is reported as its outcome."""
    try:
        return await JobRun(ctx, job_id).run()
    except RetryLater as later:
        return later.outcome


async def _runs(services: Services, job: MadeJob) -> list[str]:
    rows = await services.db.fetch(
        "SELECT outcome FROM job_runs WHERE job_id = $1::uuid ORDER BY id", job.job_id
    )
    return [r["outcome"] for r in rows]


async def _doc(services: Services, job: MadeJob) -> dict[str, Any]:
    row = await services.db.fetchrow(
        "SELECT status, deduplicated_of::text AS dup, sha256, "
        "(SELECT count(*) FROM chunks WHERE document_id = d.id) AS chunks "
        "FROM documents d WHERE id = $1::uuid",
        job.document_id,
    )
    assert row is not None
    return dict(row)


async def test_two_identical_uploads_at_once_are_indexed_once(
    services: Services, worker_ctx: WorkerContext, make_job: MakeJob
) -> None:
    data = make_pdf(_pages(6))
    a, b = await make_job(data), await make_job(data)
    outcomes = await asyncio.gather(_attempt(worker_ctx, a.job_id), _attempt(worker_ctx, b.job_id))
    assert sorted(outcomes) == sorted([Outcome.COMPLETED, Outcome.DEFERRED]), outcomes
    first, second = (a, b) if outcomes[0] == Outcome.COMPLETED else (b, a)

    waiting = await services.db.fetchrow(
        "SELECT status, attempts, lease_owner, message FROM jobs WHERE id = $1::uuid",
        second.job_id,
    )
    assert waiting is not None
    assert waiting["status"] == JobStatus.QUEUED and waiting["attempts"] == 0  # not charged
    assert waiting["lease_owner"] is None and first.job_id in waiting["message"]

    assert await _attempt(worker_ctx, second.job_id) == Outcome.DEDUPLICATED
    assert (await _doc(services, second))["dup"] == first.document_id
    assert (await _doc(services, second))["chunks"] == 0
    assert (await _doc(services, first))["chunks"] > 0
    assert await _runs(services, first) == [RunOutcome.COMPLETED]
    assert await _runs(services, second) == [RunOutcome.DEFERRED, RunOutcome.DEDUPLICATED]
    snap = await wait_for_status(services.db, second.job_id, {"completed"})
    assert "deduplicated" in snap.message


async def test_different_options_or_owners_are_not_held_back(
    services: Services, worker_ctx: WorkerContext, make_job: MakeJob, user: str
) -> None:
    data = f"{page_sentence(1, 1)} {page_sentence(1, 2)}".encode()
    jobs = [
        await make_job(data, "txt"),
        await make_job(data, "txt", options={"chunk_size": 64, "chunk_overlap": 8}),
        await make_job(data, "txt", owner=f"{user}-b"),
    ]
    outcomes = await asyncio.gather(*(_attempt(worker_ctx, j.job_id) for j in jobs))
    assert outcomes == [Outcome.COMPLETED] * 3


async def test_a_dead_first_job_holds_the_second_back_only_until_it_is_reaped(
    services: Services, worker_ctx: WorkerContext, make_job: MakeJob
) -> None:
    """The first job's worker died mid-run (its lease taken, its content claimed,
    then silence): the second waits until the reaper ends the dead run, then
    processes the document itself; the first, run again, ends as its duplicate."""
    data = f"{page_sentence(2, 1)} {page_sentence(2, 2)} dead first".encode()
    dead, second = await make_job(data, "txt"), await make_job(data, "txt")
    token = "dead-worker-7:0000"
    row = await lease.acquire(services.db, dead.job_id, token, 1.0)
    assert row is not None
    await start_run(
        services.db, dead.job_id, attempt=1, worker_id="dead-worker-7", lease_token=token
    )
    await change_job(services.db, None, dead.job_id, status=JobStatus.RUNNING)
    sha = await services.db.fetchval(
        "UPDATE documents SET sha256 = encode(sha256($2::bytea), 'hex') "
        "WHERE id = $1::uuid RETURNING sha256",
        dead.document_id,
        data,
    )
    assert sha

    assert await _attempt(worker_ctx, second.job_id) == Outcome.DEFERRED
    await asyncio.sleep(1.2)  # the dead lease lapses
    assert dead.job_id in await reap_expired(worker_ctx)
    assert await _attempt(worker_ctx, second.job_id) == Outcome.COMPLETED
    assert await _attempt(worker_ctx, dead.job_id) == Outcome.DEDUPLICATED
    assert (await _doc(services, dead))["dup"] == second.document_id
    assert await _runs(services, dead) == [RunOutcome.LOST, RunOutcome.DEDUPLICATED]
    assert await _runs(services, second) == [RunOutcome.DEFERRED, RunOutcome.COMPLETED]


async def test_the_ledger_records_each_execution_with_its_worker_and_attempt(
    services: Services, worker_ctx: WorkerContext, make_job: MakeJob
) -> None:
    job = await make_job(b"short note about ledgers", "txt")
    assert await _attempt(worker_ctx, job.job_id) == Outcome.COMPLETED
    assert await _attempt(worker_ctx, job.job_id) == Outcome.SKIPPED  # finished: not taken
    rows = await services.db.fetch(
        "SELECT attempt, worker_id, lease_token, outcome, ended_at >= started_at AS ordered "
        "FROM job_runs WHERE job_id = $1::uuid",
        job.job_id,
    )
    assert [dict(r) for r in rows] == [
        {
            "attempt": 1,
            "worker_id": worker_ctx.worker_id,
            "lease_token": rows[0]["lease_token"],
            "outcome": "completed",
            "ordered": True,
        }
    ]
    assert rows[0]["lease_token"].startswith(f"{worker_ctx.worker_id}:")


async def test_a_job_whose_cancel_came_before_it_started_is_cancelled_never_running(
    services: Services, worker_ctx: WorkerContext, make_job: MakeJob
) -> None:
    """Taking the lease, opening the run and marking the job ``running`` are one
    statement; a cancel asked for before that ends the job without it ever running."""
    job = await make_job(b"cancelled before it started", "txt")
    await services.db.execute(
        "UPDATE jobs SET cancel_requested = true WHERE id = $1::uuid", job.job_id
    )
    assert await _attempt(worker_ctx, job.job_id) == Outcome.CANCELLED
    assert await _runs(services, job) == ["cancelled"]
    events = await stream_events(services.redis, job.job_id)
    assert [e.status for e in events] == ["cancelled"]
    row = await services.db.fetchrow(
        "SELECT j.status, j.attempts, j.started_at, j.lease_owner, d.status AS doc "
        "FROM jobs j JOIN documents d ON d.id = j.document_id WHERE j.id = $1::uuid",
        job.job_id,
    )
    assert row is not None
    assert (row["status"], row["attempts"], row["started_at"], row["lease_owner"]) == (
        "cancelled",
        1,
        None,
        None,
    )
    assert row["doc"] != "processing"


async def test_a_run_resumed_past_its_claim_does_not_index_a_second_copy(
    services: Services, worker_ctx: WorkerContext, make_job: MakeJob
) -> None:
    """B claims and gets as far as embedding, then its worker stops (the job is handed
    back, its checkpoints kept); A, identical, is indexed meanwhile.  B's next run
    resumes after validate (so after the claim) and must end as A's duplicate."""
    data = make_pdf(_pages(30))
    options = {"chunk_size": 24, "chunk_overlap": 4}
    b, a = await make_job(data, options=options), await make_job(data, options=options)
    run_b = asyncio.create_task(JobRun(worker_ctx, b.job_id).run())
    deadline = asyncio.get_running_loop().time() + 60
    while (snap := await job_snapshot(services.db, b.job_id)) is None or snap.stage != "embed":
        assert asyncio.get_running_loop().time() < deadline, snap
        await asyncio.sleep(0.02)
    run_b.cancel()  # what a worker's shutdown does to a running job
    with contextlib.suppress(asyncio.CancelledError):
        await run_b
    assert (await wait_for_status(services.db, b.job_id, {"queued"})).status == "queued"

    assert await _attempt(worker_ctx, a.job_id) == Outcome.COMPLETED
    assert await _attempt(worker_ctx, b.job_id) == Outcome.DEDUPLICATED
    assert (await _doc(services, b))["dup"] == a.document_id
    assert (await _doc(services, b))["chunks"] == 0
    assert await _runs(services, b) == [RunOutcome.REQUEUED, RunOutcome.DEDUPLICATED]


async def test_a_start_whose_reply_was_lost_is_taken_up_not_counted_twice(
    services: Services, make_job: MakeJob
) -> None:
    """Postgres can go between a start's commit and its reply: the worker then
    waits the outage out and takes up its own start (same attempt, same ledger
    run, the ``running`` event rebuilt for it to publish) instead of starting
    again, which would count a second attempt for one execution."""
    job = await make_job(b"A start whose reply never came. " * 4, "txt")
    token = "lost-reply-worker:0001"
    assert await lease.started_by(services.db, job.job_id, token) is None  # nothing yet
    first = await lease.start(
        services.db, job.job_id, token, 30, worker_id="lost-reply-worker", max_attempts=3
    )
    assert first is not None and first.event is not None
    again = await lease.started_by(services.db, job.job_id, token)
    assert again is not None and again.run_id == first.run_id
    assert again.row["attempts"] == first.row["attempts"] == 1
    assert again.event is not None and again.event.status == "running"
    assert again.event.seq == first.event.seq
    assert await lease.started_by(services.db, job.job_id, "another-worker:0002") is None
    runs = await services.db.fetchval(
        "SELECT count(*) FROM job_runs WHERE job_id = $1::uuid", job.job_id
    )
    assert runs == 1
