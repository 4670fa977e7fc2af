"""Shared msgspec schemas: the base Struct, the error body, health, pagination.

Request schemas forbid unknown fields (a typo is an error, not a silent
default); response schemas are plain Structs.  Feature modules define their
own request/response Structs on these bases.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

import msgspec

from app.core.errors import BadRequest

T = TypeVar("T")


class Request(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every request body: unknown fields are rejected."""


class Response(msgspec.Struct, kw_only=True):
    """Base of every response body."""


class ErrorBody(Response):
    """The one error shape: ``{"error", "message", "details", "request_id"}``."""

    error: str
    message: str
    details: dict[str, Any] = msgspec.field(default_factory=dict)
    request_id: str | None = None


class Liveness(Response):
    status: Literal["ok"] = "ok"


class DependencyHealth(Response):
    status: Literal["ok", "down"]
    latency_ms: float
    error: str | None = None


class Readiness(Response):
    status: Literal["ok", "degraded"]
    checks: dict[str, DependencyHealth]


class WhoAmI(Response):
    user_id: str
    token_expires_at: datetime
    admin: bool = False
    """The token carries ``role: "admin"`` (the fleet-wide routes answer it)."""


Limit = Annotated[int, msgspec.Meta(ge=1, le=200)]
Cursor = Annotated[
    str,
    msgspec.Meta(
        description="Opaque; the next_cursor of the previous page (400 invalid_cursor otherwise)",
        extra_json_schema={"pattern": "^[A-Za-z0-9_-]*$"},
    ),
]
"""A page cursor: documented as URL-safe base64 but checked by :func:`decode_cursor`
(so a bad one is 400 ``invalid_cursor``, not a schema error)."""


class PageQuery(Request):
    """``?limit=&cursor=`` for every paginated list."""

    limit: Limit = 50
    cursor: Cursor | None = None


class ProcessingOptions(Request):
    """The one schema of ``processing_options`` (initiate, simple, reprocess).

    Unknown keys are refused, so a typo or an out-of-range value is a 422 when
    the upload starts, not a failed job after the whole file was sent.
    """

    chunk_size: Annotated[int, msgspec.Meta(ge=16, le=8192)] | None = None
    chunk_overlap: Annotated[int, msgspec.Meta(ge=0, le=4096)] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The options that were given, as stored on the document."""
        return {k: v for k, v in msgspec.structs.asdict(self).items() if v is not None}


class Page(Response, Generic[T]):
    items: list[T]
    next_cursor: str | None = None
    """Pass as ``cursor`` to get the next page; absent on the last page."""


def encode_cursor(created_at: datetime, item_id: str) -> str:
    """Opaque keyset cursor over ``(created_at DESC, id)``."""
    raw = f"{created_at.isoformat()}|{item_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


MAX_CURSOR_LENGTH = 256
"""Longer cursors are refused before they are decoded (ours are about 80 characters)."""
_CURSOR_MIN = datetime(1970, 1, 1, tzinfo=UTC)
_CURSOR_MAX = datetime(9000, 1, 1, tzinfo=UTC)
_SEQ_CURSOR = re.compile(r"[0-9]{1,10}")
MAX_SEQ_CURSOR = 2**31 - 1
"""Chunk ``seq`` is a Postgres ``integer``."""


def invalid_cursor() -> BadRequest:
    return BadRequest("cursor is not valid", code="invalid_cursor", details={"field": "cursor"})


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The ``(created_at, id)`` of an :func:`encode_cursor` cursor, or 400 ``invalid_cursor``.

    Invariant: whatever the client sends, the values returned are safe to bind
    as ``timestamptz``/``uuid`` query arguments (an aware timestamp in a sane
    range, a real UUID), so no cursor can reach the database as a ``DataError``.
    """
    if len(cursor) > MAX_CURSOR_LENGTH:
        raise invalid_cursor()
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, item_id = raw.split("|", 1)
        created = datetime.fromisoformat(stamp)
        if created.tzinfo is None or created.utcoffset() is None:
            raise ValueError("naive timestamp")
        created = created.astimezone(UTC)
        if not _CURSOR_MIN <= created <= _CURSOR_MAX:
            raise ValueError("timestamp out of range")
        return created, uuid.UUID(item_id)
    except (ValueError, TypeError, OverflowError, binascii.Error, UnicodeDecodeError):
        raise invalid_cursor() from None


def decode_seq_cursor(cursor: str) -> int:
    """A chunk-list cursor (the last ``seq`` seen), or 400 ``invalid_cursor``."""
    if not _SEQ_CURSOR.fullmatch(cursor) or int(cursor) > MAX_SEQ_CURSOR:
        raise invalid_cursor()
    return int(cursor)
