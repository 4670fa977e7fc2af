"""The job queue: four priorities on ARQ, without a second queue.

The gateway enqueues with :class:`JobQueue`; workers consume with the ARQ
worker in ``workers/``.  The ARQ job id is the Sluice job id, so a job is
enqueued at most once while ARQ holds it.

How priorities map onto ARQ
---------------------------
ARQ keeps one sorted set per queue, scored by each job's *ready time* in
milliseconds, and every worker starts the ready jobs with the lowest scores
first.  A priority is therefore expressed as an earlier ready time: a job
enqueued at ``t`` with priority ``p`` gets the score ``t - OFFSET[p]``::

    low 0 | normal 1 h | high 2 h | critical 4 h

so among ready jobs the higher level starts first and, within a level, enqueue
order decides (scores are made strictly increasing per process, so FIFO holds
even for jobs enqueued in the same millisecond).

**Aging rule.**  Because the rank is ``enqueue time - offset``, a waiting job
outranks every job of a level ``d`` hours higher enqueued more than ``d`` hours
after it: a ``low`` job is overtaken by later ``critical`` jobs for at most 4
hours, by later ``normal`` jobs for at most 1 hour, and is never starved.

ARQ traps this design works around (each pinned by ``tests/test_queue.py``):

* ARQ derives a job's key expiry from its score (ARQ #447): a score hours in the
  past would shorten it, more than a day in the past makes ``enqueue_job`` fail.
  We always pass ``_expires`` (:data:`JOB_EXPIRES`).
* ``Retry(defer=...)`` re-scores a job as ``now + defer`` and so drops the
  priority offset.  A ``defer`` that restored it would be negative for every
  level above ``low`` (``backoff - offset``): ARQ would start the job at once,
  its backoff ignored.  So a retry is scored at its ready time
  (:meth:`JobQueue.schedule_retry` returns ``defer`` = the backoff) and its
  rank recorded for *promotion* (``app/core/promotion.py``): once it is due,
  a worker's poll lowers its score to ``ready - OFFSET[p]``, as if enqueued
  at its ready time.
* ARQ reads only ``queue_read_limit`` ids per poll, and running jobs stay in the
  sorted set: a fleet with more running jobs than that stalls (ARQ #171).  Use
  :func:`read_limit_for` with the fleet's concurrency.
* A dead worker's job is retried only when its in-progress key expires, a full
  job timeout later (ARQ #343, #407); :meth:`JobQueue.requeue_lost` releases it
  at once once the job's lease (``workers/lease.py``) has lapsed.
* A kept result blocks its job id (ARQ #432): workers keep no results
  (``keep_result=0``), so a failed job can be enqueued again by ``/retry``.

Wake-ups
--------
ARQ's workers find jobs by polling the sorted set.  Sluice's workers
(``workers/wake.py``) block on a small per-queue *wake list* instead
(:func:`wake_key`): every change that can make a job startable
(:meth:`JobQueue.enqueue`, :meth:`~JobQueue.requeue_lost`, :meth:`~JobQueue.abort`)
pushes one token per job after the job is in the sorted set (``enqueue`` in
the same atomic command, :data:`ENQUEUE_SCRIPT`), so a burst of N jobs wakes
up to N idle workers.  The list is capped at :data:`WAKE_LIST_MAX`
tokens.  A token is only a hint: a lost one (the push failed, the list was
flushed) costs at most the workers' slow fallback poll, never a job.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from datetime import timedelta
from enum import StrEnum

import asyncpg
import redis.exceptions
from arq import create_pool
from arq.connections import ArqRedis, RedisSettings
from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, result_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from app.core.logging import get_logger
from app.core.outage import is_redis_outage, wait_until_reachable
from app.core.promotion import promote_key, rank_key

QUEUE_NAME = "sluice:queue"
PROCESS_FUNCTION = "process_document"

HOUR_MS = 3_600_000


log = get_logger(__name__)


class Priority(StrEnum):
    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"
    CRITICAL = "critical"


PRIORITY_OFFSET_MS: dict[Priority, int] = {
    Priority.LOW: 0,
    Priority.NORMAL: 1 * HOUR_MS,
    Priority.HIGH: 2 * HOUR_MS,
    Priority.CRITICAL: 4 * HOUR_MS,
}
"""How much earlier than its enqueue time each level's job is ranked."""


