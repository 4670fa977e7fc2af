"""A streaming ``multipart/form-data`` reader, on python-multipart's parser.

Starlette's form parser spools every file to a temporary file before the
handler sees it; uploads want the bytes as they arrive, so that a part can be
checked, hashed and forwarded while holding at most itself in memory.
:func:`iter_form` turns a request body into a flat stream of events:

* :class:`FormPart` when a part starts (its field name, filename, content type),
* ``bytes`` for each piece of that part's body, in order,
* ``None`` when the part ends.

:func:`read_form` builds on it for the common case of text fields plus one
streamed file part.

The multipart syntax (delimiters, transport padding, a delimiter split across
two reads, header lines) is parsed by python-multipart's ``MultipartParser``,
which replaced a hand-written state machine here (``bench/formstream.py``): with
64 KiB reads -- what uvicorn hands an app that is slower than its network -- it
is at least as fast and holds less; with small reads it costs more per read, but
those only come when the network is the slower side.  It is stricter about
syntax than the old reader (header names must be tokens; nothing but blank
lines may precede the first delimiter) and lets a delimiter look-alike inside
a part's data through as data, as RFC 2046 says.  This module keeps the
gateway's invariants on top of it:

* the body is read through :func:`~app.gateway.requests.iter_body` (the route's
  limit, 413 beyond it) and nothing is kept past the piece just received but a
  possible partial delimiter: each ``bytes`` event is a slice of a piece;
* at most :data:`MAX_FORM_FIELDS` parts, and :data:`MAX_HEADER_BYTES` of header
  lines per part, however the body is split into reads;
* every part has ``Content-Disposition: form-data`` with a ``name``; headers are
  UTF-8; ``filename*`` (RFC 5987) is decoded and wins over ``filename``;
* a malformed body -- whatever the parser or this module finds wrong, including a
  body that ends before its closing delimiter -- is 400 ``invalid_form``, never a 500.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote

import msgspec
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser
from starlette.requests import Request

from app.core.errors import BadRequest, ValidationFailed
from app.gateway.requests import iter_body

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

MAX_HEADER_BYTES = 16 * 1024
"""Most bytes of header lines one part may have."""
MAX_FORM_FIELDS = 32
"""Most parts (text fields and files) one form may have."""
_PARAM_RE = re.compile(r';\s*([A-Za-z0-9_*-]+)\s*=\s*("(?:\\.|[^"\\])*"|[^;]*)')
_QUIET = logging.Logger("python_multipart", logging.CRITICAL + 1)
"""The parser's logger: it logs a warning before raising each error, which this
module turns into a 400 (the access log already has the request)."""


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


class _Events:
    """python-multipart's callbacks, turned into :data:`FormEvent` values in :attr:`out`
    (with this module's limits checked as the bytes go by)."""

    def __init__(self) -> None:
        self.out: list[FormEvent] = []
        self.parts = 0
        self.ended = False
        self._lines: list[bytes] = []
        self._header_bytes = 0
        self._name = bytearray()
        self._value = bytearray()

    def callbacks(self) -> MultipartCallbacks:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._lines.clear()
        self._header_bytes = 0

    def _count(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > MAX_HEADER_BYTES:
            raise _invalid("part headers are too large")

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._count(end - start)
        self._name += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._count(end - start)
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._count(3)  # ":" and CRLF
        self._lines.append(bytes(self._name) + b":" + bytes(self._value))
        self._name.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        self.parts += 1
        if self.parts > MAX_FORM_FIELDS:
            raise _invalid(f"more than {MAX_FORM_FIELDS} form parts")
        self.out.append(_parse_headers(b"\r\n".join(self._lines)))

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self.out.append(data[start:end])

    def _part_end(self) -> None:
        self.out.append(None)

    def _end(self) -> None:
        self.ended = True


async def iter_form(request: Request, limit: int) -> AsyncIterator[FormEvent]:
    """Stream the events of a ``multipart/form-data`` request body of at most
    ``limit`` bytes (413 beyond, see :func:`~app.gateway.requests.iter_body`)."""
    events = _Events()
    parser = MultipartParser(
        boundary_of(request.headers.get("content-type", "")),
        events.callbacks(),
        max_header_count=MAX_HEADER_BYTES,  # bounded by the bytes of the headers instead
        max_header_size=MAX_HEADER_BYTES,
    )
    parser.logger = _QUIET
    async for chunk in iter_body(request, limit):
        try:
            parser.write(chunk)
        except FormParserError as exc:
            raise _invalid(f"malformed multipart body: {exc}") from None
        for event in events.out:
            yield event
        events.out.clear()
    if not events.ended:
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
