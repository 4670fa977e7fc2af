"""The ARQ worker, configured from :class:`~app.core.settings.Settings`.

:func:`open_worker_context` builds the collaborators every job shares (pool,
Redis, S3, the embedder loaded once, the tokenizer, the queue) and
:func:`build_worker` the ARQ :class:`~arq.worker.Worker` around them:

* ``max_jobs`` = ``MAX_CONCURRENT_TASKS`` (jobs per process);
* ``queue_read_limit`` from the fleet's concurrency (ARQ #171), refreshed from
  the worker registry by the maintenance loop in ``workers/main.py``;
* ``keep_result=0``: no result keys, so job ids are never blocked (ARQ #432);
  the jobs table is where results live;
* ``job_timeout`` just above ``MAX_PROCESSING_TIME_MINUTES`` (the job function
  enforces the bound itself and records why); recovery of a dead worker's job
  does not wait for it (leases, ``workers/lease.py``);
* ARQ's own retry count is a backstop only: attempts are counted in the jobs
  table, where lease recoveries count too;
* aborts enabled, so cancelling a waiting job drops it from the queue;
* :class:`SluiceWorker`: ARQ's worker with one leak closed, so that its poll
  loop can be resumed after a Redis outage (``workers/main.py``).
"""

from __future__ import annotations

import socket
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

from arq.worker import Worker, func

from app.core.db import create_pool
from app.core.embedding import Embedder, create_embedder, load_tokenizer
from app.core.queue import PROCESS_FUNCTION, QUEUE_NAME, JobQueue, connect_redis, read_limit_for
from app.core.settings import Settings
from app.core.storage import open_s3
from workers.context import WorkerContext, WorkerMetrics
from workers.parse import ParseChildren
from workers.run import process_document

HEALTH_CHECK_SECONDS = 10
ARQ_MAX_TRIES = 1000


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


@asynccontextmanager
async def open_worker_context(
    settings: Settings,
    *,
    embedder: Embedder | None = None,
    metrics: WorkerMetrics | None = None,
    worker_id: str | None = None,
    **timings: Any,
) -> AsyncIterator[WorkerContext]:
    """Collaborators for one worker process (``embedder`` given: shared, not closed)."""
    async with AsyncExitStack() as stack:
        db = await create_pool(
            settings.database_url.reveal(),
            max_size=max(settings.database_pool_size, settings.max_concurrent_tasks + 2),
            wait=True,
        )
        stack.push_async_callback(db.close)
        redis = await connect_redis(settings.redis_url.reveal(), wait=True)
        stack.push_async_callback(redis.aclose)
        s3 = await stack.enter_async_context(open_s3(settings))
        if embedder is None:
            embedder = await create_embedder(settings)
            stack.push_async_callback(embedder.aclose)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sluice-worker-")))
        children = ParseChildren(settings.max_concurrent_parses)
        stack.push_async_callback(children.aclose)
        yield WorkerContext(
            parse_children=children,
            settings=settings,
            db=db,
            redis=redis,
            s3=s3,
            embedder=embedder,
            tokenizer=load_tokenizer(),
            queue=JobQueue(redis),
            worker_id=worker_id or new_worker_id(),
            tmp_dir=tmp,
            metrics=metrics or WorkerMetrics(),
            **{**WorkerContext.timings_from(settings), **timings},
        )


def worker_kwargs(ctx: WorkerContext, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for :class:`arq.worker.Worker` (the worker settings)."""
    settings = ctx.settings
    job_timeout = ctx.max_processing_seconds + 60
    max_jobs = settings.max_concurrent_tasks
    kwargs: dict[str, Any] = {
        "functions": [
            func(
                process_document,
                name=PROCESS_FUNCTION,
                timeout=job_timeout,
                max_tries=ARQ_MAX_TRIES,
                keep_result=0,
            )
        ],
        "queue_name": QUEUE_NAME,
        "redis_pool": ctx.redis,
        "max_jobs": max_jobs,
        "job_timeout": job_timeout,
        "keep_result": 0,
        "poll_delay": settings.worker_poll_interval_ms / 1000,
        "queue_read_limit": read_limit_for(max_jobs, max_jobs),
        "max_tries": ARQ_MAX_TRIES,
        "health_check_interval": HEALTH_CHECK_SECONDS,
        "ctx": {"sluice": ctx},
        "allow_abort_jobs": True,
        "retry_jobs": True,
        "handle_signals": True,
    }
    kwargs.update(overrides)
    return kwargs


class SluiceWorker(Worker):
    """ARQ's :class:`~arq.worker.Worker`, safe to resume after a Redis error.

    ARQ's ``start_jobs`` takes a job slot (semaphore + counter) before its
    Redis transaction and gives it back only on the errors it expects, so each
    connection error there would leak a slot until the worker stopped taking
    jobs.  Invariant kept here: a slot is held exactly while a job task exists.
    """

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        for job_id in job_ids:
            if self.job_counter >= self.max_jobs:
                return
            counter, task = self.job_counter, self.tasks.get(job_id.decode())
            try:
                await super().start_jobs([job_id])
            except BaseException:
                if self.job_counter > counter and self.tasks.get(job_id.decode()) is task:
                    self.job_counter -= 1
                    self.sem.release()
                raise


def build_worker(ctx: WorkerContext, **overrides: Any) -> Worker:
    return SluiceWorker(**worker_kwargs(ctx, **overrides))
