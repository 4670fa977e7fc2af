"""The streaming form reader (:mod:`app.gateway.formstream`) on python-multipart.

Pins what the gateway promises on top of the parser: the same events however
the body is split into reads, the part-count and header-size limits whatever
the split, and a 400 ``invalid_form`` (never another exception, never a log
line from the parser) for any malformed body.
"""

from __future__ import annotations

import logging
import re
import string
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from starlette.requests import Request

from app.core.errors import BadRequest
from app.gateway.formstream import MAX_FORM_FIELDS, MAX_HEADER_BYTES, FormPart, iter_form

BOUNDARY = "pinned-boundary-4f1c"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def request_of(body: bytes, sizes: list[int], content_type: str = CONTENT_TYPE) -> Request:
    """A request whose body arrives in pieces of ``sizes`` (cycled)."""
    chunks: list[bytes] = []
    at = 0
    while at < len(body):
        size = sizes[len(chunks) % len(sizes)]
        chunks.append(body[at : at + size])
        at += size
    pending = iter(chunks or [b""])
    left = max(1, len(chunks))

    async def receive() -> dict[str, Any]:
        nonlocal left
        left -= 1
        return {"type": "http.request", "body": next(pending, b""), "more_body": left > 0}

    headers = [(b"content-type", content_type.encode())]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers}, receive)


async def events_of(body: bytes, sizes: list[int], **kw: Any) -> list[Any]:
    """The reader's events, with consecutive byte pieces joined and parts as tuples."""
    out: list[Any] = []
    async for event in iter_form(request_of(body, sizes, **kw), limit=len(body) + 1):
        if isinstance(event, bytes):
            if out and isinstance(out[-1], bytes):
                out[-1] += event
            else:
                out.append(event)
        elif isinstance(event, FormPart):
            out.append((event.name, event.filename, event.content_type))
        else:
            out.append(None)
    return out


def form(fields: dict[str, str], file: bytes, *, filename: str = "f.bin") -> bytes:
    out = b""
    for name, value in fields.items():
        out += (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + value.encode()
            + b"\r\n"
        )
    out += (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return out + file + f"\r\n--{BOUNDARY}--\r\n".encode()


def expected(fields: dict[str, str], file: bytes, filename: str = "f.bin") -> list[Any]:
    out: list[Any] = []
    for name, value in fields.items():
        out += [(name, None, ""), *([value.encode()] if value else []), None]
    return [*out, ("file", filename, "application/octet-stream"), *([file] if file else []), None]


NAMES = st.text(string.ascii_letters + "_", min_size=1, max_size=12)
LOOKALIKES = st.sampled_from(
    [b"\r\n--" + BOUNDARY.encode() + b"X", b"\r\n--", b"--" + BOUNDARY.encode(), b"\r\r\n\n"]
)
FILES = st.lists(st.binary(max_size=300) | LOOKALIKES, max_size=8).map(b"".join)
SIZES = st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=6)
QUICK = settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
_DELIMITER = re.compile(rb"\r\n--" + re.escape(BOUNDARY.encode()) + rb"(.?)", re.DOTALL)


def only_lookalikes(file: bytes) -> bool:
    """The file holds no real delimiter (a client picks a boundary its data lacks):
    every ``CRLF--boundary`` in it, or made with the CRLF after it, goes on with X."""
    return all(m.group(1) == b"X" for m in _DELIMITER.finditer(file + b"\r\n"))


@QUICK
@given(
    fields=st.dictionaries(NAMES.filter(lambda n: n != "file"), st.text(max_size=200), max_size=4),
    file=FILES,
    sizes=SIZES,
)
async def test_any_split_gives_the_same_events(
    fields: dict[str, str], file: bytes, sizes: list[int]
) -> None:
    """Text with CRLFs and dashes, binary data with delimiter look-alikes: the
    events are the form's, however the body is split."""
    assume(only_lookalikes(file))
    assert await events_of(form(fields, file), sizes) == expected(fields, file)


@QUICK
@given(
    file=FILES,
    edits=st.lists(
        st.tuples(st.floats(0, 1), st.sampled_from([b"", b"\r", b"\n", b"-", b":", b'"', b"x"])),
        min_size=1,
        max_size=4,
    ),
    sizes=SIZES,
)
async def test_a_damaged_body_is_invalid_form_or_read(
    file: bytes, edits: list[tuple[float, bytes]], sizes: list[int]
) -> None:
    body = bytearray(form({"a": "1", "b": "two"}, file))
    for where, replacement in edits:
        at = int(where * (len(body) - 1))
        body[at : at + 1] = replacement
    try:
        await events_of(bytes(body), sizes)
    except BadRequest as exc:
        assert exc.code == "invalid_form"


@pytest.mark.parametrize("sizes", [[1 << 20], [1], [7, 4096]])
async def test_part_count_and_header_size_hold_whatever_the_split(sizes: list[int]) -> None:
    many = {f"f{i}": "v" for i in range(MAX_FORM_FIELDS - 1)}
    assert len(await events_of(form(many, b"data"), sizes)) == 3 * MAX_FORM_FIELDS
    with pytest.raises(BadRequest, match="form parts"):
        await events_of(form({**many, "one_more": "v"}, b"data"), sizes)
    # one part's header lines: a long filename fills them up
    room = MAX_HEADER_BYTES - len('Content-Disposition: form-data; name="file"; filename=""\r\n')
    room -= len("Content-Type: application/octet-stream\r\n")
    fits = "n" * (room - 8)
    assert (await events_of(form({}, b"x", filename=fits), sizes))[0][1] == fits
    with pytest.raises(BadRequest, match="headers are too large"):
        await events_of(form({}, b"x", filename=fits + "n" * 16), sizes)


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (form({"a": "1"}, b"x")[:-20], CONTENT_TYPE, "ended early"),
        (b"preamble\r\n" + form({"a": "1"}, b"x"), CONTENT_TYPE, "malformed multipart body"),
        (
            f"--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nx\r\n--{BOUNDARY}--\r\n".encode(),
            CONTENT_TYPE,
            "Content-Disposition",
        ),
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; filename="a"\r\n\r\nx\r\n'
            f"--{BOUNDARY}--\r\n".encode(),
            CONTENT_TYPE,
            "no name",
        ),
        (form({"a": "1"}, b"x"), "multipart/form-data", "boundary"),
        (form({"a": "1"}, b"x"), "application/json", "multipart/form-data"),
    ],
)
async def test_malformed_forms_are_invalid_form(
    body: bytes, content_type: str, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(BadRequest, match=message) as raised:
        await events_of(body, [1 << 20], content_type=content_type)
    assert raised.value.code == "invalid_form"
    assert not [r for r in caplog.records if r.name.startswith("python_multipart")]


async def test_what_httpx_sends_reads_back() -> None:
    """A real client's encoding: RFC 5987 ``filename*`` is not sent by httpx, but
    a quoted name with an escaped quote is, and both fields and file come back."""
    request = httpx.Request(
        "POST",
        "http://x/",
        data={"note": 'quote " and ünï'},
        files={"file": ('we"ird ñame.txt', b"\r\n--" * 1000, "text/plain")},
    )
    body = request.read()
    events = await events_of(body, [3, 1000], content_type=request.headers["content-type"])
    assert events[1] == 'quote " and ünï'.encode()
    assert events[3][0] == "file" and "ñame.txt" in events[3][1]
    assert events[4] == b"\r\n--" * 1000
