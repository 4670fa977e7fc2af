"""Waiting out a Postgres or S3 outage inside a running job.

A job that loses Postgres or S3 does not fail and does not spend an attempt:
:func:`await_database` / :func:`await_storage` wait (backoff with jitter, as
long as it takes) until the dependency answers again, and the run carries on
from its checkpoints (``workers/run.py``).  Meanwhile the reaper leaves the
job alone, because this worker's heartbeat (in Redis) shows it alive.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

from app.core.logging import get_logger
from app.core.outage import is_confused_connection, is_database_outage, is_storage_outage
from workers.context import WorkerContext

log = get_logger("sluice.worker.pipeline")

CONFUSED_CONNECTION_RIDES = 3
"""Times one attempt waits out a confused asyncpg connection
(:func:`~app.core.outage.is_confused_connection`) like an outage; past it the
error is the attempt's, as a bug that repeats must be."""

DATABASE_WAIT = (0.2, 5.0)
"""First and largest wait (seconds, jittered) between probes of a lost dependency."""


class Backoff:
    """Exponential backoff with jitter, from :data:`DATABASE_WAIT`'s first wait
    doubling up to its largest."""

    def __init__(self) -> None:
        self.delay = DATABASE_WAIT[0]

    async def sleep(self) -> None:
        await asyncio.sleep(self.delay * random.uniform(0.5, 1.0))  # noqa: S311
        self.delay = min(self.delay * 2, DATABASE_WAIT[1])


class DatabaseRides:
    """Which database errors one attempt waits out: every outage, and a confused
    connection at most :data:`CONFUSED_CONNECTION_RIDES` times."""

    def __init__(self) -> None:
        self.confused = 0

    def rides(self, exc: BaseException) -> bool:
        if is_database_outage(exc):
            return True
        if is_confused_connection(exc) and self.confused < CONFUSED_CONNECTION_RIDES:
            self.confused += 1
            return True
        return False


async def await_database(ctx: WorkerContext, job_id: str, exc: BaseException) -> None:
    """Wait (backoff with jitter, as long as it takes) until Postgres answers."""
    ctx.set_database_up(False)
    log.warning("database_unavailable_job_waiting", job_id=job_id, error=type(exc).__name__)
    backoff = Backoff()
    while True:
        # Pooled connections that lived through the outage are broken in ways
        # asyncpg does not always notice (a stale reply confuses the protocol):
        # replace them all.
        await ctx.db.expire_connections()
        await backoff.sleep()
        try:
            await ctx.db.fetchval("SELECT 1")
        except Exception as probe:  # not back yet, whatever it says
            log.info("database_still_unavailable", error=type(probe).__name__)
            continue
        break
    await ctx.db.expire_connections()
    ctx.set_database_up(True)
    log.info("database_back_job_resuming", job_id=job_id)


async def await_storage(
    ctx: WorkerContext,
    job_id: str,
    exc: BaseException,
    *,
    check: Callable[[], Awaitable[None]],
    backoff: Backoff,
) -> None:
    """Wait (backoff with jitter, as long as it takes) until S3 answers again.

    ``check`` (the job's cancel and lease check) runs every round, so a cancel
    or a lost lease ends the wait; ``backoff`` is the run's own and keeps growing
    across its outages, so an object S3 keeps failing with 5xx is asked for at
    most every few seconds.
    """
    log.warning("storage_unavailable_job_waiting", job_id=job_id, error=cause(exc))
    while True:
        await backoff.sleep()
        try:
            await check()  # a cancel or a lost lease ends the wait
        except Exception as down:
            if not is_database_outage(down):
                raise  # CancelRequested, LeaseLost
        try:
            await ctx.s3.head_bucket(Bucket=ctx.settings.minio_bucket_name)
        except Exception as probe:
            if not is_storage_outage(probe):
                break  # S3 answers (if with an error, the stage will say which)
            log.info("storage_still_unavailable", error=cause(probe))
            continue
        break
    log.info("storage_back_job_resuming", job_id=job_id)


def cause(exc: BaseException) -> str:
    """The innermost exception's type name (what a log line says went wrong)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return type(exc).__name__
