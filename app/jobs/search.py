"""Semantic search: the caller's best chunks for a query.

The query is embedded by the embedder the caller passes (the gateway's is an
HTTP client of ``sluice embedder``, the same model the workers use) and matched
by cosine distance against the caller's chunks only.  The HNSW index serves the
common case; because pgvector filters after the index scan (no iterative
scans before 0.8), a caller whose chunks are a small share of the table can
get fewer than ``top_k`` hits from it, so the search then falls back to an
exact scan over the caller's own chunks (cheap precisely because they are
few).  ``document_ids`` restricts to some documents (a deduplicated document
searches the one it points to) and always scans exactly.  The query vector is
sent as a ``real[]`` and cast (``$1::real[]::vector``): asyncpg encodes the array
in binary (formatting 384 floats as text cost ~0.3 ms of the gateway's CPU per
search), and it does not depend on which type codecs a pooled connection has.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import asyncpg

from app.core.embedding import Embedder
from app.core.errors import (
    PermanentError,
    ServiceUnavailable,
    TransientError,
    ValidationFailed,
)
from app.jobs.schemas import SearchHit, SearchRequest, SearchResponse

DEFAULT_EF_SEARCH = 100
"""HNSW ``ef_search`` when the caller does not choose (the ``SEARCH_EF_SEARCH`` default)."""


def _document_ids(request: SearchRequest) -> list[uuid.UUID] | None:
    if request.document_ids is None:
        return None
    try:
        return [uuid.UUID(d) for d in request.document_ids]
    except ValueError:
        raise ValidationFailed(
            "document_ids must be UUIDs", details={"field": "document_ids"}
        ) from None


def session_defaults(ef_search: int) -> dict[str, str]:
    """Session settings for a pool that serves searches (``create_pool(server_settings=)``):
    its connections start, and are reset to, ``hnsw.ef_search = ef_search``."""
    return {"hnsw.ef_search": str(ef_search)}


async def search(
    db: asyncpg.Pool,
    embedder: Embedder,
    owner_id: str,
    request: SearchRequest,
    *,
    ef_search: int = DEFAULT_EF_SEARCH,
    preset_ef_search: int | None = None,
    slots: asyncio.Semaphore | None = None,
) -> SearchResponse:
    """The caller's ``top_k`` chunks nearest to ``request.query``, best first.

    422 for malformed ``document_ids`` or a blank query (checked before the
    embedder is asked); 503 ``embedding_unavailable`` when the embedder fails.
    The HNSW search runs with ``hnsw.ef_search = max(ef_search, 2 * top_k)``,
    set for this search only (see :func:`_nearest`); not set at all when it equals
    ``preset_ef_search``, what ``db``'s connections start with (:func:`session_defaults`).
    With ``slots``, the database query waits for one of them (the embedding does not):
    CPU-bound scans beyond the database's cores only slow each other down.
    """
    started = time.perf_counter()
    doc_ids = _document_ids(request)
    if not request.query.strip():
        raise ValidationFailed("query must not be blank", details={"field": "query"})
    try:
        vectors = await embedder.embed([request.query])
    except (TransientError, PermanentError) as exc:
        raise ServiceUnavailable(exc.message, code="embedding_unavailable") from exc
    ef = max(ef_search, request.top_k * 2)
    vec = vectors[0].tolist()  # a binary float4[] parameter: no text to format or parse
    async with slots if slots is not None else contextlib.nullcontext():
        rows = await _nearest(
            db, vec, owner_id, request.top_k, doc_ids, ef_search=ef, preset=preset_ef_search
        )
    hits = [SearchHit(**{**dict(r), "score": round(float(r["score"]), 6)}) for r in rows]
    return SearchResponse(
        query=request.query,
        results=hits,
        took_ms=round((time.perf_counter() - started) * 1000, 2),
    )


_SELECT = """
    SELECT c.document_id, c.seq AS chunk_seq, c.text, c.page_start, c.page_end,
           c.char_start, c.char_end, c.embedding <=> $1::real[]::vector AS distance
"""


def _named(nearest: str) -> str:
    """``nearest`` (a query of ``_SELECT``'s columns) with each hit's document's filename."""
    return f"""
        SELECT n.document_id::text AS document_id, n.chunk_seq, n.text, n.page_start,
               n.page_end, n.char_start, n.char_end, 1 - n.distance AS score,
               COALESCE(d.filename, '') AS filename
        FROM ({nearest}) n LEFT JOIN documents d ON d.id = n.document_id
        ORDER BY n.distance
    """


_HNSW = _named(
    f"{_SELECT} FROM chunks c WHERE c.owner_id = $2 "
    "ORDER BY c.embedding <=> $1::real[]::vector LIMIT $3"
)
# Exact: the materialised CTE keeps the planner off the (post-filtering) index.
_EXACT = _named(
    f"""
    WITH mine AS MATERIALIZED (
        SELECT * FROM chunks
        WHERE owner_id = $2 AND ($4::uuid[] IS NULL OR document_id IN (
            SELECT COALESCE(deduplicated_of, id) FROM documents
            WHERE owner_id = $2 AND id = ANY($4::uuid[])))
    )
    {_SELECT} FROM mine c ORDER BY c.embedding <=> $1::real[]::vector LIMIT $3
    """
)


async def _nearest(
    db: asyncpg.Pool,
    vec: list[float],
    owner: str,
    top_k: int,
    doc_ids: list[uuid.UUID] | None,
    *,
    ef_search: int,
    preset: int | None = None,
) -> list[asyncpg.Record]:
    """One round trip in the common case: the query alone.

    ``hnsw.ef_search`` is the connection's own when it equals ``preset`` (the pool's
    connections start at it, :func:`session_defaults`); otherwise the query runs in a
    transaction with ``SET LOCAL``, so the setting ends with it (pooled connections
    carry no session state: :func:`app.core.db.create_pool`).
    """
    async with db.acquire() as conn:
        if doc_ids is None:
            if ef_search == preset:
                rows = await conn.fetch(_HNSW, vec, owner, top_k)
            else:
                async with conn.transaction():
                    await conn.execute(f"SET LOCAL hnsw.ef_search = {int(ef_search)}")
                    rows = await conn.fetch(_HNSW, vec, owner, top_k)
            if len(rows) >= top_k:
                return list(rows)
        return list(await conn.fetch(_EXACT, vec, owner, top_k, doc_ids))
