"""An upload session's lifecycle: initiate, load, restart, cancel.

* **initiate** decides the part size (``UPLOAD_CHUNK_SIZE_MB``, never below
  S3's 5 MiB minimum, raised so that a file needs at most 10,000 parts),
  starts the S3 multipart upload, then registers the document and its job
  (``awaiting_upload``, :func:`app.uploads.register.register_upload`) and
  creates the session, in one transaction.  If that fails, the S3 upload is
  aborted: nothing half-written stays.
* **get_session** loads the caller's session; unknown, malformed and foreign
  ids are all 404 (``lock=True`` takes its row lock).
* **restart** recovers a lost session (:mod:`app.uploads.reconcile`) in place:
  a fresh S3 multipart upload under the same upload, job and document ids,
  recorded parts cleared, TTL renewed; the client sends every part again.
  Parts are only ever recorded against the session's current S3 upload id,
  so a part that raced a restart is refused, not mis-recorded.
* **cancel** aborts the S3 upload and cancels the job through
  :func:`app.jobs.service.request_cancel`, the one cancel path.
"""

from __future__ import annotations

import contextlib
import uuid
from datetime import datetime, timedelta

from botocore.exceptions import ClientError

from app.core.db import Queryable
from app.core.errors import Conflict, NotFound
from app.core.logging import get_logger
from app.core.storage import client_error_code, storage_errors
from app.jobs.documents import object_key_for
from app.jobs.model import JobStatus
from app.jobs.service import request_cancel
from app.jobs.transitions import job_transaction
from app.uploads.model import (
    SESSION_COLUMNS,
    UploadContext,
    UploadSession,
    UploadSessionStatus,
    session_from_row,
)
from app.uploads.reconcile import NO_SUCH_UPLOAD, is_lost
from app.uploads.register import NewUpload, register_upload
from app.uploads.rules import check_filename, check_sha256, check_size, classify, decide_chunk_size
from app.uploads.schemas import CancelledUpload, InitiatedUpload, InitiateUpload

log = get_logger(__name__)


async def initiate(ctx: UploadContext, owner_id: str, req: InitiateUpload) -> InitiatedUpload:
    """Start a resumable upload: an S3 multipart upload, the document, its job, the session."""
    upload = _new_upload(ctx, owner_id, req)
    chunk_size, total_parts = decide_chunk_size(req.file_size, ctx.settings.upload_chunk_size_bytes)
    upload_id = str(uuid.uuid4())
    key = object_key_for(upload.document_id)
    s3_upload_id = await _create_s3_upload(
        ctx,
        key,
        content_type=upload.content_type,
        document_id=upload.document_id,
        owner_id=owner_id,
    )
    expires_at = _expiry(ctx)
    try:
        async with job_transaction(ctx.db, ctx.redis) as changes:
            await register_upload(changes, upload, stored=False)
            await _insert_session(
                changes.conn,
                upload,
                upload_id=upload_id,
                s3_upload_id=s3_upload_id,
                chunk_size=chunk_size,
                total_parts=total_parts,
                expires_at=expires_at,
            )
    except BaseException:
        with contextlib.suppress(Exception):  # best effort: nothing half-written stays
            await ctx.s3.abort_multipart_upload(Bucket=ctx.bucket, Key=key, UploadId=s3_upload_id)
        raise
    log.info(
        "upload_initiated",
        upload_id=upload_id,
        job_id=upload.job_id,
        size=upload.size,
        parts=total_parts,
    )
    return InitiatedUpload(
        upload_id=upload_id,
        job_id=upload.job_id,
        document_id=upload.document_id,
        chunk_size=chunk_size,
        total_parts=total_parts,
        expires_at=expires_at,
        filename=upload.filename,
        file_size=upload.size,
        content_type=upload.content_type,
        document_type=upload.document_type,
        priority=str(req.priority),
    )


def _new_upload(ctx: UploadContext, owner_id: str, req: InitiateUpload) -> NewUpload:
    """The request checked (filename, type, size, checksum), with fresh ids."""
    filename = check_filename(req.filename)
    document_type, content_type = classify(filename, req.content_type, req.document_type)
    check_size(req.file_size, ctx.settings.max_upload_size_bytes)
    checksum = check_sha256(req.checksum_sha256)
    return NewUpload(
        owner_id=owner_id,
        document_id=str(uuid.uuid4()),
        job_id=str(uuid.uuid4()),
        filename=filename,
        content_type=content_type,
        document_type=document_type,
        size=req.file_size,
        priority=req.priority,
        processing_options=req.processing_options.to_dict(),
        checksum_sha256=checksum,
    )


async def _insert_session(
    conn: Queryable,
    upload: NewUpload,
    *,
    upload_id: str,
    s3_upload_id: str,
    chunk_size: int,
    total_parts: int,
    expires_at: datetime,
) -> None:
    await conn.execute(
        """
        INSERT INTO upload_sessions (id, owner_id, document_id, job_id, s3_upload_id,
            object_key, filename, file_size, content_type, chunk_size, total_parts,
            expires_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
        """,
        uuid.UUID(upload_id),
        upload.owner_id,
        uuid.UUID(upload.document_id),
        uuid.UUID(upload.job_id),
        s3_upload_id,
        object_key_for(upload.document_id),
        upload.filename,
        upload.size,
        upload.content_type,
        chunk_size,
        total_parts,
        expires_at,
    )


def _expiry(ctx: UploadContext) -> datetime:
    return ctx.now() + timedelta(hours=ctx.settings.upload_session_ttl_hours)


