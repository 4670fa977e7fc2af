"""Completing a resumable upload: one S3 object, a queued job, enqueued once.

:func:`complete` holds the session's row lock from the check to the commit, so
two racing calls complete (and enqueue) once; the second returns the same
answer.  In that transaction it reconciles the part list with S3
(:func:`~app.uploads.reconcile.reconcile`), completes the S3 upload, marks the
session ``completed`` and records the job ``queued``
(:func:`~app.uploads.register.record_stored`).  After the commit the job is
handed to the queue with ``enqueue_or_defer`` and ``enqueued_at`` is recorded.
A completion whose enqueue did not happen (a crash in between, a Redis outage)
is enqueued later: by a repeated ``complete`` or the sweeper
(:func:`reenqueue_if_lost`, after :data:`REENQUEUE_GRACE_SECONDS`), and in any
case by the workers' ``resync_queue``, since the job row says ``queued``.
"""

from __future__ import annotations

from botocore.exceptions import ClientError

from app.core.db import Queryable
from app.core.errors import Conflict
from app.core.logging import get_logger
from app.core.storage import client_error_code, storage_errors
from app.jobs.model import JobStatus
from app.jobs.transitions import JobChanges, job_transaction
from app.uploads.model import (
    OPEN_UPLOAD_STATUSES,
    StoredPart,
    UploadContext,
    UploadSession,
    UploadSessionStatus,
)
from app.uploads.reconcile import NO_SUCH_UPLOAD, reconcile, upload_lost
from app.uploads.register import record_stored
from app.uploads.rules import MAX_PARTS
from app.uploads.schemas import CompletedUpload
from app.uploads.sessions import abort_s3, ensure_writable, get_session, mark_cancelled

log = get_logger(__name__)

REENQUEUE_GRACE_SECONDS = 10.0
"""A completed session not marked enqueued after this long is enqueued again."""


def _completed(session: UploadSession) -> CompletedUpload:
    return CompletedUpload(
        upload_id=session.id,
        job_id=session.job_id,
        document_id=session.document_id,
        status="queued",
        size=session.file_size,
        filename=session.filename,
    )


async def complete(ctx: UploadContext, owner_id: str, upload_id: str) -> CompletedUpload:
    """Complete the S3 upload from the verified part list and enqueue the job, once."""
    session = await get_session(ctx.db, owner_id, upload_id)
    if session.status == UploadSessionStatus.COMPLETED:
        await reenqueue_if_lost(ctx, session)
        return _completed(session)
    async with job_transaction(ctx.db, ctx.redis) as changes:
        session = await get_session(changes.conn, owner_id, upload_id, lock=True)
        if session.status == UploadSessionStatus.COMPLETED:  # a racing call finished first
            return _completed(session)
        await _refuse_if_cancelled(ctx, changes.conn, session)
        ensure_writable(session, ctx.now())
        parts = await _verified_parts(ctx, changes.conn, session)
        await complete_s3(ctx, session, parts)
        queued = await _record_completed(ctx, changes, session)
    if queued:
        await _enqueue(ctx, session)
    log.info(
        "upload_completed",
        upload_id=session.id,
        job_id=session.job_id,
        size=session.file_size,
        parts=session.total_parts,
    )
    return _completed(session)


async def _refuse_if_cancelled(ctx: UploadContext, conn: Queryable, session: UploadSession) -> None:
    """409 ``upload_cancelled`` for an open session whose job was cancelled elsewhere.

    The S3 upload is aborted first.  The session's ``cancelled`` mark is rolled
    back with the transaction by the 409 itself; the sweeper marks it later.
    """
    if session.job_status == JobStatus.CANCELLED and session.status in OPEN_UPLOAD_STATUSES:
        await abort_s3(ctx, session)
        await mark_cancelled(conn, session)
        raise Conflict(
            "upload was cancelled", code="upload_cancelled", details={"status": "cancelled"}
        )


