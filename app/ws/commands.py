"""The client commands that need I/O: subscribe, unsubscribe, get_job_status, cancel_job.

:class:`Commands` answers each on the connection that sent it, echoing the
request ``id``.  A command never ends the connection: every failure becomes an
``error`` message -- a :class:`~app.core.errors.SluiceError` with its own code
(``job_not_found`` and ``job_finished`` also name the job), anything else
``internal_error``.
"""

from __future__ import annotations

import asyncpg
from redis.asyncio import Redis

from app.core.errors import Conflict, NotFound, SluiceError
from app.core.logging import get_logger
from app.jobs.service import request_cancel
from app.ws.connection import Connection
from app.ws.hub import FollowResult, Hub
from app.ws.messages import (
    CancelJob,
    Command,
    Error,
    GetJobStatus,
    JobCancelled,
    JobStatusResponse,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
)

log = get_logger(__name__)


class Commands:
    """Runs one connection's commands against the hub, the database and Redis."""

    def __init__(self, hub: Hub, db: asyncpg.Pool, redis: Redis, *, max_subscriptions: int) -> None:
        self._hub = hub
        self._db = db
        self._redis = redis
        self._max_subscriptions = max_subscriptions

    async def run(self, conn: Connection, command: Command) -> None:
        try:
            await self._dispatch(conn, command)
        except (NotFound, Conflict) as exc:
            target: str | None = getattr(command, "job_id", None)
            conn.reply(
                Error(
                    code=exc.code,
                    message=exc.message,
                    job_id=target,
                    details=exc.details or None,
                    id=command.id,
                )
            )
        except SluiceError as exc:
            conn.reply(Error(code=exc.code, message=exc.message, id=command.id))
        except Exception:
            log.exception("command_failed", command=type(command).__name__)
            conn.reply(
                Error(code="internal_error", message="the command failed; try again", id=command.id)
            )

    async def _dispatch(self, conn: Connection, command: Command) -> None:
        match command:
            case Subscribe():
                await self._subscribe(conn, command)
            case Unsubscribe(job_ids=job_ids):
                self._hub.unfollow(conn, job_ids)
                conn.reply(Unsubscribed(job_ids=list(dict.fromkeys(job_ids)), id=command.id))
            case GetJobStatus(job_id=job_id):
                snapshot = await self._hub.snapshots.one(job_id, conn.reader_scope)
                if snapshot is None:
                    raise NotFound("job not found", code="job_not_found")
                conn.reply(JobStatusResponse(job_id=job_id, data=snapshot, id=command.id))
            case CancelJob(job_id=job_id):
                event = await request_cancel(self._db, self._redis, job_id, conn.user_id)
                conn.reply(JobCancelled(job_id=job_id, data=event, id=command.id))

    async def _subscribe(self, conn: Connection, command: Subscribe) -> None:
        def ready(result: FollowResult) -> None:
            conn.cork()  # the acknowledgement and every catch-up frame go out in one write
            self._acknowledge(conn, command, result)

        try:
            await self._hub.follow(
                conn, conn.reader_scope, command.job_ids, command.since, on_ready=ready
            )
        finally:
            conn.uncork()

    def _acknowledge(self, conn: Connection, command: Subscribe, result: FollowResult) -> None:
        for job_id in result.not_found:
            conn.reply(
                Error(code="job_not_found", message="job not found", job_id=job_id, id=command.id)
            )
        for job_id in result.limit_exceeded:
            conn.reply(
                Error(
                    code="too_many_subscriptions",
                    message=f"a connection may follow at most {self._max_subscriptions} jobs",
                    job_id=job_id,
                    id=command.id,
                )
            )
        if result.job_ids:
            conn.reply(
                Subscribed(
                    job_ids=result.job_ids, recovered=result.recovered or None, id=command.id
                )
            )
