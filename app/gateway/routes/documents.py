"""Documents: list, show, chunks, download, delete, reprocess; processing metrics.

Every query is scoped to the caller (``owner_id``); another user's document
is a 404 like a missing one.  Deleting removes the row (its chunks, vectors,
jobs and checkpoints go with it by cascade, in one transaction) and then the
stored object; documents that were deduplicated against it get a job of their
own; reprocessing creates a new job with new options for a document
whose object is stored and that has no job in flight.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

import asyncpg
import msgspec
from starlette.requests import Request
from starlette.responses import Response

from app.core.errors import Conflict, NotFound, ServiceUnavailable
from app.core.logging import get_logger
from app.core.queue import Priority, queue_depth_by_priority, workers_alive
from app.core.schemas import (
    Cursor,
    Page,
    PageQuery,
    ProcessingOptions,
    decode_cursor,
    decode_seq_cursor,
    encode_cursor,
)
from app.core.schemas import Request as RequestBody
from app.core.schemas import Response as ResponseBody
from app.core.storage import client_error_code
from app.gateway.requests import identity, query_params, read_optional_json
from app.gateway.responses import json_response
from app.gateway.routes.jobs import parse_id
from app.gateway.routing import ApiLink, ApiRoute
from app.gateway.services import Services, services
from app.jobs.documents import create_job
from app.jobs.model import JobStatus
from app.uploads.rules import content_disposition

log = get_logger("sluice.gateway.documents")

WORKER_ALIVE_WINDOW_SECONDS = 60.0
ACTIVE_JOB_STATUSES = ("awaiting_upload", "queued", "running", "retrying")


class LatestJob(ResponseBody):
    job_id: str
    status: str
    stage: str | None
    overall_progress: float


class DocumentView(ResponseBody):
    document_id: str
    filename: str
    content_type: str
    document_type: str
    size_bytes: int
    status: str
    sha256: str | None
    checksum_sha256: str | None
    page_count: int | None
    chunk_count: int
    deduplicated_of: str | None
    """Set when this file duplicated one already indexed; search uses that one's chunks."""
    processing_options: dict[str, Any]
    latest_job: LatestJob | None
    created_at: datetime
    updated_at: datetime


DocumentStatus = Literal["pending", "stored", "processing", "indexed", "failed", "cancelled"]


class DocumentListQuery(PageQuery):
    status: DocumentStatus | None = None


class ChunkView(ResponseBody):
    seq: int
    text: str
    token_count: int
    page_start: int | None
    page_end: int | None
    char_start: int
    char_end: int
    sha256: str


class ChunkQuery(RequestBody):
    limit: Annotated[int, msgspec.Meta(ge=1, le=500)] = 100
    cursor: Cursor | None = None


class ChunkPage(ResponseBody):
    items: list[ChunkView]
    next_cursor: str | None = None


class DownloadLink(ResponseBody):
    url: str
    expires_in: int
    filename: str


class ReprocessRequest(RequestBody):
    processing_options: ProcessingOptions | None = None
    """New options; omitted keeps the document's current ones."""
    priority: Priority = Priority.NORMAL


class ReprocessResponse(ResponseBody):
    job_id: str
    document_id: str
    status: str
    priority: str


class StageTiming(ResponseBody):
    """Per job: the seconds of every run of the stage (attempts) added up."""

    jobs: int
    avg_seconds: float
    p95_seconds: float


class ProcessingMetrics(ResponseBody):
    jobs_by_status: dict[str, int]
    """The caller's jobs."""
    stage_timings: dict[str, StageTiming]
    """The caller's jobs finished in the last 24 hours."""
    queue_depth: dict[str, int]
    """Jobs waiting fleet-wide (queued or retrying), by priority."""
    arq_queue_length: int
    workers_alive: int


