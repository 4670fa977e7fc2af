"""Priorities on ARQ, and the ARQ behaviours (traps) the design depends on.

Each test uses its own queue name (ARQ job keys are global, so job ids are
unique across tests too) on the real Redis and an in-process ARQ
worker running a recording job function, so order is observed directly.  The
``test_arq_*`` tests pin ARQ's own behaviour: if an ARQ upgrade changes it,
they fail and the workarounds in ``app/core/queue.py`` must be revisited.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from arq import Retry
from arq.connections import ArqRedis
from arq.constants import in_progress_key_prefix, job_key_prefix
from arq.worker import Worker, func
from redis.exceptions import ResponseError

from app.core.promotion import promote_key, rank_key
from app.core.queue import (
    HOUR_MS,
    JOB_EXPIRES,
    PROCESS_FUNCTION,
    JobQueue,
    Priority,
    read_limit_for,
)
from app.gateway.services import Services


async def _record(ctx: dict[str, Any], job_id: str) -> None:
    stats = ctx["stats"]  # ARQ hands each job a copy of ctx: share through an object
    ctx["order"].append(job_id)
    stats["running"] += 1
    stats["peak"] = max(stats["peak"], stats["running"])
    await asyncio.sleep(ctx.get("hold", 0))
    stats["running"] -= 1
    if ctx.get("retry_defer") is not None:
        raise Retry(defer=ctx["retry_defer"])


def _worker(redis: ArqRedis, queue: str, **kw: Any) -> Worker:
    ctx: dict[str, Any] = {"order": [], "stats": {"running": 0, "peak": 0}, **kw.pop("ctx", {})}
    options: dict[str, Any] = {
        "queue_name": queue,
        "redis_pool": redis,
        "burst": True,
        "max_jobs": 1,
        "poll_delay": 0.01,
        "handle_signals": False,
        "keep_result": 0,
        "ctx": ctx,
        **kw,
    }
    return Worker(functions=[func(_record, name=PROCESS_FUNCTION)], **options)


async def _run_for(worker: Worker, seconds: float, *, until: int | None = None) -> None:
    """Run a non-burst worker for ``seconds`` (or until it started ``until`` jobs)."""
    task = asyncio.create_task(worker.async_run())
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and (until is None or len(worker.ctx["order"]) < until):
        await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.gather(*worker.tasks.values(), return_exceptions=True)


@pytest.fixture
def qname() -> str:
    return f"test:queue:{uuid.uuid4().hex[:8]}"


@pytest.fixture
def queue(services: Services, qname: str) -> JobQueue:
    return JobQueue(services.redis, queue_name=qname)


async def test_critical_enqueued_after_50_low_starts_next(
    services: Services, queue: JobQueue, qname: str
) -> None:
    lows = [f"low-{i}" for i in range(50)]
    for job_id in lows:
        assert await queue.enqueue(job_id, Priority.LOW)
    assert await queue.enqueue("critical-1", Priority.CRITICAL)
    worker = _worker(services.redis, qname, max_jobs=1)
    await worker.async_run()
    assert worker.ctx["order"] == ["critical-1", *lows]


async def test_levels_start_highest_first_fifo_within_a_level(
    services: Services, queue: JobQueue, qname: str
) -> None:
    enqueued = []
    for i in range(5):
        for prio in (Priority.LOW, Priority.NORMAL, Priority.HIGH, Priority.CRITICAL):
            job_id = f"{prio}-{i}"
            enqueued.append((prio, job_id))
            assert await queue.enqueue(job_id, prio)
    worker = _worker(services.redis, qname)
    await worker.async_run()
    expected = [
        j
        for level in (Priority.CRITICAL, Priority.HIGH, Priority.NORMAL, Priority.LOW)
        for p, j in enqueued
        if p == level
    ]
    assert worker.ctx["order"] == expected


async def test_a_long_waiting_low_job_outranks_new_critical_jobs(
    services: Services, qname: str
) -> None:
    """Aging: a job ranks at enqueue time minus its level's offset (critical: 4 h)."""
    now = time.time()
    past = JobQueue(services.redis, queue_name=qname, clock=lambda: now - 4 * 3600 - 60)
    recent = JobQueue(services.redis, queue_name=qname, clock=lambda: now - 3 * 3600)
    current = JobQueue(services.redis, queue_name=qname)
    await past.enqueue("low-waited-4h1m", Priority.LOW)
    await recent.enqueue("low-waited-3h", Priority.LOW)
    await current.enqueue("critical-new", Priority.CRITICAL)
    await current.enqueue("normal-new", Priority.NORMAL)
    worker = _worker(services.redis, qname)
    await worker.async_run()
    assert worker.ctx["order"] == ["low-waited-4h1m", "critical-new", "low-waited-3h", "normal-new"]


