"""Readiness follows its dependencies; logs carry the request id and no secrets;
logging never makes its caller wait for the output."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import httpx
import msgspec
import pytest

from app.core.logging import QUEUE_MAX_RECORDS, configure_logging, flush_logs, get_logger
from app.core.secret import Secret, SecretUrl
from app.core.settings import Settings
from app.gateway.app import create_app
from app.gateway.services import open_services
from devstack.redis import EmbeddedRedis


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


# --- what a log line may contain, in both formats --------------------------------------

JWT_LIKE = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1MSJ9.c2lnbmF0dXJlLW9mLXRoZS10b2tlbg"
OPAQUE_TOKEN = "A1b2C3d4E5f6G7h8I9j0.K1l2M3n4O5p6Q7r8S9t0.U1v2W3x4Y5z6A7b8C9d0"


@pytest.fixture(params=["console", "json"])
def any_logs(request: pytest.FixtureRequest) -> Iterator[io.StringIO]:
    stream = LogCapture()
    configure_logging(
        "INFO", request.param, stream=stream, secrets=[Secret("literal-secret-value-42")]
    )
    yield stream
    logging.getLogger().handlers.clear()


def _raise_with_secret_locals() -> None:
    settings_in_frame = {"minio_secret_key": "local-s3-secret-77"}  # noqa: F841
    bearer = "Bearer " + JWT_LIKE  # noqa: F841
    raise RuntimeError(
        "could not reach postgresql://sluice:db-pass-1234@db:5432/sluice with "
        f"token={OPAQUE_TOKEN} (literal-secret-value-42)"
    )


def test_tracebacks_show_no_locals_and_no_secret(any_logs: io.StringIO) -> None:
    try:
        _raise_with_secret_locals()
    except RuntimeError:
        get_logger("probe").exception("unhandled_error")
    out = any_logs.getvalue()
    assert "Traceback (most recent call last)" in out and "_raise_with_secret_locals" in out
    for leaked in ("local-s3-secret-77", "db-pass-1234", OPAQUE_TOKEN, "literal-secret-value-42"):
        assert leaked not in out
    assert "c2lnbmF0dXJl" not in out  # the JWT's signature
    assert "postgresql://sluice:***@db:5432/sluice" in out  # still says where it failed


def test_secret_fields_and_values_are_redacted_everywhere(any_logs: io.StringIO) -> None:
    get_logger("probe").info(
        f"call with Bearer {OPAQUE_TOKEN}",
        headers={"Authorization": f"Bearer {JWT_LIKE}", "Cookie": "session=s3cr3t-cookie"},
        raw_headers=[(b"x-api-key", b"raw-api-key-55"), (b"accept", b"*/*")],
        nested={"deeper": {"password": "hunter2-hunter2", "url": "redis://:redis-pw-9@r:6379/0"}},
        query="page=2&token=query-token-66&access_token=query-token-67",
        jwt_secret="field-jwt-secret-88",
        note=f"the id token is {JWT_LIKE}",
    )
    logging.getLogger("uvicorn.error").error(
        "header authorization: Basic dXNlcjpwYXNzd29yZA== after basic checks"
    )
    out = any_logs.getvalue()
    for leaked in (
        OPAQUE_TOKEN,
        "c2lnbmF0dXJl",
        "s3cr3t-cookie",
        "raw-api-key-55",
        "hunter2-hunter2",
        "redis-pw-9",
        "query-token-66",
        "query-token-67",
        "field-jwt-secret-88",
        "dXNlcjpwYXNzd29yZA",
    ):
        assert leaked not in out, leaked
    assert "page=2" in out and "redis://:***@r:6379/0" in out and "*/*" in out
    assert "after basic checks" in out  # prose is left alone


def test_secret_settings_never_show_in_a_repr() -> None:
    from tests.test_settings import BASE

    env = {
        **BASE,
        "MINIO_SECRET_KEY": "s3-secret-for-repr",
        "JWT_SECRET": "jwt-secret-for-repr-" + "z" * 20,
        "DATABASE_URL": "postgresql://sluice:db-password-for-repr@db/sluice",
        "REDIS_URL": "redis://:redis-password-for-repr@redis:6379/0",
        "EMBEDDING_API_KEY": "embedding-key-for-repr",
    }
    settings = Settings.from_environ(env)
    shown = f"{settings!r} {settings} {settings.jwt_secret} {settings.database_url:>10}"
    for name in ("MINIO_SECRET_KEY", "JWT_SECRET", "EMBEDDING_API_KEY"):
        assert env[name] not in shown
    assert "db-password-for-repr" not in shown and "redis-password-for-repr" not in shown
    assert "postgresql://sluice:***@db/sluice" in shown
    assert settings.jwt_secret.reveal() == env["JWT_SECRET"]
    assert settings.database_url.reveal() == env["DATABASE_URL"]
    # A plain str put in by msgspec.structs.replace is wrapped as well.
    replaced = msgspec.structs.replace(settings, redis_url="redis://:other-pw@h:1/0")
    assert isinstance(replaced.redis_url, SecretUrl) and "other-pw" not in repr(replaced)


class _BlockedStream(io.StringIO):
    """A stream whose writes wait until released (a full pipe, a slow terminal)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, s: str) -> int:
        self.release.wait(30)
        return super().write(s)