_DOC_COLUMNS = """
    d.id::text AS document_id, d.filename, d.content_type, d.document_type, d.size_bytes,
    d.status, d.sha256, d.checksum_sha256, d.page_count, d.deduplicated_of::text AS deduplicated_of,
    d.processing_options, d.created_at, d.updated_at,
    (SELECT count(*) FROM chunks c WHERE c.document_id = COALESCE(d.deduplicated_of, d.id))
        AS chunk_count,
    lj.id::text AS lj_id, lj.status AS lj_status, lj.stage AS lj_stage,
    lj.overall_progress AS lj_progress
"""
_LATEST_JOB = """
    LEFT JOIN LATERAL (SELECT id, status, stage, overall_progress FROM jobs
                       WHERE document_id = d.id ORDER BY created_at DESC, id DESC LIMIT 1) lj
    ON true
"""


def _view(row: asyncpg.Record) -> DocumentView:
    data = dict(row)
    lj = None
    if data["lj_id"] is not None:
        lj = LatestJob(
            job_id=data["lj_id"],
            status=data["lj_status"],
            stage=data["lj_stage"],
            overall_progress=round(float(data["lj_progress"]), 4),
        )
    for key in ("lj_id", "lj_status", "lj_stage", "lj_progress"):
        del data[key]
    return DocumentView(latest_job=lj, **data)


async def _load(db: asyncpg.Pool, doc_id: str, owner: str) -> DocumentView:
    row = await db.fetchrow(
        f"SELECT {_DOC_COLUMNS} FROM documents d {_LATEST_JOB} WHERE d.id = $1 AND d.owner_id = $2",
        parse_id(doc_id, "document"),
        owner,
    )
    if row is None:
        raise NotFound("document not found", code="document_not_found")
    return _view(row)


async def list_documents(request: Request) -> Response:
    svc = services(request)
    q = query_params(request, DocumentListQuery)
    args: list[Any] = [identity(request).user_id]
    where = ["d.owner_id = $1"]
    if q.status is not None:
        args.append(q.status)
        where.append(f"d.status = ${len(args)}")
    if q.cursor:
        created, last_id = decode_cursor(q.cursor)
        args += [created, last_id]
        where.append(f"(d.created_at, d.id) < (${len(args) - 1}, ${len(args)})")
    args.append(q.limit + 1)
    rows = await svc.db.fetch(
        f"SELECT {_DOC_COLUMNS} FROM documents d {_LATEST_JOB} WHERE {' AND '.join(where)} "
        f"ORDER BY d.created_at DESC, d.id DESC LIMIT ${len(args)}",
        *args,
    )
    items = [_view(r) for r in rows[: q.limit]]
    cursor = (
        encode_cursor(items[-1].created_at, items[-1].document_id) if len(rows) > q.limit else None
    )
    return json_response(Page[DocumentView](items=items, next_cursor=cursor))


async def get_document(request: Request) -> Response:
    svc = services(request)
    return json_response(
        await _load(svc.db, request.path_params["document_id"], identity(request).user_id)
    )


async def list_chunks(request: Request) -> Response:
    svc = services(request)
    doc = await _load(svc.db, request.path_params["document_id"], identity(request).user_id)
    q = query_params(request, ChunkQuery)
    after = decode_seq_cursor(q.cursor) if q.cursor else -1
    source = doc.deduplicated_of or doc.document_id
    rows = await svc.db.fetch(
        "SELECT seq, text, token_count, page_start, page_end, char_start, char_end, sha256 "
        "FROM chunks WHERE document_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        uuid.UUID(source),
        after,
        q.limit + 1,
    )
    items = [ChunkView(**dict(r)) for r in rows[: q.limit]]
    cursor = str(items[-1].seq) if len(rows) > q.limit else None
    return json_response(ChunkPage(items=items, next_cursor=cursor))


