"""The Starlette application factory."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import BaseRoute, Route

from app.core.auth import TokenService
from app.core.logging import get_logger
from app.core.looplag import LoopLagProbe
from app.core.settings import Settings
from app.core.storage import ensure_bucket
from app.gateway.admission import PartSlots
from app.gateway.metrics import GatewayMetrics, HttpMetrics
from app.gateway.middleware.auth import AuthMiddleware
from app.gateway.middleware.bodyguard import BodyGuardMiddleware, BodyPolicy
from app.gateway.middleware.context import RequestContextMiddleware
from app.gateway.middleware.errors import exception_handlers
from app.gateway.middleware.ratelimit import RateLimitMiddleware
from app.gateway.openapi import build_openapi, docs_routes, openapi_endpoint
from app.gateway.routes import (
    admin,
    dashboard,
    dashboard_config,
    documents,
    health,
    jobs,
    search,
    simple,
    tus,
    uploads,
)
from app.gateway.services import Services, open_services
from app.uploads.sweeper import run_sweeper
from app.uploads.tus import TusRuntime

log = get_logger("sluice.gateway")
VERSION = "0.1.0"
EXPOSED_HEADERS = [
    "X-Request-ID",
    "Retry-After",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
    "ETag",
    *tus.CORS_EXPOSE_HEADERS,
]


def api_routes() -> list[BaseRoute]:
    """Every documented route of the gateway, in one place."""
    return [
        *health.routes(),
        *uploads.routes(),
        *simple.routes(),
        *jobs.routes(),
        *documents.routes(),
        *search.routes(),
        *dashboard_config.routes(),
        *admin.routes(),
    ]


def create_app(settings: Settings, *, services: Services | None = None) -> Starlette:
    """Build the gateway.

    With ``services`` given (tests), the caller owns them; otherwise they are
    opened from ``settings`` in the app's lifespan and closed at shutdown.  The
    metrics are built before either (the middleware records into them) and
    are the services' own.
    """
    metrics = services.metrics if services is not None else GatewayMetrics()
    tokens = services.tokens if services is not None else TokenService(settings.jwt_secret.reveal())
    routes = api_routes()
    spec = build_openapi(routes, title="Sluice", version=VERSION)
    routes += [
        *tus.routes(),  # a protocol of its own (tus.io 1.0.0), outside the OpenAPI document
        Route("/openapi.json", openapi_endpoint(spec), methods=["GET"], include_in_schema=False),
        *docs_routes(),
        *dashboard.routes(settings),  # the operations page, static files (not in OpenAPI)
    ]
    app = Starlette(
        routes=routes,
        lifespan=_lifespan(settings, services, metrics),
        exception_handlers=exception_handlers(),
        middleware=middleware_stack(settings, metrics.http, tokens),
    )
    app.state.part_slots = PartSlots(settings.max_parts_in_flight_per_user)
    app.state.tus = TusRuntime.of(settings)
    if services is not None:
        app.state.services = services
    return app


def middleware_stack(
    settings: Settings, metrics: HttpMetrics, tokens: TokenService
) -> list[Middleware]:
    """The gateway's middleware, outermost first (see :mod:`app.gateway.middleware`)."""
    return [
        Middleware(RequestContextMiddleware, metrics=metrics),
        Middleware(BodyGuardMiddleware, policy=BodyPolicy.of(settings)),
        Middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "PUT", "DELETE", "OPTIONS", *tus.CORS_METHODS],
            allow_headers=[
                "Authorization",
                "Content-Type",
                "Content-MD5",
                "X-Chunk-Hash",
                "X-Request-ID",
                *tus.CORS_ALLOW_HEADERS,
            ],
            expose_headers=EXPOSED_HEADERS,
            max_age=600,
        ),
        Middleware(tus.TusProtocolMiddleware),
        Middleware(AuthMiddleware, tokens=tokens),
        Middleware(RateLimitMiddleware, settings=settings),
    ]


def _lifespan(
    settings: Settings, services: Services | None, metrics: GatewayMetrics
) -> Callable[[Starlette], AbstractAsyncContextManager[None]]:
    """The app's lifespan: nothing when the caller owns ``services``; otherwise open
    them (with ``metrics``), make sure the bucket exists and run the upload sweeper."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if services is not None:
            try:
                yield
            finally:
                await app.state.tus.aclose()  # folds left in the background
            return
        async with open_services(settings, metrics=metrics) as svc:
            await ensure_bucket(svc.s3, settings.minio_bucket_name)
            app.state.services = svc
            sweeper = asyncio.create_task(
                run_sweeper(uploads.upload_context(svc), svc.redis), name="upload-sweeper"
            )
            lag = LoopLagProbe(metrics.loop_lag, "gateway", interval=0.05)
            lag.start()
            log.info("gateway_started")
            try:
                yield
            finally:
                await app.state.tus.aclose()
                await lag.stop()
                sweeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sweeper
        log.info("gateway_stopped")

    return lifespan