def _ascii(text: str) -> str:
    return text.encode("ascii", "backslashreplace").decode()


async def _create_s3_upload(
    ctx: UploadContext, key: str, *, content_type: str, document_id: str, owner_id: str
) -> str:
    """Start an S3 multipart upload for a document's object; its upload id."""
    async with storage_errors("create_multipart_upload"):
        created = await ctx.s3.create_multipart_upload(
            Bucket=ctx.bucket,
            Key=key,
            ContentType=content_type,
            Metadata={"document-id": document_id, "owner": _ascii(owner_id)},
        )
    return str(created["UploadId"])


async def get_session(
    db: Queryable, owner_id: str, upload_id: str, *, lock: bool = False
) -> UploadSession:
    """The caller's session; unknown, malformed and foreign ids are all 404."""
    try:
        sid = uuid.UUID(upload_id)
    except ValueError:
        raise NotFound("upload not found", code="upload_not_found") from None
    row = await db.fetchrow(
        f"SELECT {SESSION_COLUMNS} FROM upload_sessions s JOIN jobs j ON j.id = s.job_id "
        f"WHERE s.id = $1 AND s.owner_id = $2{' FOR UPDATE OF s' if lock else ''}",
        sid,
        owner_id,
    )
    if row is None:
        raise NotFound("upload not found", code="upload_not_found")
    return session_from_row(row)


def upload_completed(session: UploadSession) -> Conflict:
    """409 ``upload_completed``."""
    return Conflict(
        "upload is already complete",
        code="upload_completed",
        details={"status": session.status},
    )


def ensure_writable(session: UploadSession, now: datetime) -> None:
    """404 for an expired session, 409 for a finished one."""
    if session.expired_at(now):
        raise NotFound(
            "upload session has expired",
            code="upload_expired",
            details={"expires_at": session.expires_at.isoformat()},
        )
    if session.status == UploadSessionStatus.CANCELLED or session.job_status == JobStatus.CANCELLED:
        raise Conflict(
            "upload was cancelled", code="upload_cancelled", details={"status": "cancelled"}
        )
    if session.status == UploadSessionStatus.COMPLETED:
        raise upload_completed(session)


async def abort_s3(ctx: UploadContext, session: UploadSession) -> None:
    """Abort the session's S3 multipart upload (already gone is fine)."""
    async with storage_errors("abort_multipart_upload"):
        try:
            await ctx.s3.abort_multipart_upload(
                Bucket=ctx.bucket, Key=session.object_key, UploadId=session.s3_upload_id
            )
        except ClientError as exc:
            if client_error_code(exc) not in NO_SUCH_UPLOAD:
                raise


async def mark_cancelled(conn: Queryable, session: UploadSession) -> None:
    await conn.execute(
        "UPDATE upload_sessions SET status = 'cancelled', updated_at = now() WHERE id = $1::uuid",
        session.id,
    )


async def restart(ctx: UploadContext, owner_id: str, upload_id: str) -> bool:
    """Start a fresh S3 multipart upload for a lost session, in place.

    Same upload, job and document ids; the recorded parts are cleared and the
    TTL renewed, so the client sends every part again.  Idempotent: when S3
    still knows the session's upload (never lost, or a racing restart won)
    nothing changes.  404 for an unknown or expired session, 409 for a
    cancelled or completed one.  True if a fresh upload was started.
    """
    created_id: str | None = None
    try:
        async with ctx.db.acquire() as conn, conn.transaction():
            session = await get_session(conn, owner_id, upload_id, lock=True)
            ensure_writable(session, ctx.now())
            if not await is_lost(ctx, session):
                return False
            created_id = await _create_s3_upload(
                ctx,
                session.object_key,
                content_type=session.content_type,
                document_id=session.document_id,
                owner_id=owner_id,
            )
            await conn.execute("DELETE FROM upload_parts WHERE upload_id = $1::uuid", session.id)
            await conn.execute(
                "UPDATE upload_sessions SET s3_upload_id = $2, status = 'initiated', "
                "expires_at = $3, updated_at = now() WHERE id = $1::uuid",
                session.id,
                created_id,
                _expiry(ctx),
            )
    except BaseException:
        if created_id is not None:
            with contextlib.suppress(Exception):  # best effort: nothing half-written stays
                await ctx.s3.abort_multipart_upload(
                    Bucket=ctx.bucket, Key=session.object_key, UploadId=created_id
                )
        raise
    log.info("upload_restarted", upload_id=session.id, job_id=session.job_id)
    return True


async def cancel(ctx: UploadContext, owner_id: str, upload_id: str) -> CancelledUpload:
    """Abort the S3 upload and cancel the job; idempotent; 409 once completed."""
    async with ctx.db.acquire() as conn, conn.transaction():
        session = await get_session(conn, owner_id, upload_id, lock=True)
        if session.status == UploadSessionStatus.COMPLETED:
            raise upload_completed(session)
        if session.expired_at(ctx.now()):
            raise NotFound("upload session has expired", code="upload_expired")
        if session.status != UploadSessionStatus.CANCELLED:
            await abort_s3(ctx, session)
            await mark_cancelled(conn, session)
    # After the commit, on its own connection: never hold one connection while waiting
    # for another.  If this fails, a repeated cancel finishes it (the job is not yet
    # cancelled, so this branch runs again).
    if session.job_status != JobStatus.CANCELLED:
        await request_cancel(ctx.db, ctx.redis, session.job_id, owner_id)
    log.info("upload_cancelled", upload_id=session.id, job_id=session.job_id)
    return CancelledUpload(upload_id=session.id, job_id=session.job_id, status="cancelled")
