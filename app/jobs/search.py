"""Semantic search: the caller's best chunks for a query.

The query is embedded with the same provider the workers use and matched by
cosine distance against the caller's chunks only.  The HNSW index serves the
common case; because pgvector filters after the index scan (no iterative
scans before 0.8), a caller whose chunks are a small share of the table can
get fewer than ``top_k`` hits from it, so the search then falls back to an
exact scan over the caller's own chunks (cheap precisely because they are
few).  ``document_ids`` restricts to some documents (a deduplicated document
searches the one it points to) and always scans exactly.  The query vector is
sent as text and cast (``$1::text::vector``) so it does not depend on which
type codecs a pooled connection happens to have registered.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg

from app.core.embedding import Embedder, create_embedder, vector_literal
from app.core.errors import ServiceUnavailable, TransientError, ValidationFailed
from app.core.settings import Settings
from app.jobs.schemas import SearchHit, SearchRequest, SearchResponse

HNSW_EF_SEARCH = 200


class EmbedderHolder:
    """A process's query embedder, created on first use (one per process)."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._embedder: Embedder | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> Embedder:
        if self._embedder is None:
            async with self._lock:
                if self._embedder is None:
                    self._embedder = await create_embedder(self._settings)
        return self._embedder


def _document_ids(request: SearchRequest) -> list[uuid.UUID] | None:
    if request.document_ids is None:
        return None
    try:
        return [uuid.UUID(d) for d in request.document_ids]
    except ValueError:
        raise ValidationFailed(
            "document_ids must be UUIDs", details={"field": "document_ids"}
        ) from None


async def search(
    db: asyncpg.Pool, embedders: EmbedderHolder, owner_id: str, request: SearchRequest
) -> SearchResponse:
    """The caller's ``top_k`` chunks nearest to ``request.query``, best first.

    422 for malformed ``document_ids`` or a blank query (checked before the
    embedder loads); 503 ``embedding_unavailable`` when the provider fails.
    """
    started = time.perf_counter()
    doc_ids = _document_ids(request)
    if not request.query.strip():
        raise ValidationFailed("query must not be blank", details={"field": "query"})
    embedder = await embedders.get()
    try:
        vectors = await embedder.embed([request.query])
    except TransientError as exc:
        raise ServiceUnavailable(exc.message, code="embedding_unavailable") from exc
    rows = await _nearest(db, vector_literal(vectors[0]), owner_id, request.top_k, doc_ids)
    names: dict[str, str] = {}
    if rows:
        found = await db.fetch(
            "SELECT id::text AS id, filename FROM documents WHERE id = ANY($1::uuid[])",
            list({uuid.UUID(r["document_id"]) for r in rows}),
        )
        names = {r["id"]: r["filename"] for r in found}
    hits = [
        SearchHit(
            filename=names.get(r["document_id"], ""),
            **{**dict(r), "score": round(float(r["score"]), 6)},
        )
        for r in rows
    ]
    return SearchResponse(
        query=request.query,
        results=hits,
        took_ms=round((time.perf_counter() - started) * 1000, 2),
    )


_SELECT = """
    SELECT c.document_id::text AS document_id, c.seq AS chunk_seq, c.text, c.page_start,
           c.page_end, c.char_start, c.char_end, 1 - (c.embedding <=> $1::text::vector) AS score
"""


async def _nearest(
    db: asyncpg.Pool, vec: str, owner: str, top_k: int, doc_ids: list[uuid.UUID] | None
) -> list[asyncpg.Record]:
    if doc_ids is None:
        async with db.acquire() as conn, conn.transaction():
            await conn.execute(f"SET LOCAL hnsw.ef_search = {max(HNSW_EF_SEARCH, top_k * 2)}")
            rows = await conn.fetch(
                f"{_SELECT} FROM chunks c WHERE c.owner_id = $2 "
                "ORDER BY c.embedding <=> $1::text::vector LIMIT $3",
                vec,
                owner,
                top_k,
            )
        if len(rows) >= top_k:
            return list(rows)
    # Exact: the materialised CTE keeps the planner off the (post-filtering) index.
    return list(
        await db.fetch(
            f"""
        WITH mine AS MATERIALIZED (
            SELECT * FROM chunks
            WHERE owner_id = $2 AND ($4::uuid[] IS NULL OR document_id IN (
                SELECT COALESCE(deduplicated_of, id) FROM documents
                WHERE owner_id = $2 AND id = ANY($4::uuid[])))
        )
        {_SELECT} FROM mine c ORDER BY c.embedding <=> $1::text::vector LIMIT $3
        """,
            vec,
            owner,
            top_k,
            doc_ids,
        )
    )
