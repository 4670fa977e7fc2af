"""No secret reaches a log, in either format, from any of the three processes.

Real ``python -m app gateway``, ``python -m workers`` and ``python -m app ws``
processes run with distinctive secrets (S3 secret key, JWT secret, a database
password, an embedding API key) against a database that was never migrated, so
every request, job and command that touches it fails with an unexpected
exception whose traceback is logged: by the gateway's 500 handler and uvicorn,
by ARQ and the worker's maintenance loop, by the WebSocket server's command
handler.  The captured stdout/stderr of each must show those tracebacks and
none of the secrets, nor a bearer token's signature.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import pytest_asyncio
from websockets.asyncio.client import connect

from app.core.auth import TokenService
from app.core.queue import JobQueue, Priority, connect_redis
from app.gateway.services import Services
from devstack.process import free_port
from devstack.stack import EmbeddedStack

ROOT = Path(__file__).resolve().parents[1]
RUN = uuid.uuid4().hex[:12]
S3_SECRET = f"s3-secret-{RUN}-Zq8"
JWT_SECRET = f"jwt-secret-{RUN}-{'k' * 24}"
DB_PASSWORD = f"pg-password-{RUN}-Xw4"
EMBEDDING_KEY = f"embedding-key-{RUN}-Vb2"
TRACEBACK = "Traceback (most recent call last)"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest_asyncio.fixture(scope="module")
async def unmigrated_dsn(stack: EmbeddedStack, services: Services) -> AsyncIterator[str]:
    """A database with no tables, reached with a password (the embedded server
    trusts local connections, so any password is accepted)."""
    name = f"secrets_probe_{RUN}"
    await services.db.execute(f'CREATE DATABASE "{name}"')
    port = urlsplit(stack.postgres.dsn).port
    try:
        yield f"postgresql://postgres:{DB_PASSWORD}@127.0.0.1:{port}/{name}"
    finally:
        await services.db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Proc:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.log_path = name, log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, url: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=1).status_code in (200, 503):
                    return
            time.sleep(0.1)
        raise AssertionError(f"{self.name} not up within {timeout}s:\n{self.log()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


async def _wait_for_text(proc: Proc, *needles: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not all(n in proc.log() for n in needles):
        if time.monotonic() > deadline:
            raise AssertionError(f"{proc.name} never logged {needles}:\n{proc.log()[-3000:]}")
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("log_format", ["console", "json"])
async def test_unexpected_errors_log_no_secret(
    log_format: str,
    settings_env: dict[str, str],
    unmigrated_dsn: str,
    tmp_path: Path,
) -> None:
    redis_db = "7" if log_format == "console" else "8"  # a queue of their own
    redis_url = settings_env["REDIS_URL"].rsplit("/", 1)[0] + f"/{redis_db}"
    gateway_port, ws_port, metrics_port = free_port(), free_port(), free_port()
    env = {
        **settings_env,
        "PYTHONPATH": str(ROOT),
        "PYTHONUNBUFFERED": "1",
        "DATABASE_URL": unmigrated_dsn,
        "REDIS_URL": redis_url,
        "MINIO_SECRET_KEY": S3_SECRET,
        "JWT_SECRET": JWT_SECRET,
        # no model to load; the key is one more secret to look for
        "EMBEDDING_PROVIDER": "openai",
        "EMBEDDING_API_URL": "http://127.0.0.1:9/v1",
        "EMBEDDING_API_KEY": EMBEDDING_KEY,
        "JOB_LEASE_SECONDS": "3",
        "LOG_FORMAT": log_format,
        "LOG_LEVEL": "INFO",
        "WEBSOCKET_HOST": "127.0.0.1",
        "WEBSOCKET_PORT": str(ws_port),
        "WORKER_METRICS_PORT": str(metrics_port),
    }
    py = sys.executable
    procs = {
        "gateway": Proc(
            "gateway",
            [py, "-m", "app", "gateway", "--port", str(gateway_port)],
            env,
            tmp_path / "gateway.log",
        ),
        "worker": Proc("worker", [py, "-m", "workers"], env, tmp_path / "worker.log"),
        "ws": Proc("ws", [py, "-m", "app", "ws"], env, tmp_path / "ws.log"),
    }
    token = TokenService(JWT_SECRET).mint("secret-keeper")
    signature = token.rsplit(".", 1)[1]
    try:
        procs["gateway"].wait_healthy(f"http://127.0.0.1:{gateway_port}/health")
        procs["ws"].wait_healthy(f"http://127.0.0.1:{ws_port}/health")
        procs["worker"].wait_healthy(f"http://127.0.0.1:{metrics_port}/health")

        # Gateway: a route whose query fails unexpectedly -> 500, traceback logged.
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway_port}") as client:
            r = await client.get("/api/v1/jobs", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 500, r.text
        assert r.json()["error"] == "internal_error"

        # Worker: a job whose first query fails unexpectedly.
        job_id = str(uuid.uuid4())
        redis = await connect_redis(redis_url)
        try:
            assert await JobQueue(redis).enqueue(job_id, Priority.NORMAL)
        finally:
            await redis.aclose()
        await _wait_for_text(procs["worker"], job_id, TRACEBACK, "UndefinedTable")

        # WebSocket server: a command whose query fails unexpectedly.
        url = f"ws://127.0.0.1:{ws_port}/api/v1/ws/progress?token={token}"
        async with connect(url) as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "connected"
            await ws.send(json.dumps({"type": "get_job_status", "job_id": job_id}))
            reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert reply["type"] == "error" and reply["code"] == "internal_error", reply
        await _wait_for_text(procs["gateway"], TRACEBACK)
        await _wait_for_text(procs["ws"], TRACEBACK)
    finally:
        for proc in procs.values():
            proc.stop()

    for name, proc in procs.items():
        text = proc.log()
        assert TRACEBACK in text, f"{name}: no traceback was logged, so nothing was tested"
        for label, secret in (
            ("S3 secret key", S3_SECRET),
            ("JWT secret", JWT_SECRET),
            ("database password", DB_PASSWORD),
            ("embedding API key", EMBEDDING_KEY),
            ("bearer token signature", signature),
        ):
            assert secret not in text, f"{name} ({log_format}) logged the {label}"
        assert f"{RUN}-" not in text, f"{name} ({log_format}) logged part of a secret"