async def download(request: Request) -> Response:
    svc = services(request)
    owner = identity(request).user_id
    row = await svc.db.fetchrow(
        "SELECT filename, object_key FROM documents WHERE id = $1 AND owner_id = $2",
        parse_id(request.path_params["document_id"], "document"),
        owner,
    )
    if row is None:
        raise NotFound("document not found", code="document_not_found")
    bucket = svc.settings.minio_bucket_name
    try:
        await svc.s3.head_object(Bucket=bucket, Key=row["object_key"])
    except Exception as exc:
        if client_error_code(exc) in {"404", "NoSuchKey", "NotFound"}:
            raise Conflict(
                "the document's upload has not completed", code="upload_incomplete"
            ) from None
        raise ServiceUnavailable("object storage unavailable", code="storage_unavailable") from exc
    expires = svc.settings.presign_expiry_seconds
    url = await svc.s3_public.generate_presigned_url(
        "get_object",
        Params={
            "Bucket": bucket,
            "Key": row["object_key"],
            "ResponseContentDisposition": content_disposition(row["filename"]),
        },
        ExpiresIn=expires,
    )
    return json_response(DownloadLink(url=url, expires_in=expires, filename=row["filename"]))


async def delete_document(request: Request) -> Response:
    svc = services(request)
    owner = identity(request).user_id
    doc_uuid = parse_id(request.path_params["document_id"], "document")
    async with svc.db.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "SELECT object_key FROM documents WHERE id = $1 AND owner_id = $2 FOR UPDATE",
            doc_uuid,
            owner,
        )
        if row is None:
            raise NotFound("document not found", code="document_not_found")
        jobs = await conn.fetch(
            "SELECT id::text AS id FROM jobs WHERE document_id = $1 AND status = ANY($2)",
            doc_uuid,
            list(ACTIVE_JOB_STATUSES),
        )
        # Documents that were deduplicated against this one searched its chunks:
        # they get their own processing job now.
        dupes = await conn.fetch(
            "UPDATE documents SET deduplicated_of = NULL, status = 'stored', updated_at = now() "
            "WHERE deduplicated_of = $1 RETURNING id::text AS id, owner_id",
            doc_uuid,
        )
        requeue = [
            await create_job(
                conn, owner_id=d["owner_id"], document_id=d["id"], status=JobStatus.QUEUED
            )
            for d in dupes
        ]
        # Chunks, vectors, jobs and checkpoints go by cascade; a worker still on
        # one of these jobs finds its row gone and writes nothing.
        await conn.execute("DELETE FROM documents WHERE id = $1", doc_uuid)
    for job_id in requeue:
        await svc.queue.enqueue(job_id, Priority.NORMAL)
    for job in jobs:
        try:
            await svc.queue.abort(job["id"])
        except Exception:
            log.warning("queue_abort_failed", job_id=job["id"], exc_info=True)
    await _delete_object(svc, row["object_key"])
    return Response(status_code=204)


async def _delete_object(svc: Services, key: str) -> None:
    for attempt in range(3):
        try:
            await svc.s3.delete_object(Bucket=svc.settings.minio_bucket_name, Key=key)
            return
        except Exception:
            if attempt == 2:
                log.error("object_delete_failed", key=key, exc_info=True)
                return
            await asyncio.sleep(0.2 * (attempt + 1))


async def reprocess(request: Request) -> Response:
    svc = services(request)
    owner = identity(request).user_id
    doc_id = request.path_params["document_id"]
    doc_uuid = parse_id(doc_id, "document")
    body = await read_optional_json(request, ReprocessRequest, ReprocessRequest())
    async with svc.db.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "SELECT status, processing_options FROM documents WHERE id = $1 AND owner_id = $2 "
            "FOR UPDATE",
            doc_uuid,
            owner,
        )
        if row is None:
            raise NotFound("document not found", code="document_not_found")
        if row["status"] == "pending":
            raise Conflict("the document's upload has not completed", code="upload_incomplete")
        active = await conn.fetchval(
            "SELECT id::text FROM jobs WHERE document_id = $1 AND status = ANY($2) LIMIT 1",
            doc_uuid,
            list(ACTIVE_JOB_STATUSES),
        )
        if active is not None:
            raise Conflict(
                "the document already has a job in progress",
                code="job_active",
                details={"job_id": active},
            )
        options = dict(row["processing_options"] or {})
        if body.processing_options is not None:
            options.update(body.processing_options.to_dict())
        await conn.execute(
            "UPDATE documents SET processing_options = $2, updated_at = now() WHERE id = $1",
            doc_uuid,
            options,
        )
        job_id = await create_job(
            conn,
            owner_id=owner,
            document_id=doc_id,
            priority=body.priority,
            status=JobStatus.QUEUED,
        )
    await svc.queue.enqueue(job_id, body.priority)
    return json_response(
        ReprocessResponse(
            job_id=job_id, document_id=doc_id, status=JobStatus.QUEUED, priority=body.priority
        ),
        202,
    )


