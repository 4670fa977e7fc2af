"""``POST /api/v1/search``: the caller's best chunks for a query.

The handler parses the body and calls :func:`app.jobs.search.search` with the
gateway's query embedder (an HTTP client of ``sluice embedder``, see
:attr:`~app.gateway.services.Services.query_embedder`: the gateway never loads
the model); how the search ranks and when it scans exactly is documented there.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from app.gateway.requests import identity, read_json
from app.gateway.responses import json_response
from app.gateway.routing import ApiRoute
from app.gateway.services import services
from app.jobs.schemas import SearchRequest, SearchResponse
from app.jobs.search import search as search_chunks


async def search(request: Request) -> Response:
    body = await read_json(request, SearchRequest)
    svc = services(request)
    found = await search_chunks(
        svc.db,
        svc.query_embedder,
        identity(request).user_id,
        body,
        ef_search=svc.settings.search_ef_search,
        preset_ef_search=svc.settings.search_ef_search,  # the services' pool starts at it
        slots=svc.search_slots,
    )
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
