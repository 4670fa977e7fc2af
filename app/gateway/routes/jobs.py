"""Jobs: status, listing, cancel and retry.

``GET /api/v1/jobs/{job_id}`` shows a job's status, stage and progress, its
attempts, error, warnings and the time spent per stage; ``lease_expired`` is
true while a ``running`` job's worker has stopped renewing its lease (the
workers' reaper re-queues it).  Cancel goes through
:func:`app.jobs.transitions.request_cancel`, the one cancel path; a job that had not
started is also dropped from the ARQ queue.  Retry re-queues a ``failed`` or
``cancelled`` job under the same id with fresh attempts.  Another user's job
is indistinguishable from a missing one (404).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

import asyncpg
from starlette.requests import Request
from starlette.responses import Response

from app.core.errors import Conflict, NotFound
from app.core.logging import get_logger
from app.core.queue import Priority
from app.core.schemas import Page, PageQuery, decode_cursor, encode_cursor
from app.core.schemas import Response as ResponseBody
from app.core.storage import client_error_code
from app.gateway.requests import identity, query_params
from app.gateway.responses import json_response
from app.gateway.routing import ApiLink, ApiRoute
from app.gateway.services import Services, services
from app.jobs.events import publish_event
from app.jobs.model import JobStatus
from app.jobs.transitions import record_progress, request_cancel

log = get_logger("sluice.gateway.jobs")

JobStatusName = Literal[
    "awaiting_upload", "queued", "running", "retrying", "completed", "failed", "cancelled"
]


class JobView(ResponseBody):
    job_id: str
    document_id: str
    status: str
    priority: str
    stage: str | None
    stage_progress: float
    overall_progress: float
    message: str
    seq: int
    attempts: int
    max_attempts: int
    error_code: str | None
    error_message: str | None
    warnings: list[dict[str, Any]]
    stage_timings: dict[str, list[float]]
    """Seconds spent in each stage, one entry per run of it, oldest first (a job retried
    after a failure runs some stages again; stages resumed from a checkpoint add none)."""
    result: dict[str, Any]
    cancel_requested: bool
    lease_expired: bool
    """A running job whose worker stopped renewing its lease; it will be retried."""
    created_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime


class JobListQuery(PageQuery):
    status: JobStatusName | None = None
    priority: Priority | None = None
    document_id: uuid.UUID | None = None


JOB_COLUMNS = """
    j.id::text AS job_id, j.document_id::text AS document_id, j.status, j.priority, j.stage,
    j.stage_progress, j.overall_progress, j.message, j.seq, j.attempts, j.error_code,
    j.error_message, j.warnings, j.stage_timings, j.result, j.cancel_requested,
    (j.status = 'running' AND j.lease_expires_at < now()) AS lease_expired,
    j.created_at, j.queued_at, j.started_at, j.finished_at, j.updated_at
