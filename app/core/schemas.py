"""Shared msgspec schemas: the base Struct, the error body, health, pagination.

Request schemas forbid unknown fields (a typo is an error, not a silent
default); response schemas are plain Structs.  Feature modules define their
own request/response Structs on these bases.
"""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
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


class Page(Response, Generic[T]):
    items: list[T]
    next_cursor: str | None = None
    """Pass as ``cursor`` to get the next page; absent on the last page."""


def encode_cursor(created_at: datetime, item_id: str) -> str:
    """Opaque keyset cursor over ``(created_at DESC, id)``."""
    raw = f"{created_at.isoformat()}|{item_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, item_id = raw.split("|", 1)
        return datetime.fromisoformat(stamp), item_id
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadRequest(
            "cursor is not valid", code="invalid_cursor", details={"field": "cursor"}
        ) from None
