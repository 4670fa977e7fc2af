"""Documents: where rows are born, and what a client can do to its documents.

Uploads (multipart and simple), reprocessing and tests all create rows through
:func:`create_document` / :func:`create_job`, so that ownership, object keys
and a job's initial state are set the same way everywhere.

The rest is the HTTP-free documents service the gateway's handlers call:
list, show, chunks, download link, delete, reprocess.  Every lookup is scoped
to the caller (another user's document is a 404 like a missing one).  Deleting
removes the row (its chunks, vectors, jobs and checkpoints go with it by
cascade, in one transaction) and then the stored object; documents that were
deduplicated against it get a job of their own.  Reprocessing creates a new
job with new options for a document whose upload completed and that has no
unfinished job.  Jobs created here are enqueued after commit with
:meth:`~app.core.queue.JobQueue.enqueue_or_defer` (a Redis outage leaves them
queued for the workers' resync).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg

from app.core.db import Queryable, fetch_owned
from app.core.errors import Conflict
from app.core.logging import get_logger
from app.core.pagination import Keyset, Where, fetch_page
from app.core.queue import Priority
from app.core.schemas import Page, decode_seq_cursor
from app.jobs.context import JobsContext, object_exists
from app.jobs.model import UNFINISHED_STATUSES, DocumentStatus, JobStatus, Stage
from app.jobs.schemas import (
    ChunkPage,
    ChunkQuery,
    ChunkView,
    DocumentListQuery,
    DocumentView,
    DownloadLink,
    LatestJob,
    ReprocessRequest,
    ReprocessResponse,
)

log = get_logger(__name__)

DOCUMENT_TYPES = ("pdf", "txt", "md", "csv", "json", "html", "png", "jpeg", "tiff")


def object_key_for(document_id: str) -> str:
    """S3 key of a document's bytes; never derived from the client's filename."""
    return f"documents/{document_id}/original"


async def create_document(
    conn: Queryable,
    *,
    owner_id: str,
    filename: str,
    content_type: str,
    document_type: str,
    size_bytes: int,
    processing_options: dict[str, Any] | None = None,
    checksum_sha256: str | None = None,
    status: DocumentStatus = DocumentStatus.PENDING,
    document_id: str | None = None,
) -> str:
    doc_id = document_id or str(uuid.uuid4())
    await conn.execute(
        """
        INSERT INTO documents (id, owner_id, filename, content_type, document_type, size_bytes,
                               checksum_sha256, object_key, status, processing_options)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
        """,
        uuid.UUID(doc_id),
        owner_id,
        filename,
        content_type,
        document_type,
        size_bytes,
        checksum_sha256,
        object_key_for(doc_id),
        str(status),
        processing_options or {},
    )
    return doc_id


async def create_job(
    conn: Queryable,
    *,
    owner_id: str,
    document_id: str,
    priority: Priority | str = Priority.NORMAL,
    status: JobStatus = JobStatus.AWAITING_UPLOAD,
    job_id: str | None = None,
) -> str:
    """Insert a job (seq 0).  The caller enqueues it once its object is stored."""
    new_id = job_id or str(uuid.uuid4())
    await conn.execute(
        """
        INSERT INTO jobs (id, owner_id, document_id, priority, status, stage, message, queued_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, CASE WHEN $5 = 'queued' THEN now() END)
        """,
        uuid.UUID(new_id),
        owner_id,
        uuid.UUID(document_id),
        str(priority),
        str(status),
        str(Stage.UPLOAD) if status == JobStatus.AWAITING_UPLOAD else None,
        "waiting for upload" if status == JobStatus.AWAITING_UPLOAD else "queued",
    )
    return new_id


# --- reading ------------------------------------------------------------------------------

_DOCUMENT_SELECT = """
    SELECT d.id::text AS document_id, d.filename, d.content_type, d.document_type, d.size_bytes,
           d.status, d.sha256, d.checksum_sha256, d.page_count,
           d.deduplicated_of::text AS deduplicated_of, d.processing_options, d.created_at,
           d.updated_at,
           (SELECT count(*) FROM chunks c WHERE c.document_id = COALESCE(d.deduplicated_of, d.id))
               AS chunk_count,
           lj.id::text AS lj_id, lj.status AS lj_status, lj.stage AS lj_stage,
           lj.overall_progress AS lj_progress
    FROM documents d
    LEFT JOIN LATERAL (SELECT id, status, stage, overall_progress FROM jobs
                       WHERE document_id = d.id ORDER BY created_at DESC, id DESC LIMIT 1) lj
    ON true
