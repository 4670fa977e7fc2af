"""Exception handlers: every error in the one JSON shape.

:func:`exception_handlers` renders a :class:`~app.core.errors.SluiceError` with
its status and code; Starlette's 404/405 as ``not_found`` / ``method_not_allowed``
(a 405's ``Allow`` names every method of the path); an unexpected exception
becomes a 500 naming only the request id, except that losing Postgres or Redis
(wherever in a request it happens) is a 503 ``database_unavailable`` /
``redis_unavailable`` with ``Retry-After`` (:func:`app.core.outage.as_unavailable`).
"""

from __future__ import annotations

from typing import Any

import asyncpg
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import Scope

from app.core.errors import SluiceError
from app.core.logging import get_logger
from app.core.outage import OUTAGE_TYPES, as_unavailable
from app.gateway.responses import error_response, request_id_of

log = get_logger("sluice.gateway")


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
