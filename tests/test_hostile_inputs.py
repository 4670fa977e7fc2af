"""Hostile input to the gateway: deep JSON, bad cursors, hostile filenames.

Every case is a precise 4xx with nothing created, never a 500.  Real Postgres
and S3 behind an in-process gateway.
"""

from __future__ import annotations

import base64
import json
import unicodedata
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import quote, unquote

import httpx
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.core.errors import BadRequest
from app.core.jsonguard import MAX_JSON_DEPTH, nesting_depth, too_deep
from app.core.schemas import decode_cursor, encode_cursor
from app.gateway.services import Services
from app.uploads.rules import check_filename, content_disposition
from tests import fixtures_uploads as fx

BASE = "/api/v1/documents/upload"
DEEP = "[" * 5000 + "]" * 5000


def _deep_object(depth: int = 5000) -> bytes:
    return ('{"a": ' * depth + "1" + "}" * depth).encode()


def _form(filename_param: str, data: bytes, **fields: str) -> tuple[bytes, str]:
    """A multipart body built by hand, so any filename reaches the gateway as sent."""
    boundary = "hostile-boundary-7f3a"
    out = b""
    for name, value in fields.items():
        out += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        ).encode()
    out += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; {filename_param}\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    out += data + f"\r\n--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


async def _simple(
    client: httpx.AsyncClient, headers: dict[str, str], filename: str, data: bytes, **fields: str
) -> httpx.Response:
    body, ctype = _form(f"filename*=UTF-8''{quote(filename, safe='')}", data, **fields)
    return await client.post(
        f"{BASE}/simple", content=body, headers={**headers, "Content-Type": ctype}
    )


# --- the depth guard itself ---------------------------------------------------------------


