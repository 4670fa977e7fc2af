"""Retried jobs wait out their backoff, then rank as their priority says.

The production worker class (:class:`workers.runtime.SluiceWorker`, woken on
enqueue or on ARQ's own poll loop) runs in-process on the real Redis with a
recording job function that retries the way ``workers/endings.py`` does
(:meth:`~app.core.queue.JobQueue.schedule_retry`, then ``Retry(defer=...)``),
each test on its own queue.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from arq import Retry
from arq.constants import in_progress_key_prefix
from arq.worker import func

from app.core.db import create_pool
from app.core.promotion import QueuePoller, promote_key, rank_key
from app.core.queue import HOUR_MS, PROCESS_FUNCTION, JobQueue, Priority
from app.core.settings import Settings
from app.gateway.services import Services
from devstack.process import free_port
from workers.context import WorkerContext
from workers.run import OUTAGE_RETRY_SECONDS, process_document
from workers.runtime import SluiceWorker

Log = list[tuple[str, float]]


async def _job(ctx: dict[str, Any], arq_id: str) -> None:
    # ARQ ids are global to the Redis server (``arq:job:<id>``): a test's ids carry its
    # queue name (``name@queue``) so no other test's leftover job can collide with them.
    job_id = arq_id.split("@", 1)[0]
    ctx["log"].append((job_id, time.time()))
    await asyncio.sleep(ctx["holds"].get(job_id, 0.0))
    retries = ctx["retries"]  # ARQ hands each job a copy of ctx: share through objects
    if retries.get(job_id):
        retries[job_id] -= 1
        queue: JobQueue = ctx["queue"]
        defer = await queue.schedule_retry(arq_id, ctx["priorities"][job_id], ctx["backoff"])
        raise Retry(defer=defer)


def _worker(
    services: Services,
    settings: Settings,
    qname: str,
    log: Log,
    *,
    wake: bool,
    priorities: dict[str, Priority],
    retries: dict[str, int],
    backoff: float,
    holds: dict[str, float] | None = None,
    max_jobs: int = 10,
) -> SluiceWorker:
    ctx = {
        "log": log,
        "queue": JobQueue(services.redis, queue_name=qname),
        "priorities": priorities,
        "retries": retries,
        "backoff": backoff,
        "holds": holds or {},
    }
    return SluiceWorker(
        functions=[func(_job, name=PROCESS_FUNCTION, max_tries=10)],
        queue_name=qname,
        redis_pool=services.redis,
        max_jobs=max_jobs,
        poll_delay=5.0 if wake else 0.05,  # woken: the fallback never decides the timing
        handle_signals=False,
        keep_result=0,
        ctx=ctx,
        wake_redis_url=settings.redis_url.reveal() if wake else None,
    )


@asynccontextmanager
async def _running(worker: SluiceWorker) -> AsyncIterator[None]:
    task = asyncio.create_task(worker.async_run())
    try:
        await asyncio.sleep(0.2)  # started, listening
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.gather(*worker.tasks.values(), return_exceptions=True)


async def _wait_for(log: Log, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(log) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.002)


@pytest.fixture
def qname() -> str:
    return f"test:retry:{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("priority", [Priority.NORMAL, Priority.HIGH, Priority.CRITICAL])
async def test_a_retried_job_starts_again_when_its_backoff_ends(
    services: Services, settings: Settings, qname: str, priority: Priority
) -> None:
    log: Log = []
    worker = _worker(
        services,
        settings,
        qname,
        log,
        wake=True,
        priorities={"flaky": priority},
        retries={"flaky": 1},
        backoff=1.0,
    )
    async with _running(worker):
        assert await JobQueue(services.redis, queue_name=qname).enqueue(f"flaky@{qname}", priority)
        await _wait_for(log, 2, timeout=5)
    assert [job for job, _ in log] == ["flaky", "flaky"]
    gap = log[1][1] - log[0][1]
    assert 1.0 - 0.01 <= gap < 1.0 + 0.3, gap
    # Promoted and gone from the promotion records.
    assert await services.redis.zcard(promote_key(qname)) == 0
    assert await services.redis.hlen(rank_key(qname)) == 0


@pytest.mark.parametrize("wake", [True, False], ids=["woken", "arq-loop"])
async def test_a_due_retried_critical_job_starts_before_an_older_low_job(
    services: Services, settings: Settings, qname: str, wake: bool
) -> None:
    """One slot: ``crit`` fails and retries after 0.3 s while ``blocker`` holds the
    slot for 1 s; when the slot frees, the due retry (ranked as a critical job
    enqueued at its ready time) goes before ``low``, which has waited longer."""
    log: Log = []
    priorities = {"low": Priority.LOW, "crit": Priority.CRITICAL, "blocker": Priority.HIGH}
    worker = _worker(
        services,
        settings,
        qname,
        log,
        wake=wake,
        priorities=priorities,
        retries={"crit": 1},
        backoff=0.3,
        holds={"blocker": 1.0},
        max_jobs=1,
    )
    queue = JobQueue(services.redis, queue_name=qname)
    for job_id in ("low", "crit", "blocker"):  # before the worker starts: all waiting
        assert await queue.enqueue(f"{job_id}@{qname}", priorities[job_id])
    async with _running(worker):
        await _wait_for(log, 4, timeout=8)
    assert [job for job, _ in log] == ["crit", "blocker", "crit", "low"]
    assert log[2][1] - log[0][1] >= 0.3 - 0.01  # the backoff held


async def test_arq_loop_worker_holds_the_backoff(
    services: Services, settings: Settings, qname: str
) -> None:
    log: Log = []
    worker = _worker(
        services,
        settings,
        qname,
        log,
        wake=False,
        priorities={"flaky": Priority.CRITICAL},
        retries={"flaky": 1},
        backoff=0.8,
    )
    async with _running(worker):
        assert await JobQueue(services.redis, queue_name=qname).enqueue(
            f"flaky@{qname}", Priority.CRITICAL
        )
        await _wait_for(log, 2, timeout=5)
    assert [job for job, _ in log] == ["flaky", "flaky"]
    gap = log[1][1] - log[0][1]
    assert 0.8 - 0.01 <= gap < 0.8 + 0.3, gap


async def test_promotion_leaves_running_and_vanished_jobs_alone(
    services: Services, qname: str
) -> None:
    """A due record of a job still being retried (in progress, ARQ's re-score not yet
    written) waits; one of a job that started without promotion, or that ARQ no
    longer holds, is dropped; a waiting one is promoted, never moved later."""
    redis, now_ms = services.redis, int(time.time() * 1000)
    queue = JobQueue(redis, queue_name=qname, clock=lambda: now_ms / 1000 - 1)
    for job_id in ("finishing", "started", "gone", "waiting"):
        await queue.schedule_retry(job_id, Priority.CRITICAL, 0.5)  # due at now - 0.5 s
    ready = now_ms - 500
    await redis.zadd(qname, {"finishing": ready - 5000, "started": ready + 10, "waiting": ready})
    for job_id in ("finishing", "started"):
        await redis.psetex(in_progress_key_prefix + job_id, 60_000, b"1")
    entries = await QueuePoller(redis, qname).read(now_ms, offset=0, limit=10)
    scores = {job.decode(): score for job, score in entries}
    assert scores == {
        "waiting": ready - 4 * HOUR_MS,
        "finishing": ready - 5000,
        "started": ready + 10,
    }
    remaining = await redis.zrange(promote_key(qname), 0, -1)
    assert remaining == [b"finishing"]
    assert await redis.hkeys(rank_key(qname)) == [b"finishing"]


async def _job_meeting_an_outage(ctx: dict[str, Any], arq_id: str) -> None:
    """``crit``'s first delivery goes through the real job function, whose Postgres is
    unreachable; every other delivery is recorded and holds its slot a while."""
    job_id = arq_id.split("@", 1)[0]
    ctx["log"].append((job_id, time.time()))
    if job_id == "crit" and not ctx["outages"]:
        ctx["outages"].append(arq_id)
        await process_document(ctx, arq_id)  # raises ARQ's Retry: handed back
    await asyncio.sleep(ctx["holds"].get(job_id, 0.0))


async def test_a_job_handed_back_by_a_postgres_outage_keeps_its_priority(
    services: Services, settings: Settings, worker_ctx: WorkerContext, qname: str
) -> None:
    """One slot.  ``crit`` (critical) reaches a worker whose Postgres is unreachable:
    it is handed back without an attempt and waits out the outage retry.  Meanwhile
    ``low`` waits and ``blocker`` (high) holds the slot until after ``crit`` is due;
    when the slot frees, ``crit`` goes first, at its own rank, not as a new ``low``
    job (which is what it was once the worker, without Postgres, lost its priority)."""
    log: Log = []
    redis = services.redis
    queue = JobQueue(redis, queue_name=qname)
    dead = await create_pool(f"postgresql://postgres@127.0.0.1:{free_port()}/x", min_size=0)
    ctx = {
        "log": log,
        "outages": [],
        "holds": {"blocker": OUTAGE_RETRY_SECONDS + 0.5},
        "sluice": dataclasses.replace(worker_ctx, db=dead, queue=queue),
    }
    worker = SluiceWorker(
        functions=[func(_job_meeting_an_outage, name=PROCESS_FUNCTION, max_tries=10)],
        queue_name=qname,
        redis_pool=redis,
        max_jobs=1,
        poll_delay=5.0,
        handle_signals=False,
        keep_result=0,
        ctx=ctx,
        wake_redis_url=settings.redis_url.reveal(),
    )
    crit = f"crit@{qname}"
    try:
        assert await queue.enqueue(crit, Priority.CRITICAL)
        crit_score = await redis.zscore(qname, crit)
        async with _running(worker):
            await _wait_for(log, 1, timeout=5)
            deadline = time.monotonic() + 5
            while await redis.zscore(qname, crit) == crit_score:  # ARQ's re-score landed
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            assert await redis.hget(rank_key(qname), crit) == str(int(crit_score)).encode()
            for job_id, priority in (("low", Priority.LOW), ("blocker", Priority.HIGH)):
                assert await queue.enqueue(f"{job_id}@{qname}", priority)
            await _wait_for(log, 4, timeout=OUTAGE_RETRY_SECONDS + 5)
    finally:
        await dead.close()
    assert [job for job, _ in log] == ["crit", "blocker", "crit", "low"]
    assert log[2][1] - log[0][1] >= OUTAGE_RETRY_SECONDS - 0.01  # it waited out the outage
