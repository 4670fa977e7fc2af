"""``POST /api/v1/search``: the caller's best chunks for a query.

The query is embedded with the same provider the workers use (loaded lazily,
once per gateway process, off the event loop) and matched by cosine distance
against the caller's chunks only.  The HNSW index serves the common case;
because pgvector filters after the index scan (no iterative scans before
0.8), a caller whose chunks are a small share of the table can get fewer than
``top_k`` hits from it, so the search then falls back to an exact scan over the
caller's own chunks (cheap precisely because they are few).  ``document_ids``
restricts to some documents (a deduplicated document searches the one it
points to) and always scans exactly.  The query vector is sent as text and
cast (``$1::text::vector``) so it does not depend on which type codecs a
pooled connection happens to have registered.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Annotated, Any

import asyncpg
import msgspec
from starlette.requests import Request
from starlette.responses import Response

from app.core.embedding import Embedder, create_embedder, vector_literal
from app.core.errors import ServiceUnavailable, TransientError, ValidationFailed
from app.core.schemas import Request as RequestBody
from app.core.schemas import Response as ResponseBody
from app.core.settings import Settings
from app.gateway.requests import identity, read_json
from app.gateway.responses import json_response
from app.gateway.routing import ApiRoute
from app.gateway.services import services

HNSW_EF_SEARCH = 200


DocumentId = Annotated[str, msgspec.Meta(extra_json_schema={"format": "uuid"})]
"""Checked by the handler (422 ``validation_error`` naming ``document_ids``)."""


class SearchRequest(RequestBody):
    query: Annotated[
        str, msgspec.Meta(min_length=1, max_length=4000, examples=["termination notice period"])
    ]
    top_k: Annotated[int, msgspec.Meta(ge=1, le=100)] = 10
    document_ids: Annotated[list[DocumentId], msgspec.Meta(max_length=1000)] | None = None


class SearchHit(ResponseBody):
    document_id: str
    filename: str
    chunk_seq: int
    text: str
    score: float
    """Cosine similarity, 1 is identical."""
    page_start: int | None
    page_end: int | None
    char_start: int
    char_end: int


class SearchResponse(ResponseBody):
    query: str
    results: list[SearchHit]
    took_ms: float


class EmbedderHolder:
    """The gateway's embedder, created on first use (one per process)."""

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


def _holder(request: Request) -> EmbedderHolder:
    state = request.app.state
    holder = getattr(state, "embedder_holder", None)
    if holder is None:
        holder = EmbedderHolder(services(request).settings)
        state.embedder_holder = holder
    assert isinstance(holder, EmbedderHolder)
    return holder


_SELECT = """
    SELECT c.document_id::text AS document_id, c.seq AS chunk_seq, c.text, c.page_start,
           c.page_end, c.char_start, c.char_end, 1 - (c.embedding <=> $1::text::vector) AS score
"""


async def _search(
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


async def search(request: Request) -> Response:
    started = time.perf_counter()
    svc = services(request)
    body = await read_json(request, SearchRequest)
    owner = identity(request).user_id
    doc_ids = None
    if body.document_ids is not None:
        try:
            doc_ids = [uuid.UUID(d) for d in body.document_ids]
        except ValueError:
            raise ValidationFailed(
                "document_ids must be UUIDs", details={"field": "document_ids"}
            ) from None
    if not body.query.strip():
        raise ValidationFailed("query must not be blank", details={"field": "query"})
    embedder = await _holder(request).get()
    try:
        vectors = await embedder.embed([body.query])
    except TransientError as exc:
        raise ServiceUnavailable(exc.message, code="embedding_unavailable") from exc
    rows = await _search(svc.db, vector_literal(vectors[0]), owner, body.top_k, doc_ids)
    names: dict[str, str] = {}
    if rows:
        found = await svc.db.fetch(
            "SELECT id::text AS id, filename FROM documents WHERE id = ANY($1::uuid[])",
            list({uuid.UUID(r["document_id"]) for r in rows}),
        )
        names = {r["id"]: r["filename"] for r in found}
    hits: list[Any] = [
        SearchHit(
            filename=names.get(r["document_id"], ""),
            **{**dict(r), "score": round(float(r["score"]), 6)},
        )
        for r in rows
    ]
    return json_response(
        SearchResponse(
            query=body.query,
            results=hits,
            took_ms=round((time.perf_counter() - started) * 1000, 2),
        )
    )


def routes() -> list[ApiRoute]:
    return [
        ApiRoute(
            "/api/v1/search",
            search,
            methods=["POST"],
            body=SearchRequest,
            response=SearchResponse,
            summary="Semantic search over your indexed documents",
            tags=["search"],
        ),
    ]
