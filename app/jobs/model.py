"""What a job and a document are: their statuses and stages, and the event that
records a job's change.

Every status and stage is a :class:`~enum.StrEnum` whose values are the strings
stored in the ``jobs`` and ``documents`` tables (their CHECK constraints list
the same values; ``tests/test_migrations.py`` pins that) and sent on the wire,
so they compare equal to, hash like and encode as the raw strings a row or a
decoded message holds.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import msgspec


class JobStatus(StrEnum):
    AWAITING_UPLOAD = "awaiting_upload"
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})
"""A job in one of these never changes state again (short of ``/retry``)."""

UNFINISHED_STATUSES = frozenset(JobStatus) - TERMINAL_STATUSES
"""A job in one of these is still in flight: it will change state on its own.  A
document has at most one such job (reprocessing refuses a second one), and
deleting the document drops its unfinished jobs from the queue."""

RETRYABLE_STATUSES = frozenset({JobStatus.FAILED, JobStatus.CANCELLED})
"""``/retry`` queues a job in one of these again, under the same id."""


class RunOutcome(StrEnum):
    """How one execution of a job ended, as the ``job_runs`` ledger records it
    (``migrations/0005_job_runs.sql``).

    ``completed``, ``deduplicated``, ``failed`` and ``cancelled`` end the job;
    ``retrying`` and ``deferred`` (an identical document is being processed:
    wait for it, no attempt spent) and ``requeued`` (the worker stopped) hand
    it back to the queue; ``skipped``: the job was no longer runnable once its
    lease was taken; ``lost``: the worker died or lost the lease mid-run.
    """

    COMPLETED = "completed"
    DEDUPLICATED = "deduplicated"
    FAILED = "failed"
    CANCELLED = "cancelled"
    RETRYING = "retrying"
    REQUEUED = "requeued"
    DEFERRED = "deferred"
    SKIPPED = "skipped"
    LOST = "lost"

    @property
    def final(self) -> bool:
        """True for the outcomes that end the job (each job has at most one)."""
        return self in FINAL_RUN_OUTCOMES


class Stage(StrEnum):
    UPLOAD = "upload"
    VALIDATE = "validate"
    EXTRACT = "extract"
    CHUNK = "chunk"
    EMBED = "embed"
    INDEX = "index"


FINAL_RUN_OUTCOMES = frozenset(
    {RunOutcome.COMPLETED, RunOutcome.DEDUPLICATED, RunOutcome.FAILED, RunOutcome.CANCELLED}
)
"""The ledger outcomes that leave the job in a terminal status."""


class DocumentStatus(StrEnum):
    """Where a document's bytes and chunks are (``documents.status``)."""

    PENDING = "pending"
    """Its upload has not completed: there are no bytes to process yet."""
    STORED = "stored"
    PROCESSING = "processing"
    INDEXED = "indexed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ProgressEvent(msgspec.Struct, kw_only=True, omit_defaults=False):
    """One job state change; the ``data`` of a WebSocket ``job_progress`` message.

    ``status`` and ``stage`` encode as their string values, so the wire form is
    the one a plain-string event had; decoding yields the enums.
    """

    job_id: str
    seq: int
    status: JobStatus
    stage: Stage | None
    stage_progress: float
    overall_progress: float
    message: str
    ts: float
    """Unix time (seconds) when the state change was recorded."""
    owner_id: str = ""
    document_id: str = ""
    error_code: str | None = None
    error_message: str | None = None
    details: dict[str, Any] = msgspec.field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES
