"""The gateway's pure-ASGI middleware, outermost first (see :func:`app.gateway.app.create_app`):

1. :mod:`.context` -- the request id, the access log line, the HTTP metrics;
2. :mod:`.bodyguard` -- stalled bodies (408), draining refused bodies, vanished clients;
3. Starlette's CORS middleware;
4. :mod:`.auth` -- the bearer token, for every request whose route declares ``auth``;
5. :mod:`.ratelimit` -- the per-user budgets each route declares (``rate_limit``).

:mod:`.errors` holds the exception handlers that render every error in the one
JSON shape.  The authentication and rate-limit decisions read the route's
declaration through :func:`app.gateway.routing.policy_of`, never the path.
"""