async def processing_metrics(request: Request) -> Response:
    svc = services(request)
    owner = identity(request).user_id
    by_status = await svc.db.fetch(
        "SELECT status, count(*) AS n FROM jobs WHERE owner_id = $1 GROUP BY status", owner
    )
    timings = await svc.db.fetch(
        """
        SELECT t.key AS stage, count(*) AS n, avg(t.seconds) AS avg,
               percentile_cont(0.95) WITHIN GROUP (ORDER BY t.seconds) AS p95
        FROM jobs j, LATERAL (
            SELECT e.key, (SELECT sum(x::float8) FROM jsonb_array_elements_text(
                       CASE jsonb_typeof(e.value) WHEN 'array' THEN e.value
                            ELSE jsonb_build_array(e.value) END) x) AS seconds
            FROM jsonb_each(j.stage_timings) e) t
        WHERE j.owner_id = $1 AND j.finished_at > now() - interval '24 hours'
        GROUP BY t.key
        """,
        owner,
    )
    depth, arq_len, alive = await asyncio.gather(
        queue_depth_by_priority(svc.db),
        svc.queue.depth(),
        workers_alive(svc.redis, window_seconds=WORKER_ALIVE_WINDOW_SECONDS, now=svc.clock()),
    )
    return json_response(
        ProcessingMetrics(
            jobs_by_status={r["status"]: int(r["n"]) for r in by_status},
            stage_timings={
                r["stage"]: StageTiming(
                    jobs=int(r["n"]), avg_seconds=round(r["avg"], 4), p95_seconds=round(r["p95"], 4)
                )
                for r in timings
            },
            queue_depth=depth,
            arq_queue_length=arq_len,
            workers_alive=alive,
        )
    )


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


def routes() -> list[ApiRoute]:
    doc = "/api/v1/documents/{document_id}"
    errors = [404]
    return [
        ApiRoute(
            "/api/v1/documents/processing/metrics",
            processing_metrics,
            methods=["GET"],
            summary="Jobs by status, stage timings, queue depth, workers alive",
            response=ProcessingMetrics,
            tags=["documents"],
        ),
        ApiRoute(
            "/api/v1/documents",
            list_documents,
            methods=["GET"],
            summary="List your documents",
            query=DocumentListQuery,
            response=Page[DocumentView],
            links=document_links("$response.body#/items/0/document_id"),
            tags=["documents"],
        ),
        ApiRoute(
            doc,
            get_document,
            methods=["GET"],
            summary="A document and its latest job",
            response=DocumentView,
            errors=errors,
            tags=["documents"],
        ),
        ApiRoute(
            doc,
            delete_document,
            methods=["DELETE"],
            status_code=204,
            summary="Delete a document: its object, chunks and vectors",
            errors=errors,
            tags=["documents"],
        ),
        ApiRoute(
            f"{doc}/chunks",
            list_chunks,
            methods=["GET"],
            query=ChunkQuery,
            summary="A document's chunks in order",
            response=ChunkPage,
            errors=errors,
            tags=["documents"],
        ),
        ApiRoute(
            f"{doc}/download",
            download,
            methods=["GET"],
            summary="A presigned URL to download the original file",
            response=DownloadLink,
            errors=[*errors, 409],
            tags=["documents"],
        ),
        ApiRoute(
            f"{doc}/reprocess",
            reprocess,
            methods=["POST"],
            body=ReprocessRequest,
            body_required=False,
            summary="Process again with new options (a new job)",
            response=ReprocessResponse,
            status_code=202,
            errors=[*errors, 409],
            links=[
                ApiLink(
                    name="GetJob",
                    operation="get_get_job",
                    parameters={"job_id": "$response.body#/job_id"},
                )
            ],
            tags=["documents"],
        ),
    ]
