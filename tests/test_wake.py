"""Wake-ups: idle workers start a job within milliseconds of its enqueue, and
never depend on the wake-up for correctness.

The production worker class (:class:`workers.runtime.SluiceWorker` with its
wake listener) runs in-process on the real Redis, with a recording job
function, each test on its own queue.  The fallback poll is set long (5 s)
where a test shows that something other than the fallback started the job.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from arq import Retry
from arq.connections import ArqRedis
from arq.worker import func

from app.core.queue import PROCESS_FUNCTION, JobQueue, Priority, connect_redis, wake_key
from app.core.settings import Settings
from app.gateway.services import Services
from devstack.redis import EmbeddedRedis
from workers.runtime import SluiceWorker

LONG_FALLBACK_S = 5.0


async def _record(ctx: dict[str, Any], job_id: str) -> None:
    log = ctx["log"]  # ARQ hands each job a copy of ctx: share through an object
    log.append((ctx["name"], job_id, time.time()))
    await asyncio.sleep(ctx["hold"])
    retries = ctx["retries"]
    if retries.get(job_id):
        retries[job_id] -= 1
        raise Retry(defer=ctx["retry_defer"])


def _worker(
    services: Services,
    settings: Settings,
    qname: str,
    log: list[tuple[str, str, float]],
    *,
    name: str = "w1",
    fallback_s: float = LONG_FALLBACK_S,
    max_jobs: int = 10,
    hold: float = 0.0,
    retries: dict[str, int] | None = None,
    retry_defer: float = 0.0,
    redis: ArqRedis | None = None,
    redis_url: str | None = None,
) -> SluiceWorker:
    ctx = {
        "log": log,
        "name": name,
        "hold": hold,
        "retries": retries or {},
        "retry_defer": retry_defer,
    }
    return SluiceWorker(
        functions=[func(_record, name=PROCESS_FUNCTION, max_tries=10)],
        queue_name=qname,
        redis_pool=redis or services.redis,
        max_jobs=max_jobs,
        poll_delay=fallback_s,
        handle_signals=False,
        keep_result=0,
        ctx=ctx,
        wake_redis_url=redis_url or settings.redis_url.reveal(),
    )


@asynccontextmanager
async def _running(*workers: SluiceWorker) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(w.async_run()) for w in workers]
    try:
        deadline = time.monotonic() + 10
        while not all(w.waiting_for_work for w in workers):  # every one idle, listening
            assert time.monotonic() < deadline, "workers did not become idle"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # their BLPOPs are on the wire
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in workers:
            await asyncio.gather(*w.tasks.values(), return_exceptions=True)


async def _wait_for(log: list[tuple[str, str, float]], count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(log) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.002)


@pytest.fixture
def qname() -> str:
    return f"test:wake:{uuid.uuid4().hex[:8]}"


async def test_an_idle_worker_starts_an_enqueued_job_within_milliseconds(
    services: Services, settings: Settings, qname: str
) -> None:
    log: list[tuple[str, str, float]] = []
    queue = JobQueue(services.redis, queue_name=qname)
    latencies = []
    async with _running(_worker(services, settings, qname, log)):
        for i in range(20):
            t0 = time.time()
            assert await queue.enqueue(f"job-{i}", Priority.NORMAL)
            await _wait_for(log, i + 1, timeout=LONG_FALLBACK_S * 2)
            assert len(log) == i + 1
            latencies.append(log[-1][2] - t0)
            await asyncio.sleep(0.02)  # idle again: back in its blocking pop
    assert statistics.median(latencies) < 0.05, latencies
    assert max(latencies) < 1.0, latencies  # never the 5 s fallback


async def test_a_job_whose_wake_up_was_lost_starts_within_the_fallback_poll(
    services: Services, settings: Settings, qname: str
) -> None:
    log: list[tuple[str, str, float]] = []
    worker = _worker(services, settings, qname, log, fallback_s=1.0)
    async with _running(worker):
        # An enqueue whose wake-up never arrives: the job is in ARQ's sorted set
        # (as JobQueue puts it there) and the wake list is gone.
        async with services.redis.pipeline(transaction=True) as pipe:
            pipe.delete(wake_key(qname))
            await pipe.execute()
        t0 = time.time()
        await services.redis.enqueue_job(
            PROCESS_FUNCTION, "lost-wake", _job_id="lost-wake", _queue_name=qname
        )
        await services.redis.delete(wake_key(qname))
        await _wait_for(log, 1, timeout=3)
    assert [job for _, job, _ in log] == ["lost-wake"]
    assert log[0][2] - t0 < 1.0 + 0.3
    assert worker.wake_listener is not None and worker.wake_listener.tokens == 0


async def test_a_deferred_job_starts_on_time_not_at_the_fallback(
    services: Services, settings: Settings, qname: str
) -> None:
    log: list[tuple[str, str, float]] = []
    queue = JobQueue(services.redis, queue_name=qname)
    async with _running(_worker(services, settings, qname, log)):
        t0 = time.time()
        assert await queue.enqueue("later", Priority.LOW, delay_s=1.5)
        await _wait_for(log, 1, timeout=LONG_FALLBACK_S * 2)
    assert len(log) == 1
    started = log[0][2] - t0
    assert 1.5 - 0.01 <= started < 1.5 + 0.3, started


async def test_a_retried_job_starts_again_when_its_defer_ends(
    services: Services, settings: Settings, qname: str
) -> None:
    log: list[tuple[str, str, float]] = []
    queue = JobQueue(services.redis, queue_name=qname)
    worker = _worker(services, settings, qname, log, retries={"flaky": 1}, retry_defer=1.2)
    async with _running(worker):
        assert await queue.enqueue("flaky", Priority.LOW)
        await _wait_for(log, 2, timeout=LONG_FALLBACK_S * 2)
    assert [job for _, job, _ in log] == ["flaky", "flaky"]
    gap = log[1][2] - log[0][2]
    assert 1.2 - 0.01 <= gap < 1.2 + 0.3, gap


async def test_a_burst_is_shared_by_idle_workers(
    services: Services, settings: Settings, qname: str
) -> None:
    log: list[tuple[str, str, float]] = []
    queue = JobQueue(services.redis, queue_name=qname)
    workers = [
        _worker(services, settings, qname, log, name=name, max_jobs=2, hold=0.5)
        for name in ("a", "b")
    ]
    async with _running(*workers):
        t0 = time.time()
        for i in range(4):
            assert await queue.enqueue(f"burst-{i}", Priority.NORMAL)
        await _wait_for(log, 4, timeout=LONG_FALLBACK_S * 2)
    assert sorted(job for _, job, _ in log) == [f"burst-{i}" for i in range(4)]
    by_worker = {name: sum(1 for n, _, _ in log if n == name) for name in ("a", "b")}
    assert by_worker == {"a": 2, "b": 2}
    # All four ran at once (both workers woken), not two now and two after the holds.
    assert max(t for _, _, t in log) - t0 < 0.4


async def test_a_full_worker_takes_the_next_waiting_job_as_soon_as_a_slot_frees(
    services: Services, settings: Settings, qname: str
) -> None:
    log: list[tuple[str, str, float]] = []
    queue = JobQueue(services.redis, queue_name=qname)
    async with _running(_worker(services, settings, qname, log, max_jobs=1, hold=0.2)):
        for i in range(3):
            assert await queue.enqueue(f"backlog-{i}", Priority.NORMAL)
        await _wait_for(log, 3, timeout=LONG_FALLBACK_S * 3)
    assert [job for _, job, _ in log] == [f"backlog-{i}" for i in range(3)]
    gaps = [b[2] - a[2] for a, b in itertools.pairwise(log)]
    assert all(0.2 - 0.01 <= gap < 0.2 + 0.3 for gap in gaps), gaps  # not the 5 s fallback


async def test_an_idle_worker_sends_redis_about_one_command_per_fallback(
    services: Services, settings: Settings, qname: str, tmp_path: Path
) -> None:
    """Counted with INFO commandstats over 3 s of a 1 s fallback, on a Redis of its own
    (the suite's Redis also serves the servers other modules keep running)."""
    log: list[tuple[str, str, float]] = []
    server = EmbeddedRedis(tmp_path, durable=False)
    url = server.start()
    redis = await connect_redis(url)
    try:
        worker = _worker(services, settings, qname, log, fallback_s=1.0, redis=redis, redis_url=url)
        async with _running(worker):
            before = await _commands(redis)
            await asyncio.sleep(3.0)
            after = await _commands(redis)
    finally:
        await redis.aclose()
        server.stop()
    sent = after - before - 1  # the INFO of the second count itself
    assert sent <= 2 * 3, sent
    assert log == []


async def _commands(redis: ArqRedis) -> int:
    stats = await redis.info("commandstats")
    return sum(int(v["calls"]) for v in stats.values())
