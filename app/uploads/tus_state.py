"""What a tus upload is: its ``tus_uploads`` row, joined with its session and job.

A plain or final tus upload *is* an upload session (``session_id = id``): its
S3 multipart upload, object key, expiry and status are the session's.  A
partial upload has no session; its row holds its own.  :class:`TusUpload` reads
both the same way, and says what the protocol reports: ``Upload-Offset``
(:attr:`TusUpload.offset`), whether the upload is finished, and why it can no
longer be written (410).
"""

from __future__ import annotations

import uuid
from datetime import datetime

import msgspec

from app.core.db import Queryable
from app.core.errors import Gone, NotFound
from app.jobs.model import JobStatus
from app.uploads.model import OPEN_UPLOAD_STATUSES, UploadContext, UploadSessionStatus
from app.uploads.tus_store import TusStorage


class TusUpload(msgspec.Struct, kw_only=True):
    """One tus upload: its ``tus_uploads`` row joined with its session and job."""

    id: str
    owner_id: str
    session_id: str | None
    concat: str
    upload_length: int | None
    upload_offset: int
    chunk_size: int
    pending_starts: list[int]
    metadata: str
    concat_header: str
    object_key: str
    s3_upload_id: str | None
    expires_at: datetime
    session_status: str | None
    job_status: str | None
    job_id: str | None
    document_id: str | None

    @property
    def partial(self) -> bool:
        return self.session_id is None

    @property
    def done(self) -> bool:
        """Every byte is stored and the upload completed (its session, or a partial's object)."""
        if self.partial:
            return self.upload_length == self.upload_offset and self.s3_upload_id is None
        return self.session_status == UploadSessionStatus.COMPLETED

    @property
    def offset(self) -> int:
        """``Upload-Offset``: a completed upload has all its bytes, whatever a crash left."""
        if self.done and self.upload_length is not None:
            return self.upload_length
        return self.upload_offset

    def check_usable(self, now: datetime) -> None:
        """410 for an expired upload, or one whose job was cancelled."""
        if self.done:
            return
        status = self.session_status
        if status == UploadSessionStatus.EXPIRED or (
            (status is None or status in OPEN_UPLOAD_STATUSES) and self.expires_at <= now
        ):
            raise Gone(
                "the upload expired before it was completed",
                code="upload_expired",
                details={"expires_at": self.expires_at.isoformat()},
            )
        if status == UploadSessionStatus.CANCELLED or self.job_status == JobStatus.CANCELLED:
            raise Gone("the upload was cancelled", code="upload_cancelled")


COLUMNS = """
    t.id::text AS id, t.owner_id, t.session_id::text AS session_id, t.concat,
    t.upload_length, t.upload_offset, t.chunk_size, t.pending_starts, t.metadata,
    t.concat_header, COALESCE(s.object_key, t.object_key) AS object_key,
    CASE WHEN t.session_id IS NULL THEN t.s3_upload_id ELSE s.s3_upload_id END AS s3_upload_id,
    COALESCE(s.expires_at, t.expires_at) AS expires_at, s.status AS session_status,
    j.status AS job_status, s.job_id::text AS job_id, s.document_id::text AS document_id
"""


def parse_upload_id(upload_id: str) -> uuid.UUID:
    """The upload id as a UUID; a malformed one is an unknown upload (404)."""
    try:
        return uuid.UUID(upload_id)
    except ValueError:
        raise NotFound("upload not found", code="upload_not_found") from None


async def load(db: Queryable, owner_id: str, upload_id: str) -> TusUpload:
    """The caller's tus upload; unknown, malformed, terminated and foreign ids are all 404."""
    row = await db.fetchrow(
        f"SELECT {COLUMNS} FROM tus_uploads t "
        "LEFT JOIN upload_sessions s ON s.id = t.session_id LEFT JOIN jobs j ON j.id = s.job_id "
        "WHERE t.id = $1 AND t.owner_id = $2",
        parse_upload_id(upload_id),
        owner_id,
    )
    if row is None:
        raise NotFound("upload not found", code="upload_not_found")
    return TusUpload(**dict(row))


def storage_of(ctx: UploadContext) -> TusStorage:
    return TusStorage(ctx.s3, ctx.bucket)
