"""The ARQ worker, configured from :class:`~app.core.settings.Settings`.

:func:`open_worker_context` builds the collaborators every job shares (pool,
Redis, S3, the embedder loaded once, the parse children, the queue, the
metrics) and :func:`build_worker` the ARQ :class:`~arq.worker.Worker` around
them:

* ``max_jobs`` = ``MAX_CONCURRENT_TASKS`` (jobs per process);
* ``queue_read_limit`` from the fleet's concurrency (ARQ #171), refreshed from
  the worker registry by the maintenance loop (``workers/fleet.py``);
* ``keep_result=0``: no result keys, so job ids are never blocked (ARQ #432);
  the jobs table is where results live;
* ``job_timeout`` just above ``MAX_PROCESSING_TIME_MINUTES`` (the job function
  enforces the bound itself and records why); recovery of a dead worker's job
  does not wait for it (leases, ``workers/lease.py``);
* ARQ's own retry count is a backstop only: attempts are counted in the jobs
  table, where lease recoveries count too;
* aborts enabled, so cancelling a waiting job drops it from the queue;
* :class:`SluiceWorker`: ARQ's worker with one leak closed, so that its poll
  loop can be resumed after a Redis outage, and woken on enqueue
  (``workers/wake.py``) rather than polling, ``WORKER_POLL_INTERVAL_MS`` being
  the fallback poll (``WORKER_WAKE=false``: ARQ's own loop at that interval);
  every poll promotes the due retried jobs to their priority's rank first
  (``app/core/promotion.py``).

Outages are waited out, never fatal: ARQ's poll loop runs under
:func:`poll_supervised`, which resumes it (backoff with jitter) once Redis
answers again while running jobs carry on; meanwhile ``/health`` says
``"degraded"`` (still HTTP 200) and ``sluice_worker_redis_up`` is 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import redis.exceptions
from arq.utils import timestamp_ms
from arq.worker import Worker, func
from prometheus_client import CollectorRegistry

from app.core.db import create_pool
from app.core.embedding import Embedder, create_embedder, model_dir
from app.core.logging import get_logger
from app.core.promotion import QueuePoller
from app.core.queue import PROCESS_FUNCTION, QUEUE_NAME, JobQueue, connect_redis, read_limit_for
from app.core.settings import Settings
from app.core.storage import open_s3
from workers.context import WorkerContext, WorkerMetrics
from workers.parse import ParseChildren
from workers.run import process_document
from workers.wake import WakeListener

log = get_logger("sluice.worker")

HEALTH_CHECK_SECONDS = 30
"""How often ARQ's health key (``sluice-worker --check``) is rewritten (two
commands; kept rare for an idle worker's Redis budget, ``workers/wake.py``)."""
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
    """Collaborators for one worker process (``embedder`` given: shared, not closed).

    ``metrics`` is the process's (built once on its registry); without it the
    worker gets a registry of its own (an embedded or test worker).  ``timings``
    override :class:`WorkerContext`'s timing fields (``lease_seconds``...)."""
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
            tokenizer_path=model_dir() / "tokenizer.json",
            queue=JobQueue(redis),
            worker_id=worker_id or new_worker_id(),
            tmp_dir=tmp,
            metrics=metrics if metrics is not None else WorkerMetrics(CollectorRegistry()),
            **{**WorkerContext.timings_from(settings), **timings},
        )


