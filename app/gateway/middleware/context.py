"""The request context: an id for every request, its access log line, its metrics.

:class:`RequestContextMiddleware` gives every request an id (``X-Request-ID``,
taken from the client when it is sane), binds it to structlog's context so
every log line of the request carries it, logs one access line, and feeds
the Prometheus request metrics; a request whose client went away mid-body
(see :mod:`app.gateway.middleware.bodyguard`) is logged as ``client_disconnected``
with status 499 instead.
"""

from __future__ import annotations

import re
import time
import uuid

import structlog
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.logging import get_logger
from app.gateway.metrics import HttpMetrics
from app.gateway.middleware.bodyguard import CLIENT_CLOSED_REQUEST
from app.gateway.routing import route_template

log = get_logger("sluice.gateway")
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_QUIET_ROUTES = frozenset({"/health", "/health/ready", "/metrics"})
"""Probes and scrapes: counted in the metrics, but no access log line."""


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
                self._record(scope, status, time.perf_counter() - started)

    def _record(self, scope: Scope, status: int, elapsed: float) -> None:
        """Count the request and log its access line (or its client's disappearance)."""
        route = route_template(scope)
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
        elif route not in _QUIET_ROUTES:
            log.info(
                "request",
                method=scope["method"],
                path=scope["path"],
                status=status,
                duration_ms=round(elapsed * 1000, 2),
            )