async def test_a_job_id_is_enqueued_at_most_once(
    services: Services, queue: JobQueue, qname: str
) -> None:
    assert await queue.enqueue("dup", Priority.NORMAL) is True
    assert await queue.enqueue("dup", Priority.CRITICAL) is False
    assert await services.redis.zcard(qname) == 1
    worker = _worker(services.redis, qname)
    await worker.async_run()
    assert worker.ctx["order"] == ["dup"]
    # Workers keep no result (keep_result=0), so /retry can enqueue the id again.
    assert await queue.enqueue("dup", Priority.NORMAL) is True


async def test_max_concurrent_tasks_bounds_jobs_per_process(
    services: Services, queue: JobQueue, qname: str
) -> None:
    for i in range(6):
        await queue.enqueue(f"j{i}", Priority.NORMAL)
    worker = _worker(services.redis, qname, max_jobs=2, ctx={"hold": 0.1})
    await worker.async_run()
    assert len(worker.ctx["order"]) == 6
    assert worker.ctx["stats"]["peak"] == 2


async def test_abort_drops_a_waiting_job_unrun(
    services: Services, queue: JobQueue, qname: str
) -> None:
    await queue.enqueue("keep", Priority.NORMAL)
    await queue.enqueue("drop", Priority.NORMAL, delay_s=60)
    await queue.abort("drop")
    worker = _worker(services.redis, qname, allow_abort_jobs=True)
    await worker.async_run()
    assert worker.ctx["order"] == ["keep"]
    assert not await queue.is_queued("drop")


async def test_a_retry_waits_its_backoff_and_records_its_rank(
    services: Services, queue: JobQueue, qname: str
) -> None:
    """A retried critical job is scored at its ready time (so even a plain ARQ
    worker, which never promotes, waits out the backoff) and its priority's rank
    is recorded for the poll that finds it due."""
    await queue.enqueue("crit", Priority.CRITICAL)
    defer_s = await queue.schedule_retry("crit", Priority.CRITICAL, 5)
    assert defer_s == 5
    worker = _worker(services.redis, qname, max_burst_jobs=1, ctx={"retry_defer": defer_s})
    await worker.async_run()
    now_ms = time.time() * 1000
    score = await services.redis.zscore(qname, "crit")
    assert score is not None
    assert abs(score - (now_ms + 5000)) < 2000  # not before its backoff
    ready = await services.redis.zscore(promote_key(qname), "crit")
    assert ready is not None and abs(ready - (now_ms + 5000)) < 2000
    rank = await services.redis.hget(rank_key(qname), "crit")
    assert rank is not None and int(rank) == int(ready) - 4 * HOUR_MS


# --- ARQ behaviours the design relies on or works around ------------------------------


async def test_arq_retry_defer_drops_a_priority_offset(
    services: Services, queue: JobQueue, qname: str
) -> None:
    """ARQ re-scores a retried job as now + defer: a plain Retry loses the offset."""
    await queue.enqueue("crit-plain", Priority.CRITICAL)
    worker = _worker(services.redis, qname, max_burst_jobs=1, ctx={"retry_defer": 5})
    await worker.async_run()
    score = await services.redis.zscore(qname, "crit-plain")
    assert score is not None
    assert abs(score - (time.time() * 1000 + 5000)) < 2000


