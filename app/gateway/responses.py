"""Writing a response: JSON bodies, and every error in the one :class:`ErrorBody` shape."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.responses import Response
from starlette.types import Scope

from app.core.errors import SluiceError
from app.core.schemas import ErrorBody

_encoder = msgspec.json.Encoder()


def json_response(
    content: Any, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """Encode ``content`` (Structs, dicts, lists...) with msgspec."""
    return Response(
        _encoder.encode(content),
        status_code=status_code,
        headers=headers,
        media_type="application/json",
    )


def request_id_of(scope: Scope) -> str | None:
    """The id the request-context middleware gave this request (``X-Request-ID``)."""
    value = scope.get("state", {}).get("request_id")
    return value if isinstance(value, str) else None


def error_response(exc: SluiceError, request_id: str | None) -> Response:
    """``exc`` as an :class:`ErrorBody` with its status and headers, naming the request."""
    body = ErrorBody(
        error=exc.code, message=exc.message, details=exc.details, request_id=request_id
    )
    headers = dict(exc.headers)
    if request_id:
        headers["X-Request-ID"] = request_id
    return json_response(body, exc.status, headers=headers)
