"""Registering an upload: its document and job rows, and the moment its bytes are stored.

Both upload paths go through :func:`register_upload`, so a document and its
job are born, stored and queued the same way:

* a resumable upload registers at ``initiate`` (document ``pending``, job
  ``awaiting_upload``) and calls :func:`record_stored` at ``complete``;
* a simple upload registers once its object is stored, with
  ``stored=True``, which does both in the caller's transaction.

:func:`record_stored` marks the document ``stored`` and moves the job from
``awaiting_upload`` to ``queued`` ("upload complete; queued for processing")
through :class:`~app.jobs.transitions.JobChanges`: the event is published
only once the caller's transaction has committed.  Nothing here enqueues: the
caller does that after the commit, with ``enqueue_or_defer`` (a Redis outage
leaves the job ``queued`` for the workers' resync to enqueue).
"""

from __future__ import annotations

from typing import Any

import msgspec

from app.core.queue import Priority
from app.jobs.documents import create_document, create_job
from app.jobs.model import JobStatus, ProgressEvent, Stage
from app.jobs.transitions import JobChanges


class NewUpload(msgspec.Struct, kw_only=True, frozen=True):
    """A validated upload about to get its rows (ids chosen by the caller)."""

    owner_id: str
    document_id: str
    job_id: str
    filename: str
    content_type: str
    document_type: str
    size: int
    priority: Priority
    processing_options: dict[str, Any] = msgspec.field(default_factory=dict)
    checksum_sha256: str | None = None


async def register_upload(changes: JobChanges, upload: NewUpload, *, stored: bool) -> None:
    """Create the upload's document (``pending``) and job (``awaiting_upload``).

    With ``stored`` (the object is already in storage) also :func:`record_stored`,
    so the job is ``queued`` when the caller's transaction commits.
    """
    await create_document(
        changes.conn,
        owner_id=upload.owner_id,
        filename=upload.filename,
        content_type=upload.content_type,
        document_type=upload.document_type,
        size_bytes=upload.size,
        processing_options=upload.processing_options,
        checksum_sha256=upload.checksum_sha256,
        document_id=upload.document_id,
    )
    await create_job(
        changes.conn,
        owner_id=upload.owner_id,
        document_id=upload.document_id,
        priority=upload.priority,
        job_id=upload.job_id,
    )
    if stored:
        await record_stored(
            changes, document_id=upload.document_id, job_id=upload.job_id, size=upload.size
        )


async def record_stored(
    changes: JobChanges,
    *,
    document_id: str,
    job_id: str,
    size: int,
    upload_id: str | None = None,
) -> ProgressEvent | None:
    """The upload's bytes are stored: document ``stored``, job ``awaiting_upload`` -> ``queued``.

    Returns the recorded event, or None when the job had already left
    ``awaiting_upload`` (cancelled meanwhile): then it must not be enqueued.
    """
    await changes.conn.execute(
        "UPDATE documents SET status = 'stored', size_bytes = $2, updated_at = now() "
        "WHERE id = $1::uuid",
        document_id,
        size,
    )
    details: dict[str, Any] = {} if upload_id is None else {"upload_id": upload_id}
    return await changes.record(
        job_id,
        status=JobStatus.QUEUED,
        stage=Stage.UPLOAD,
        stage_progress=1.0,
        message="upload complete; queued for processing",
        details={**details, "bytes_received": size, "file_size": size},
        only_if_status=[JobStatus.AWAITING_UPLOAD],
    )
