"""Shared fixtures and helpers for the upload tests.

``uploads`` is a gateway (in-process, real Postgres/Redis/S3) whose part size
is S3's 5 MiB minimum, so multi-part files stay small (2-3 parts).  Helpers
build payloads, send parts and read objects back from S3.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import pytest_asyncio

from app.core.settings import Settings
from app.gateway.app import create_app
from app.gateway.services import Services

MiB = 1024 * 1024
PART = 5 * MiB
ROOT = Path(__file__).resolve().parents[1]


@pytest_asyncio.fixture(scope="session")
async def upload_services(services: Services) -> Services:
    """The shared services with 5 MiB parts, a 6 MiB simple-upload threshold and a
    64 MiB upload limit."""
    settings = msgspec.structs.replace(
        services.settings,
        upload_chunk_size_mb=5,
        multipart_upload_threshold_mb=6,
        max_upload_size_mb=64,
        cors_origins=("https://app.example",),
        # limits have their own tests (test_ratelimit.py) with their own settings
        rate_limit_uploads_per_minute=1000,
        rate_limit_requests_per_minute=10000,
    )
    return dataclasses.replace(services, settings=settings)


@pytest_asyncio.fixture(scope="session")
async def uploads(upload_services: Services) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on an in-process gateway using :func:`upload_services`."""
    async with app_client(upload_services) as c:
        yield c


@contextlib.asynccontextmanager
async def app_client(svc: Services) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(svc.settings, services=svc)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://gateway", timeout=60) as c,
    ):
        yield c


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def parts_of(data: bytes, chunk_size: int) -> list[bytes]:
    return [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]


async def initiate(
    client: httpx.AsyncClient, headers: dict[str, str], size: int, **fields: Any
) -> dict[str, Any]:
    body = {"filename": "report.txt", "file_size": size, "content_type": "text/plain", **fields}
    r = await client.post("/api/v1/documents/upload/initiate", json=body, headers=headers)
    assert r.status_code == 201, r.text
    result: dict[str, Any] = r.json()
    return result


async def put_part(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    upload_id: str,
    number: int,
    data: bytes,
    *,
    md5: str | None = None,
) -> httpx.Response:
    return await client.put(
        f"/api/v1/documents/upload/{upload_id}/parts/{number}",
        content=data,
        headers={**headers, "Content-MD5": md5 or md5_b64(data)},
    )


async def s3_object(svc: Services, document_id: str) -> bytes:
    obj = await svc.s3.get_object(
        Bucket=svc.settings.minio_bucket_name, Key=f"documents/{document_id}/original"
    )
    async with obj["Body"] as body:
        data: bytes = await body.read()
    return data


async def s3_upload_ids(svc: Services, key: str) -> set[str]:
    resp = await svc.s3.list_multipart_uploads(Bucket=svc.settings.minio_bucket_name, Prefix=key)
    return {u["UploadId"] for u in resp.get("Uploads", [])}


# --- a real gateway process -----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GatewayProcess:
    """``python -m app gateway`` on a free port; always stopped by its owner."""

    def __init__(self, env: Mapping[str, str], log_path: Path, port: int | None = None) -> None:
        self.env = dict(env)
        self.port = port or free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app", "gateway", "--port", str(self.port)],
            env=self.env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("gateway did not start in time")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


def gateway_env(settings_env: Mapping[str, str], **extra: str) -> dict[str, str]:
    env = {**settings_env, "UPLOAD_CHUNK_SIZE_MB": "5", **extra}
    env.setdefault("PYTHONPATH", str(ROOT))
    return env


@pytest.fixture
def gateway_factory(
    settings_env: dict[str, str], tmp_path: Path, migrated: Settings
) -> Iterator[Any]:
    """Start gateway processes; every one is stopped at teardown, also on failure."""
    started: list[GatewayProcess] = []

    def start(port: int | None = None, **extra: str) -> GatewayProcess:
        gw = GatewayProcess(gateway_env(settings_env, **extra), tmp_path / "gateway.log", port)
        started.append(gw)
        gw.start()
        return gw

    try:
        yield start
    finally:
        for gw in started:
            gw.stop()


async def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")
