"""Authentication and rate limits follow each route's declaration, not its path.

:class:`~app.gateway.routing.ApiRoute` declares ``auth`` and ``rate_limit``; the
middleware read them through :func:`~app.gateway.routing.policy_of`.  The first
test pins that every route of the API declares what the path rules it replaced
(``/api/v1/`` prefix for auth, a part-transfer regex and an upload-start set for
the rate limiter) gave it, so the move changed no route's behaviour.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

from app.core.auth import TokenService
from app.gateway.app import api_routes, create_app
from app.gateway.routing import (
    ApiRoute,
    RateLimit,
    RoutePolicy,
    policy_of,
    resolve,
    route_template,
)
from app.gateway.services import Services
from tests.conftest import JWT_SECRET

# The rules the declarations replaced, verbatim from the old middleware.
OLD_API_PREFIX = "/api/v1/"
OLD_PART_TRANSFER_RE = re.compile(r"^/api/v1/documents/upload/(chunk|[^/]+/parts/\d+(/presign)?)$")
OLD_UPLOAD_START_PATHS = frozenset(
    {"/api/v1/documents/upload/initiate", "/api/v1/documents/upload/simple"}
)


ADMIN_ONLY = frozenset(
    {"/api/v1/admin/jobs", "/api/v1/admin/queue", "/api/v1/admin/fleet", "/api/v1/ws/stats"}
)


def old_policy(method: str, path: str) -> RoutePolicy:
    if not path.startswith(OLD_API_PREFIX):
        return RoutePolicy(auth=False, rate_limit=RateLimit.NONE)
    if OLD_PART_TRANSFER_RE.match(path):
        cost = RateLimit.PART_TRANSFER
    elif method == "POST" and path.rstrip("/") in OLD_UPLOAD_START_PATHS:
        cost = RateLimit.UPLOAD_START
    else:
        cost = RateLimit.API
    return RoutePolicy(auth=True, rate_limit=cost)


def concrete(template: str) -> str:
    """A path the template matches: ids are UUIDs, part numbers 1."""

    def fill(m: re.Match[str]) -> str:
        name = m.group(1)
        return str(uuid.uuid4()) if name.endswith("_id") else "1"

    return re.sub(r"{([a-z_]+)(?::[a-z]+)?}", fill, template)


def scope_for(app: Starlette, method: str, path: str) -> dict[str, Any]:
    return {"type": "http", "method": method, "path": path, "app": app, "headers": []}


def test_every_route_declares_what_the_path_rules_gave_it() -> None:
    app = Starlette(routes=api_routes())
    checked = 0
    for route in api_routes():
        assert isinstance(route, ApiRoute)
        for method in sorted(route.methods or ()):
            if method == "HEAD":
                continue
            path = concrete(route.path)
            scope = scope_for(app, method, path)
            assert resolve(scope)[1] is not None, (method, path)
            # The path rules knew nothing of the admin role: compare the rest, and
            # pin which routes are admin-only (the fleet-wide views of issue 11).
            policy = policy_of(scope)
            assert dataclasses.replace(policy, admin=False) == old_policy(method, path), (
                method,
                route.path,
            )
            assert policy.admin is (route.path in ADMIN_ONLY), route.path
            assert route_template(scope) == route.path
            checked += 1
    assert checked >= 20
    declared = {r.path: r.rate_limit for r in api_routes() if isinstance(r, ApiRoute)}
    assert sorted(p for p, cost in declared.items() if cost is RateLimit.PART_TRANSFER) == [
        "/api/v1/documents/upload/chunk",
        "/api/v1/documents/upload/{upload_id}/parts/{part_number}",
        "/api/v1/documents/upload/{upload_id}/parts/{part_number}/presign",
    ]


def test_undeclared_paths_fall_back_to_the_api_prefix() -> None:
    app = Starlette(routes=api_routes())
    authenticated = RoutePolicy(auth=True, rate_limit=RateLimit.API)
    public = RoutePolicy(auth=False, rate_limit=RateLimit.NONE)
    cases = {
        ("GET", "/api/v1/nope"): authenticated,  # 404 under the API: 401 without a token
        ("DELETE", "/api/v1/me"): authenticated,  # 405: the path's route needs auth
        ("GET", "/api/v1/documents/upload/chunk"): authenticated,  # 405: not a transfer
        ("GET", "/api/v1/documents/upload/initiate"): authenticated,  # 405: not a start
        ("POST", "/health"): public,  # 405 on a public route
        ("GET", "/favicon.ico"): public,  # 404 outside the API
    }
    for (method, path), expected in cases.items():
        scope = scope_for(app, method, path)
        assert policy_of(scope) == expected, (method, path)
        assert route_template(scope) == "unmatched", (method, path)


def test_a_public_route_cannot_be_rate_limited() -> None:
    with pytest.raises(ValueError, match="public"):
        RoutePolicy(auth=False, rate_limit=RateLimit.API)
    with pytest.raises(ValueError, match="public"):
        ApiRoute(
            "/x", _ok, methods=["GET"], summary="x", auth=False, rate_limit=RateLimit.UPLOAD_START
        )
    assert ApiRoute("/x", _ok, methods=["GET"], summary="x", auth=False).rate_limit is (
        RateLimit.NONE
    )
    assert ApiRoute("/x", _ok, methods=["GET"], summary="x").rate_limit is RateLimit.API


async def _ok(_request: Request) -> Response:
    return Response(b"ok")


async def test_the_declaration_decides_not_the_path(services: Services) -> None:
    """A public route under /api/v1 needs no token; an authenticated one outside it does."""
    app = create_app(services.settings, services=services)
    app.router.routes += [
        ApiRoute("/api/v1/open", _ok, methods=["GET"], summary="open", auth=False),
        ApiRoute("/private", _ok, methods=["GET"], summary="private"),
        ApiRoute(
            "/private/transfer",
            _ok,
            methods=["POST"],
            summary="transfer",
            rate_limit=RateLimit.PART_TRANSFER,
        ),
    ]
    token = TokenService(JWT_SECRET).mint(f"policy-{uuid.uuid4().hex[:8]}")
    auth = {"Authorization": f"Bearer {token}"}
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        r = await c.get("/api/v1/open")
        assert r.status_code == 200 and "x-ratelimit-limit" not in r.headers
        r = await c.get("/private")
        assert (r.status_code, r.json()["error"]) == (401, "missing_token")
        r = await c.get("/private", headers=auth)
        assert r.status_code == 200 and "x-ratelimit-limit" in r.headers
        r = await c.post("/private/transfer", headers=auth)
        assert r.status_code == 200 and "x-ratelimit-limit" not in r.headers
        # Unknown and wrong-method requests under the API still need a token...
        for method, path in (("GET", "/api/v1/nope"), ("DELETE", "/api/v1/me")):
            r = await c.request(method, path)
            assert (r.status_code, r.json()["error"]) == (401, "missing_token"), path
            # ...and with one, they are answered (and counted) as API requests.
            r = await c.request(method, path, headers=auth)
            assert r.status_code in (404, 405) and "x-ratelimit-limit" in r.headers, path
        assert (await c.get("/nope")).status_code == 404
