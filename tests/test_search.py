"""``POST /api/v1/search`` over indexed chunks, scoped to the caller; queries are
embedded by a real ``sluice embedder`` subprocess (``search_embedder``)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import httpx
import numpy as np
import pytest

from app.core.db import create_pool
from app.core.settings import Settings
from app.gateway.services import Services
from app.jobs.search import _HNSW, _nearest, session_defaults
from devstack.embedder import EmbedderProcess
from tests.fixtures_pipeline import (
    TOPIC_PAGES,
    MakeJob,
    make_pdf,
)
from workers.context import WorkerContext
from workers.run import JobRun, Outcome

Headers = Callable[[str], dict[str, str]]


async def _index(
    ctx: WorkerContext, make_job: MakeJob, pages: list[list[str]] | bytes, owner: str | None = None
) -> str:
    data = pages if isinstance(pages, bytes) else make_pdf(pages)
    job = await make_job(data, owner=owner, options={"chunk_size": 32, "chunk_overlap": 0})
    assert await JobRun(ctx, job.job_id).run() == Outcome.COMPLETED
    return job.document_id


@pytest.mark.usefixtures("search_embedder")
async def test_search_ranks_the_caller_chunks_only(
    worker_ctx: WorkerContext,
    make_job: MakeJob,
    client: httpx.AsyncClient,
    auth_headers: dict[str, str],
    user: str,
    headers_for: Headers,
) -> None:
    mine = await _index(worker_ctx, make_job, TOPIC_PAGES)
    theirs = await _index(worker_ctx, make_job, [TOPIC_PAGES[3]], owner=f"{user}-b")
    r = await client.post(
        "/api/v1/search",
        headers=auth_headers,
        json={"query": "baking bread with wild yeast", "top_k": 2},
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 2
    assert {h["document_id"] for h in results} == {mine}
    assert results[0]["page_start"] <= 4 <= results[0]["page_end"]
    assert "Sourdough" in results[0]["text"]
    assert results[0]["score"] >= results[1]["score"]
    assert results[0]["filename"] == "doc.pdf"
    other = await client.post(
        "/api/v1/search",
        headers=headers_for(f"{user}-b"),
        json={"query": "baking bread with wild yeast"},
    )
    assert {h["document_id"] for h in other.json()["results"]} == {theirs}


@pytest.mark.usefixtures("search_embedder")
async def test_search_within_chosen_documents(
    services: Services,
    worker_ctx: WorkerContext,
    make_job: MakeJob,
    client: httpx.AsyncClient,
    auth_headers: dict[str, str],
) -> None:
    volcano_pdf = make_pdf([TOPIC_PAGES[0]])
    volcano = await _index(worker_ctx, make_job, volcano_pdf)
    history = await _index(worker_ctx, make_job, [TOPIC_PAGES[1]])
    r = await client.post(
        "/api/v1/search",
        headers=auth_headers,
        json={"query": "lava and magma", "document_ids": [history]},
    )
    assert {h["document_id"] for h in r.json()["results"]} == {history}
    # A deduplicated document searches the chunks of the one it duplicates.
    dup = await make_job(volcano_pdf, options={"chunk_size": 32, "chunk_overlap": 0})
    assert await JobRun(worker_ctx, dup.job_id).run() == Outcome.DEDUPLICATED
    r = await client.post(
        "/api/v1/search",
        headers=auth_headers,
        json={"query": "lava and magma", "document_ids": [dup.document_id], "top_k": 1},
    )
    assert [h["document_id"] for h in r.json()["results"]] == [volcano]


@pytest.mark.usefixtures("search_embedder")
async def test_search_with_nothing_indexed_is_empty(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    r = await client.post("/api/v1/search", headers=auth_headers, json={"query": "anything"})
    assert r.status_code == 200 and r.json()["results"] == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"query": ""}, "query"),
        ({"query": "   "}, "query"),
        ({"query": "x", "top_k": 0}, "top_k"),
        ({"query": "x", "top_k": 101}, "top_k"),
        ({"query": "x", "document_ids": ["nope"]}, "document_ids"),
        ({"query": "x", "unknown": 1}, None),
    ],
)
async def test_search_rejects_bad_requests(
    client: httpx.AsyncClient,
    auth_headers: dict[str, str],
    body: dict[str, object],
    field: str | None,
) -> None:
    r = await client.post("/api/v1/search", headers=auth_headers, json=body)
    assert r.status_code == 422, r.text
    if field:
        assert r.json()["details"]["field"] == field


async def test_the_search_query_uses_the_index_and_its_ef_search_does_not_leak(
    migrated: Settings,
) -> None:
    """The HNSW query (with its documents join) can be served by the index; a pool
    made for searches starts its connections at the preset ``hnsw.ef_search``, and
    the one a search sets is gone when its connection is next used."""
    vec = np.full(384, 384**-0.5, dtype=np.float32).tolist()
    dsn = migrated.database_url.reveal()
    nobody = f"nobody-{uuid.uuid4()}"
    plain = await create_pool(dsn, max_size=1)
    pool = await create_pool(dsn, max_size=1, server_settings=session_defaults(123))
    try:
        await _nearest(plain, vec, nobody, 10, None, ef_search=77)
        # The same (only) connection: pgvector's default again, not the search's 77.
        assert await plain.fetchval("SHOW hnsw.ef_search") == "40"
        assert await pool.fetchval("SELECT current_setting('hnsw.ef_search', true)") == "123"
        await _nearest(pool, vec, nobody, 10, None, ef_search=77, preset=123)
        assert await pool.fetchval("SHOW hnsw.ef_search") == "123"
        async with pool.acquire() as conn, conn.transaction():  # no way round the index
            await conn.execute("SET LOCAL enable_seqscan = off; SET LOCAL enable_sort = off")
            plan = await conn.fetch(f"EXPLAIN {_HNSW}", vec, "someone", 10)
    finally:
        await plain.close()
        await pool.close()
    assert "chunks_embedding_hnsw" in "\n".join(r[0] for r in plan)


async def _texts_embedded(embedder: EmbedderProcess) -> float:
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(f"{embedder.url}/metrics")).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("sluice_embedder_texts_total ")
    )


async def test_a_search_waits_for_a_database_slot_after_embedding(
    services: Services,
    search_embedder: EmbedderProcess,
    worker_ctx: WorkerContext,
    make_job: MakeJob,
    client: httpx.AsyncClient,
    auth_headers: dict[str, str],
) -> None:
    """While every ``SEARCH_MAX_CONCURRENT_QUERIES`` slot is taken, a search is embedded
    and then waits; it is answered as soon as a slot frees."""
    await _index(worker_ctx, make_job, TOPIC_PAGES)
    slots, held = services.search_slots, services.settings.search_max_concurrent_queries
    for _ in range(held):
        await slots.acquire()
    released = False
    try:
        before = await _texts_embedded(search_embedder)
        pending = asyncio.create_task(
            client.post(
                "/api/v1/search",
                headers=auth_headers,
                json={"query": "baking bread with wild yeast", "top_k": 1},
            )
        )
        for _ in range(600):  # the query reaches the embedder first
            if await _texts_embedded(search_embedder) > before:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the search never reached the embedder")
        await asyncio.sleep(0.5)
        assert not pending.done(), "a search ran its query with every slot taken"
        slots.release()
        released = True
        r = await asyncio.wait_for(pending, 30)
    finally:
        for _ in range(held - 1 if released else held):
            slots.release()
    assert r.status_code == 200, r.text
    assert "Sourdough" in r.json()["results"][0]["text"]