async def test_arq_expiry_follows_the_score(services: Services, qname: str) -> None:
    """ARQ #447: without ``_expires`` the job key TTL is score - now + 1 day."""
    redis = services.redis
    with pytest.raises(ResponseError):  # more than a day in the past: enqueue fails
        await redis.enqueue_job(
            PROCESS_FUNCTION,
            "a",
            _job_id=f"a-{qname}",
            _queue_name=qname,
            _defer_until=datetime.now(UTC) - timedelta(days=2),
        )
    await redis.enqueue_job(
        PROCESS_FUNCTION,
        "b",
        _job_id=f"b-{qname}",
        _queue_name=qname,
        _defer_until=datetime.now(UTC) - timedelta(hours=23),
    )
    assert await redis.pttl(job_key_prefix + f"b-{qname}") < 2 * HOUR_MS
    # Ours always pass _expires: a critical job (score 4 h back) keeps its full TTL.
    await JobQueue(redis, queue_name=qname).enqueue(f"c-{qname}", Priority.CRITICAL)
    ttl = await redis.pttl(job_key_prefix + f"c-{qname}")
    assert ttl > JOB_EXPIRES.total_seconds() * 1000 - 60_000


async def test_arq_kept_result_blocks_the_job_id(
    services: Services, queue: JobQueue, qname: str
) -> None:
    """ARQ #432: while a result is kept, enqueueing the same id is refused."""
    await queue.enqueue("kept", Priority.NORMAL)
    worker = _worker(services.redis, qname, keep_result=60)
    await worker.async_run()
    assert await queue.enqueue("kept", Priority.NORMAL) is False


async def test_arq_read_limit_below_fleet_concurrency_stalls(
    services: Services, queue: JobQueue, qname: str
) -> None:
    """ARQ #171: a poll reads only ``queue_read_limit`` ids, running ones included."""
    for job_id in ("running-a", "running-b", "ready"):
        await queue.enqueue(job_id, Priority.NORMAL)
    for job_id in ("running-a", "running-b"):  # held by two other workers
        await services.redis.psetex(in_progress_key_prefix + job_id, 60_000, b"1")
    stalled = _worker(services.redis, qname, burst=False, queue_read_limit=2)
    await _run_for(stalled, 0.5)
    assert stalled.ctx["order"] == []
    fine = _worker(
        services.redis,
        qname,
        burst=False,
        queue_read_limit=read_limit_for(fleet_slots=2, max_jobs=1),
    )
    await _run_for(fine, 10, until=1)
    assert fine.ctx["order"] == ["ready"]


async def test_arq_dead_workers_job_waits_for_in_progress_key_unless_requeued(
    services: Services, queue: JobQueue, qname: str
) -> None:
    """ARQ #343/#407: a dead worker's in-progress key blocks its job for the whole
    job timeout; ``requeue_lost`` (used once the lease lapsed) releases it."""
    await queue.enqueue("orphan", Priority.HIGH)
    await services.redis.psetex(in_progress_key_prefix + "orphan", 3_600_000, b"1")
    blocked = _worker(services.redis, qname, burst=False)
    await _run_for(blocked, 0.3)
    assert blocked.ctx["order"] == []
    assert await queue.requeue_lost("orphan", Priority.HIGH) is True
    worker = _worker(services.redis, qname)
    await worker.async_run()
    assert worker.ctx["order"] == ["orphan"]


async def test_requeue_lost_enqueues_a_job_arq_forgot(
    services: Services, queue: JobQueue, qname: str
) -> None:
    assert await queue.requeue_lost("forgotten", Priority.LOW) is True
    assert await queue.is_queued("forgotten")
