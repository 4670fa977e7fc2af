"""Jobs: status, listing, cancel and retry.

``GET /api/v1/jobs/{job_id}`` shows a job's status, stage and progress, its
attempts, error, warnings and the time spent per stage; ``lease_expired`` is
true while a ``running`` job's worker has stopped renewing its lease (the
workers' reaper re-queues it).  Cancel goes through
:func:`app.jobs.service.request_cancel`, the one cancel path; a job that had
not started is also dropped from the ARQ queue.  Retry re-queues a ``failed``
or ``cancelled`` job under the same id with fresh attempts.  A job's events
(``/events?since=``) are what the WebSocket replays after ``since``
(:mod:`app.jobs.timeline`); an admin reads any job's.  Another user's
job is indistinguishable from a missing one (404).  The handlers parse, call
:mod:`app.jobs.service` and respond.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from app.core.errors import BadRequest, ValidationFailed
from app.core.schemas import Page
from app.gateway.requests import identity, query_params
from app.gateway.responses import json_response
from app.gateway.routing import ApiLink, ApiRoute
from app.gateway.services import services
from app.jobs import service, timeline
from app.jobs.model import JobStatus
from app.jobs.ops_schemas import JobEvents, JobEventsQuery
from app.jobs.schemas import JobListQuery, JobView


async def get_job(request: Request) -> Response:
    job_id = request.path_params["job_id"]
    return json_response(
        await service.get_job(services(request), job_id, identity(request).user_id)
    )


async def list_jobs(request: Request) -> Response:
    query = query_params(request, JobListQuery)
    return json_response(
        await service.list_jobs(services(request), identity(request).user_id, query)
    )


def events_query(request: Request) -> JobEventsQuery:
    """``?since=&limit=``: a bad value of either is 400 ``invalid_since`` /
    ``invalid_limit`` naming the range; other parameters are 422 as on every route."""
    try:
        return query_params(request, JobEventsQuery)
    except ValidationFailed as exc:
        field = exc.details.get("field")
        if field not in ("since", "limit"):
            raise
        expected = "an integer >= 0" if field == "since" else "an integer from 1 to 1000"
        raise BadRequest(
            f"{field} must be {expected}", code=f"invalid_{field}", details={"field": field}
        ) from None


async def job_events(request: Request) -> Response:
    query = events_query(request)
    svc = services(request)
    return json_response(
        await timeline.job_events(
            svc.db,
            svc.redis,
            request.path_params["job_id"],
            identity(request),
            since=query.since,
            limit=query.limit,
        )
    )


async def cancel_job(request: Request) -> Response:
    job_id = request.path_params["job_id"]
    view = await service.cancel_job(services(request), job_id, identity(request).user_id)
    return json_response(view, 202 if view.status == JobStatus.RUNNING else 200)


async def retry_job(request: Request) -> Response:
    job_id = request.path_params["job_id"]
    view = await service.retry_job(services(request), job_id, identity(request).user_id)
    return json_response(view, 202)


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
            "/api/v1/jobs/{job_id}/events",
            job_events,
            methods=["GET"],
            summary="A job's events after `since`, as the WebSocket replays them",
            query=JobEventsQuery,
            response=JobEvents,
            errors=[400, *errors],
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
