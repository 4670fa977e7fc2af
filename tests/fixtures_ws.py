"""Fixtures for the WebSocket server tests: real ``python -m app ws`` processes,
an in-process server with shrunken limits, clients, and jobs to watch."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
import pytest_asyncio
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect

from app.core.auth import TokenService
from app.core.db import create_pool
from app.core.settings import Settings
from app.jobs.documents import create_document, create_job
from app.jobs.model import JobStatus
from devstack.process import free_port

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class WsProcess:
    """One ``python -m app ws`` child process."""

    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return int(self.proc.returncode)


def _wait_healthy(ws: WsProcess, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ws.proc.poll() is not None:
            raise RuntimeError(f"ws server exited with {ws.proc.returncode}:\n{ws.log()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{ws.http}/health", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"ws server not healthy within {timeout}s:\n{ws.log()}")


@pytest.fixture(scope="session")
def ws_factory(
    settings_env: dict[str, str], migrated: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., WsProcess]]:
    """Start ``python -m app ws`` processes; every one is stopped at session end."""
    started: list[WsProcess] = []
    log_dir = tmp_path_factory.mktemp("ws-logs")

    def start(**extra_env: str) -> WsProcess:
        port = free_port()
        env = {
            **settings_env,
            "WEBSOCKET_HOST": "127.0.0.1",
            "WEBSOCKET_PORT": str(port),
            "LOG_LEVEL": "INFO",
            **extra_env,
        }
        log_path = log_dir / f"ws-{port}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "app", "ws"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        ws = WsProcess(port, proc, log_path)
        started.append(ws)
        _wait_healthy(ws)
        return ws

    try:
        yield start
    finally:
        for ws in started:
            ws.stop()


@pytest.fixture(scope="session")
def ws_server(ws_factory: Callable[..., WsProcess]) -> WsProcess:
    """The shared WebSocket server process for most tests."""
    return ws_factory()


@dataclass
class Deps:
    db: asyncpg.Pool
    redis: Redis
    tokens: TokenService


@pytest_asyncio.fixture(scope="session")
async def ws_deps(migrated: Settings, tokens: TokenService) -> AsyncIterator[Deps]:
    db = await create_pool(migrated.database_url.reveal(), max_size=4)
    redis: Redis = Redis.from_url(migrated.redis_url.reveal())
    try:
        yield Deps(db, redis, tokens)
    finally:
        await redis.aclose()
        await db.close()


async def make_job(db: asyncpg.Pool, owner: str, status: JobStatus = JobStatus.QUEUED) -> str:
    doc = await create_document(
        db,
        owner_id=owner,
        filename="a.txt",
        content_type="text/plain",
        document_type="txt",
        size_bytes=10,
    )
    return await create_job(db, owner_id=owner, document_id=doc, status=status)


_decode = msgspec.json.Decoder().decode


@dataclass
class Client:
    """A test client: JSON in and out, with a timeout on every receive."""

    ws: ClientConnection
    seen: list[dict[str, Any]] = field(default_factory=list)

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        if isinstance(message, dict):
            await self.ws.send(msgspec.json.encode(message).decode())
        else:
            await self.ws.send(message)

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        message: dict[str, Any] = _decode(raw)
        self.seen.append(message)
        return message

    async def expect(self, type_: str, timeout: float = 5.0) -> dict[str, Any]:
        """The next message, which must be of ``type_``."""
        message = await self.recv(timeout)
        assert message["type"] == type_, message
        return message

    async def progress_until_terminal(
        self, job_id: str, timeout: float = 10.0
    ) -> list[dict[str, Any]]:
        """Every job_progress ``data`` for ``job_id`` up to and including the terminal one."""
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while True:
            message = await self.recv(max(0.01, deadline - time.monotonic()))
            if message["type"] == "job_progress" and message["job_id"] == job_id:
                out.append(message["data"])
                if message["data"]["status"] in ("completed", "failed", "cancelled"):
                    return out

    async def close(self) -> None:
        await self.ws.close()


@contextlib.asynccontextmanager
async def ws_client(
    base_url: str, token: str | None = None, path: str = "/api/v1/ws/progress", **kwargs: Any
) -> AsyncIterator[Client]:
    url = f"{base_url}{path}" + (f"?token={token}" if token else "")
    async with connect(url, open_timeout=5, close_timeout=2, **kwargs) as ws:
        yield Client(ws)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")
