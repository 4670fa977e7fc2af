"""The gateway's collaborators, built once per process and passed to handlers.

:func:`open_services` builds them from :class:`~app.core.settings.Settings`
(the pool, the Redis client, the S3 clients, the token service, the Prometheus
metrics...) and closes them on exit.  Tests build the same object against the
embedded stack.  Handlers reach them through :func:`services`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import asyncpg
from arq.connections import ArqRedis
from starlette.requests import Request

from app.core.auth import TokenService
from app.core.db import create_pool
from app.core.embedclient import EmbeddingClient
from app.core.embedding import Embedder
from app.core.queue import JobQueue, connect_redis
from app.core.settings import Settings
from app.core.storage import S3Client, open_s3
from app.gateway.metrics import GatewayMetrics
from app.jobs.search import session_defaults


@dataclass
class Services:
    settings: Settings
    db: asyncpg.Pool
    redis: ArqRedis
    s3: S3Client
    s3_public: S3Client
    """Signs presigned URLs with the endpoint clients can reach."""
    tokens: TokenService
    queue: JobQueue
    query_embedder: Embedder
    """Embeds search queries over HTTP (``SEARCH_EMBEDDING_URL``, ``sluice embedder``):
    the gateway never loads the model, so it never imports torch."""
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    """The gateway's Prometheus series (built once; apps sharing these services share them)."""
    clock: Callable[[], float] = time.time
    search_slots: asyncio.Semaphore = field(init=False)
    """``SEARCH_MAX_CONCURRENT_QUERIES`` slots for the nearest-neighbour queries of this
    process's searches (:func:`app.jobs.search.search`)."""

    def __post_init__(self) -> None:
        self.search_slots = asyncio.Semaphore(self.settings.search_max_concurrent_queries)


@asynccontextmanager
async def open_services(
    settings: Settings, *, metrics: GatewayMetrics | None = None
) -> AsyncIterator[Services]:
    async with AsyncExitStack() as stack:
        db = await create_pool(
            settings.database_url.reveal(),
            max_size=settings.database_pool_size,
            wait=True,
            # A search at SEARCH_EF_SEARCH then needs no SET (app.jobs.search).
            server_settings=session_defaults(settings.search_ef_search),
        )
        stack.push_async_callback(db.close)
        redis = await connect_redis(settings.redis_url.reveal(), wait=True)
        stack.push_async_callback(redis.aclose)
        s3 = await stack.enter_async_context(open_s3(settings))
        s3_public = await stack.enter_async_context(open_s3(settings, public=True))
        query_embedder = query_embedder_of(settings)
        stack.push_async_callback(query_embedder.aclose)
        yield Services(
            settings=settings,
            db=db,
            redis=redis,
            s3=s3,
            s3_public=s3_public,
            tokens=TokenService(settings.jwt_secret.reveal()),
            queue=JobQueue(redis),
            query_embedder=query_embedder,
            metrics=metrics if metrics is not None else GatewayMetrics(),
        )


def query_embedder_of(settings: Settings) -> Embedder:
    """The search-query embedder: the embedding service at ``SEARCH_EMBEDDING_URL``
    (no connection is made until the first search; aiohttp, not httpx: see
    :mod:`app.core.embedclient`)."""
    return EmbeddingClient(
        settings.search_embedding_url, model=settings.embedding_model, timeout_s=10.0
    )


def services(request: Request) -> Services:
    """The :class:`Services` of the app serving ``request``."""
    svc = request.app.state.services
    assert isinstance(svc, Services)
    return svc
