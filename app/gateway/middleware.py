"""Pure-ASGI middleware: request context, authentication, error rendering.

* :class:`RequestContextMiddleware` gives every request an id (``X-Request-ID``,
  taken from the client when it is sane), binds it to structlog's context so
  every log line of the request carries it, logs one access line, and feeds
  the Prometheus request metrics; a request whose client went away mid-body
  (see :mod:`app.gateway.bodyguard`) is logged as ``client_disconnected`` with
  status 499 instead.
* :class:`AuthMiddleware` verifies the bearer token on every ``/api/v1`` route
  and stores the :class:`~app.core.auth.Identity` in ``scope["state"]``.
* :func:`exception_handlers` renders every error in the one JSON shape; an
  unexpected exception becomes a 500 naming only the request id, except that
  losing Postgres or Redis (wherever in a request it happens) is a 503
  ``database_unavailable`` / ``redis_unavailable`` with ``Retry-After``
  (:func:`app.core.outage.as_unavailable`).
"""

from __future__ import annotations

import re
import time
import uuid
import weakref
from typing import Any

import asyncpg
import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.auth import TokenService
from app.core.errors import SluiceError, Unauthorized
from app.core.logging import get_logger
from app.core.outage import OUTAGE_TYPES, as_unavailable
from app.core.schemas import ErrorBody
from app.gateway.bodyguard import CLIENT_CLOSED_REQUEST
from app.gateway.http import json_response

log = get_logger("sluice.gateway")
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
API_PREFIX = "/api/v1/"


def request_id_of(scope: Scope) -> str | None:
    value = scope.get("state", {}).get("request_id")
    return value if isinstance(value, str) else None


def error_response(exc: SluiceError, request_id: str | None) -> Response:
    body = ErrorBody(
        error=exc.code, message=exc.message, details=exc.details, request_id=request_id
    )
    headers = dict(exc.headers)
    if request_id:
        headers["X-Request-ID"] = request_id
    return json_response(body, exc.status, headers=headers)


class HttpMetrics:
    """Request counters and latencies; one set per registry (apps may share one)."""

    _by_registry: weakref.WeakKeyDictionary[CollectorRegistry, HttpMetrics] = (
        weakref.WeakKeyDictionary()
    )

    @classmethod
    def of(cls, registry: CollectorRegistry) -> HttpMetrics:
        metrics = cls._by_registry.get(registry)
        if metrics is None:
            metrics = cls._by_registry[registry] = cls(registry)
        return metrics

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "sluice_http_requests_total",
            "HTTP requests",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "sluice_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            registry=registry,
        )


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        supplied = Request(scope).headers.get("x-request-id", "")
        request_id = supplied if _REQUEST_ID_RE.match(supplied) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"x-request-id" for k, _ in headers):
                    headers.append((b"x-request-id", request_id.encode()))
                message["headers"] = headers
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                elapsed = time.perf_counter() - started
                route = _route_template(scope)
                gone = scope["state"].get("client_disconnected")
                if gone is not None:
                    status = CLIENT_CLOSED_REQUEST
                self.metrics.requests.labels(scope["method"], route, str(status)).inc()
                self.metrics.latency.labels(scope["method"], route).observe(elapsed)
                if gone is not None:
                    log.info(
                        "client_disconnected",
                        method=scope["method"],
                        path=scope["path"],
                        route=route,
                        status=status,
                        bytes_received=gone,
                        duration_ms=round(elapsed * 1000, 2),
                    )
                elif route not in {"/health", "/health/ready", "/metrics"}:
                    log.info(
                        "request",
                        method=scope["method"],
                        path=scope["path"],
                        status=status,
                        duration_ms=round(elapsed * 1000, 2),
                    )


def _route_template(scope: Scope) -> str:
    app = scope.get("app")
    for route in getattr(app, "routes", ()):
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return str(getattr(route, "path", "unmatched"))
    return "unmatched"


class AuthMiddleware:
    def __init__(self, app: ASGIApp, *, tokens: TokenService) -> None:
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(API_PREFIX):
            await self.app(scope, receive, send)
            return
        if scope["method"] == "OPTIONS":  # CORS preflight carries no credentials
            await self.app(scope, receive, send)
            return
        try:
            identity = self.tokens.verify_header(Request(scope).headers.get("authorization"))
        except Unauthorized as exc:
            exc.headers.setdefault("WWW-Authenticate", 'Bearer realm="sluice"')
            await error_response(exc, request_id_of(scope))(scope, receive, send)
            return
        scope.setdefault("state", {})["identity"] = identity
        with structlog.contextvars.bound_contextvars(user_id=identity.user_id):
            await self.app(scope, receive, send)


async def _sluice_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SluiceError)
    if exc.status >= 500:
        log.error("request_failed", code=exc.code, error=exc.message)
    return error_response(exc, request_id_of(request.scope))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    err = SluiceError(str(exc.detail), code=codes.get(exc.status_code, "http_error"))
    err.status = exc.status_code  # type: ignore[misc]
    if exc.headers:
        err.headers.update(exc.headers)
    if exc.status_code == 405:
        err.headers["Allow"] = ", ".join(_allowed_methods(request.scope))
    return error_response(err, request_id_of(request.scope))


def _allowed_methods(scope: Scope) -> list[str]:
    """Every method some route serves at this path (Starlette's 405 names only
    the first route's, but a path such as a document's has one route per method)."""
    allowed: set[str] = set()
    for route in getattr(scope.get("app"), "routes", ()):
        match, _ = route.matches({**scope, "method": "GET"})
        methods = getattr(route, "methods", None)
        if match is not Match.NONE and methods:
            allowed |= set(methods)
    return sorted(allowed)


async def _outage_response(request: Request, exc: Exception) -> Response | None:
    unavailable = as_unavailable(exc)
    if unavailable is None:
        return None
    log.warning("dependency_unavailable", code=unavailable.code, error=type(exc).__name__)
    if unavailable.code == "database_unavailable":
        # Pooled connections that lived through the outage may be broken in ways
        # asyncpg does not notice: have them all replaced on their next use.
        db = getattr(getattr(request.app.state, "services", None), "db", None)
        if isinstance(db, asyncpg.Pool):
            await db.expire_connections()
    return error_response(unavailable, request_id_of(request.scope))


async def _outage(request: Request, exc: Exception) -> Response:
    """Exceptions that may mean a lost Postgres/Redis: 503 if so, else a plain 500."""
    return await _outage_response(request, exc) or await _unexpected(request, exc)


async def _unexpected(request: Request, exc: Exception) -> Response:
    outage = await _outage_response(request, exc)  # raised in a middleware (rate limits...)
    if outage is not None:
        return outage
    request_id = request_id_of(request.scope)
    log.exception("unhandled_error", path=request.url.path)
    err = SluiceError(
        f"internal error; quote request id {request_id} when reporting it", code="internal_error"
    )
    return error_response(err, request_id)


def exception_handlers() -> dict[Any, Any]:
    return {
        SluiceError: _sluice_error,
        HTTPException: _http_error,
        **dict.fromkeys(OUTAGE_TYPES, _outage),
        Exception: _unexpected,
    }
