"""The upload sweeper: what S3 lifecycle rules would do, if MinIO honoured them.

Each round (:func:`sweep`) aborts the S3 multipart uploads of sessions past
their TTL (marking them ``expired`` and their jobs ``failed`` with
``upload_expired``), aborts those whose job was cancelled through another
path (e.g. the WebSocket ``cancel_job``), enqueues completed uploads whose
enqueue was lost to a crash, and removes what tus uploads leave behind
(:func:`app.uploads.tus.sweep`: incomplete parts of closed sessions, expired
partial uploads).  :func:`run_sweeper` runs a round per interval
on every gateway replica, but a Redis ``SET NX PX`` lock lets only one of them
do each round; row locks (``FOR UPDATE SKIP LOCKED``) keep a round and live
requests from touching the same session at once.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from redis.asyncio import Redis

from app.core.errors import ServiceUnavailable
from app.core.logging import get_logger
from app.jobs.model import JobStatus
from app.jobs.transitions import job_transaction
from app.uploads import tus
from app.uploads.completion import REENQUEUE_GRACE_SECONDS, reenqueue_if_lost
from app.uploads.model import (
    SESSION_COLUMNS,
    UploadContext,
    UploadSession,
    UploadSessionStatus,
    session_from_row,
)
from app.uploads.schemas import SweepReport
from app.uploads.sessions import abort_s3

log = get_logger(__name__)
SWEEP_LOCK_KEY = "sluice:uploads:sweeper"


async def sweep(ctx: UploadContext, *, batch: int = 200) -> SweepReport:
    """One round: expire overdue sessions, abort those whose job was cancelled
    elsewhere, and enqueue completed uploads whose enqueue was lost."""
    report = SweepReport()
    now = ctx.now()
    rows = await ctx.db.fetch(
        f"""
        SELECT {SESSION_COLUMNS} FROM upload_sessions s JOIN jobs j ON j.id = s.job_id
        WHERE s.status IN ('initiated', 'uploading')
          AND (s.expires_at <= $1 OR j.status = 'cancelled')
        ORDER BY s.expires_at LIMIT $2
        """,
        now,
        batch,
    )
    for row in rows:
        session = session_from_row(row)
        try:
            outcome = await _close_abandoned(ctx, session, now)
        except ServiceUnavailable:
            log.warning("sweep_abort_failed", upload_id=session.id)
            continue
        if outcome == UploadSessionStatus.EXPIRED:
            report.expired += 1
        elif outcome == UploadSessionStatus.CANCELLED:
            report.cancelled += 1
    lost = await ctx.db.fetch(
        f"""
        SELECT {SESSION_COLUMNS} FROM upload_sessions s JOIN jobs j ON j.id = s.job_id
        WHERE s.status = 'completed' AND s.enqueued_at IS NULL AND j.status = 'queued'
          AND s.completed_at <= $1 LIMIT $2
        """,
        now - timedelta(seconds=REENQUEUE_GRACE_SECONDS),
        batch,
    )
    for row in lost:
        report.reenqueued += await reenqueue_if_lost(ctx, session_from_row(row))
    tus_cleaned = await tus.sweep(ctx, now, batch=batch)  # incomplete parts, partial uploads
    if report.expired or report.cancelled or report.reenqueued or tus_cleaned:
        log.info(
            "upload_sweep",
            expired=report.expired,
            cancelled=report.cancelled,
            reenqueued=report.reenqueued,
            tus_cleaned=tus_cleaned,
        )
    return report


async def _close_abandoned(
    ctx: UploadContext, session: UploadSession, now: datetime
) -> UploadSessionStatus | None:
    """Abort one open session whose job was cancelled (``cancelled``) or that is past
    its TTL (``expired``: its document and job fail); None if left to someone else."""
    async with job_transaction(ctx.db, ctx.redis) as changes:
        conn = changes.conn
        row = await conn.fetchrow(
            f"SELECT {SESSION_COLUMNS} FROM upload_sessions s JOIN jobs j ON j.id = s.job_id "
            "WHERE s.id = $1::uuid AND s.status IN ('initiated', 'uploading') "
            "FOR UPDATE OF s SKIP LOCKED",
            session.id,
        )
        if row is None:  # another replica or request is on it
            return None
        session = session_from_row(row)
        if session.job_status == JobStatus.CANCELLED:
            outcome = UploadSessionStatus.CANCELLED
        elif session.expires_at <= now:
            outcome = UploadSessionStatus.EXPIRED
        else:
            return None
        await abort_s3(ctx, session)
        await conn.execute(
            "UPDATE upload_sessions SET status = $2, updated_at = now() WHERE id = $1::uuid",
            session.id,
            str(outcome),
        )
        if outcome == UploadSessionStatus.EXPIRED:
            await conn.execute(
                "UPDATE documents SET status = 'failed', updated_at = now() WHERE id = $1::uuid",
                session.document_id,
            )
            await changes.record(
                session.job_id,
                status=JobStatus.FAILED,
                error_code="upload_expired",
                error_message="the upload was not completed before its session expired",
                message="upload expired",
                only_if_status=[JobStatus.AWAITING_UPLOAD],
            )
    return outcome


async def sweep_once_across_replicas(
    ctx: UploadContext, redis: Redis, *, interval_seconds: float
) -> SweepReport | None:
    """Run :func:`sweep` unless another replica already did this interval.

    The key is never released, only left to expire with the interval, so its
    value means nothing and no replica needs to tell whose it is.
    """
    if not await redis.set(SWEEP_LOCK_KEY, b"1", nx=True, px=int(interval_seconds * 1000)):
        return None
    return await sweep(ctx)


async def run_sweeper(ctx: UploadContext, redis: Redis, *, interval_seconds: float = 60.0) -> None:
    """Forever: one sweep per interval across all replicas (cancel the task to stop)."""
    while True:
        try:
            await sweep_once_across_replicas(ctx, redis, interval_seconds=interval_seconds)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("upload_sweep_failed", exc_info=True)
        await asyncio.sleep(interval_seconds)