def aging_rule() -> str:
    """The aging rule of the module docstring in words, from :data:`PRIORITY_OFFSET_MS`
    (the dashboard shows it next to the queue)."""
    hours = {p: PRIORITY_OFFSET_MS[p] / HOUR_MS for p in Priority}
    later = ", ".join(
        f"by later {p} jobs for at most {hours[p] - hours[Priority.LOW]:g} h"
        for p in (Priority.CRITICAL, Priority.HIGH, Priority.NORMAL)
    )
    return (
        "Ready jobs start highest priority first, then in enqueue order. A job is ranked "
        "as if enqueued earlier by its level's head start ("
        + ", ".join(f"{p} {hours[p]:g} h" for p in reversed(Priority))
        + "), so a waiting job ages past newer higher-priority ones and is never starved: "
        f"a low job is overtaken {later}."
    )


WORKERS_KEY = "sluice:workers"
"""Sorted set: worker id -> its last heartbeat (unix ms)."""
WORKER_SLOTS_KEY = "sluice:workers:slots"
"""Hash: worker id -> its MAX_CONCURRENT_TASKS."""

QUEUE_EPOCH_KEY = "sluice:queue:epoch"
"""A marker written once per Redis data set by the first worker that finds it
missing: if it vanishes, Redis lost the queue and workers resync it from the
jobs table at once (``workers/fleet.py``, ``claim_new_epoch``)."""

WAKE_LIST_MAX = 1024
"""Most wake tokens a queue's wake list holds (a burst larger than the fleet
needs no more; the excess would only cause empty polls later)."""
WAKE_TOKEN = b"1"


def wake_key(queue_name: str) -> str:
    """The wake list of ``queue_name`` (one token per job made startable)."""
    return f"{queue_name}:wake"


ENQUEUE_SCRIPT = """
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then
  return 0
end
redis.call('PSETEX', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
redis.call('LPUSH', KEYS[4], ARGV[5])
redis.call('LTRIM', KEYS[4], 0, ARGV[6] - 1)
return 1
"""
"""ARQ's ``enqueue_job`` and the wake-up in one atomic command.  KEYS: the job
key, its result key, the queue, its wake list; ARGV: the job key's expiry (ms),
the serialized job, the score, the job id, the wake token, the wake list's cap.
Returns 1 if enqueued, 0 if ARQ already holds the job id (or its result)."""

JOB_EXPIRES = timedelta(days=7)
"""How long ARQ keeps a job that has not finished (queued, deferred or retried)."""


REDIS_COMMAND_RETRIES = 3
"""Retries of one Redis command on a lost connection (exponential backoff with
jitter, 50 ms doubling up to 1 s): a failover or a restart of a second or two is
invisible; a longer outage surfaces as ``redis.exceptions.ConnectionError``,
which the gateway answers 503 ``redis_unavailable`` and a worker waits out."""


def redis_settings(url: str) -> RedisSettings:
    """ARQ's settings for ``url``, with the retry policy of :data:`REDIS_COMMAND_RETRIES`."""
    return dataclasses.replace(
        RedisSettings.from_dsn(url),
        retry=Retry(ExponentialWithJitterBackoff(cap=1.0, base=0.05), REDIS_COMMAND_RETRIES),
        retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError],
    )


async def connect_redis(url: str, *, wait: bool = False) -> ArqRedis:
    """One ARQ-flavoured Redis client (a ``redis.asyncio.Redis``) per process.

    ``wait=True`` (long-running processes) waits for an unreachable Redis
    instead of failing (:func:`~app.core.outage.wait_until_reachable`).
    """

    async def connect() -> ArqRedis:
        return await create_pool(redis_settings(url), default_queue_name=QUEUE_NAME)

    if not wait:
        return await connect()
    return await wait_until_reachable(connect, dependency="redis", is_outage=is_redis_outage)


def priority_score(priority: Priority | str, ready_ms: int) -> int:
    """ARQ score of a job of ``priority`` that becomes ready at ``ready_ms``."""
    return ready_ms - PRIORITY_OFFSET_MS[Priority(priority)]


def read_limit_for(fleet_slots: int, max_jobs: int) -> int:
    """``queue_read_limit`` for a worker in a fleet with ``fleet_slots`` job slots.

    Running jobs stay at the head of ARQ's sorted set until they finish, so a
    poll must read past all of them plus enough ready jobs to fill this
    worker's own ``max_jobs`` slots (ARQ #171).
    """
    return max(100, fleet_slots + 5 * max_jobs)


