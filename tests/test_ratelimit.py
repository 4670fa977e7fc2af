"""Per-user rate limits counted in Redis: 429 with Retry-After and X-RateLimit-*."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

import msgspec

from app.gateway.middleware.ratelimit import RateLimiter
from app.gateway.services import Services
from tests.fixtures_uploads import (
    app_client,
)

BASE = "/api/v1/documents/upload"
WINDOW_START = 60.0 * 29_000_000  # a minute boundary, far from any real clock


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def limited(svc: Services, clock: Clock, *, uploads: int, requests: int) -> Services:
    settings = msgspec.structs.replace(
        svc.settings, rate_limit_uploads_per_minute=uploads, rate_limit_requests_per_minute=requests
    )
    return dataclasses.replace(svc, settings=settings, clock=clock)


async def test_upload_starts_are_limited_per_user(
    upload_services: Services, headers_for: Callable[[str], dict[str, str]], user: str
) -> None:
    clock = Clock(WINDOW_START + 1)
    svc = limited(upload_services, clock, uploads=2, requests=50)
    body = {"filename": "a.txt", "file_size": 10}
    async with app_client(svc) as c:
        ok = [
            await c.post(f"{BASE}/initiate", json=body, headers=headers_for(user)) for _ in range(2)
        ]
        assert [r.status_code for r in ok] == [201, 201]
        assert [r.headers["x-ratelimit-limit"] for r in ok] == ["2", "2"]
        assert [r.headers["x-ratelimit-remaining"] for r in ok] == ["1", "0"]
        assert 0 < int(ok[0].headers["x-ratelimit-reset"]) <= 60
        r = await c.post(f"{BASE}/initiate", json=body, headers=headers_for(user))
        assert r.status_code == 429
        assert r.json()["error"] == "rate_limited"
        assert r.json()["details"]["limit"] == 2
        assert int(r.headers["retry-after"]) >= 1
        assert r.headers["x-ratelimit-remaining"] == "0"
        # simple uploads share the budget
        r = await c.post(
            f"{BASE}/simple",
            headers=headers_for(user),
            files={"file": ("a.txt", b"hi", "text/plain")},
        )
        assert r.status_code == 429
        # another user is not affected, and reads are not upload starts
        other = await c.post(f"{BASE}/initiate", json=body, headers=headers_for(user + "-b"))
        assert other.status_code == 201
        assert (await c.get(f"{BASE}/active", headers=headers_for(user))).status_code == 200
        # the window slides: well into the next minute the old requests weigh little
        clock.now = WINDOW_START + 60 + 45
        r = await c.post(f"{BASE}/initiate", json=body, headers=headers_for(user))
        assert r.status_code == 201, r.text


async def test_request_limit_holds_across_replicas(
    upload_services: Services, headers_for: Callable[[str], dict[str, str]], user: str
) -> None:
    clock = Clock(WINDOW_START + 5)
    svc = limited(upload_services, clock, uploads=10, requests=6)
    async with app_client(svc) as a, app_client(svc) as b:  # two gateways, one Redis
        results = await asyncio.gather(
            *[(a if i % 2 else b).get("/api/v1/me", headers=headers_for(user)) for i in range(10)]
        )
        codes = sorted(r.status_code for r in results)
        assert codes == [200] * 6 + [429] * 4  # atomic: no overshoot under concurrency
        refused = next(r for r in results if r.status_code == 429)
        assert refused.headers["x-ratelimit-limit"] == "6"
        assert int(refused.headers["retry-after"]) >= 1
        # unauthenticated probes are never limited
        assert (await a.get("/health")).status_code == 200


async def test_retry_after_is_when_a_request_fits_again(upload_services: Services) -> None:
    limiter = RateLimiter(upload_services.redis, prefix="sluice:rl-test")
    user = "limiter-" + str(id(limiter))
    t0 = WINDOW_START + 30
    for _ in range(3):
        assert (await limiter.hit(user, [("x", 3)], t0)).allowed
    refused = await limiter.hit(user, [("x", 3)], t0)
    assert not refused.allowed
    wait = refused.binding.retry_after
    assert 30 <= wait <= 60
    assert not (await limiter.hit(user, [("x", 3)], t0 + wait - 5)).allowed
    assert (await limiter.hit(user, [("x", 3)], t0 + wait + 0.5)).allowed


async def test_part_transfers_do_not_spend_the_request_budget(
    upload_services: Services, headers_for: Callable[[str], dict[str, str]], user: str
) -> None:
    clock = Clock(WINDOW_START + 1)
    svc = limited(upload_services, clock, uploads=10, requests=2)
    async with app_client(svc) as c:
        init = await c.post(
            f"{BASE}/initiate",
            json={"filename": "a.txt", "file_size": 10},
            headers=headers_for(user),
        )
        assert init.status_code == 201
        upload_id = init.json()["upload_id"]
        # Many part requests (here: resends of a bad part) are judged on their merits...
        for _ in range(5):
            r = await c.put(
                f"{BASE}/{upload_id}/parts/1",
                content=b"0123456789",
                headers={**headers_for(user), "X-Chunk-Hash": "0" * 32},
            )
            assert r.status_code == 400, r.text
            assert r.json()["error"] == "checksum_mismatch"
        # ...and leave the request budget as it was after initiate: one call left.
        status = await c.get(f"{BASE}/status/{upload_id}", headers=headers_for(user))
        assert status.status_code == 200
        assert status.headers["x-ratelimit-remaining"] == "0"
        assert (await c.get("/api/v1/me", headers=headers_for(user))).status_code == 429
