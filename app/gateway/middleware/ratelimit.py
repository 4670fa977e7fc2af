"""Per-user rate limits, counted in Redis so they hold across gateway replicas.

What a request costs is its route's declaration
(:class:`~app.gateway.routing.RateLimit`, read through
:func:`~app.gateway.routing.policy_of`): ``API`` is one request of
``RATE_LIMIT_REQUESTS_PER_MINUTE``; ``UPLOAD_START`` (``initiate`` and ``simple``, a tus
creation unless it is a partial upload) also one upload of
``RATE_LIMIT_UPLOADS_PER_MINUTE``; ``PART_TRANSFER`` (``chunk``, ``PUT .../parts/N``,
``.../presign``, tus ``PATCH``) and ``NONE`` cost nothing. Each limit is a sliding-
window counter (the current minute's count plus the previous minute's, weighted by how
much of it still overlaps the window), checked and incremented for all the request's
limits by one Lua script in one round trip, so concurrent requests on any replica cannot
overshoot and a burst at a minute boundary does not get a second full budget. The
weighting assumes the previous minute's requests were spread evenly: after a burst at
the end of a minute, a trailing 60 s can hold up to twice the limit (the price of two
counters per limit instead of a log of every request). Rejected requests are not
counted, against any limit.

Every limited response carries ``X-RateLimit-Limit``, ``X-RateLimit-Remaining``
and ``X-RateLimit-Reset`` (seconds until the current window ends) for the
tightest limit that applied; a 429 adds ``Retry-After``.  If Redis is down the
request is let through (logged): availability over strictness.

Why not the ``limits`` library (``bench/ratelimit.py`` measures both on one
Redis): its Redis strategies check one limit per call and need a second call per
limit for the headers (``get_window_stats``), so a request costs 2 round trips
and an upload start 4, against 1 here (about 2x and 3-3.5x the time per
request); hitting the limits one after the other charges the request budget
for upload starts the uploads limit refuses; and it reads the clock itself,
where this limiter takes the time from the caller (the services' clock, which is
what lets the tests pin the window's boundaries).  Its moving window is exact
where this weighted counter is not (see above).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.auth import Identity
from app.core.errors import RateLimited
from app.core.logging import get_logger
from app.core.settings import Settings
from app.gateway.responses import error_response, request_id_of
from app.gateway.routing import RateLimit, policy_of

log = get_logger("sluice.gateway")
WINDOW_SECONDS = 60

# KEYS: current and previous window key per limit.  ARGV: elapsed fraction of the
# current window, then one limit per pair of keys.  Returns {allowed, curr1, prev1, ...}
# with the counts as they are after this call.
_SCRIPT = """
local weight = 1 - tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local n = #KEYS / 2
local counts = {}
local allowed = 1
for i = 1, n do
  local curr = tonumber(redis.call('GET', KEYS[2 * i - 1]) or '0')
  local prev = tonumber(redis.call('GET', KEYS[2 * i]) or '0')
  if prev * weight + curr + 1 > tonumber(ARGV[2 + i]) then allowed = 0 end
  counts[2 * i - 1] = curr
  counts[2 * i] = prev
end
if allowed == 1 then
  for i = 1, n do
    counts[2 * i - 1] = redis.call('INCR', KEYS[2 * i - 1])
    redis.call('EXPIRE', KEYS[2 * i - 1], ttl)
  end
