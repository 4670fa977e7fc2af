"""Shared fixtures: one real embedded stack (PostgreSQL+pgvector, Redis, S3 API
server) per test session, on free ports, torn down at the end even when tests
fail or the run is interrupted.

* ``stack`` -- the running :class:`~devstack.stack.EmbeddedStack`;
* ``settings_env`` / ``settings`` -- environment and Settings pointing at it;
* ``services`` -- the gateway's collaborators (pool, Redis, S3...);
* ``client`` -- an httpx client talking to an in-process gateway;
* ``tokens`` / ``auth_headers`` -- mint bearer tokens for any user.

Tests that need isolation from each other use unique ids (users, jobs) rather
than wiping shared state.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from app.core.auth import TokenService
from app.core.db import migrate_dsn
from app.core.settings import Settings
from app.core.storage import ensure_bucket, open_s3
from app.gateway.app import create_app
from app.gateway.services import Services, open_services
from devstack.stack import EmbeddedStack

# Fixture modules, registered once for the whole suite.
pytest_plugins = [
    "tests.fixtures_uploads",
    "tests.fixtures_pipeline",
    "tests.fixtures_ws",
    "tests.fixtures_embedder",
]

JWT_SECRET = "test-secret-" + "x" * 24


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedStack]:
    data_dir: Path = tmp_path_factory.mktemp("stack")
    with EmbeddedStack.in_dir(data_dir, durable=False) as s:
        yield s


@pytest.fixture(scope="session")
def settings_env(stack: EmbeddedStack) -> dict[str, str]:
    """Environment for a Sluice process (in-process or a child) using the stack."""
    return {
        **stack.environ(bucket="sluice-test"),
        "JWT_SECRET": JWT_SECRET,
        "LOG_FORMAT": "console",
        "LOG_LEVEL": "WARNING",
        "HF_HUB_OFFLINE": "1",
        # Tests poll the API; tests of the limits themselves set their own.
        "RATE_LIMIT_REQUESTS_PER_MINUTE": "100000",
        "PATH": os.environ.get("PATH", ""),
    }


@pytest.fixture(scope="session")
def settings(settings_env: dict[str, str]) -> Settings:
    return Settings.from_environ(settings_env)


@pytest_asyncio.fixture(scope="session")
async def migrated(settings: Settings) -> Settings:
    await migrate_dsn(settings.database_url.reveal())
    async with open_s3(settings) as s3:
        await ensure_bucket(s3, settings.minio_bucket_name)
    return settings


@pytest_asyncio.fixture(scope="session")
async def services(migrated: Settings) -> AsyncIterator[Services]:
    async with open_services(migrated) as svc:
        yield svc


@pytest_asyncio.fixture(scope="session")
async def client(services: Services) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(services.settings, services=services)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://gateway") as c,
    ):
        yield c


@pytest.fixture(scope="session")
def tokens() -> TokenService:
    return TokenService(JWT_SECRET)


@pytest.fixture
def user() -> str:
    """A fresh user id per test, so tests never see each other's data."""
    return f"user-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def auth_headers(tokens: TokenService, user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens.mint(user)}"}


@pytest.fixture
def headers_for(tokens: TokenService) -> Callable[[str], dict[str, str]]:
    def make(user_id: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {tokens.mint(user_id)}"}

    return make
