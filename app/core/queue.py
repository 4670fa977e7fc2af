"""The job queue, on ARQ.

The gateway enqueues with :class:`JobQueue`; workers consume with the ARQ
worker in ``workers/``.  The ARQ job id is the Sluice job id, so a job is
enqueued at most once while ARQ remembers it.
"""

from __future__ import annotations

from arq import create_pool
from arq.connections import ArqRedis, RedisSettings

from app.core.events import Priority

QUEUE_NAME = "sluice:queue"
PROCESS_FUNCTION = "process_document"


async def connect_redis(url: str) -> ArqRedis:
    """One ARQ-flavoured Redis client (a ``redis.asyncio.Redis``) per process."""
    return await create_pool(RedisSettings.from_dsn(url), default_queue_name=QUEUE_NAME)


class JobQueue:
    """Puts Sluice jobs on the ARQ queue."""

    def __init__(self, redis: ArqRedis, *, queue_name: str = QUEUE_NAME) -> None:
        self._redis = redis
        self._queue_name = queue_name

    async def enqueue(self, job_id: str, priority: Priority) -> bool:
        """Enqueue ``job_id``; False if ARQ already holds a job with that id."""
        job = await self._redis.enqueue_job(
            PROCESS_FUNCTION, job_id, _job_id=job_id, _queue_name=self._queue_name
        )
        return job is not None