@pytest.mark.parametrize("fmt", ["console", "json"])
def test_logging_never_waits_for_the_output(fmt: Literal["console", "json"]) -> None:
    stream = _BlockedStream()
    configure_logging("INFO", fmt, stream=stream)
    try:

        def log_many() -> None:
            log = get_logger("probe")
            for i in range(200):
                try:
                    raise ValueError(f"failure {i}")
                except ValueError:
                    log.exception("job_crashed", i=i)

        caller = threading.Thread(target=log_many)
        caller.start()
        caller.join(20)
        blocked = caller.is_alive()
        stream.release.set()
        caller.join(20)
        assert not blocked, "a log call waited for the output to be written"
        assert flush_logs(20)
        out = stream.getvalue()
        assert out.count("ValueError: failure") == 200  # nothing lost once it drains
    finally:
        stream.release.set()
        logging.getLogger().handlers.clear()


def test_every_line_is_written_before_the_process_exits(tmp_path: Path) -> None:
    script = (
        "from app.core.logging import configure_logging, get_logger\n"
        "configure_logging('INFO', 'json')\n"
        "log = get_logger('probe')\n"
        "for i in range(2000):\n"
        "    log.info('line', i=i)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert [x["i"] for x in lines] == list(range(2000))


def test_a_stuck_output_drops_lines_and_says_how_many() -> None:
    stream = _BlockedStream()
    configure_logging("INFO", "json", stream=stream)
    total = QUEUE_MAX_RECORDS + 50
    try:
        caller = threading.Thread(
            target=lambda: [get_logger("probe").info("line", i=i) for i in range(total)]
        )
        caller.start()
        caller.join(60)
        assert not caller.is_alive(), "a log call waited for the stuck output"
    finally:
        stream.release.set()
    assert flush_logs(30)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    logging.getLogger().handlers.clear()
    written = [x for x in lines if x["event"] == "line"]
    reports = [x for x in lines if x["event"].startswith("log_lines_dropped")]
    assert len(reports) == 1, reports
    dropped = int(reports[0]["event"].split("count=")[1].split()[0])
    assert dropped >= 1 and len(written) + dropped == total


def test_a_forked_child_logs_through_its_own_writer() -> None:
    script = (
        "import os, sys\n"
        "from app.core.logging import configure_logging, get_logger\n"
        "configure_logging('INFO', 'json')\n"
        "get_logger('probe').info('parent_before')\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    get_logger('probe').info('child_line')\n"
        "    sys.exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "get_logger('probe').info('parent_after')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    events = [json.loads(line)["event"] for line in result.stderr.splitlines()]
    assert events == ["parent_before", "child_line", "parent_after"]