class JobQueue:
    """Puts Sluice jobs on the ARQ queue, ranked by priority then enqueue order."""

    def __init__(
        self,
        redis: ArqRedis,
        *,
        queue_name: str = QUEUE_NAME,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._queue_name = queue_name
        self._clock = clock
        self._last_score: dict[Priority, int] = {}
        self._wake_key = wake_key(queue_name)
        self._promote_key = promote_key(queue_name)
        self._rank_key = rank_key(queue_name)
        self._enqueue = redis.register_script(ENQUEUE_SCRIPT)

    def _next_score(self, priority: Priority, delay_ms: int) -> int:
        score = priority_score(priority, int(self._clock() * 1000) + delay_ms)
        last = self._last_score.get(priority)
        if last is not None and score <= last and delay_ms == 0:
            score = last + 1  # strictly increasing: FIFO within a level in this process
        if delay_ms == 0:  # a deferred job must not push later ones back with it
            self._last_score[priority] = max(score, last or score)
        return score

    async def enqueue(self, job_id: str, priority: Priority | str, *, delay_s: float = 0) -> bool:
        """Enqueue ``job_id``; False if ARQ already holds a job with that id.

        One round trip (:data:`ENQUEUE_SCRIPT`): what ARQ's ``enqueue_job``
        writes (the job, serialized as ARQ does, and its score), refused as ARQ
        refuses it, plus its wake token, atomically: a worker woken by the token
        finds the job, and a job is never queued without its token.
        """
        score = self._next_score(Priority(priority), int(delay_s * 1000))
        job = serialize_job(
            PROCESS_FUNCTION,
            (job_id,),
            {},
            None,
            timestamp_ms(),
            serializer=getattr(self._redis, "job_serializer", None),
        )
        added = await self._enqueue(
            keys=[
                job_key_prefix + job_id,
                result_key_prefix + job_id,
                self._queue_name,
                self._wake_key,
            ],
            args=[
                int(JOB_EXPIRES.total_seconds() * 1000),
                job,
                score,
                job_id,
                WAKE_TOKEN,
                WAKE_LIST_MAX,
            ],
        )
        return bool(added)

    async def wake(self, tokens: int = 1) -> None:
        """Push ``tokens`` wake tokens (one per job made startable), capped.

        Called after the job is in the sorted set, so a worker woken by the
        token finds it.  A job deferred into the future gets a token too: the
        worker that takes it learns the job's ready time and sleeps until then.
        A Redis outage here is logged, not raised: the job is already queued,
        and the workers' fallback poll finds it without the token.
        """
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.lpush(self._wake_key, *([WAKE_TOKEN] * tokens))
                pipe.ltrim(self._wake_key, 0, WAKE_LIST_MAX - 1)
                await pipe.execute()
        except Exception as exc:
            if not is_redis_outage(exc):
                raise
            log.warning("wake_up_lost", reason=type(exc).__name__)

    async def enqueue_or_defer(self, job_id: str, priority: Priority | str) -> bool:
        """Enqueue a job whose ``queued`` state is already committed; never raises for Redis.

        The one enqueue-failure policy of every route: the job row is the
        truth, so when Redis cannot take the job now it stays ``queued`` and the
        workers' ``resync_queue`` (``workers/fleet.py``) enqueues it once Redis is
        back (within its grace period).  Returns True if ARQ holds the job now.
        """
        try:
            await self.enqueue(job_id, priority)
        except Exception as exc:
            if not is_redis_outage(exc):
                raise
            log.warning("enqueue_deferred", job_id=job_id, reason=type(exc).__name__)
            return False
        return True

    async def schedule_retry(
        self, job_id: str, priority: Priority | str, backoff_s: float
    ) -> float:
        """Record the rank of a job about to be retried after ``backoff_s``; returns
        the ``Retry(defer=...)`` (seconds) to raise: the backoff itself.

        ARQ scores the retry at ``now + backoff``, so no worker starts it sooner;
        once due, a worker's poll promotes it to ``ready - OFFSET[priority]``
        (``app/core/promotion.py``).  A Redis outage here is logged, not raised:
        the job then waits its backoff all the same and ranks as a ``low`` job
        enqueued at its ready time.
        """
        ready_ms = int(self._clock() * 1000) + int(backoff_s * 1000)
        await self._record_rank(job_id, ready_ms, priority_score(priority, ready_ms))
        return backoff_s

    async def hand_back(self, job_id: str, score: int, backoff_s: float) -> float:
        """Record that a job handed back unstarted keeps its place once due; returns
        the ``Retry(defer=...)`` (seconds) to raise: ``backoff_s``.

        For a job a worker could not even begin (Postgres unreachable before its
        lease was taken): no attempt was spent, and neither should its rank be.
        ``score`` is the job's ARQ score when it was picked (ARQ's ``ctx["score"]``),
        which already holds its priority (and its age), so the worker needs no
        database to know it: once due, a poll promotes the job back to that score.
        Never raises for a Redis outage (logged; the job then ranks as a ``low``
        job enqueued at its ready time, as :meth:`schedule_retry` says).
        """
        ready_ms = int(self._clock() * 1000) + int(backoff_s * 1000)
        await self._record_rank(job_id, ready_ms, min(score, ready_ms))
        return backoff_s

    async def _record_rank(self, job_id: str, ready_ms: int, rank: int) -> None:
        """Promote ``job_id`` to score ``rank`` once ``ready_ms`` has come."""
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.zadd(self._promote_key, {job_id: ready_ms})
                pipe.hset(self._rank_key, job_id, str(rank))
                pipe.expire(self._promote_key, JOB_EXPIRES)
                pipe.expire(self._rank_key, JOB_EXPIRES)
                await pipe.execute()
        except Exception as exc:
            if not is_redis_outage(exc):
                raise
            log.warning("retry_rank_lost", job_id=job_id, reason=type(exc).__name__)

    async def is_queued(self, job_id: str) -> bool:
        """True while ARQ holds the job (waiting, deferred or running)."""
        return bool(await self._redis.exists(job_key_prefix + job_id))

    async def started_seconds_ago(self, job_id: str, in_progress_seconds: float) -> float | None:
        """How long ago a worker marked the job in progress; None if none has.

        ARQ sets the in-progress key with a TTL of ``in_progress_seconds`` (its
        ``Worker.in_progress_timeout_s``) when a worker picks the job up and never
        renews it, so its age is that TTL minus what is left of it.  A key without
        a TTL counts as set forever ago.
        """
        left_ms = int(await self._redis.pttl(in_progress_key_prefix + job_id))
        if left_ms == -2:
            return None
        if left_ms < 0:
            return float("inf")
        return max(0.0, in_progress_seconds - left_ms / 1000)

    async def abort(self, job_id: str) -> None:
        """Ask ARQ to drop a job that has not started (a worker removes it unrun).

        Uses ARQ's abort set; unlike :meth:`arq.jobs.Job.abort` it does not
        wait for the job.  A deferred job is moved to the front so that the
        abort takes effect at the next poll rather than when it would be ready.
        """
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.zscore(self._queue_name, job_id)
            pipe.exists(job_key_prefix + job_id)
            score, exists = await pipe.execute()
        if not exists or score is None:
            return
        now_ms = int(self._clock() * 1000)
        async with self._redis.pipeline(transaction=True) as pipe:
            if score > now_ms:
                pipe.zadd(self._queue_name, {job_id: 1}, xx=True)
            pipe.zadd(abort_jobs_ss, {job_id: now_ms})
            await pipe.execute()
        await self.wake()  # a worker drops it now rather than at its next poll

    async def requeue_lost(self, job_id: str, priority: Priority | str) -> bool:
        """Make a job whose worker died runnable again now.

        ARQ still has the job in its sorted set, blocked by the dead worker's
        in-progress key until the full job timeout passes (ARQ #343); deleting
        that key lets the next poll of any worker start it, keeping its place.
        If ARQ lost the job altogether, it is enqueued afresh.  Returns True
        if the job is queued afterwards.
        """
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(in_progress_key_prefix + job_id)
            pipe.exists(job_key_prefix + job_id)
            pipe.zscore(self._queue_name, job_id)
            _, exists, score = await pipe.execute()
        if exists and score is not None:
            await self.wake()
            return True
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(job_key_prefix + job_id)
            pipe.zrem(self._queue_name, job_id)
            await pipe.execute()
        return await self.enqueue(job_id, priority)

    async def depth(self) -> int:
        """Jobs ARQ holds in the queue (waiting, deferred and running)."""
        return int(await self._redis.zcard(self._queue_name))

    async def ready(self) -> int:
        """Jobs ARQ holds whose ready time has come (waiting for a worker, or
        running: ARQ keeps a running job in its sorted set); deferred ones not."""
        now_ms = int(self._clock() * 1000)
        return int(await self._redis.zcount(self._queue_name, "-inf", now_ms))


async def workers_alive(redis: ArqRedis, *, window_seconds: float, now: float) -> int:
    """How many workers sent a heartbeat within ``window_seconds``."""
    return int(await redis.zcount(WORKERS_KEY, int((now - window_seconds) * 1000), "+inf"))


async def queue_depth_by_priority(db: asyncpg.Pool) -> dict[str, int]:
    rows = await db.fetch(
        "SELECT priority, count(*) AS n FROM jobs WHERE status IN ('queued', 'retrying') "
        "GROUP BY priority"
    )
    depth = {str(p): 0 for p in Priority}
    depth.update({r["priority"]: int(r["n"]) for r in rows})
    return depth
