"""The fleet-wide views: every user's jobs, the queue, the fleet, the WebSocket servers.

Every route here is declared ``admin=True``: the authentication middleware
answers a token without ``role: "admin"`` 403 ``admin_required`` before these
handlers run (:mod:`app.gateway.routing`), so they never check it themselves.
The handlers parse, call :mod:`app.jobs.service`, :mod:`app.jobs.queue_stats`
or :mod:`app.jobs.fleet_status` and respond.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from app.core.schemas import Page
from app.gateway.requests import query_params
from app.gateway.responses import json_response
from app.gateway.routes.health import check_dependencies
from app.gateway.routing import ApiRoute
from app.gateway.services import services
from app.jobs import fleet_status, service
from app.jobs.ops_schemas import AdminJobListQuery, AdminJobView, Fleet, QueueStats, WsStats
from app.jobs.queue_stats import queue_stats


async def list_all_jobs(request: Request) -> Response:
    query = query_params(request, AdminJobListQuery)
    return json_response(await service.list_all_jobs(services(request), query))


async def get_queue(request: Request) -> Response:
    svc = services(request)
    return json_response(await queue_stats(svc.db, svc.queue))


async def get_fleet(request: Request) -> Response:
    svc = services(request)
    view = await fleet_status.fleet(
        svc.db,
        svc.redis,
        now=svc.clock(),
        lease_seconds=svc.settings.job_lease_seconds,
        dependencies=await check_dependencies(svc),
    )
    return json_response(view)


async def get_ws_stats(request: Request) -> Response:
    svc = services(request)
    return json_response(await fleet_status.ws_stats(svc.redis, now=svc.clock()))


def routes() -> list[ApiRoute]:
    return [
        ApiRoute(
            "/api/v1/admin/jobs",
            list_all_jobs,
            methods=["GET"],
            summary="Every user's jobs, with their owner (admin)",
            query=AdminJobListQuery,
            response=Page[AdminJobView],
            admin=True,
            tags=["admin"],
        ),
        ApiRoute(
            "/api/v1/admin/queue",
            get_queue,
            methods=["GET"],
            summary="Queue depth and oldest wait per priority, rates, the aging rule (admin)",
            response=QueueStats,
            admin=True,
            tags=["admin"],
        ),
        ApiRoute(
            "/api/v1/admin/fleet",
            get_fleet,
            methods=["GET"],
            summary="Workers with their running jobs, WebSocket servers, dependencies (admin)",
            response=Fleet,
            admin=True,
            tags=["admin"],
        ),
        ApiRoute(
            "/api/v1/ws/stats",
            get_ws_stats,
            methods=["GET"],
            summary="Connections, sessions, subscriptions and messages/s per WebSocket "
            "server and in total (admin)",
            response=WsStats,
            admin=True,
            tags=["admin"],
        ),
    ]
