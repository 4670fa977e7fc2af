"""Creating documents and their jobs: the one place rows are born.

Uploads (multipart and simple), reprocessing and tests all go through
:func:`create_document` / :func:`create_job` so that ownership, object keys
and initial job state are set the same way everywhere.
"""

from __future__ import annotations

import uuid
from typing import Any

from app.core.db import Queryable
from app.core.queue import Priority
from app.jobs.model import JobStatus

DOCUMENT_TYPES = ("pdf", "txt", "md", "csv", "json", "html")


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
    status: str = "pending",
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
        status,
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
        "upload" if status == JobStatus.AWAITING_UPLOAD else None,
        "waiting for upload" if status == JobStatus.AWAITING_UPLOAD else "queued",
    )
    return new_id
