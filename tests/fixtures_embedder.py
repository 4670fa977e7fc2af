"""The warm embedding service as a real subprocess (``sluice embedder``).

* ``embedder_service`` -- one ``python -m app embedder`` per test session, with
  small request limits (so the limit tests are cheap), always stopped at the end;
* ``search_embedder`` -- points the in-process gateway's query embedder at it for
  one test (and puts the previous one back).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from app.core.embedclient import EmbeddingClient
from app.gateway.services import Services
from devstack.embedder import EmbedderProcess

EMBEDDER_LIMITS = {
    "EMBEDDER_MAX_INPUTS": "8",
    "EMBEDDER_MAX_INPUT_CHARS": "5000",  # above the search query limit (4,000)
    "EMBEDDER_MAX_BODY_KB": "64",
    "EMBEDDER_MAX_BATCH_SIZE": "64",
    "EMBEDDER_MAX_WAIT_MS": "5",
}


@pytest.fixture(scope="session")
def embedder_service(
    settings_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbedderProcess]:
    log = tmp_path_factory.mktemp("embedder") / "embedder.log"
    # A fresh cache: the session's embedder exports its ONNX graph, as on a first start.
    cache = {"EMBEDDER_CACHE_DIR": str(tmp_path_factory.mktemp("embedder-cache"))}
    with EmbedderProcess(log, {**settings_env, **EMBEDDER_LIMITS, **cache}) as proc:
        yield proc


@pytest_asyncio.fixture
async def search_embedder(
    services: Services, embedder_service: EmbedderProcess
) -> AsyncIterator[EmbedderProcess]:
    previous = services.query_embedder
    services.query_embedder = EmbeddingClient(
        embedder_service.api_url, model=services.settings.embedding_model
    )
    try:
        yield embedder_service
    finally:
        await services.query_embedder.aclose()
        services.query_embedder = previous
