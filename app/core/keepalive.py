"""Keep-alive on both ends of Sluice's HTTP connections: the client lets go first.

A pooled connection that one end closes while the other reuses it meets a reset
or a closed stream instead of an answer.  Two races make that happen:

* the server closes an idle connection just as the client sends on it (uvicorn's
  default 5 s equals httpx's default pool expiry);
* httpcore's pool checks the expiry of *every* idle connection each time it
  assigns requests, including one it has just handed to a request whose task has
  not run yet: on a busy event loop that connection can expire in between and is
  closed under the request (``httpx.ReadError`` from ``ClosedResourceError``, seen
  in the crowded-fleet test).

So Sluice's servers hold idle connections for ``HTTP_KEEPALIVE_SECONDS`` (75 s)
and its own clients expire them after :data:`CLIENT_KEEPALIVE_EXPIRY` (30 s):
long enough that connections in use by a busy client never reach it, short
enough that the server never closes one first.
"""

from __future__ import annotations

CLIENT_KEEPALIVE_EXPIRY = 30.0
"""Seconds Sluice's httpx clients keep an idle pooled connection (below the
servers' ``HTTP_KEEPALIVE_SECONDS``, default 75)."""