"""
_DOCUMENT_KEYSET = Keyset("d.created_at", "d.id", id_field="document_id")


def document_view(row: asyncpg.Record) -> DocumentView:
    data = dict(row)
    latest = None
    if data["lj_id"] is not None:
        latest = LatestJob(
            job_id=data["lj_id"],
            status=JobStatus(data["lj_status"]),
            stage=None if data["lj_stage"] is None else Stage(data["lj_stage"]),
            overall_progress=round(float(data["lj_progress"]), 4),
        )
    for key in ("lj_id", "lj_status", "lj_stage", "lj_progress"):
        del data[key]
    data["status"] = DocumentStatus(data["status"])
    return DocumentView(latest_job=latest, **data)


async def get_document(ctx: JobsContext, document_id: str, owner_id: str) -> DocumentView:
    row = await fetch_owned(
        ctx.db,
        f"{_DOCUMENT_SELECT} WHERE d.id = $1 AND d.owner_id = $2",
        document_id,
        owner_id,
        not_found="document",
    )
    return document_view(row)


async def list_documents(
    ctx: JobsContext, owner_id: str, query: DocumentListQuery
) -> Page[DocumentView]:
    """The caller's documents, newest first, with their latest job."""
    where = Where().add("d.owner_id = {}", owner_id)
    if query.status is not None:
        where.add("d.status = {}", str(query.status))
    page = await fetch_page(
        ctx.db,
        _DOCUMENT_SELECT,
        where,
        keyset=_DOCUMENT_KEYSET,
        cursor=query.cursor,
        limit=query.limit,
    )
    return Page[DocumentView](
        items=[document_view(r) for r in page.rows], next_cursor=page.next_cursor
    )


async def list_chunks(
    ctx: JobsContext, document_id: str, owner_id: str, query: ChunkQuery
) -> ChunkPage:
    """A document's chunks in order (a deduplicated document's are its original's).

    The cursor is checked before the document is looked up: a bad one is 400
    ``invalid_cursor`` whichever document it is sent for.
    """
    after = decode_seq_cursor(query.cursor) if query.cursor else -1
    doc = await get_document(ctx, document_id, owner_id)
    rows = await ctx.db.fetch(
        "SELECT seq, text, token_count, page_start, page_end, char_start, char_end, sha256 "
        "FROM chunks WHERE document_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        uuid.UUID(doc.deduplicated_of or doc.document_id),
        after,
        query.limit + 1,
    )
    items = [ChunkView(**dict(r)) for r in rows[: query.limit]]
    cursor = str(items[-1].seq) if len(rows) > query.limit else None
    return ChunkPage(items=items, next_cursor=cursor)


async def download_link(
    ctx: JobsContext, document_id: str, owner_id: str, *, disposition: Callable[[str], str]
) -> DownloadLink:
    """A presigned URL of the original file, saved under its filename.

    ``disposition`` renders the ``Content-Disposition`` the download carries
    (the uploads' filename rules own it).  A document whose upload has not
    completed is a :class:`Conflict`; an S3 failure is 503.
    """
    row = await fetch_owned(
        ctx.db,
        "SELECT filename, object_key FROM documents WHERE id = $1 AND owner_id = $2",
        document_id,
        owner_id,
        not_found="document",
    )
    if not await object_exists(ctx, row["object_key"], operation="download"):
        raise Conflict("the document's upload has not completed", code="upload_incomplete")
    expires = ctx.settings.presign_expiry_seconds
    url = await ctx.s3_public.generate_presigned_url(
        "get_object",
        Params={
            "Bucket": ctx.settings.minio_bucket_name,
            "Key": row["object_key"],
            "ResponseContentDisposition": disposition(row["filename"]),
        },
        ExpiresIn=expires,
    )
    return DownloadLink(url=url, expires_in=expires, filename=row["filename"])


# --- delete and reprocess -----------------------------------------------------------------


