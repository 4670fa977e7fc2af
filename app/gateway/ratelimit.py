"""Per-user rate limits, counted in Redis so they hold across gateway replicas.

Two limits: ``RATE_LIMIT_REQUESTS_PER_MINUTE`` for every authenticated
``/api/v1`` request and ``RATE_LIMIT_UPLOADS_PER_MINUTE`` for starting an
upload (``initiate``, ``simple``, and a tus creation that is not a partial upload).
Part transfers into an open session (``chunk``, ``PUT .../parts/N``, ``.../presign``,
a tus ``PATCH``) are exempt from the request
limit: a session holds at most ``total_parts`` parts and sessions are already
metered by the uploads limit, while counting each 8 MiB part as a request
would cap one user at ~13 MiB/s with the default limits.  Each is a sliding-window counter (the
current minute's count plus the previous minute's, weighted by how much of it
still overlaps the window), checked and incremented by one Lua script, so
concurrent requests on any replica cannot overshoot and a burst at a minute
boundary cannot double the limit.  Rejected requests are not counted.

Every limited response carries ``X-RateLimit-Limit``, ``X-RateLimit-Remaining``
and ``X-RateLimit-Reset`` (seconds until the current window ends) for the
tightest limit that applied; a 429 adds ``Retry-After``.  If Redis is down the
request is let through (logged): availability over strictness.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.auth import Identity
from app.core.errors import RateLimited
from app.core.logging import get_logger
from app.core.settings import Settings
from app.gateway.middleware import error_response, request_id_of

log = get_logger("sluice.gateway")
WINDOW_SECONDS = 60
PART_TRANSFER_RE = re.compile(r"^/api/v1/documents/upload/(chunk|[^/]+/parts/\d+(/presign)?)$")
TUS_UPLOAD_RE = re.compile(r"^/api/v1/tus/[^/]+$")
"""A tus upload: its PATCHes are part transfers (exempt, like ``PART_TRANSFER_RE``)."""
UPLOAD_START_PATHS = frozenset(
    {
        "/api/v1/documents/upload/initiate",
        "/api/v1/documents/upload/simple",
    }
)

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


def _tus_file_creation(scope: Scope) -> bool:
    """A tus creation that starts a file (a partial upload is a piece of one: not counted)."""
    if scope["path"].rstrip("/") != "/api/v1/tus":
        return False
    concat = dict(scope.get("headers", ())).get(b"upload-concat", b"")
    return not concat.strip().startswith(b"partial")


class RateLimitMiddleware:
    """Applies :class:`RateLimiter` to authenticated ``/api/v1`` requests.

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

    def _limits(self, scope: Scope) -> list[tuple[str, int]]:
        limits = [("requests", self.settings.rate_limit_requests_per_minute)]
        if scope["method"] == "POST" and (
            scope["path"].rstrip("/") in UPLOAD_START_PATHS or _tus_file_creation(scope)
        ):
            limits.append(("uploads", self.settings.rate_limit_uploads_per_minute))
        return limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ident = scope.get("state", {}).get("identity") if scope["type"] == "http" else None
        if (
            not isinstance(ident, Identity)
            or scope["method"] == "OPTIONS"
            or PART_TRANSFER_RE.match(scope["path"])
            or (scope["method"] == "PATCH" and TUS_UPLOAD_RE.match(scope["path"]))
        ):
            await self.app(scope, receive, send)
            return
        svc = scope["app"].state.services
        if self._limiter is None or self._redis is not svc.redis:
            self._redis = svc.redis
            self._limiter = self._factory(svc.redis)
        try:
            decision = await self._limiter.hit(ident.user_id, self._limits(scope), svc.clock())
        except Exception as exc:  # Redis down: serve rather than refuse everyone
            log.warning("rate_limit_unavailable", error=type(exc).__name__)
            await self.app(scope, receive, send)
            return
        headers = decision.headers()
        if not decision.allowed:
            b = decision.binding
            err = RateLimited(
                f"rate limit of {b.limit} {b.name} per minute exceeded; retry in {b.retry_after} s",
                code="rate_limited",
                details={
                    "limit": b.limit,
                    "scope": b.name,
                    "window_seconds": WINDOW_SECONDS,
                    "retry_after": b.retry_after,
                },
                headers=headers,
            )
            await error_response(err, request_id_of(scope))(scope, receive, send)
            return
        extra = [(k.lower().encode(), v.encode()) for k, v in headers.items()]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)
