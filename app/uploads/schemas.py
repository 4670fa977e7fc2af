"""Request and response schemas of the upload API (msgspec Structs).

Progress figures (``progress``) are fractions of the file's bytes, 0.0-1.0,
like the ``stage_progress`` of progress events.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec

from app.core.queue import Priority
from app.core.schemas import ProcessingOptions, Request, Response
from app.jobs.documents import DOCUMENT_TYPES
from app.uploads.rules import FILENAME_JSON_SCHEMA, HEX_MD5, MAX_PARTS

Filename = Annotated[
    str, msgspec.Meta(extra_json_schema=FILENAME_JSON_SCHEMA, examples=["annual report 2025.pdf"])
]
"""A file's name; checked by :func:`~app.uploads.rules.check_filename` (400
``invalid_filename``) and :func:`~app.uploads.rules.classify` (415), not by the decoder."""
DocumentType = Annotated[str, msgspec.Meta(extra_json_schema={"enum": list(DOCUMENT_TYPES)})]
"""One of the accepted document types; it must match the file's extension (415 otherwise)."""
HexMd5 = Annotated[str, msgspec.Meta(extra_json_schema={"pattern": HEX_MD5.pattern})]
"""An MD5 as 32 hex digits; checked by :func:`~app.uploads.rules.parse_md5`
(400 ``invalid_checksum``), not by the decoder."""
_PART_NUMBER = msgspec.Meta(extra_json_schema={"minimum": 1, "maximum": MAX_PARTS})
_MAYBE_HEX_MD5 = msgspec.Meta(extra_json_schema={"pattern": "^(?:[0-9a-fA-F]{32})?$"})


class InitiateUpload(Request):
    filename: Filename
    file_size: Annotated[int, msgspec.Meta(extra_json_schema={"minimum": 1}, examples=[12582912])]
    content_type: str = ""
    document_type: DocumentType | None = None
    processing_options: ProcessingOptions = msgspec.field(default_factory=ProcessingOptions)
    """Validated like ``reprocess``'s: a bad value is a 422 here, not a failed job."""
    priority: Priority = Priority.NORMAL
    checksum_sha256: (
        Annotated[str, msgspec.Meta(extra_json_schema={"pattern": "^[0-9a-fA-F]{64}$"})] | None
    ) = None


# The text fields of the form route for one part (its bytes are ``chunk_file``).
class ChunkFields(Request):
    upload_id: Annotated[str, msgspec.Meta(extra_json_schema={"format": "uuid"})]
    part_number: Annotated[int, _PART_NUMBER]
    chunk_hash: HexMd5
    total_parts: Annotated[int, _PART_NUMBER] | None = None
    is_final_chunk: bool | None = None


# The text fields of a simple upload's form (its bytes are ``file``).
class SimpleFields(Request):
    priority: Priority = Priority.NORMAL
    document_type: DocumentType | None = None
    processing_options: str | None = None
    """A JSON object, as text, validated like ``reprocess``'s (``chunk_size``,
    ``chunk_overlap``): malformed or nested too deep is 400, a bad value 422."""


class PresignBody(Request):
    content_md5: Annotated[str, _MAYBE_HEX_MD5] | None = None
    """Hex MD5 of the part (empty is the same as absent); when given, storage rejects
    any other bytes."""


class InitiatedUpload(Response):
    upload_id: str
    job_id: str
    document_id: str
    chunk_size: int
    total_parts: int
    expires_at: datetime
    filename: str
    file_size: int
    content_type: str
    document_type: str
    priority: str
    status: str = "initiated"


class PartAccepted(Response):
    upload_id: str
    part_number: int
    etag: str
    size: int
    parts_received: int
    bytes_received: int
    progress: float
    """Fraction of the file's bytes received so far, 0.0-1.0."""


class PartInfo(Response):
    part_number: int
    size: int
    etag: str


class UploadStatus(Response):
    upload_id: str
    status: str
    """``initiated``, ``uploading``, ``completed``, ``cancelled``, ``expired``, or ``lost``
    (storage lost the parts: ``POST .../restart/{upload_id}``, then send every part)."""
    filename: str
    file_size: int
    chunk_size: int
    total_parts: int
    parts: list[PartInfo]
    missing_parts: list[int]
    parts_received: int
    bytes_received: int
    progress: float
    """Fraction of the file's bytes received so far, 0.0-1.0."""
    expires_at: datetime
    job_id: str
    document_id: str
    created_at: datetime
    completed_at: datetime | None = None


class ActiveUpload(Response):
    upload_id: str
    status: str
    filename: str
    file_size: int
    chunk_size: int
    total_parts: int
    parts_received: int
    bytes_received: int
    progress: float
    expires_at: datetime
    created_at: datetime
    job_id: str
    document_id: str


class CompletedUpload(Response):
    upload_id: str | None
    job_id: str
    document_id: str
    status: str
    size: int
    filename: str = ""


class CancelledUpload(Response):
    upload_id: str
    job_id: str
    status: str


class PresignedPart(Response):
    upload_id: str
    part_number: int
    url: str
    method: str
    expires_at: datetime
    size: int
    """The exact size S3 must receive for this part."""
    headers: dict[str, str] = msgspec.field(default_factory=dict)


class SweepReport(msgspec.Struct, kw_only=True):
    expired: int = 0
    cancelled: int = 0
    reenqueued: int = 0
