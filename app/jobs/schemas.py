"""Wire schemas of the jobs, documents and search API.

The services in this package take the request Structs and return the response
Structs, so a route handler only parses, calls and responds.  Statuses, stages
and priorities are the StrEnums of :mod:`app.jobs.model` and
:mod:`app.core.queue`: they encode as the plain strings clients always got.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

import msgspec

from app.core.queue import Priority
from app.core.schemas import Cursor, PageQuery, ProcessingOptions
from app.core.schemas import Request as RequestBody
from app.core.schemas import Response as ResponseBody
from app.jobs.model import DocumentStatus, JobStatus, Stage

# --- jobs ---------------------------------------------------------------------------------


class JobView(ResponseBody):
    job_id: str
    document_id: str
    status: JobStatus
    priority: Priority
    stage: Stage | None
    stage_progress: float
    overall_progress: float
    message: str
    seq: int
    attempts: int
    max_attempts: int
    error_code: str | None
    error_message: str | None
    warnings: list[dict[str, Any]]
    stage_timings: dict[str, list[float]]
    """Seconds spent in each stage, one entry per run of it, oldest first (a job retried
    after a failure runs some stages again; stages resumed from a checkpoint add none)."""
    result: dict[str, Any]
    cancel_requested: bool
    lease_expired: bool
    """A running job whose worker stopped renewing its lease; it will be retried."""
    created_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime


class JobListQuery(PageQuery):
    status: JobStatus | None = None
    priority: Priority | None = None
    document_id: uuid.UUID | None = None


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


# --- documents ----------------------------------------------------------------------------


class LatestJob(ResponseBody):
    job_id: str
    status: JobStatus
    stage: Stage | None
    overall_progress: float


class DocumentView(ResponseBody):
    document_id: str
    filename: str
    content_type: str
    document_type: str
    size_bytes: int
    status: DocumentStatus
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
    status: JobStatus
    priority: Priority


# --- search -------------------------------------------------------------------------------

DocumentId = Annotated[str, msgspec.Meta(extra_json_schema={"format": "uuid"})]
"""Checked by the search service (422 ``validation_error`` naming ``document_ids``)."""


class SearchRequest(RequestBody):
    query: Annotated[
        str, msgspec.Meta(min_length=1, max_length=4000, examples=["termination notice period"])
    ]
    top_k: Annotated[int, msgspec.Meta(ge=1, le=100)] = 10
    document_ids: Annotated[list[DocumentId], msgspec.Meta(max_length=1000)] | None = None


class SearchHit(ResponseBody):
    document_id: str
    filename: str
    chunk_seq: int
    text: str
    score: float
    """Cosine similarity, 1 is identical."""
    page_start: int | None
    page_end: int | None
    char_start: int
    char_end: int


class SearchResponse(ResponseBody):
    query: str
    results: list[SearchHit]
    took_ms: float
