"""What a resumable upload is: its statuses, its session row, and its collaborators.

An upload session is one S3 multipart upload with its state in Postgres
(``upload_sessions``, one row per session, joined with its job).  Every
operation of :mod:`app.uploads` is HTTP-free and takes an
:class:`UploadContext` with the collaborators it needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Protocol

import asyncpg
import msgspec
from redis.asyncio import Redis

from app.core.queue import Priority
from app.core.settings import Settings
from app.core.storage import S3Client
from app.jobs.model import JobStatus


class UploadSessionStatus(StrEnum):
    """An upload session's status; the values are the strings in ``upload_sessions.status``.

    Stored: ``initiated`` (no part yet), ``uploading``, ``completed``,
    ``cancelled``, ``expired``.  :data:`LOST` is only ever *reported* (by the
    status route, when storage forgot the multipart upload), never stored.
    The table's CHECK also admits ``completing``, which no code ever wrote; it
    is not a member, and no code checks for it.
    """

    INITIATED = "initiated"
    UPLOADING = "uploading"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    LOST = "lost"


OPEN_UPLOAD_STATUSES = frozenset({UploadSessionStatus.INITIATED, UploadSessionStatus.UPLOADING})
"""Sessions that still take parts (until their TTL): not completed, cancelled or expired.

The SQL of this package spells the same set as ``status IN ('initiated',
'uploading')``, the predicate of the table's partial indexes."""


class UploadSession(msgspec.Struct, kw_only=True):
    """One session's row joined with its job's status and priority."""

    id: str
    owner_id: str
    document_id: str
    job_id: str
    s3_upload_id: str
    object_key: str
    filename: str
    file_size: int
    content_type: str
    chunk_size: int
    total_parts: int
    status: UploadSessionStatus
    expires_at: datetime
    created_at: datetime
    completed_at: datetime | None
    enqueued_at: datetime | None
    job_status: JobStatus
    priority: Priority

    def expected_size(self, part_number: int) -> int:
        """Every part has ``chunk_size`` bytes but the last, which has the rest."""
        if part_number < self.total_parts:
            return self.chunk_size
        return self.file_size - self.chunk_size * (self.total_parts - 1)

    def expired_at(self, now: datetime) -> bool:
        """Expired: marked so by the sweeper, or still open past its TTL."""
        return self.status == UploadSessionStatus.EXPIRED or (
            self.status in OPEN_UPLOAD_STATUSES and self.expires_at <= now
        )


SESSION_COLUMNS = """
    s.id::text AS id, s.owner_id, s.document_id::text AS document_id, s.job_id::text AS job_id,
    s.s3_upload_id, s.object_key, s.filename, s.file_size, s.content_type, s.chunk_size,
    s.total_parts, s.status, s.expires_at, s.created_at, s.completed_at, s.enqueued_at,
    j.status AS job_status, j.priority
"""
"""The columns of :class:`UploadSession`, from ``upload_sessions s JOIN jobs j``."""


def session_from_row(row: asyncpg.Record) -> UploadSession:
    """The session of a row selected with :data:`SESSION_COLUMNS` (and perhaps more)."""
    fields: dict[str, Any] = {name: row[name] for name in UploadSession.__struct_fields__}
    fields["status"] = UploadSessionStatus(fields["status"])
    fields["job_status"] = JobStatus(fields["job_status"])
    fields["priority"] = Priority(fields["priority"])
    return UploadSession(**fields)


class StoredPart(msgspec.Struct):
    """A part storage holds (or Sluice recorded): its number, size and ETag (unquoted)."""

    part_number: int
    size: int
    etag: str


class Enqueuer(Protocol):
    async def enqueue_or_defer(self, job_id: str, priority: Priority | str) -> bool: ...


@dataclass(frozen=True, slots=True)
class UploadContext:
    """What every upload operation is given: stores, queue, settings and a clock."""

    db: asyncpg.Pool
    redis: Redis | None
    s3: S3Client
    s3_public: S3Client
    queue: Enqueuer
    settings: Settings
    clock: Callable[[], float]

    @property
    def bucket(self) -> str:
        return self.settings.minio_bucket_name

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)
