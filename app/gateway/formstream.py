"""A streaming ``multipart/form-data`` reader.

Starlette's form parser spools every file to a temporary file before the
handler sees it; uploads want the bytes as they arrive, so that a part can be
checked and forwarded while holding at most itself in memory.  :func:`iter_form`
turns a request body into a flat stream of events:

* :class:`FormPart` when a part starts (its field name, filename, content type),
* ``bytes`` for each piece of that part's body, in order,
* ``None`` when the part ends.

:func:`read_form` builds on it for the common case of text fields plus one
streamed file part.

It enforces a header-size limit and a part-count limit and raises
:class:`~app.core.errors.BadRequest` (``invalid_form``) for malformed bodies.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol
from urllib.parse import unquote

import msgspec
from starlette.requests import Request

from app.core.errors import BadRequest, ValidationFailed
from app.gateway.requests import iter_body

MAX_HEADER_BYTES = 16 * 1024
MAX_FORM_FIELDS = 32
"""Most parts (text fields and files) one form may have."""
_PARAM_RE = re.compile(r';\s*([A-Za-z0-9_*-]+)\s*=\s*("(?:\\.|[^"\\])*"|[^;]*)')


class FormPart(msgspec.Struct, frozen=True):
    name: str
    filename: str | None
    content_type: str


FormEvent = FormPart | bytes | None


def _invalid(message: str) -> BadRequest:
    return BadRequest(message, code="invalid_form", details={"field": "body"})


def boundary_of(content_type: str) -> bytes:
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/form-data":
        raise BadRequest(
            "request body must be multipart/form-data",
            code="invalid_form",
            details={"field": "Content-Type"},
        )
    for key, value in _PARAM_RE.findall(";" + params):
        if key.lower() == "boundary":
            boundary = value.strip().strip('"')
            if 1 <= len(boundary) <= 200:
                return bytes(boundary, "latin-1")
    raise _invalid("multipart/form-data needs a boundary parameter")


def _parse_headers(raw: bytes) -> FormPart:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _invalid("part headers are not UTF-8") from None
    headers: dict[str, str] = {}
    for line in text.split("\r\n"):
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise _invalid("malformed part header")
        headers[name.strip().lower()] = value.strip()
    disposition = headers.get("content-disposition", "")
    if not disposition.lower().startswith("form-data"):
        raise _invalid("every part needs 'Content-Disposition: form-data'")
    params: dict[str, str] = {}
    for key, quoted in _PARAM_RE.findall(disposition[len("form-data") :]):
        value = re.sub(r"\\(.)", r"\1", quoted[1:-1]) if quoted.startswith('"') else quoted
        params[key.lower()] = value
    if "filename*" in params:  # RFC 5987: charset''percent-encoded
        charset, _, encoded = params["filename*"].partition("''")
        try:
            params["filename"] = unquote(encoded, encoding=charset or "utf-8", errors="strict")
        except (LookupError, UnicodeDecodeError):  # unknown charset, or bytes not in it
            raise _invalid("filename* is not valid percent-encoded text") from None
    if "name" not in params:
        raise _invalid("a form part has no name")
    return FormPart(
        name=params["name"],
        filename=params.get("filename"),
        content_type=headers.get("content-type", ""),
    )


async def iter_form(request: Request, limit: int) -> AsyncIterator[FormEvent]:
    """Stream the events of a ``multipart/form-data`` request body of at most
    ``limit`` bytes (413 beyond, see :func:`~app.gateway.requests.iter_body`)."""
    delimiter = b"--" + boundary_of(request.headers.get("content-type", ""))
    body_end = b"\r\n" + delimiter
    buf = bytearray()
    state = "preamble"
    parts = 0
    async for chunk in iter_body(request, limit):
        buf += chunk
        while True:
            if state == "preamble":
                at = buf.find(delimiter)
                if at < 0:
                    del buf[: max(0, len(buf) - len(delimiter))]
                    break
                del buf[: at + len(delimiter)]
                state = "after_delimiter"
            elif state == "after_delimiter":
                if len(buf) < 2:
                    break
                if buf[:2] == b"--":
                    state = "done"
                    buf.clear()
                    break
                if buf[:2] != b"\r\n":
                    raise _invalid("malformed multipart delimiter")
                del buf[:2]
                state = "headers"
            elif state == "headers":
                at = buf.find(b"\r\n\r\n")
                if at < 0:
                    if len(buf) > MAX_HEADER_BYTES:
                        raise _invalid("part headers are too large")
                    break
                parts += 1
                if parts > MAX_FORM_FIELDS:
                    raise _invalid(f"more than {MAX_FORM_FIELDS} form parts")
                part = _parse_headers(bytes(buf[:at]))
                del buf[: at + 4]
                state = "body"
                yield part
            elif state == "body":
                at = buf.find(body_end)
                if at < 0:
                    keep = len(body_end) - 1
                    if len(buf) > keep:
                        piece = bytes(buf[: len(buf) - keep])
                        del buf[: len(buf) - keep]
                        yield piece
                    break
                if at:
                    yield bytes(buf[:at])
                del buf[: at + len(body_end)]
                state = "after_delimiter"
                yield None
            else:  # done: ignore the epilogue
                buf.clear()
                break
    if state != "done":
        raise _invalid("multipart body ended early")


MAX_TEXT_FIELD = 64 * 1024
"""Largest accepted non-file form field, in bytes."""


class FileSink(Protocol):
    """Where :func:`read_form` sends the file part's bytes."""

    async def write(self, data: bytes, /) -> Any: ...


async def read_form(
    request: Request,
    file_field: str,
    open_sink: Callable[[FormPart, dict[str, str]], Awaitable[FileSink]],
    *,
    limit: int,
) -> tuple[dict[str, str], FormPart]:
    """Stream a form with exactly one file part named ``file_field``; the whole
    body is at most ``limit`` bytes.

    Text fields (UTF-8, each at most :data:`MAX_TEXT_FIELD` bytes) are collected
    and returned.  When the file part starts, ``open_sink(part, fields_so_far)``
    returns the sink its bytes are written to as they arrive; nothing of the file
    is held here.  Raises :class:`BadRequest` (``invalid_form``) for a repeated
    file part, an oversized or non-UTF-8 field, and :class:`ValidationFailed`
    when the file part is missing.
    """
    fields: dict[str, str] = {}
    file_part: FormPart | None = None
    sink: FileSink | None = None
    current: str | None = None
    text = bytearray()
    async for event in iter_form(request, limit):
        if isinstance(event, FormPart):
            current = event.name
            text.clear()
            if current == file_field:
                if file_part is not None:
                    raise BadRequest(
                        f"send one {file_field} per request",
                        code="invalid_form",
                        details={"field": file_field},
                    )
                file_part = event
                sink = await open_sink(event, fields)
        elif isinstance(event, bytes):
            if current == file_field and sink is not None:
                await sink.write(event)
            else:
                text += event
                if len(text) > MAX_TEXT_FIELD:
                    raise BadRequest(
                        f"form field {current!r} is too long",
                        code="invalid_form",
                        details={"field": current},
                    )
        elif current is not None:
            if current != file_field:
                fields[current] = _utf8(text, current)
            current = None
    if file_part is None:
        raise ValidationFailed(
            f"{file_field}: a file part is required", details={"field": file_field}
        )
    return fields, file_part


def _utf8(data: bytearray, field: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(
            f"form field {field!r} is not UTF-8", code="invalid_form", details={"field": field}
        ) from None
