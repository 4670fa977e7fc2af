"""Authentication: the bearer token of every request whose route declares ``auth``.

:class:`AuthMiddleware` asks :func:`~app.gateway.routing.policy_of` whether the
request needs a token (the matched :class:`~app.gateway.routing.ApiRoute`'s
declaration; undeclared paths under ``/api/v1`` need one too), verifies it, and
stores the :class:`~app.core.auth.Identity` in ``scope["state"]`` for
:func:`~app.gateway.requests.identity` and the rate limiter.  A CORS preflight
(``OPTIONS``) carries no credentials and is let through.  A missing or bad token
is 401 with ``WWW-Authenticate``, before any body is read.  A route declared
``admin`` answers a valid token without ``role: "admin"`` 403 ``admin_required``
here, the one place the admin role is enforced (handlers never check it again).
"""

from __future__ import annotations

import structlog
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from app.core.auth import TokenService
from app.core.errors import Forbidden, Unauthorized
from app.gateway.responses import error_response, request_id_of
from app.gateway.routing import policy_of


class AuthMiddleware:
    def __init__(self, app: ASGIApp, *, tokens: TokenService) -> None:
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        policy = policy_of(scope) if scope["type"] == "http" else None
        if policy is None or scope["method"] == "OPTIONS" or not policy.auth:
            await self.app(scope, receive, send)
            return
        try:
            identity = self.tokens.verify_header(Request(scope).headers.get("authorization"))
        except Unauthorized as exc:
            exc.headers.setdefault("WWW-Authenticate", 'Bearer realm="sluice"')
            await error_response(exc, request_id_of(scope))(scope, receive, send)
            return
        if policy.admin and not identity.admin:
            refused = Forbidden(
                "this route needs an admin token (role: admin)", code="admin_required"
            )
            await error_response(refused, request_id_of(scope))(scope, receive, send)
            return
        scope.setdefault("state", {})["identity"] = identity
        with structlog.contextvars.bound_contextvars(user_id=identity.user_id):
            await self.app(scope, receive, send)
