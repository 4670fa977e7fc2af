"""Liveness, readiness, metrics and the caller's identity.

``/health`` answers as long as the process serves HTTP; ``/health/ready``
checks Postgres, Redis and S3 concurrently (each bounded by a timeout) and is
503 when any is down, so a load balancer stops routing here.  Both are
unauthenticated so that probes can reach them; they reveal no data.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from app.core.schemas import DependencyHealth, Liveness, Readiness, WhoAmI
from app.gateway.requests import identity
from app.gateway.responses import json_response
from app.gateway.routing import ApiRoute
from app.gateway.services import Services, services

CHECK_TIMEOUT = 2.0


async def _timed(check: Callable[[], Awaitable[Any]]) -> DependencyHealth:
    started = time.perf_counter()
    try:
        await asyncio.wait_for(check(), CHECK_TIMEOUT)
    except Exception as exc:  # any failure means "down"; say what it was
        elapsed = (time.perf_counter() - started) * 1000
        reason = "timed out" if isinstance(exc, TimeoutError) else type(exc).__name__
        return DependencyHealth(status="down", latency_ms=round(elapsed, 2), error=reason)
    return DependencyHealth(
        status="ok", latency_ms=round((time.perf_counter() - started) * 1000, 2)
    )


async def liveness(_request: Request) -> Response:
    return json_response(Liveness())


async def check_dependencies(svc: Services) -> Readiness:
    """Postgres, Redis and S3, checked concurrently, each with its latency (also the
    dependencies of ``GET /api/v1/admin/fleet``)."""
    names = ("postgres", "redis", "s3")
    results = await asyncio.gather(
        _timed(lambda: svc.db.fetchval("SELECT 1")),
        _timed(svc.redis.ping),
        _timed(lambda: svc.s3.head_bucket(Bucket=svc.settings.minio_bucket_name)),
    )
    checks = dict(zip(names, results, strict=True))
    ok = all(c.status == "ok" for c in results)
    return Readiness(status="ok" if ok else "degraded", checks=checks)


async def readiness(request: Request) -> Response:
    ready = await check_dependencies(services(request))
    return json_response(ready, 200 if ready.status == "ok" else 503)


async def metrics(request: Request) -> Response:
    return Response(
        generate_latest(services(request).metrics.registry), media_type=CONTENT_TYPE_LATEST
    )


async def whoami(request: Request) -> Response:
    ident = identity(request)
    return json_response(
        WhoAmI(
            user_id=ident.user_id,
            token_expires_at=datetime.fromtimestamp(ident.expires_at, UTC),
            admin=ident.admin,
        )
    )


def routes() -> list[ApiRoute]:
    return [
        ApiRoute(
            "/health",
            liveness,
            methods=["GET"],
            summary="Liveness",
            response=Liveness,
            auth=False,
            tags=["health"],
        ),
        ApiRoute(
            "/health/ready",
            readiness,
            methods=["GET"],
            response=Readiness,
            other_responses={503: Readiness},
            summary="Readiness: Postgres, Redis and S3 with latencies",
            auth=False,
            tags=["health"],
        ),
        ApiRoute(
            "/metrics",
            metrics,
            methods=["GET"],
            summary="Prometheus metrics",
            auth=False,
            tags=["health"],
            response_media_type="text/plain",
        ),
        ApiRoute(
            "/api/v1/me",
            whoami,
            methods=["GET"],
            summary="The authenticated caller",
            response=WhoAmI,
            tags=["auth"],
        ),
    ]
