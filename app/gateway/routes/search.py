"""``POST /api/v1/search``: the caller's best chunks for a query.

The handler parses the body and calls :func:`app.jobs.search.search` with the
process's query embedder (loaded lazily, once per gateway process, off the
event loop); how the search ranks and when it scans exactly is documented
there.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from app.gateway.requests import identity, read_json
from app.gateway.responses import json_response
from app.gateway.routing import ApiRoute
from app.gateway.services import services
from app.jobs.schemas import SearchRequest, SearchResponse
from app.jobs.search import EmbedderHolder
from app.jobs.search import search as search_chunks


def _holder(request: Request) -> EmbedderHolder:
    state = request.app.state
    holder = getattr(state, "embedder_holder", None)
    if holder is None:
        holder = EmbedderHolder(services(request).settings)
        state.embedder_holder = holder
    assert isinstance(holder, EmbedderHolder)
    return holder


async def search(request: Request) -> Response:
    body = await read_json(request, SearchRequest)
    svc = services(request)
    found = await search_chunks(svc.db, _holder(request), identity(request).user_id, body)
    return json_response(found)


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