async def _verified_parts(
    ctx: UploadContext, conn: Queryable, session: UploadSession
) -> list[StoredPart]:
    """Every part, reconciled with S3 and in order; 410 if lost, 409 if any is missing."""
    parts = await reconcile(ctx, conn, session, authoritative=True)
    if parts is None:
        raise upload_lost(session)
    missing = [n for n in range(1, session.total_parts + 1) if n not in parts]
    if missing:
        raise Conflict(
            f"{len(missing)} of {session.total_parts} parts are missing",
            code="missing_parts",
            details={"missing_parts": missing[:MAX_PARTS], "total_parts": session.total_parts},
        )
    return [parts[n] for n in sorted(parts)]


async def _record_completed(
    ctx: UploadContext, changes: JobChanges, session: UploadSession
) -> bool:
    """Mark the session ``completed`` and its job ``queued``; False if the job had moved on."""
    await changes.conn.execute(
        "UPDATE upload_sessions SET status = 'completed', completed_at = $2, "
        "updated_at = now() WHERE id = $1::uuid",
        session.id,
        ctx.now(),
    )
    event = await record_stored(
        changes,
        document_id=session.document_id,
        job_id=session.job_id,
        size=session.file_size,
        upload_id=session.id,
    )
    return event is not None


async def complete_s3(ctx: UploadContext, session: UploadSession, parts: list[StoredPart]) -> None:
    """Complete the S3 multipart upload and check the object's size (409 if wrong)."""
    async with storage_errors("complete_multipart_upload"):
        try:
            await ctx.s3.complete_multipart_upload(
                Bucket=ctx.bucket,
                Key=session.object_key,
                UploadId=session.s3_upload_id,
                MultipartUpload={
                    "Parts": [{"ETag": f'"{p.etag}"', "PartNumber": p.part_number} for p in parts]
                },
            )
        except ClientError as exc:
            code = client_error_code(exc)
            if code not in NO_SUCH_UPLOAD:
                if code in {"InvalidPart", "InvalidPartOrder", "EntityTooSmall"}:
                    raise Conflict(
                        f"storage rejected the part list ({code}); check status "
                        "and resend the listed parts",
                        code="invalid_parts",
                        details={"s3_error": code},
                    ) from None
                raise
            # Completed by an earlier call that crashed before recording it?  Then the
            # object exists with the right size, checked below.
        head = await ctx.s3.head_object(Bucket=ctx.bucket, Key=session.object_key)
    size = int(head["ContentLength"])
    if size != session.file_size:
        log.error(
            "upload_size_mismatch", upload_id=session.id, size=size, expected=session.file_size
        )
        raise Conflict(
            f"stored object has {size} bytes, expected {session.file_size}",
            code="size_mismatch",
            details={"size": size, "file_size": session.file_size},
        )


async def _enqueue(ctx: UploadContext, session: UploadSession) -> None:
    """Hand the committed job to the queue; ``enqueued_at`` once it holds it."""
    if await ctx.queue.enqueue_or_defer(session.job_id, session.priority):
        await ctx.db.execute(
            "UPDATE upload_sessions SET enqueued_at = now() WHERE id = $1::uuid", session.id
        )
    # else left queued: reenqueue_if_lost or the workers' resync_queue enqueues it


async def reenqueue_if_lost(ctx: UploadContext, session: UploadSession) -> bool:
    """Enqueue a completed upload whose enqueue never happened (crash, Redis outage).

    The session is claimed (``enqueued_at`` set) before the enqueue, so
    concurrent callers enqueue once; the claim is released if the queue did
    not take the job.
    """
    if session.enqueued_at is not None or session.completed_at is None:
        return False
    if (ctx.now() - session.completed_at).total_seconds() < REENQUEUE_GRACE_SECONDS:
        return False
    claimed = await ctx.db.fetchval(
        """
        UPDATE upload_sessions s SET enqueued_at = now()
        FROM jobs j
        WHERE s.id = $1::uuid AND j.id = s.job_id AND s.enqueued_at IS NULL AND j.status = 'queued'
        RETURNING s.id
        """,
        session.id,
    )
    if claimed is None:
        return False
    held = False
    try:
        held = await ctx.queue.enqueue_or_defer(session.job_id, session.priority)
    finally:
        if not held:
            await ctx.db.execute(
                "UPDATE upload_sessions SET enqueued_at = NULL WHERE id = $1::uuid", session.id
            )
    if held:
        log.info("upload_job_reenqueued", upload_id=session.id, job_id=session.job_id)
    return held