def worker_kwargs(ctx: WorkerContext, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for :class:`arq.worker.Worker` (the worker settings)."""
    settings = ctx.settings
    job_timeout = ctx.job_timeout_seconds
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
    """ARQ's :class:`~arq.worker.Worker`, safe to resume after a Redis error,
    woken on enqueue instead of polling.

    ARQ's ``start_jobs`` takes a job slot (semaphore + counter) before its
    Redis transaction and gives it back only on the errors it expects, so each
    connection error there would leak a slot until the worker stopped taking
    jobs.  Invariant kept here: a slot is held exactly while a job task exists.

    With ``wake_redis_url`` (``WORKER_WAKE``), ARQ's fixed-interval poll loop is
    replaced by :meth:`_wake_loop`: poll, then wait until a wake token arrives
    (``workers/wake.py``), a job ends while the worker was full or a job was
    retried (a slot for a waiting job, or a new ready time), the earliest
    deferred job becomes ready, or the fallback interval (``poll_delay``)
    passes, whichever comes first.  A poll after a plain fallback interval
    reads the head of the queue (one command); once a job is ready, or right
    away when woken (a job is then most likely ready), one script promotes the
    due retries and claims the ready jobs it has room for
    (:meth:`~app.core.promotion.QueuePoller.claim`: ARQ's in-progress keys,
    set atomically with the read, where ARQ's ``start_jobs`` spent four round
    trips per job), and it checks aborts only while jobs run; an idle worker
    thus sends Redis about one command per fallback interval plus one
    ``BLPOP`` per :data:`~workers.wake.BLOCK_SECONDS`.

    Every poll (ARQ's loop too, ``WORKER_WAKE=false``) promotes the due
    retried jobs before it picks (``app/core/promotion.py``): a retry waits
    out its backoff, then ranks as its priority says.  A retry's ready time
    is its score, so an idle worker wakes for it like for any deferred job.
    """

    def __init__(self, *args: Any, wake_redis_url: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._wake_url = wake_redis_url
        self._nudge = asyncio.Event()
        self._armed = asyncio.Event()
        self.next_ready_ms: int | None = None
        """Earliest ready time (ARQ score) of a job not yet ready, seen by the last poll."""
        self.wake_listener: WakeListener | None = None
        self._retries_seen = 0
        self._queue_poller: QueuePoller | None = None
        self._expect_ready = False

    @property
    def waiting_for_work(self) -> bool:
        """True while the worker waits for a wake-up with a free job slot."""
        return self._armed.is_set()

    @property
    def _poller(self) -> QueuePoller:
        if self._queue_poller is None:  # ARQ may create its pool only in main()
            self._queue_poller = QueuePoller(self.pool, self.queue_name)
        return self._queue_poller

    def _has_room(self) -> bool:
        return self.job_counter < self.max_jobs

    def _release_sem_dec_counter_on_complete(self) -> None:
        was_full = not self._has_room()
        super()._release_sem_dec_counter_on_complete()
        if was_full or self.burst or self.jobs_retried != self._retries_seen:
            # A job may be waiting for this slot (the last poll could take no more), or
            # a retried job has a new ready time (a burst worker checks whether it is
            # done).  A worker that had room took every startable job at its last
            # poll; later ones come with a wake-up.
            self._nudge.set()

    async def main(self) -> None:
        if self._wake_url is None or self.max_burst_jobs >= 0:
            return await super().main()
        if self.on_startup:
            await self.on_startup(self.ctx)
        self.wake_listener = WakeListener(
            self._wake_url,
            self.queue_name,
            armed=self._armed,
            nudge=self._nudge,
            has_room=self._has_room,
        )
        listener = asyncio.create_task(self.wake_listener.run())
        try:
            await self._wake_loop()
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    async def _wake_loop(self) -> None:
        while True:
            self._nudge.clear()
            await self._poll_iteration()
            if self.burst and await self.pool.zcard(self.queue_name) == 0:
                await asyncio.gather(*self.tasks.values())
                return
            timeout = self.poll_delay_s
            if self._has_room():
                if self.next_ready_ms is not None:
                    until_ready = (self.next_ready_ms - timestamp_ms() + 1) / 1000
                    timeout = max(0.0, min(timeout, until_ready))
                self._armed.set()
            # Woken (a token, a slot freed) or a deferred job's ready time come: a job
            # is most likely startable, so the next poll claims at once (one command);
            # after a plain fallback interval it looks first (one command when idle).
            self._expect_ready = True
            try:
                async with asyncio.timeout(timeout):
                    await self._nudge.wait()
            except TimeoutError:
                self._expect_ready = timeout < self.poll_delay_s
            finally:
                self._armed.clear()

    async def _poll_iteration(self) -> None:
        if self.max_burst_jobs >= 0:  # ARQ's poll, which counts burst jobs; promote first
            await self._poller.promote(timestamp_ms())
            return await super()._poll_iteration()
        self.next_ready_ms = None
        self._retries_seen = self.jobs_retried
        if self.allow_pick_jobs and self._has_room():
            await self._pick()
        if self.allow_abort_jobs and self.job_tasks:
            await self._cancel_aborted_jobs()
        for job_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[job_id]
                task.result()  # errors in run_job propagate, as in ARQ's loop
        await self.heart_beat()

    async def _pick(self) -> None:
        """Start the ready jobs this worker has room for.

        Unless a job is expected (:meth:`_wake_loop`), the head of the queue is
        read first, so an idle worker's poll is one plain command; once a job is
        ready, one script promotes the due retries and claims the jobs
        (:meth:`~app.core.promotion.QueuePoller.claim`), where ARQ's
        ``start_jobs`` spent four round trips per job.
        """
        now = timestamp_ms()
        expected, self._expect_ready = self._expect_ready, False
        if not expected:
            entries = await self._poller.peek(
                offset=self._queue_read_offset, limit=self.queue_read_limit
            )
            if not entries or entries[0][1] > now:
                future = [int(score) for _, score in entries if score > now]
                self.next_ready_ms = future[0] if future else None
                return
        claimed, self.next_ready_ms = await self._poller.claim(
            now,
            offset=self._queue_read_offset,
            limit=self.queue_read_limit,
            free=self.max_jobs - self.job_counter,
            hold_ms=int(self.in_progress_timeout_s * 1000),
        )
        for job_id, score in claimed:
            # The slot, as ARQ's start_jobs takes it: held exactly while the task exists.
            # No await suspends between the claim's reply and here (the semaphore has
            # room), so a claimed job always gets its task; a claim lost to a
            # cancellation mid-reply is released by the fleet's resync, as ARQ's own.
            await self.sem.acquire()
            self.job_counter += 1
            task = self.loop.create_task(self.run_job(job_id, score))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[job_id] = task

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


def build_worker(ctx: WorkerContext, **overrides: Any) -> SluiceWorker:
    """The worker for ``ctx``; woken on enqueue unless ``WORKER_WAKE`` is off."""
    wake_url = ctx.settings.redis_url.reveal() if ctx.settings.worker_wake else None
    overrides.setdefault("wake_redis_url", wake_url)
    return SluiceWorker(**worker_kwargs(ctx, **overrides))


RESUME_BACKOFF = (0.1, 5.0)
"""First and largest wait (seconds, jittered) before resuming a failed poll loop."""
_RESUMABLE = (redis.exceptions.RedisError, OSError, TimeoutError)


async def poll_supervised(worker: Worker, ctx: WorkerContext) -> None:
    """Run ARQ's poll loop until the worker is told to stop.

    ARQ's loop ends at the first Redis error (a restart, a failover, a blip);
    here it is resumed once Redis answers a ``PING`` again, after a backoff
    with jitter.  Running jobs are separate tasks: they are untouched.
    Returns when a signal stopped the worker (ARQ cancels its main task).
    """
    stopping = asyncio.Event()
    worker.on_stop = lambda _sig: stopping.set()
    delay = RESUME_BACKOFF[0]
    while not stopping.is_set():
        try:
            await worker.async_run()
            return
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            return  # ARQ's signal handler cancelled its main task: shutting down
        except _RESUMABLE as exc:
            ctx.set_redis_up(False)
            log.warning("queue_poll_interrupted", error=type(exc).__name__, detail=str(exc)[:200])
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), delay * random.uniform(0.5, 1.0))  # noqa: S311
            delay = min(delay * 2, RESUME_BACKOFF[1])
            try:
                await ctx.redis.ping()
            except _RESUMABLE:
                continue
            ctx.set_redis_up(True)
            log.info("queue_poll_resumed")
            delay = RESUME_BACKOFF[0]
            break
