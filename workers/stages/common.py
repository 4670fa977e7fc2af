"""Types shared by the stages: what they exchange and how they report."""

from __future__ import annotations

from typing import Any, Protocol

import msgspec


class StageReporter(Protocol):
    """How a stage reports progress and observes cancellation.

    ``progress`` may be called as often as convenient (the pipeline throttles
    what it records); ``boundary`` is called between pages and batches and
    raises :class:`~app.core.errors.CancelRequested` once the job is cancelled
    (or its lease is lost).
    """

    async def progress(self, fraction: float, message: str) -> None: ...

    async def boundary(self) -> None: ...


class NullReporter:
    """Reports nowhere and never cancels (tests, benchmarks)."""

    async def progress(self, fraction: float, message: str) -> None:
        return None

    async def boundary(self) -> None:
        return None


class DocumentInfo(msgspec.Struct, kw_only=True, frozen=True):
    """The document row a job works on."""

    id: str
    owner_id: str
    filename: str
    document_type: str
    content_type: str
    size_bytes: int
    object_key: str
    checksum_sha256: str | None = None
    processing_options: dict[str, Any] = msgspec.field(default_factory=dict)


class PageText(msgspec.Struct, array_like=True):
    """The text of one page of a document (not the pagination ``Page`` of the API)."""

    number: int
    """1-based page number (1 for formats without pages)."""
    text: str


class Extracted(msgspec.Struct, kw_only=True):
    """What the extract stage produces: the pages' text in order, and warnings
    (pages skipped or damaged) that do not fail the document."""

    pages: list[PageText]
    warnings: list[dict[str, Any]] = msgspec.field(default_factory=list)


class Chunk(msgspec.Struct, kw_only=True, array_like=True):
    seq: int
    text: str
    token_count: int
    page_start: int
    page_end: int
    char_start: int
    """Offset in the document's extracted text (pages joined by a blank line)."""
    char_end: int
    sha256: str
