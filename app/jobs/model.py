"""What a job is: its statuses and stages, and the event that records a change.

Every status and stage is a :class:`~enum.StrEnum` whose values are the strings
stored in the ``jobs`` table and sent on the wire, so they compare equal to the
raw strings a row or a decoded message holds.
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


class Stage(StrEnum):
    UPLOAD = "upload"
    VALIDATE = "validate"
    EXTRACT = "extract"
    CHUNK = "chunk"
    EMBED = "embed"
    INDEX = "index"


class ProgressEvent(msgspec.Struct, kw_only=True, omit_defaults=False):
    """One job state change; the ``data`` of a WebSocket ``job_progress`` message."""

    job_id: str
    seq: int
    status: str
    stage: str | None
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
