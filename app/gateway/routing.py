"""How a route declares itself: :class:`ApiRoute`, and the policy a request falls under.

Every documented route is an :class:`ApiRoute`.  Besides its endpoint it declares
what it reads and answers (so ``/openapi.json`` is generated from it, see
:mod:`app.gateway.openapi`), whether it needs a bearer token (``auth``) and what
it costs against the caller's rate limits (``rate_limit``, a :class:`RateLimit`)
and whether only an admin token may call it (``admin``: the fleet-wide views).
The authentication and rate-limit middleware ask :func:`policy_of` for the
request's policy, which reads the route the router will pick; no middleware
decides by looking at the path.

Invariants:

* a route's policy is its declaration; ``rate_limit`` defaults to
  :attr:`RateLimit.API` with ``auth`` and :attr:`RateLimit.NONE` without, and a
  route without ``auth`` cannot be rate-limited (there is nobody to count);
* an ``admin`` route needs ``auth`` too; the authentication middleware, the one
  place that reads it, answers a valid token without ``role: "admin"`` 403
  ``admin_required`` before the handler runs;
* a request with the wrong method for a route's path (a 405) needs the route's
  authentication and costs one API request: it neither starts an upload nor
  transfers a part;
* a request no :class:`ApiRoute` declares -- an unknown path (a 404), a plain
  Starlette route (``/docs``), a trailing-slash redirect -- needs a token and
  costs one API request when its path is under :data:`API_PREFIX`, and is
  public otherwise: probing ``/api/v1`` without a token answers 401, never
  whether a path exists.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import Scope

Endpoint = Callable[[Request], Awaitable[Response]]
API_PREFIX = "/api/v1/"
"""The authenticated API's paths; only undeclared paths are judged by it."""


class RateLimit(StrEnum):
    """What one request to a route costs against the caller's per-minute budgets
    (:mod:`app.gateway.middleware.ratelimit`)."""

    NONE = "none"
    """Not counted: the route is public (no caller to count against)."""
    API = "api"
    """One request of ``RATE_LIMIT_REQUESTS_PER_MINUTE``."""
    UPLOAD_START = "upload_start"
    """One request, and one upload of ``RATE_LIMIT_UPLOADS_PER_MINUTE``."""
    PART_TRANSFER = "part_transfer"
    """Not counted: a part goes into an open session, which holds at most
    ``total_parts`` parts and was metered when it started; parts in flight are
    capped per user elsewhere.  Counting each 8 MiB part as a request would cap a
    user at ~13 MiB/s with the default limits."""


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    """Whether a request needs a token (an admin one), and what it costs against
    the rate limits."""

    auth: bool
    rate_limit: RateLimit
    admin: bool = False
    """Only a token with ``role: "admin"`` may call the route (others get 403)."""

    def __post_init__(self) -> None:
        if not self.auth and self.rate_limit is not RateLimit.NONE:
            raise ValueError("a public route cannot be rate-limited: there is nobody to count")
        if self.admin and not self.auth:
            raise ValueError("an admin route needs auth: a public caller has no role")


PUBLIC = RoutePolicy(auth=False, rate_limit=RateLimit.NONE)
AUTHENTICATED = RoutePolicy(auth=True, rate_limit=RateLimit.API)


class ApiLink(msgspec.Struct, frozen=True, kw_only=True):
    """An OpenAPI link from a route's success response to another operation.

    ``operation`` is the target's operationId (``<method>_<endpoint name>``);
    ``parameters`` maps the target's parameter names to runtime expressions
    such as ``$response.body#/upload_id``.  :func:`~app.gateway.openapi.build_openapi`
    refuses a link to an operation that does not exist, so links cannot rot.
    """

    name: str
    operation: str
    parameters: dict[str, str] = msgspec.field(default_factory=dict)
    request_body: dict[str, Any] | None = None
    """Fields of the target's JSON or form body (merged into a generated one)."""
    description: str = ""


class HeaderParam(msgspec.Struct, frozen=True, kw_only=True):
    """A request header a handler reads, documented as an OpenAPI header parameter."""

    name: str
    description: str
    schema: dict[str, Any]
    required: bool = False


BINARY: dict[str, Any] = {"type": "string", "format": "binary"}
"""The JSON Schema of a raw byte body or a form's file field."""


class ApiRoute(Route):
    """A Starlette route that declares its policy and describes itself for OpenAPI.

    Request bodies are one of: a JSON Struct (``body``); a multipart form whose
    text fields are the Struct ``body`` and whose binary fields are ``files``
    (``json_fields`` are form fields that carry JSON text, documented with
    their type); or raw bytes (``raw_body``).

    ``other_responses`` are statuses answered with a body other than the error
    shape (``/health/ready``'s 503 is a :class:`Readiness`).  The documented
    error statuses are ``errors`` plus the ones every route of
    a kind can answer (:meth:`default_errors`), so a route cannot forget the
    401 of authentication, the 408/413 of a body or the 503 of an outage.

    ``auth`` and ``rate_limit`` are the route's :class:`RoutePolicy` (see the
    module docstring); the middleware reads nothing else to decide.
    """

    def __init__(
        self,
        path: str,
        endpoint: Endpoint,
        *,
        methods: Sequence[str],
        summary: str,
        body: type | None = None,
        body_media_type: str = "application/json",
        body_required: bool = True,
        raw_body: bool = False,
        files: Sequence[str] = (),
        json_fields: Mapping[str, Any] | None = None,
        headers: Sequence[HeaderParam] = (),
        query: type | None = None,
        response: Any = None,
        status_code: int = 200,
        errors: Sequence[int] = (),
        other_responses: Mapping[int, Any] | None = None,
        links: Sequence[ApiLink] = (),
        auth: bool = True,
        rate_limit: RateLimit | None = None,
        admin: bool = False,
        tags: Sequence[str] = (),
        response_media_type: str = "application/json",
    ) -> None:
        super().__init__(path, endpoint, methods=list(methods))
        self.summary = summary
        self.body = body
        self.body_media_type = "application/octet-stream" if raw_body else body_media_type
        self.body_required = body_required
        self.raw_body = raw_body
        self.files = tuple(files)
        self.json_fields = dict(json_fields or {})
        self.headers = tuple(headers)
        self.query = query
        self.response = response
        self.status_code = status_code
        self.other_responses = dict(other_responses or {})
        self.links = tuple(links)
        default = RateLimit.API if auth else RateLimit.NONE
        self.policy = RoutePolicy(
            auth=auth, rate_limit=default if rate_limit is None else rate_limit, admin=admin
        )
        self.tags = tuple(tags)
        self.response_media_type = response_media_type
        self.errors = tuple(sorted({*errors, *self.default_errors()} - set(self.other_responses)))

    @property
    def auth(self) -> bool:
        return self.policy.auth

    @property
    def rate_limit(self) -> RateLimit:
        return self.policy.rate_limit

    @property
    def admin(self) -> bool:
        return self.policy.admin

    @property
    def has_body(self) -> bool:
        return self.body is not None or self.raw_body or bool(self.files)

    def default_errors(self) -> set[int]:
        """Statuses every route of this kind can answer, whatever its handler does.

        * authenticated: 401 (token), 429 (rate limit, parts in flight), 503
          (``database_unavailable`` / ``redis_unavailable``: every authenticated
          route reads Postgres, and the rate limiter Redis); admin: 403
          (``admin_required``);
        * with a body: 400 (malformed), 408 (``body_timeout``), 413
          (``payload_too_large``), and 422 when the body has a schema;
        * with a query: 422 (unknown or invalid parameters), and 400
          (``invalid_cursor``) when it has a ``cursor``.
        """
        found: set[int] = set()
        if self.auth:
            found |= {401, 429, 503}
        if self.admin:
            found.add(403)
        if self.has_body:
            found |= {400, 408, 413}
            if self.body is not None:
                found.add(422)
        if self.query is not None:
            found.add(422)
            if "cursor" in getattr(self.query, "__struct_fields__", ()):
                found.add(400)
        return found


_RESOLVED = "sluice.route"
"""The scope key :func:`resolve` keeps its answer under (one lookup per request)."""


def resolve(scope: Scope) -> tuple[Match, BaseRoute | None]:
    """The route the app's router will hand ``scope`` to, as the router picks it:
    the first full match, else the first partial one (another method: a 405),
    else ``(Match.NONE, None)`` (a 404 or a trailing-slash redirect).

    Looked up once per request and kept in the scope, so the middleware that
    ask (authentication, rate limits, metrics) share one lookup.
    """
    found: tuple[Match, BaseRoute | None] | None = scope.get(_RESOLVED)
    if found is None:
        found = (Match.NONE, None)
        for route in getattr(scope.get("app"), "routes", ()):
            match, _ = route.matches(scope)
            if match is Match.FULL:
                found = (match, route)
                break
            if match is Match.PARTIAL and found[1] is None:
                found = (match, route)
        scope[_RESOLVED] = found
    return found


def policy_of(scope: Scope) -> RoutePolicy:
    """The :class:`RoutePolicy` an HTTP request falls under (see the module docstring)."""
    match, route = resolve(scope)
    if isinstance(route, ApiRoute):
        if match is Match.FULL:
            return route.policy
        return AUTHENTICATED if route.auth else PUBLIC  # a 405
    return AUTHENTICATED if scope["path"].startswith(API_PREFIX) else PUBLIC


def route_template(scope: Scope) -> str:
    """The path template of the route that served ``scope`` in full (a metrics
    label), or ``"unmatched"``."""
    match, route = resolve(scope)
    return str(getattr(route, "path", "unmatched")) if match is Match.FULL else "unmatched"
