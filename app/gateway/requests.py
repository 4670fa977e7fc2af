"""Reading a request: bounded bodies, JSON, forms' text fields, query strings, the caller.

Handlers read bodies only through :func:`iter_body` (and :func:`read_body` /
:func:`read_json` built on it), which bound every body by a per-route limit
before and while reading it; multipart forms are read by
:mod:`app.gateway.formstream`, on top of :func:`iter_body`.  Everything a client
sends is validated here into msgspec Structs: malformed input is 400, input that
does not fit the schema 422 naming the offending field.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeVar

import msgspec
from starlette.requests import ClientDisconnect, Request

from app.core.auth import Identity
from app.core.errors import BadRequest, PayloadTooLarge, Unauthorized, ValidationFailed
from app.core.jsonguard import MAX_JSON_DEPTH, too_deep
from app.gateway.services import services

T = TypeVar("T")


def declared_length(request: Request) -> int | None:
    """The request's ``Content-Length``, or ``None`` when it sends none (chunked)."""
    value = request.headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


def too_large(
    limit: int, *, code: str = "payload_too_large", field: str = "body"
) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"request body exceeds {limit} bytes",
        code=code,
        details={"field": field, "limit": limit},
    )


async def iter_body(
    request: Request, limit: int, *, code: str = "payload_too_large", field: str = "body"
) -> AsyncIterator[bytes]:
    """Yield the request body as it arrives, never more than ``limit`` bytes in all.

    Invariants: a declared ``Content-Length`` over ``limit`` is refused (413,
    ``code``) before a byte is read, so a client waiting on ``Expect:
    100-continue`` is never asked for the body; a chunked body is counted and
    refused as soon as the count passes ``limit``; nothing is buffered here (each
    piece is yielded as received).  A client that goes away raises
    :class:`~starlette.requests.ClientDisconnect`; a body that stalls is refused
    by the body guard (:mod:`app.gateway.middleware.bodyguard`), which owns the timeout.
    """
    declared = declared_length(request)
    if declared is not None and declared > limit:
        raise too_large(limit, code=code, field=field)
    received = 0
    more = declared != 0
    while more:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        piece: bytes = message.get("body", b"")
        received += len(piece)
        if received > limit:
            raise too_large(limit, code=code, field=field)
        more = bool(message.get("more_body", False))
        if piece:
            yield piece


async def read_body(request: Request, limit: int) -> bytes:
    """The whole request body, at most ``limit`` bytes (413 beyond; see :func:`iter_body`)."""
    body = bytearray()
    async for piece in iter_body(request, limit):
        body += piece
    return bytes(body)


def json_body_limit(request: Request) -> int:
    """``MAX_JSON_BODY_KB`` of the app serving ``request``."""
    return services(request).settings.max_json_body_bytes


async def read_json(request: Request, type_: type[T]) -> T:
    """Decode and validate the request body as ``type_``.

    The body is read through :func:`iter_body` with the JSON control-route limit
    (``MAX_JSON_BODY_KB``; 413 ``payload_too_large`` beyond it).  Malformed JSON
    is 400 ``invalid_json``; a body that does not match the schema is 422
    ``validation_error`` with the offending path in ``details``.
    """
    return decode_json(await read_body(request, json_body_limit(request)), type_)


async def read_optional_json(request: Request, type_: type[T], default: T) -> T:
    """Like :func:`read_json`, but an empty (or all-whitespace) body is ``default``."""
    raw = await read_body(request, json_body_limit(request))
    return decode_json(raw, type_) if raw.strip() else default


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
        if "got `float`" not in str(exc):
            raise validation_error(exc, field) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(
            f"{what} is not valid JSON: {exc}", code="invalid_json", details=details
        ) from None
    # JSON has one number type: ``2.0`` is the integer 2 to JSON Schema (and so to
    # the documented schema), but not to msgspec's strict decoder.  The depth guard
    # above already bounds how deep this generic decode can go.
    return convert_strict(whole_floats_as_ints(msgspec.json.decode(data)), type_, field)


def whole_floats_as_ints(value: Any) -> Any:
    """``value`` with every integral float (``2.0``) made an ``int``; iterative, so
    any depth msgspec could decode is safe here."""
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if not isinstance(value, (list, dict)):
        return value
    stack: list[list[Any] | dict[Any, Any]] = [value]
    while stack:
        node = stack.pop()
        items = enumerate(node) if isinstance(node, list) else node.items()
        for key, item in items:
            if isinstance(item, float) and item.is_integer():
                node[key] = int(item)
            elif isinstance(item, (list, dict)):
                stack.append(item)
    return value


def convert_strict(data: Any, type_: type[T], field: str | None = None) -> T:
    try:
        return msgspec.convert(data, type=type_)
    except msgspec.ValidationError as exc:
        raise validation_error(exc, field) from None


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
    """Validate the query string against a Struct of optional fields.

    A parameter given twice is refused rather than one copy silently winning,
    and so is a value the lax conversion would read as ``None`` (``?status=null``):
    a query value is text, and absent is spelt by leaving it out.
    """
    params = request.query_params
    for name in params:
        if len(params.getlist(name)) > 1:
            raise ValidationFailed(
                f"{name}: give the parameter at most once", details={"field": name, "path": None}
            )
    parsed = convert(dict(params), type_)
    for name in params:
        if getattr(parsed, name, "") is None:
            raise ValidationFailed(
                f"{name}: {params[name]!r} is not a value", details={"field": name, "path": None}
            )
    return parsed


def identity(request: Request) -> Identity:
    """The authenticated caller; set by the auth middleware on every route declared ``auth``."""
    ident = request.scope.get("state", {}).get("identity")
    if not isinstance(ident, Identity):
        raise Unauthorized("authentication required", code="missing_token")
    return ident