end
table.insert(counts, 1, allowed)
return counts
"""


@dataclass(frozen=True, slots=True)
class LimitState:
    name: str
    limit: int
    remaining: int
    reset_seconds: int
    retry_after: int


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    binding: LimitState
    """The limit with the least room left (the one that refused, if any)."""

    def headers(self) -> dict[str, str]:
        h = {
            "X-RateLimit-Limit": str(self.binding.limit),
            "X-RateLimit-Remaining": str(self.binding.remaining),
            "X-RateLimit-Reset": str(self.binding.reset_seconds),
        }
        if not self.allowed:
            h["Retry-After"] = str(self.binding.retry_after)
        return h

    def refusal(self) -> RateLimited:
        """The 429 of a refused request, naming the limit that refused it."""
        b = self.binding
        return RateLimited(
            f"rate limit of {b.limit} {b.name} per minute exceeded; retry in {b.retry_after} s",
            code="rate_limited",
            details={
                "limit": b.limit,
                "scope": b.name,
                "window_seconds": WINDOW_SECONDS,
                "retry_after": b.retry_after,
            },
            headers=self.headers(),
        )


class RateLimiter:
    """Sliding-window counters in Redis, checked and bumped atomically."""

    def __init__(
        self, redis: Redis, *, window_seconds: int = WINDOW_SECONDS, prefix: str = "sluice:rl"
    ) -> None:
        self._redis = redis
        self._window = window_seconds
        self._prefix = prefix
        self._script = redis.register_script(_SCRIPT)

    async def hit(self, user_id: str, limits: Sequence[tuple[str, int]], now: float) -> Decision:
        window_index = int(now // self._window)
        elapsed = (now % self._window) / self._window
        keys: list[str] = []
        for name, _ in limits:
            base = f"{self._prefix}:{{{user_id}}}:{name}"
            keys += [f"{base}:{window_index}", f"{base}:{window_index - 1}"]
        raw: list[Any] = await self._script(
            keys=keys, args=[elapsed, self._window * 2, *(limit for _, limit in limits)]
        )
        allowed = bool(int(raw[0]))
        reset = max(1, math.ceil(self._window * (1 - elapsed)))
        states = []
        for i, (name, limit) in enumerate(limits):
            curr, prev = int(raw[1 + 2 * i]), int(raw[2 + 2 * i])
            estimate = prev * (1 - elapsed) + curr
            remaining = max(0, math.floor(limit - estimate))
            states.append(
                LimitState(
                    name, limit, remaining, reset, self._retry_after(curr, prev, elapsed, limit)
                )
            )
        if allowed:
            binding = min(states, key=lambda s: (s.remaining, s.limit))
        else:
            binding = max(
                (s for s in states if s.remaining < 1),
                key=lambda s: s.retry_after,
                default=min(states, key=lambda s: s.remaining),
            )
        return Decision(allowed, binding)

    def _retry_after(self, curr: int, prev: int, elapsed: float, limit: int) -> int:
        """Seconds until one more request fits under ``limit``."""
        window = self._window
        if curr + 1 > limit:  # wait for the next window, where curr becomes prev
            rest = window * (1 - elapsed)
            over = curr + 1 - limit  # then prev weight must shrink: curr*(1-x) + 1 <= limit
            extra = window * over / curr if curr else 0.0
            return max(1, math.ceil(rest + extra))
        if prev == 0:
            return 1
        # prev * (1 - elapsed - t/window) + curr + 1 <= limit
        t = window * ((prev * (1 - elapsed) + curr + 1 - limit) / prev)
        return max(1, math.ceil(t))


def _tus_partial(scope: Scope) -> bool:
    """A tus ``Upload-Concat: partial`` creation: a piece of one file's upload, not a new one."""
    concat: bytes = dict(scope.get("headers", ())).get(b"upload-concat", b"")
    return concat.strip().startswith(b"partial")


class RateLimitMiddleware:
    """Applies :class:`RateLimiter` to authenticated requests, as their routes declare.

    Runs inside the auth middleware (it needs the identity) and finds Redis
    and the clock on the app's services.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        settings: Settings,
        limiter_factory: Callable[[Redis], RateLimiter] = RateLimiter,
    ) -> None:
        self.app = app
        self.settings = settings
        self._factory = limiter_factory
        self._limiter: RateLimiter | None = None
        self._redis: Redis | None = None

    def limits(self, cost: RateLimit) -> list[tuple[str, int]]:
        """The ``(name, per minute)`` budgets one request of this kind spends."""
        requests = ("requests", self.settings.rate_limit_requests_per_minute)
        if cost is RateLimit.API:
            return [requests]
        if cost is RateLimit.UPLOAD_START:
            return [requests, ("uploads", self.settings.rate_limit_uploads_per_minute)]
        return []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ident = scope.get("state", {}).get("identity") if scope["type"] == "http" else None
        if not isinstance(ident, Identity) or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        cost = policy_of(scope).rate_limit
        if cost is RateLimit.UPLOAD_START and _tus_partial(scope):
            cost = RateLimit.API  # the tus final upload is what starts the file
        limits = self.limits(cost)
        if not limits:
            await self.app(scope, receive, send)
            return
        svc = scope["app"].state.services
        if self._limiter is None or self._redis is not svc.redis:
            self._redis = svc.redis
            self._limiter = self._factory(svc.redis)
        try:
            decision = await self._limiter.hit(ident.user_id, limits, svc.clock())
        except Exception as exc:  # Redis down: serve rather than refuse everyone
            log.warning("rate_limit_unavailable", error=type(exc).__name__)
            await self.app(scope, receive, send)
            return
        if not decision.allowed:
            await error_response(decision.refusal(), request_id_of(scope))(scope, receive, send)
            return
        extra = [(k.lower().encode(), v.encode()) for k, v in decision.headers().items()]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)