def test_depth_guard_measures_without_recursing() -> None:
    assert nesting_depth(b'{"a": [1, {"b": "[[[[ not brackets ]"}]}') == 3
    assert nesting_depth(b'"\\"[[["') == 0
    assert nesting_depth(DEEP) == 5000
    assert too_deep(DEEP) and too_deep(_deep_object())
    assert not too_deep("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)
    assert too_deep("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1))
    assert not too_deep('["' + "[" * 10_000 + '"]')  # brackets inside a string


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    return 0


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\ab\n'),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(alphabet='[]{}"\\ab', max_size=4), inner, max_size=3)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None, database=None)
@given(_json_values)
def test_depth_guard_agrees_with_a_recursive_count(value: Any) -> None:
    assert nesting_depth(msgspec.json.encode(value)) == _depth(value)


# --- item 5: deep nesting and processing_options -----------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        (
            "POST",
            f"{BASE}/initiate",
            b'{"filename": "a.txt", "file_size": 10, "processing_options": {"x": '
            + DEEP.encode()
            + b"}}",
        ),
        ("POST", f"{BASE}/initiate", _deep_object()),
        (
            "POST",
            f"{BASE}/{uuid.uuid4()}/parts/1/presign",
            b'{"content_md5": ' + DEEP.encode() + b"}",
        ),
        (
            "POST",
            f"/api/v1/documents/{uuid.uuid4()}/reprocess",
            b'{"processing_options": ' + DEEP.encode() + b"}",
        ),
        ("POST", "/api/v1/search", b'{"query": ' + DEEP.encode() + b"}"),
    ],
)
async def test_deeply_nested_json_is_invalid_json_not_500(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str], method: str, path: str, body: bytes
) -> None:
    r = await uploads.request(
        method, path, content=body, headers={**auth_headers, "Content-Type": "application/json"}
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"] == "invalid_json"
    assert r.json()["details"]["max_depth"] == MAX_JSON_DEPTH


async def test_processing_options_are_validated_when_the_upload_starts(
    uploads: httpx.AsyncClient,
    auth_headers: dict[str, str],
    upload_services: Services,
    user: str,
) -> None:
    """``{"chunk_size": 1}`` used to be accepted and fail the job after the upload."""
    for options in ({"chunk_size": 1}, {"chunk_overlap": -1}, {"chunk_size": "big"}, {"lang": 1}):
        r = await uploads.post(
            f"{BASE}/initiate",
            headers=auth_headers,
            json={"filename": "a.txt", "file_size": 10, "processing_options": options},
        )
        assert r.status_code == 422, (options, r.text)
        assert r.json()["error"] == "validation_error"
        assert r.json()["details"]["field"].startswith("processing_options"), r.text
        r = await _simple(
            uploads, auth_headers, "a.txt", b"hello", processing_options=_json(options)
        )
        assert r.status_code == 422, (options, r.text)
        assert r.json()["details"]["field"].startswith("processing_options"), r.text
    r = await _simple(uploads, auth_headers, "a.txt", b"hello", processing_options=DEEP)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_json")
    assert r.json()["details"]["field"] == "processing_options"
    assert await _count(upload_services, user, "documents") == 0

    good = {"chunk_size": 64, "chunk_overlap": 8}
    init = await fx.initiate(uploads, auth_headers, 10, processing_options=good)
    r = await _simple(uploads, auth_headers, "b.txt", b"hello", processing_options=_json(good))
    assert r.status_code == 201, r.text
    for document_id in (init["document_id"], r.json()["document_id"]):
        stored = await upload_services.db.fetchval(
            "SELECT processing_options FROM documents WHERE id = $1::uuid", document_id
        )
        assert stored == good


def _json(value: Any) -> str:
    return json.dumps(value)


async def _count(svc: Services, user: str, table: str) -> int:
    value = await svc.db.fetchval(f"SELECT count(*) FROM {table} WHERE owner_id = $1", user)
    return int(value)


# --- item 6: cursors ----------------------------------------------------------------------


def _b64(raw: str) -> str:
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _b64_bytes(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _bad_cursors(real: str) -> list[str]:
    some_id = str(uuid.uuid4())
    return [
        "garbage!!",  # not base64
        "%%%",
        "x" * 5000,  # absurdly long
        real[: len(real) // 2],  # truncated
        real[:-3],
        _b64("no separator"),
        _b64(f"not-a-date|{some_id}"),
        _b64("2026-01-01T00:00:00+00:00|not-a-uuid"),
        _b64(f"2026-01-01T00:00:00|{some_id}"),  # naive timestamp
        _b64(f"0001-01-01T00:00:00+05:00|{some_id}"),  # out of range once in UTC
        _b64(f"9999-12-31T23:59:59-05:00|{some_id}"),
        encode_cursor(datetime(1, 1, 1, 12, tzinfo=timezone(timedelta(hours=11))), some_id),
        base64.urlsafe_b64encode(b"\xff\xfe|\x00").decode(),  # not UTF-8
        "12",  # a chunk cursor on a keyset list
    ]


_offsets = st.sampled_from([UTC, timezone(timedelta(hours=14)), timezone(-timedelta(hours=12))])
_cursor_like = st.builds(
    lambda when, tz, item: _b64(f"{when.replace(tzinfo=tz).isoformat()}|{item}"),
    st.datetimes(),
    st.none() | _offsets,
    st.uuids().map(str) | st.text(max_size=40),
)


@settings(max_examples=400, deadline=None, database=None)
@given(st.text(max_size=300) | _cursor_like | st.binary(max_size=120).map(_b64_bytes))
def test_a_cursor_decodes_to_safe_query_arguments_or_400(cursor: str) -> None:
    """Whatever arrives, the database gets an aware timestamp in range and a UUID."""
    try:
        created, item_id = decode_cursor(cursor)
    except BadRequest as exc:
        assert exc.code == "invalid_cursor" and exc.status == 400
    else:
        assert created.utcoffset() == timedelta(0)
        assert 1970 <= created.year <= 9000
        assert isinstance(item_id, uuid.UUID)


async def test_every_bad_cursor_is_400_invalid_cursor(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str], upload_services: Services
) -> None:
    for _ in range(2):  # two of everything, so that every list has a next page
        await fx.initiate(uploads, auth_headers, 10)
    routes = ["/api/v1/jobs", "/api/v1/documents", f"{BASE}/active"]
    for route in routes:
        page = (await uploads.get(route, params={"limit": "1"}, headers=auth_headers)).json()
        real = page["next_cursor"]
        assert real, (route, page)
        ok = await uploads.get(route, params={"limit": "1", "cursor": real}, headers=auth_headers)
        assert ok.status_code == 200, ok.text
        for cursor in _bad_cursors(real):
            r = await uploads.get(route, params={"cursor": cursor}, headers=auth_headers)
            assert r.status_code == 400, (route, cursor, r.text)
            assert r.json()["error"] == "invalid_cursor", (route, cursor, r.text)
            assert r.json()["details"]["field"] == "cursor"

    # chunks: the cursor is the last seq seen
    document_id = (await uploads.get("/api/v1/documents", headers=auth_headers)).json()["items"][0][
        "document_id"
    ]
    chunks = f"/api/v1/documents/{document_id}/chunks"
    assert (await uploads.get(chunks, params={"cursor": "3"}, headers=auth_headers)).is_success
    for cursor in ["-1", "1.5", "abc", "99999999999", "2147483648", "\u0663", real, " 1"]:
        r = await uploads.get(chunks, params={"cursor": cursor}, headers=auth_headers)
        assert r.status_code == 400, (cursor, r.text)
        assert r.json()["error"] == "invalid_cursor", (cursor, r.text)


# --- item 7: filenames ----------------------------------------------------------------------

BIDI_CONTROLS = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
BAD_FILENAMES = [
    "report\r\n.pdf",
    "line\nfeed.txt",
    "tab\there.txt",
    "nul\x00.txt",
    "del\x7f.txt",
    "c1\x85control.txt",
    "c1\x9b.txt",
    "invoice\u202efdp.txt",  # RIGHT-TO-LEFT OVERRIDE
    "embed\u202a.txt",
    "isolate\u2066.txt",
    "mark\u200f.txt",
    "arabic\u061cmark.txt",
    "para\u2029sep.txt",
    "a" * 252 + ".txt",  # 256 bytes
    "é" * 126 + ".txt",  # 256 bytes in UTF-8
    "   ",
]


async def _s3_state(svc: Services) -> tuple[set[str], set[str]]:
    bucket = svc.settings.minio_bucket_name
    uploads_ = await svc.s3.list_multipart_uploads(Bucket=bucket, Prefix="documents/")
    objects = await svc.s3.list_objects_v2(Bucket=bucket, Prefix="documents/")
    return (
        {u["UploadId"] for u in uploads_.get("Uploads", [])},
        {o["Key"] for o in objects.get("Contents", [])},
    )


async def test_hostile_filenames_are_refused_with_nothing_created(
    uploads: httpx.AsyncClient,
    auth_headers: dict[str, str],
    upload_services: Services,
    user: str,
) -> None:
    before = await _s3_state(upload_services)
    for name in BAD_FILENAMES:
        r = await uploads.post(
            f"{BASE}/initiate",
            headers=auth_headers,
            json={"filename": name, "file_size": 10, "content_type": "text/plain"},
        )
        assert r.status_code == 400, (name, r.text)
        assert r.json()["error"] == "invalid_filename", (name, r.text)
        assert r.json()["details"]["field"] == "filename"
        r = await _simple(uploads, auth_headers, name, b"hello")
        assert r.status_code == 400, (name, r.text)
        assert r.json()["error"] == "invalid_filename", (name, r.text)
    for table in ("upload_sessions", "documents", "jobs"):
        assert await _count(upload_services, user, table) == 0, table
    assert await _s3_state(upload_services) == before
    # a filename* in an unknown charset is a bad form, not a 500
    body, ctype = _form("filename*=x-nonexistent''a%E9.txt", b"hello")
    r = await uploads.post(
        f"{BASE}/simple", content=body, headers={**auth_headers, "Content-Type": ctype}
    )
    assert r.status_code == 400, r.text


def _disposition_filename(header: str) -> str:
    """The name a browser would use: ``filename*`` (RFC 6266) if present."""
    params = dict(
        (k.strip().lower(), v.strip())
        for k, _, v in (p.partition("=") for p in header.split(";")[1:])
    )
    charset, _, encoded = params["filename*"].partition("''")
    assert charset.upper() == "UTF-8"
    return unquote(encoded, encoding="utf-8", errors="strict")


async def test_unicode_filename_round_trips_to_the_download(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str], upload_services: Services
) -> None:
    name = "résumé 東京.pdf"
    nfd = "re\u0301sume\u0301 東京.pdf"  # the same name, decomposed: stored as NFC
    data = b"%PDF-1.4 not really a pdf"
    r = await _simple(uploads, auth_headers, nfd, data)
    assert r.status_code == 201, r.text
    assert r.json()["filename"] == name
    init = await fx.initiate(
        uploads, auth_headers, len(data), filename=nfd, content_type="application/pdf"
    )
    assert init["filename"] == name
    assert (await fx.put_part(uploads, auth_headers, init["upload_id"], 1, data)).is_success
    assert (
        await uploads.post(f"{BASE}/complete/{init['upload_id']}", headers=auth_headers)
    ).is_success

    for document_id in (r.json()["document_id"], init["document_id"]):
        link = await uploads.get(f"/api/v1/documents/{document_id}/download", headers=auth_headers)
        assert link.status_code == 200, link.text
        assert link.json()["filename"] == name
        async with httpx.AsyncClient(timeout=30) as raw:
            fetched = await raw.get(link.json()["url"])
        assert fetched.status_code == 200 and fetched.content == data
        header = fetched.headers["content-disposition"]
        assert header.isascii()
        assert header.startswith('attachment; filename="resume __.pdf"; ')
        assert _disposition_filename(header) == name


@settings(max_examples=400, deadline=None, database=None)
@given(st.text(max_size=300))
def test_a_filename_is_refused_or_safe_for_headers(name: str) -> None:
    try:
        clean = check_filename(name)
    except BadRequest as exc:
        assert exc.code == "invalid_filename" and exc.details["field"] == "filename"
        return
    assert clean.strip()
    assert clean == unicodedata.normalize("NFC", clean)
    assert len(clean.encode()) <= 255
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in clean)
    assert not set(clean) & set(
        "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
    )
    header = content_disposition(clean)
    assert header.isascii() and header.isprintable()
    assert _disposition_filename(header) == clean


def test_content_disposition_is_ascii_with_a_utf8_filename_star() -> None:
    value = content_disposition('quote"back\\slash é.txt')
    assert value == (
        'attachment; filename="quote_back_slash e.txt"; '
        "filename*=UTF-8''quote%22back%5Cslash%20%C3%A9.txt"
    )
    assert content_disposition("東京.pdf").startswith('attachment; filename="__.pdf"')
    assert content_disposition("東京").startswith('attachment; filename="__"')