"""


def job_view(row: asyncpg.Record, max_attempts: int) -> JobView:
    data = dict(row)
    data["stage_progress"] = round(float(data["stage_progress"]), 4)
    data["overall_progress"] = round(float(data["overall_progress"]), 4)
    data["lease_expired"] = bool(data["lease_expired"])
    data["stage_timings"] = {  # rows written before timings kept every run hold a number
        k: v if isinstance(v, list) else [v] for k, v in data["stage_timings"].items()
    }
    return JobView(max_attempts=max_attempts, **data)


def parse_id(value: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise NotFound(f"{what} not found", code=f"{what}_not_found") from None


async def load_job(
    db: asyncpg.Pool | asyncpg.Connection, job_id: str, owner_id: str, max_attempts: int
) -> JobView:
    row = await db.fetchrow(
        f"SELECT {JOB_COLUMNS} FROM jobs j WHERE j.id = $1 AND j.owner_id = $2",
        parse_id(job_id, "job"),
        owner_id,
    )
    if row is None:
        raise NotFound("job not found", code="job_not_found")
    return job_view(row, max_attempts)


async def get_job(request: Request) -> Response:
    svc = services(request)
    view = await load_job(
        svc.db,
        request.path_params["job_id"],
        identity(request).user_id,
        svc.settings.task_retry_max_attempts,
    )
    return json_response(view)


async def list_jobs(request: Request) -> Response:
    svc = services(request)
    q = query_params(request, JobListQuery)
    args: list[Any] = [identity(request).user_id]
    where = ["j.owner_id = $1"]
    if q.status is not None:
        args.append(q.status)
        where.append(f"j.status = ${len(args)}")
    if q.priority is not None:
        args.append(str(q.priority))
        where.append(f"j.priority = ${len(args)}")
    if q.document_id is not None:
        args.append(q.document_id)
        where.append(f"j.document_id = ${len(args)}")
    if q.cursor:
        created, last_id = decode_cursor(q.cursor)
        args += [created, last_id]
        where.append(f"(j.created_at, j.id) < (${len(args) - 1}, ${len(args)})")
    args.append(q.limit + 1)
    rows = await svc.db.fetch(
        f"SELECT {JOB_COLUMNS} FROM jobs j WHERE {' AND '.join(where)} "
        f"ORDER BY j.created_at DESC, j.id DESC LIMIT ${len(args)}",
        *args,
    )
    items = [job_view(r, svc.settings.task_retry_max_attempts) for r in rows[: q.limit]]
    cursor = encode_cursor(items[-1].created_at, items[-1].job_id) if len(rows) > q.limit else None
    return json_response(Page[JobView](items=items, next_cursor=cursor))


async def cancel_job(request: Request) -> Response:
    svc = services(request)
    job_id = request.path_params["job_id"]
    owner = identity(request).user_id
    event = await request_cancel(svc.db, svc.redis, job_id, owner)
    if event.status == JobStatus.CANCELLED:
        try:  # it had not started: drop it from the queue too (workers skip it anyway)
            await svc.queue.abort(job_id)
        except Exception:
            log.warning("queue_abort_failed", job_id=job_id, exc_info=True)
    view = await load_job(svc.db, job_id, owner, svc.settings.task_retry_max_attempts)
    return json_response(view, 202 if view.status == JobStatus.RUNNING else 200)


async def retry_job(request: Request) -> Response:
    svc = services(request)
    job_id = request.path_params["job_id"]
    owner = identity(request).user_id
    job_uuid = parse_id(job_id, "job")
    async with svc.db.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "SELECT j.status, j.priority, d.object_key, d.status AS doc_status FROM jobs j "
            "JOIN documents d ON d.id = j.document_id "
            "WHERE j.id = $1 AND j.owner_id = $2 FOR UPDATE OF j",
            job_uuid,
            owner,
        )
        if row is None:
            raise NotFound("job not found", code="job_not_found")
        if row["status"] not in (JobStatus.FAILED, JobStatus.CANCELLED):
            raise Conflict(
                f"only failed or cancelled jobs can be retried (job is {row['status']})",
                code="job_not_retryable",
                details={"status": row["status"]},
            )
        if not await _object_exists(svc, row["object_key"]):
            raise Conflict(
                "the document's upload never completed; upload it again", code="upload_incomplete"
            )
        await conn.execute(
            """
            UPDATE jobs SET attempts = 0, error_code = NULL, error_message = NULL,
                   cancel_requested = false, lease_owner = NULL, lease_expires_at = NULL,
                   warnings = '[]', result = '{}', queued_at = NULL, started_at = NULL,
                   finished_at = NULL
            WHERE id = $1
            """,
            job_uuid,
        )
        await conn.execute(
            "UPDATE documents SET status = 'stored', updated_at = now() "
            "WHERE id = (SELECT document_id FROM jobs WHERE id = $1) AND status <> 'indexed'",
            job_uuid,
        )
        event = await record_progress(
            conn,
            None,
            job_id,
            status=JobStatus.QUEUED,
            stage=None,
            stage_progress=0.0,
            # overall_progress is left as it is: it never goes back within a job,
            # and the new run's first progress starts from it.
            message="queued again (retry requested)",
        )
    assert event is not None
    try:
        await publish_event(svc.redis, event)
    except Exception:
        log.warning("event_publish_failed", job_id=job_id, exc_info=True)
    await svc.queue.enqueue(job_id, row["priority"])
    view = await load_job(svc.db, job_id, owner, svc.settings.task_retry_max_attempts)
    return json_response(view, 202)


async def _object_exists(svc: Services, key: str) -> bool:
    try:
        await svc.s3.head_object(Bucket=svc.settings.minio_bucket_name, Key=key)
    except Exception as exc:
        if client_error_code(exc) in {"404", "NoSuchKey", "NotFound"}:
            return False
        raise
    return True


def job_links(source: str) -> list[ApiLink]:
    """Links from a response holding a job id at ``source`` to every job route."""
    param = {"job_id": source}
    return [
        ApiLink(name="GetJob", operation="get_get_job", parameters=param),
        ApiLink(name="CancelJob", operation="post_cancel_job", parameters=param),
        ApiLink(name="RetryJob", operation="post_retry_job", parameters=param),
    ]


def routes() -> list[ApiRoute]:
    errors = [404]
    return [
        ApiRoute(
            "/api/v1/jobs",
            list_jobs,
            methods=["GET"],
            summary="List your jobs",
            query=JobListQuery,
            response=Page[JobView],
            links=job_links("$response.body#/items/0/job_id"),
            tags=["jobs"],
        ),
        ApiRoute(
            "/api/v1/jobs/{job_id}",
            get_job,
            methods=["GET"],
            summary="A job's status, progress, attempts, error and stage timings",
            response=JobView,
            errors=errors,
            links=job_links("$response.body#/job_id")[1:],
            tags=["jobs"],
        ),
        ApiRoute(
            "/api/v1/jobs/{job_id}/cancel",
            cancel_job,
            methods=["POST"],
            summary="Cancel a job (a running one stops at its next boundary)",
            response=JobView,
            errors=[*errors, 409],
            links=job_links("$response.body#/job_id")[::2],
            tags=["jobs"],
        ),
        ApiRoute(
            "/api/v1/jobs/{job_id}/retry",
            retry_job,
            methods=["POST"],
            summary="Queue a failed or cancelled job again",
            response=JobView,
            status_code=202,
            errors=[*errors, 409],
            links=job_links("$response.body#/job_id")[:2],
            tags=["jobs"],
        ),
    ]
