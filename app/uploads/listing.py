"""What the caller sees of their uploads: one session's status, the unfinished ones.

:func:`status` reconciles an open session's parts with S3's ListParts first
(:func:`~app.uploads.reconcile.reconcile`), so a part S3 took just before a
gateway crash, or one sent through a presigned URL, shows as received; it
reports ``lost`` (no parts) once storage forgot the multipart upload.
"""

from __future__ import annotations

from datetime import datetime

import asyncpg

from app.core.pagination import Keyset, Where, fetch_page
from app.core.schemas import Page, PageQuery
from app.jobs.model import JobStatus
from app.uploads.model import (
    OPEN_UPLOAD_STATUSES,
    SESSION_COLUMNS,
    StoredPart,
    UploadContext,
    UploadSession,
    UploadSessionStatus,
)
from app.uploads.reconcile import reconcile, recorded_parts
from app.uploads.schemas import ActiveUpload, PartInfo, UploadStatus
from app.uploads.sessions import get_session


async def status(ctx: UploadContext, owner_id: str, upload_id: str) -> UploadStatus:
    """The session's parts (received and missing), progress and status as shown."""
    session = await get_session(ctx.db, owner_id, upload_id)
    now = ctx.now()
    parts, lost = await _current_parts(ctx, session, now)
    shown = _shown_status(session, now, lost=lost)
    received = sum(p.size for p in parts.values())
    return UploadStatus(
        upload_id=session.id,
        status=shown,
        filename=session.filename,
        file_size=session.file_size,
        chunk_size=session.chunk_size,
        total_parts=session.total_parts,
        parts=[
            PartInfo(part_number=p.part_number, size=p.size, etag=p.etag)
            for p in sorted(parts.values(), key=lambda p: p.part_number)
        ],
        missing_parts=[]
        if shown == UploadSessionStatus.COMPLETED
        else [n for n in range(1, session.total_parts + 1) if n not in parts],
        parts_received=len(parts),
        bytes_received=received,
        progress=round(received / session.file_size, 4),
        expires_at=session.expires_at,
        job_id=session.job_id,
        document_id=session.document_id,
        created_at=session.created_at,
        completed_at=session.completed_at,
    )


async def _current_parts(
    ctx: UploadContext, session: UploadSession, now: datetime
) -> tuple[dict[int, StoredPart], bool]:
    """``(parts, lost)``: an open session's parts reconciled with S3, else those recorded.

    A session found to hold parts moves from ``initiated`` to ``uploading``.
    """
    if session.status not in OPEN_UPLOAD_STATUSES or session.expired_at(now):
        return await recorded_parts(ctx.db, session.id), False
    async with ctx.db.acquire() as conn:
        reconciled = await reconcile(ctx, conn, session, authoritative=False)
    if reconciled and session.status == UploadSessionStatus.INITIATED:
        await ctx.db.execute(
            "UPDATE upload_sessions SET status = 'uploading' "
            "WHERE id = $1::uuid AND status = 'initiated'",
            session.id,
        )
        session.status = UploadSessionStatus.UPLOADING
    return reconciled or {}, reconciled is None


def _shown_status(session: UploadSession, now: datetime, *, lost: bool) -> UploadSessionStatus:
    """``expired`` past the TTL; ``cancelled`` once the job is; ``lost`` when storage forgot it."""
    shown = UploadSessionStatus.EXPIRED if session.expired_at(now) else session.status
    if shown == UploadSessionStatus.UPLOADING and session.job_status == JobStatus.CANCELLED:
        return UploadSessionStatus.CANCELLED
    if lost and session.job_status != JobStatus.CANCELLED:
        return UploadSessionStatus.LOST  # POST .../restart/{upload_id} starts it again
    return shown


async def list_active(ctx: UploadContext, owner_id: str, query: PageQuery) -> Page[ActiveUpload]:
    """The caller's unfinished sessions, newest first (keyset pagination)."""
    where = (
        Where()
        .add("s.owner_id = {}", owner_id)
        .add("s.status IN ('initiated', 'uploading')")  # literal: the partial index's predicate
        .add("s.expires_at > {}", ctx.now())
        .add("j.status <> 'cancelled'")
    )
    page = await fetch_page(
        ctx.db,
        f"""
        SELECT {SESSION_COLUMNS}, COALESCE(p.n, 0) AS parts, COALESCE(p.bytes, 0) AS bytes
        FROM upload_sessions s JOIN jobs j ON j.id = s.job_id
        LEFT JOIN LATERAL (SELECT count(*) AS n, sum(size)::bigint AS bytes
                           FROM upload_parts WHERE upload_id = s.id) p ON true
        """,
        where,
        keyset=Keyset(created="s.created_at", id="s.id"),
        cursor=query.cursor,
        limit=query.limit,
    )
    return Page[ActiveUpload](items=[_active(r) for r in page.rows], next_cursor=page.next_cursor)


def _active(row: asyncpg.Record) -> ActiveUpload:
    return ActiveUpload(
        upload_id=row["id"],
        status=row["status"],
        filename=row["filename"],
        file_size=row["file_size"],
        chunk_size=row["chunk_size"],
        total_parts=row["total_parts"],
        parts_received=int(row["parts"]),
        bytes_received=int(row["bytes"]),
        progress=round(int(row["bytes"]) / row["file_size"], 4),
        expires_at=row["expires_at"],
        created_at=row["created_at"],
        job_id=row["job_id"],
        document_id=row["document_id"],
    )
