"""Documents: list, show, chunks, download, delete, reprocess; processing metrics.

Every lookup is scoped to the caller; another user's document is a 404 like a
missing one.  The handlers parse, call :mod:`app.jobs.documents` (or
:func:`app.jobs.service.processing_metrics`) and respond; what delete and
reprocess do is documented there.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from app.core.schemas import Page
from app.gateway.requests import identity, query_params, read_optional_json
from app.gateway.responses import json_response
from app.gateway.routing import ApiLink, ApiRoute, Endpoint
from app.gateway.services import services
from app.jobs import documents
from app.jobs.schemas import (
    ChunkPage,
    ChunkQuery,
    DocumentListQuery,
    DocumentView,
    DownloadLink,
    ProcessingMetrics,
    ReprocessRequest,
    ReprocessResponse,
)
from app.jobs.service import processing_metrics as metrics_of
from app.uploads.rules import content_disposition


def _document_id(request: Request) -> str:
    value = request.path_params["document_id"]
    assert isinstance(value, str)
    return value


async def list_documents(request: Request) -> Response:
    query = query_params(request, DocumentListQuery)
    page = await documents.list_documents(services(request), identity(request).user_id, query)
    return json_response(page)


async def get_document(request: Request) -> Response:
    owner = identity(request).user_id
    return json_response(
        await documents.get_document(services(request), _document_id(request), owner)
    )


async def list_chunks(request: Request) -> Response:
    query = query_params(request, ChunkQuery)
    owner = identity(request).user_id
    page = await documents.list_chunks(services(request), _document_id(request), owner, query)
    return json_response(page)


async def download(request: Request) -> Response:
    link = await documents.download_link(
        services(request),
        _document_id(request),
        identity(request).user_id,
        disposition=content_disposition,
    )
    return json_response(link)


async def delete_document(request: Request) -> Response:
    owner = identity(request).user_id
    await documents.delete_document(services(request), _document_id(request), owner)
    return Response(status_code=204)


async def reprocess(request: Request) -> Response:
    body = await read_optional_json(request, ReprocessRequest, ReprocessRequest())
    owner = identity(request).user_id
    accepted = await documents.reprocess(services(request), _document_id(request), owner, body)
    return json_response(accepted, 202)


async def processing_metrics(request: Request) -> Response:
    return json_response(await metrics_of(services(request), identity(request).user_id))


def document_links(source: str) -> list[ApiLink]:
    """Links from a response holding a document id at ``source`` to every document route."""
    param = {"document_id": source}
    return [
        ApiLink(name=f"{op.title().replace('_', '')}", operation=f"{method}_{op}", parameters=param)
        for method, op in (
            ("get", "get_document"),
            ("get", "list_chunks"),
            ("get", "download"),
            ("post", "reprocess"),
            ("delete", "delete_document"),
        )
    ]


_GET_NEW_JOB = ApiLink(
    name="GetJob", operation="get_get_job", parameters={"job_id": "$response.body#/job_id"}
)


def _route(path: str, handler: Endpoint, method: str, **spec: Any) -> ApiRoute:
    return ApiRoute(path, handler, methods=[method], tags=["documents"], **spec)


def routes() -> list[ApiRoute]:
    return [
        _route(
            "/api/v1/documents/processing/metrics",
            processing_metrics,
            "GET",
            summary="Jobs by status, stage timings, queue depth, workers alive",
            response=ProcessingMetrics,
        ),
        _route(
            "/api/v1/documents",
            list_documents,
            "GET",
            summary="List your documents",
            query=DocumentListQuery,
            response=Page[DocumentView],
            links=document_links("$response.body#/items/0/document_id"),
        ),
        *_document_routes("/api/v1/documents/{document_id}"),
    ]


def _document_routes(doc: str) -> list[ApiRoute]:
    """The routes of one document, at ``doc``."""
    errors = [404]
    return [
        _route(
            doc,
            get_document,
            "GET",
            summary="A document and its latest job",
            response=DocumentView,
            errors=errors,
        ),
        _route(
            doc,
            delete_document,
            "DELETE",
            status_code=204,
            summary="Delete a document: its object, chunks and vectors",
            errors=errors,
        ),
        _route(
            f"{doc}/chunks",
            list_chunks,
            "GET",
            query=ChunkQuery,
            summary="A document's chunks in order",
            response=ChunkPage,
            errors=errors,
        ),
        _route(
            f"{doc}/download",
            download,
            "GET",
            summary="A presigned URL to download the original file",
            response=DownloadLink,
            errors=[*errors, 409],
        ),
        _route(
            f"{doc}/reprocess",
            reprocess,
            "POST",
            body=ReprocessRequest,
            body_required=False,
            summary="Process again with new options (a new job)",
            response=ReprocessResponse,
            status_code=202,
            errors=[*errors, 409],
            links=[_GET_NEW_JOB],
        ),
    ]