async def _unfinished_jobs(conn: Queryable, document_id: str, *, limit: int | None) -> list[str]:
    rows = await conn.fetch(
        "SELECT id::text AS id FROM jobs WHERE document_id = $1::uuid AND status = ANY($2) "
        "LIMIT $3",
        document_id,
        [str(s) for s in UNFINISHED_STATUSES],
        limit,
    )
    return [r["id"] for r in rows]


async def delete_document(ctx: JobsContext, document_id: str, owner_id: str) -> None:
    """Delete a document with its chunks, vectors, jobs and checkpoints, then its object.

    Documents deduplicated against it get a queued job of their own; its
    unfinished jobs leave the ARQ queue.  The object is deleted after commit,
    best effort (three tries, then logged): the document is gone either way.
    """
    async with ctx.db.acquire() as conn, conn.transaction():
        row = await fetch_owned(
            conn,
            "SELECT object_key FROM documents WHERE id = $1 AND owner_id = $2",
            document_id,
            owner_id,
            not_found="document",
            for_update=True,
        )
        unfinished = await _unfinished_jobs(conn, document_id, limit=None)
        # Documents that were deduplicated against this one searched its chunks:
        # they get their own processing job now.
        dupes = await conn.fetch(
            "UPDATE documents SET deduplicated_of = NULL, status = $2, updated_at = now() "
            "WHERE deduplicated_of = $1::uuid RETURNING id::text AS id, owner_id",
            document_id,
            str(DocumentStatus.STORED),
        )
        requeue = [
            await create_job(
                conn, owner_id=d["owner_id"], document_id=d["id"], status=JobStatus.QUEUED
            )
            for d in dupes
        ]
        # Chunks, vectors, jobs and checkpoints go by cascade; a worker still on
        # one of these jobs finds its row gone and writes nothing.
        await conn.execute("DELETE FROM documents WHERE id = $1::uuid", document_id)
    for job_id in requeue:
        await ctx.queue.enqueue_or_defer(job_id, Priority.NORMAL)
    for job_id in unfinished:
        try:
            await ctx.queue.abort(job_id)
        except Exception:
            log.warning("queue_abort_failed", job_id=job_id, exc_info=True)
    await _delete_object(ctx, row["object_key"])


async def _delete_object(ctx: JobsContext, key: str) -> None:
    for attempt in range(3):
        try:
            await ctx.s3.delete_object(Bucket=ctx.settings.minio_bucket_name, Key=key)
            return
        except Exception:
            if attempt == 2:
                log.error("object_delete_failed", key=key, exc_info=True)
                return
            await asyncio.sleep(0.2 * (attempt + 1))


async def reprocess(
    ctx: JobsContext, document_id: str, owner_id: str, request: ReprocessRequest
) -> ReprocessResponse:
    """A new queued job for a stored document, with the request's options merged in.

    A document whose upload has not completed, or that has an unfinished job,
    is a :class:`Conflict`.
    """
    async with ctx.db.acquire() as conn, conn.transaction():
        row = await fetch_owned(
            conn,
            "SELECT status, processing_options FROM documents WHERE id = $1 AND owner_id = $2",
            document_id,
            owner_id,
            not_found="document",
            for_update=True,
        )
        if DocumentStatus(row["status"]) == DocumentStatus.PENDING:
            raise Conflict("the document's upload has not completed", code="upload_incomplete")
        active = await _unfinished_jobs(conn, document_id, limit=1)
        if active:
            raise Conflict(
                "the document already has a job in progress",
                code="job_active",
                details={"job_id": active[0]},
            )
        options = dict(row["processing_options"] or {})
        if request.processing_options is not None:
            options.update(request.processing_options.to_dict())
        await conn.execute(
            "UPDATE documents SET processing_options = $2, updated_at = now() WHERE id = $1::uuid",
            document_id,
            options,
        )
        job_id = await create_job(
            conn,
            owner_id=owner_id,
            document_id=document_id,
            priority=request.priority,
            status=JobStatus.QUEUED,
        )
    await ctx.queue.enqueue_or_defer(job_id, request.priority)
    return ReprocessResponse(
        job_id=job_id, document_id=document_id, status=JobStatus.QUEUED, priority=request.priority
    )
