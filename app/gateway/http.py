"""Request/response plumbing for the gateway's JSON API.

Handlers are plain Starlette endpoints.  They read bodies with
:func:`read_json` (msgspec-validated against a Struct), answer with
:func:`json_response`, and raise :class:`~app.core.errors.SluiceError` for
anything that goes wrong.  Routes are declared with :class:`ApiRoute`, which
records the schemas a handler actually uses so that ``/openapi.json`` is
generated from them rather than written by hand.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.core.auth import Identity
from app.core.errors import BadRequest, PayloadTooLarge, Unauthorized, ValidationFailed
from app.core.jsonguard import MAX_JSON_DEPTH, too_deep

T = TypeVar("T")
Endpoint = Callable[[Request], Awaitable[Response]]

MAX_JSON_BODY = 1024 * 1024
_encoder = msgspec.json.Encoder()


class ApiRoute(Route):
    """A Starlette route that also describes itself for OpenAPI."""

    def __init__(
        self,
        path: str,
        endpoint: Endpoint,
        *,
        methods: Sequence[str],
        summary: str,
        body: type | None = None,
        body_media_type: str = "application/json",
        query: type | None = None,
        response: Any = None,
        status_code: int = 200,
        errors: Sequence[int] = (),
        auth: bool = True,
        tags: Sequence[str] = (),
        response_media_type: str = "application/json",
    ) -> None:
        super().__init__(path, endpoint, methods=list(methods))
        self.summary = summary
        self.body = body
        self.body_media_type = body_media_type
        self.query = query
        self.response = response
        self.status_code = status_code
        self.errors = tuple(errors)
        self.auth = auth
        self.tags = tuple(tags)
        self.response_media_type = response_media_type


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


async def read_json(request: Request, type_: type[T]) -> T:
    """Decode and validate the request body as ``type_``.

    Malformed JSON is 400 ``invalid_json``; a body that does not match the
    schema is 422 ``validation_error`` with the offending path in ``details``.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_JSON_BODY:
        raise PayloadTooLarge(
            f"JSON body exceeds {MAX_JSON_BODY} bytes", details={"limit": MAX_JSON_BODY}
        )
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > MAX_JSON_BODY:
            raise PayloadTooLarge(
                f"JSON body exceeds {MAX_JSON_BODY} bytes", details={"limit": MAX_JSON_BODY}
            )
    return decode_json(bytes(body), type_)


def decode_json(data: bytes | str, type_: type[T], *, field: str | None = None) -> T:
    """Decode client JSON as ``type_``: 400 ``invalid_json`` (also for nesting deeper
    than :data:`~app.core.jsonguard.MAX_JSON_DEPTH`), 422 ``validation_error``.

    ``field`` names a form field holding the JSON (its errors then name it).
    """
    what = field or "request body"
    details = {"field": field} if field else {}
    if not data:
        raise BadRequest(f"{what} must be a JSON document", code="invalid_json", details=details)
    if too_deep(data):
        raise BadRequest(
            f"{what} is nested more than {MAX_JSON_DEPTH} levels deep",
            code="invalid_json",
            details={**details, "max_depth": MAX_JSON_DEPTH},
        )
    try:
        return msgspec.json.decode(data, type=type_)
    except msgspec.ValidationError as exc:
        raise validation_error(exc, field) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(
            f"{what} is not valid JSON: {exc}", code="invalid_json", details=details
        ) from None


def convert(data: Any, type_: type[T]) -> T:
    """Validate already-parsed data (form fields, query strings) as ``type_``."""
    try:
        return msgspec.convert(data, type=type_, strict=False)
    except msgspec.ValidationError as exc:
        raise validation_error(exc) from None


def validation_error(exc: msgspec.ValidationError, within: str | None = None) -> ValidationFailed:
    """422 naming the offending field; ``within`` is the form field holding the JSON."""
    text, _, where = str(exc).partition(" - at `")
    path = where.rstrip("`")
    if within is not None:
        path = f"$.{within}{path.removeprefix('$')}"
    field = path.removeprefix("$.").split("[", 1)[0] if path.startswith("$.") else None
    message = f"{field}: {text}" if field else text
    return ValidationFailed(message, details={"field": field, "path": path or None})


def query_params(request: Request, type_: type[T]) -> T:
    """Validate the query string against a Struct of optional fields."""
    return convert(dict(request.query_params), type_)


def identity(request: Request) -> Identity:
    """The authenticated caller; set by the auth middleware on every /api/v1 route."""
    ident = request.scope.get("state", {}).get("identity")
    if not isinstance(ident, Identity):
        raise Unauthorized("authentication required", code="missing_token")
    return ident
