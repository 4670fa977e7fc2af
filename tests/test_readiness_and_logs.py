"""Readiness follows its dependencies; logs carry the request id and no secrets."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgspec
import pytest

from app.core.embedded import EmbeddedRedis
from app.core.logging import configure_logging, flush_logs
from app.core.settings import Settings
from app.gateway.app import create_app
from app.gateway.services import open_services


async def test_stopped_redis_makes_ready_503(migrated: Settings, tmp_path: Path) -> None:
    redis = EmbeddedRedis(tmp_path, durable=False)
    redis.start()
    try:
        settings = msgspec.structs.replace(migrated, redis_url=redis.url)
        async with open_services(settings) as svc:
            app = create_app(settings, services=svc)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
                assert (await c.get("/health/ready")).status_code == 200
                redis.stop()
                r = await c.get("/health/ready")
                assert r.status_code == 503
                body = r.json()
                assert body["status"] == "degraded"
                assert body["checks"]["redis"]["status"] == "down"
                assert body["checks"]["postgres"]["status"] == "ok"
                assert body["checks"]["s3"]["status"] == "ok"
                # Liveness does not depend on anything.
                assert (await c.get("/health")).status_code == 200
    finally:
        redis.stop()


class LogCapture(io.StringIO):
    """The lines a configured process would write; reading first waits for the
    log writer thread to catch up (lines are written off the caller's thread)."""

    def getvalue(self) -> str:
        assert flush_logs(), "the log writer did not catch up"
        return super().getvalue()


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    stream = LogCapture()
    configure_logging("INFO", "json", stream=stream)
    yield stream
    logging.getLogger().handlers.clear()


async def test_every_request_line_carries_its_request_id(
    client: httpx.AsyncClient, auth_headers: dict[str, str], json_logs: io.StringIO
) -> None:
    r = await client.get("/api/v1/me", headers={**auth_headers, "X-Request-ID": "req-42"})
    assert r.status_code == 200
    lines = [json.loads(line) for line in json_logs.getvalue().splitlines()]
    request_lines = [x for x in lines if x.get("event") == "request"]
    assert request_lines, lines
    assert all(x["request_id"] == "req-42" for x in request_lines)
    assert request_lines[-1]["status"] == 200


async def test_tokens_never_reach_the_logs(
    client: httpx.AsyncClient, auth_headers: dict[str, str], json_logs: io.StringIO
) -> None:
    token = auth_headers["Authorization"].split()[1]
    await client.get(f"/api/v1/me?token={token}", headers=auth_headers)
    logging.getLogger("probe").warning("saw Bearer %s and token=%s", token, token)
    assert token not in json_logs.getvalue()
    assert "[redacted]" in json_logs.getvalue()
