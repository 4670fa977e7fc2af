"""The tus 1.0 endpoint, request by request: every status code, every extension.

Against an in-process gateway on the real embedded stack (Postgres, Redis, the
S3 API server), with 5 MiB parts and a 64 MiB upload limit (see
``tests/fixtures_uploads.py``), so multi-part files stay small.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
from collections.abc import AsyncIterator
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any

import aioboto3
import httpx
import msgspec
from botocore.config import Config

from app.core.errors import ServiceUnavailable
from app.gateway.routes.uploads import upload_context
from app.gateway.services import Services
from app.uploads import sweeper
from app.uploads.tus import TusRuntime
from tests import fixtures_uploads as fx
from tests.fixtures_uploads import PART, MiB, app_client, payload, s3_object

TUS = "/api/v1/tus"
V = {"Tus-Resumable": "1.0.0"}
PARTIAL = {"Upload-Concat": "partial"}
OCTETS = "application/offset+octet-stream"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def metadata(**values: str) -> str:
    return ",".join(f"{k} {b64(v)}" for k, v in values.items())


async def create(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    length: int | None,
    *,
    body: bytes | None = None,
    extra: dict[str, str] | None = None,
    **meta: str,
) -> httpx.Response:
    h = {**headers, **V, "Upload-Metadata": metadata(**({"filename": "report.txt"} | meta))}
    if length is None:
        h["Upload-Defer-Length"] = "1"
    else:
        h["Upload-Length"] = str(length)
    if body is not None:
        h["Content-Type"] = OCTETS
    return await client.post(f"{TUS}/", headers={**h, **(extra or {})}, content=body)


async def created(
    client: httpx.AsyncClient, headers: dict[str, str], length: int | None, **kw: Any
) -> str:
    r = await create(client, headers, length, **kw)
    assert r.status_code == 201, r.text
    location: str = r.headers["location"]
    return location


async def patch(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    url: str,
    offset: int,
    data: bytes | Any,
    **extra: str,
) -> httpx.Response:
    h = {**headers, **V, "Upload-Offset": str(offset), "Content-Type": OCTETS, **extra}
    return await client.patch(url, headers=h, content=data)


async def head(client: httpx.AsyncClient, headers: dict[str, str], url: str) -> httpx.Response:
    return await client.head(url, headers={**headers, **V})


async def send_all(
    client: httpx.AsyncClient, headers: dict[str, str], url: str, data: bytes, sizes: list[int]
) -> httpx.Response:
    """PATCH ``data`` in pieces of ``sizes`` (the last piece takes the rest)."""
    offset = 0
    r: httpx.Response | None = None
    for size in [*sizes, len(data)]:
        piece = data[offset : offset + size]
        if not piece:
            break
        r = await patch(client, headers, url, offset, piece)
        assert r.status_code == 204, r.text
        assert r.headers["upload-offset"] == str(offset + len(piece))
        offset += len(piece)
    assert r is not None
    return r


async def tus_objects(svc: Services, upload_id: str) -> list[str]:
    resp = await svc.s3.list_objects_v2(
        Bucket=svc.settings.minio_bucket_name, Prefix=f"tus/{upload_id}/"
    )
    return [o["Key"] for o in resp.get("Contents", [])]


def upload_id(url: str) -> str:
    return url.rsplit("/", 1)[1]


# --- discovery and version ------------------------------------------------------------------


async def test_options_advertises_the_protocol_without_a_token(uploads: httpx.AsyncClient) -> None:
    for path in (f"{TUS}/", f"{TUS}/00000000-0000-0000-0000-000000000000"):
        r = await uploads.options(path)
        assert r.status_code == 204, r.text
        assert r.headers["tus-version"] == "1.0.0"
        assert r.headers["tus-resumable"] == "1.0.0"
        assert r.headers["tus-max-size"] == str(64 * MiB)
        assert set(r.headers["tus-extension"].split(",")) == {
            "creation",
            "creation-with-upload",
            "creation-defer-length",
            "expiration",
            "checksum",
            "termination",
            "concatenation",
        }
        assert r.headers["tus-checksum-algorithm"] == "md5,sha1,sha256"


async def test_another_protocol_version_is_412_with_tus_version(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    for version in ({"Tus-Resumable": "0.2.2"}, {}):
        r = await uploads.post(f"{TUS}/", headers={**auth_headers, **version, "Upload-Length": "5"})
        assert r.status_code == 412, r.text
        assert r.headers["tus-version"] == "1.0.0"
        assert r.json()["error"] == "tus_version_unsupported"
    # every answer under the prefix says which version it speaks, a 401 too
    r = await uploads.post(f"{TUS}/", headers={**V, "Upload-Length": "5"})
    assert r.status_code == 401
    assert r.headers["tus-resumable"] == "1.0.0"


# --- the whole flow -------------------------------------------------------------------------


async def test_patches_of_any_size_complete_the_upload_once(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str], upload_services: Services
) -> None:
    data = payload(2 * PART + 1234, seed=101)
    r = await create(
        uploads, auth_headers, len(data), filetype="text/plain", priority="high", lang="en"
    )
    assert r.status_code == 201, r.text
    url = r.headers["location"]
    uid = upload_id(url)
    assert url == f"{TUS}/{uid}"
    job_id = r.headers["sluice-job-id"]
    assert r.headers["upload-offset"] == "0"
    expires = parsedate_to_datetime(r.headers["upload-expires"])
    # one tus upload is one upload session
    status = await uploads.get(f"/api/v1/documents/upload/status/{uid}", headers=auth_headers)
    assert status.status_code == 200 and status.json()["job_id"] == job_id
    assert status.json()["file_size"] == len(data)
    session_expiry = datetime.fromisoformat(status.json()["expires_at"])
    assert abs(session_expiry.timestamp() - expires.timestamp()) < 1  # the session's TTL
    active = (await uploads.get("/api/v1/documents/upload/active", headers=auth_headers)).json()
    assert uid in [a["upload_id"] for a in active["items"]]

    h = await head(uploads, auth_headers, url)
    assert h.status_code == 200
    assert (h.headers["upload-offset"], h.headers["upload-length"]) == ("0", str(len(data)))
    assert h.headers["cache-control"] == "no-store"
    assert h.headers["upload-metadata"] == r.request.headers["upload-metadata"]
    assert h.headers["sluice-job-id"] == job_id

    # 3 MiB (an incomplete part), 3 MiB (fills part 1), 1 byte, 3 MiB (fills part 2), the rest
    offset = 0
    for size in (3 * MiB, 3 * MiB, 1, 3 * MiB):
        r = await patch(uploads, auth_headers, url, offset, data[offset : offset + size])
        assert r.status_code == 204, r.text
        offset += size
        assert r.headers["upload-offset"] == str(offset)
        assert "sluice-document-id" not in r.headers
        assert (await head(uploads, auth_headers, url)).headers["upload-offset"] == str(offset)
    assert await tus_objects(upload_services, uid)  # the incomplete part is in S3
    r = await patch(uploads, auth_headers, url, offset, data[offset:])
    assert r.status_code == 204, r.text
    assert r.headers["upload-offset"] == str(len(data))
    assert r.headers["sluice-job-id"] == job_id
    document_id = r.headers["sluice-document-id"]

    assert await s3_object(upload_services, document_id) == data
    assert await tus_objects(upload_services, uid) == []
    job = await upload_services.db.fetchrow(
        "SELECT status, priority FROM jobs WHERE id = $1::uuid", job_id
    )
    assert (job["status"], job["priority"]) == ("queued", "high")
    status = await uploads.get(f"/api/v1/documents/upload/status/{uid}", headers=auth_headers)
    assert status.json()["status"] == "completed"
    # done: HEAD says so, an empty PATCH at the end changes nothing, a byte more is 413
    assert (await head(uploads, auth_headers, url)).headers["upload-offset"] == str(len(data))
    r = await patch(uploads, auth_headers, url, len(data), b"")
    assert r.status_code == 204 and r.headers["upload-offset"] == str(len(data))
    r = await patch(uploads, auth_headers, url, len(data), b"x")
    assert r.status_code == 413, r.text
    documents = await upload_services.db.fetchval(
        "SELECT count(*) FROM documents WHERE id = $1::uuid", document_id
    )
    assert documents == 1


async def test_creation_with_upload_and_method_override(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str], upload_services: Services
) -> None:
    data = payload(PART + 77, seed=102)
    r = await create(uploads, auth_headers, len(data), body=data[: 2 * MiB])
    assert r.status_code == 201, r.text
    assert r.headers["upload-offset"] == str(2 * MiB)
    url = r.headers["location"]
    # tus-js-client's overridePatchMethod: POST + X-HTTP-Method-Override: PATCH
    r = await uploads.post(
        url,
        headers={
            **auth_headers,
            **V,
            "X-HTTP-Method-Override": "PATCH",
            "Upload-Offset": str(2 * MiB),
            "Content-Type": OCTETS,
        },
        content=data[2 * MiB :],
    )
    assert r.status_code == 204, r.text
    assert await s3_object(upload_services, r.headers["sluice-document-id"]) == data
    # a whole small file in the creation request completes it there and then
    small = b"hello, tus\n"
    r = await create(uploads, auth_headers, len(small), body=small)
    assert r.status_code == 201, r.text
    assert r.headers["upload-offset"] == str(len(small))
    assert await s3_object(upload_services, r.headers["sluice-document-id"]) == small


async def test_deferred_length_is_declared_by_a_later_patch(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str], upload_services: Services
) -> None:
    data = payload(PART + 4321, seed=103)
    url = await created(uploads, auth_headers, None)
    h = await head(uploads, auth_headers, url)
    assert h.headers["upload-defer-length"] == "1" and "upload-length" not in h.headers
    r = await patch(uploads, auth_headers, url, 0, data[: PART + 1])
    assert r.status_code == 204, r.text
    r = await patch(
        uploads, auth_headers, url, PART + 1, data[PART + 1 :], **{"Upload-Length": str(len(data))}
    )
    assert r.status_code == 204, r.text
    assert r.headers["upload-length"] == str(len(data))
    document_id = r.headers["sluice-document-id"]
    assert await s3_object(upload_services, document_id) == data
    size = await upload_services.db.fetchval(
        "SELECT size_bytes FROM documents WHERE id = $1::uuid", document_id
    )
    assert size == len(data)
    # the length is declared once
    url = await created(uploads, auth_headers, None)
    r = await patch(uploads, auth_headers, url, 0, b"abc", **{"Upload-Length": "10"})
    assert r.status_code == 204
    r = await patch(uploads, auth_headers, url, 3, b"d", **{"Upload-Length": "11"})
    assert (r.status_code, r.json()["error"]) == (400, "invalid_upload_length")
    # declared at the very end, with an empty body: that completes the upload
    url = await created(uploads, auth_headers, None)
    assert (await patch(uploads, auth_headers, url, 0, b"0123456789")).status_code == 204
    r = await patch(uploads, auth_headers, url, 10, b"", **{"Upload-Length": "10"})
    assert r.status_code == 204 and "sluice-document-id" in r.headers
    assert await s3_object(upload_services, r.headers["sluice-document-id"]) == b"0123456789"


# --- refusals -------------------------------------------------------------------------------


async def test_malformed_requests_are_400_and_name_the_header(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    base = {**auth_headers, **V}
    cases: list[tuple[dict[str, str], str]] = [
        ({"Upload-Length": "abc"}, "invalid_upload_length"),
        ({"Upload-Length": "-1"}, "invalid_upload_length"),
        ({}, "invalid_upload_length"),
        ({"Upload-Length": "5", "Upload-Defer-Length": "1"}, "invalid_upload_length"),
        ({"Upload-Defer-Length": "2"}, "invalid_upload_defer_length"),
        ({"Upload-Length": "5", "Upload-Metadata": "filename !!!"}, "invalid_metadata"),
        ({"Upload-Length": "5", "Upload-Metadata": "a YQ==,a YQ=="}, "invalid_metadata"),
        (
            {"Upload-Length": "0", "Upload-Metadata": metadata(filename="a.txt")},
            "invalid_file_size",
        ),
        (
            {"Upload-Length": "5", "Upload-Metadata": metadata(filename="evil\x1b[2J.txt")},
            "invalid_filename",
        ),
        (
            {
                "Upload-Length": "5",
                "Upload-Metadata": metadata(filename="a.txt", processing_options="{"),
            },
            "invalid_json",
        ),
        ({"Upload-Concat": "final;"}, "invalid_upload_concat"),
        ({"Upload-Concat": "final;https://elsewhere.example/x/1"}, "invalid_upload_concat"),
    ]
    for extra, code in cases:
        r = await uploads.post(f"{TUS}/", headers={**base, **extra})
        assert (r.status_code, r.json()["error"]) == (400, code), (extra, r.text)
    url = await created(uploads, auth_headers, 10)
    r = await uploads.patch(url, headers={**base, "Content-Type": OCTETS}, content=b"a")
    assert (r.status_code, r.json()["error"]) == (400, "invalid_upload_offset")
    for checksum, code in (
        ("crc32 AAAAAA==", "unsupported_checksum_algorithm"),
        ("sha1 not-base64", "invalid_checksum"),
        ("md5 " + base64.b64encode(b"short").decode(), "invalid_checksum"),
    ):
        r = await patch(uploads, auth_headers, url, 0, b"a", **{"Upload-Checksum": checksum})
        assert (r.status_code, r.json()["error"]) == (400, code), r.text


async def test_metadata_is_validated_exactly_as_initiate(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    r = await create(uploads, auth_headers, 10, priority="urgent")
    assert (r.status_code, r.json()["details"]["field"]) == (422, "priority")
    r = await uploads.post(
        f"{TUS}/", headers={**auth_headers, **V, "Upload-Length": "10", "Upload-Metadata": ""}
    )
    assert r.status_code == 422 and "`filename`" in r.json()["message"]  # as initiate says it
    r = await create(uploads, auth_headers, 10, processing_options='{"chunk_size": 1}')
    assert r.status_code == 422 and "processing_options" in r.json()["details"]["path"]
    r = await create(uploads, auth_headers, 10, filename="setup.exe")
    assert (r.status_code, r.json()["error"]) == (415, "unsupported_file_type")
    r = await create(uploads, auth_headers, 10, filename="a.pdf", filetype="text/html")
    assert (r.status_code, r.json()["error"]) == (415, "unsupported_content_type")
    r = await create(uploads, auth_headers, 10, filename="a.txt", document_type="pdf")
    assert (r.status_code, r.json()["error"]) == (415, "unsupported_file_type")
    # Uppy's names: name and type
    r = await uploads.post(
        f"{TUS}/",
        headers={
            **auth_headers,
            **V,
            "Upload-Length": "10",
            "Upload-Metadata": metadata(name="notes.md", type="text/markdown"),
        },
    )
    assert r.status_code == 201, r.text


async def test_413_for_a_file_over_the_limit_and_for_bytes_past_the_length(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    r = await create(uploads, auth_headers, 64 * MiB + 1)
    assert (r.status_code, r.json()["error"]) == (413, "file_too_large")
    assert r.json()["details"]["field"] == "Upload-Length"
    url = await created(uploads, auth_headers, 10)
    r = await patch(uploads, auth_headers, url, 0, b"x" * 11)  # declared: refused before reading
    assert (r.status_code, r.json()["error"]) == (413, "upload_length_exceeded")

    async def chunked() -> AsyncIterator[bytes]:
        yield b"x" * 6
        yield b"x" * 6

    r = await patch(uploads, auth_headers, url, 0, chunked())
    assert (r.status_code, r.json()["error"]) == (413, "upload_length_exceeded")
    assert (await head(uploads, auth_headers, url)).headers["upload-offset"] == "0"


async def test_415_for_a_patch_body_of_another_type(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    url = await created(uploads, auth_headers, 10)
    r = await uploads.patch(
        url,
        headers={**auth_headers, **V, "Upload-Offset": "0", "Content-Type": "text/plain"},
        content=b"abc",
    )
    assert (r.status_code, r.json()["error"]) == (415, "unsupported_content_type")


async def test_409_when_upload_offset_is_not_the_stored_offset(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    url = await created(uploads, auth_headers, 10)
    assert (await patch(uploads, auth_headers, url, 0, b"abcd")).status_code == 204
    for wrong in (0, 3, 5):
        r = await patch(uploads, auth_headers, url, wrong, b"efg")
        assert (r.status_code, r.json()["error"]) == (409, "offset_mismatch")
        assert r.json()["details"]["offset"] == 4
    assert (await patch(uploads, auth_headers, url, 4, b"efg")).status_code == 204


async def test_460_when_the_checksum_does_not_match_and_nothing_is_kept(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str], upload_services: Services
) -> None:
    data = payload(PART + 10, seed=104)
    url = await created(uploads, auth_headers, len(data))
    piece = data[: PART + 3]  # fills a part, which reaches S3 before the digest is known
    wrong = "sha1 " + base64.b64encode(hashlib.sha1(b"other").digest()).decode()
    r = await patch(uploads, auth_headers, url, 0, piece, **{"Upload-Checksum": wrong})
    assert (r.status_code, r.json()["error"]) == (460, "checksum_mismatch")
    assert (await head(uploads, auth_headers, url)).headers["upload-offset"] == "0"
    good = "sha256 " + base64.b64encode(hashlib.sha256(piece).digest()).decode()
    r = await patch(uploads, auth_headers, url, 0, piece, **{"Upload-Checksum": good})
    assert r.status_code == 204 and r.headers["upload-offset"] == str(len(piece))
    rest = data[len(piece) :]
    good = "md5 " + base64.b64encode(hashlib.md5(rest).digest()).decode()
    r = await patch(uploads, auth_headers, url, len(piece), rest, **{"Upload-Checksum": good})
    assert r.status_code == 204, r.text
    assert await s3_object(upload_services, r.headers["sluice-document-id"]) == data


async def test_unknown_malformed_and_foreign_uploads_are_404(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str], headers_for: Any
) -> None:
    url = await created(uploads, auth_headers, 10)
    intruder = headers_for("intruder")
    for target, who in (
        (url, intruder),
        (f"{TUS}/00000000-0000-0000-0000-000000000000", auth_headers),
        (f"{TUS}/not-a-uuid", auth_headers),
    ):
        assert (await head(uploads, who, target)).status_code == 404
        r = await patch(uploads, who, target, 0, b"a")
        assert (r.status_code, r.json()["error"]) == (404, "upload_not_found")
        r = await uploads.delete(target, headers={**who, **V})
        assert r.status_code == 404
    assert (await head(uploads, auth_headers, url)).status_code == 200


async def test_expired_upload_is_410_and_swept(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str], upload_services: Services
) -> None:
    url = await created(uploads, auth_headers, PART + 10)
    assert (await patch(uploads, auth_headers, url, 0, b"x" * 1000)).status_code == 204
    uid = upload_id(url)
    assert await tus_objects(upload_services, uid)
    await upload_services.db.execute(
        "UPDATE upload_sessions SET expires_at = now() - interval '1 minute' WHERE id = $1::uuid",
        uid,
    )
    assert (await head(uploads, auth_headers, url)).status_code == 410
    r = await patch(uploads, auth_headers, url, 1000, b"y")
    assert (r.status_code, r.json()["error"]) == (410, "upload_expired")
    report = await sweeper.sweep(upload_context(upload_services))
    assert report.expired >= 1
    assert await tus_objects(upload_services, uid) == []  # the incomplete part went with it
    assert (await head(uploads, auth_headers, url)).status_code == 410


async def test_a_tus_session_cancelled_through_the_upload_api_is_cleaned_by_the_sweeper(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str], upload_services: Services
) -> None:
    url = await created(uploads, auth_headers, PART + 10)
    assert (await patch(uploads, auth_headers, url, 0, b"x" * 1000)).status_code == 204
    uid = upload_id(url)
    r = await uploads.delete(f"/api/v1/documents/upload/cancel/{uid}", headers=auth_headers)
    assert r.status_code == 200, r.text
    assert (await head(uploads, auth_headers, url)).status_code == 410
    r = await patch(uploads, auth_headers, url, 1000, b"y")
    assert (r.status_code, r.json()["error"]) == (410, "upload_cancelled")
    assert await tus_objects(upload_services, uid)
    await sweeper.sweep(upload_context(upload_services))
    assert await tus_objects(upload_services, uid) == []


async def test_termination_aborts_and_then_404(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str], upload_services: Services
) -> None:
    data = payload(PART + 10, seed=105)
    r = await create(uploads, auth_headers, len(data))
    url, job_id = r.headers["location"], r.headers["sluice-job-id"]
    uid = upload_id(url)
    assert (await patch(uploads, auth_headers, url, 0, data[: PART + 1])).status_code == 204
    row = await upload_services.db.fetchrow(
        "SELECT s3_upload_id, object_key FROM upload_sessions WHERE id = $1::uuid", uid
    )
    r = await uploads.delete(url, headers={**auth_headers, **V})
    assert r.status_code == 204, r.text
    assert r.headers["tus-resumable"] == "1.0.0"
    left = await fx.s3_upload_ids(upload_services, row["object_key"])
    assert row["s3_upload_id"] not in left
    assert await tus_objects(upload_services, uid) == []
    job = await upload_services.db.fetchval("SELECT status FROM jobs WHERE id = $1::uuid", job_id)
    assert job == "cancelled"
    assert (await head(uploads, auth_headers, url)).status_code == 404
    assert (await patch(uploads, auth_headers, url, PART + 1, b"z")).status_code == 404
    assert (await uploads.delete(url, headers={**auth_headers, **V})).status_code == 404


async def test_a_second_patch_while_one_runs_is_423(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str], upload_services: Services
) -> None:
    data = payload(PART + 99, seed=106)
    url = await created(uploads, auth_headers, len(data))
    started, release = asyncio.Event(), asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield data[:MiB]
        started.set()
        await release.wait()
        yield data[MiB:]

    first = asyncio.create_task(patch(uploads, auth_headers, url, 0, slow()))
    await asyncio.wait_for(started.wait(), 10)
    for _ in range(2):  # a retrying client, a second tab: refused, never interleaved
        r = await patch(uploads, auth_headers, url, 0, data)
        assert (r.status_code, r.json()["error"]) == (423, "upload_locked"), r.text
        r = await uploads.delete(url, headers={**auth_headers, **V})
        assert r.status_code == 423
    release.set()
    r = await first
    assert r.status_code == 204, r.text
    assert await s3_object(upload_services, r.headers["sluice-document-id"]) == data


async def test_four_partials_concatenate_into_one_document(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str], upload_services: Services, user: str
) -> None:
    # sizes that are not multiples of the 5 MiB part: parts straddle partials
    sizes = [PART + 3, 7 * MiB, 3 * MiB, 2 * MiB + 11]
    data = payload(sum(sizes), seed=107)
    pieces, at = [], 0
    for size in sizes:
        pieces.append(data[at : at + size])
        at += size

    async def partial(piece: bytes) -> str:
        r = await uploads.post(
            f"{TUS}/",
            headers={
                **auth_headers,
                **V,
                "Upload-Length": str(len(piece)),
                "Upload-Concat": "partial",
            },
        )
        assert r.status_code == 201, r.text
        assert "sluice-job-id" not in r.headers  # a partial is no document and no job
        url = r.headers["location"]
        await send_all(uploads, auth_headers, url, piece, [2 * MiB, 4 * MiB])
        h = await head(uploads, auth_headers, url)
        assert h.headers["upload-concat"] == "partial"
        return str(url)

    urls = await asyncio.gather(*[partial(p) for p in pieces])
    concat = "final;" + " ".join(f"http://gateway{u}" for u in urls)
    r = await uploads.post(
        f"{TUS}/",
        headers={
            **auth_headers,
            **V,
            "Upload-Concat": concat,
            "Upload-Metadata": metadata(filename="joined.txt", priority="critical"),
        },
    )
    assert r.status_code == 201, r.text
    assert r.headers["upload-offset"] == r.headers["upload-length"] == str(len(data))
    document_id = r.headers["sluice-document-id"]
    assert await s3_object(upload_services, document_id) == data
    job = await upload_services.db.fetchrow(
        "SELECT status, priority FROM jobs WHERE id = $1::uuid", r.headers["sluice-job-id"]
    )
    assert (job["status"], job["priority"]) == ("queued", "critical")
    h = await head(uploads, auth_headers, r.headers["location"])
    assert h.headers["upload-concat"] == concat
    documents = await upload_services.db.fetchval(
        "SELECT count(*) FROM documents WHERE owner_id = $1", user
    )
    assert documents == 1  # the partials never became documents
    for url in urls:  # ...and are gone once used
        assert (await head(uploads, auth_headers, url)).status_code == 404
        assert await tus_objects(upload_services, upload_id(url)) == []


async def test_equal_partials_are_copied_whole(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str], upload_services: Services
) -> None:
    """tus-js-client's split (equal partials, the last takes the rest): one UploadPartCopy
    per partial, the session's part size being the partials' own."""
    sizes = [6 * MiB, 6 * MiB, 6 * MiB + 5]
    data = payload(sum(sizes), seed=108)
    urls, at = [], 0
    for size in sizes:
        r = await uploads.post(
            f"{TUS}/", headers={**auth_headers, **V, "Upload-Length": str(size), **PARTIAL}
        )
        urls.append(r.headers["location"])
        await send_all(uploads, auth_headers, urls[-1], data[at : at + size], [4 * MiB])
        at += size
    r = await uploads.post(
        f"{TUS}/",
        headers={
            **auth_headers,
            **V,
            "Upload-Concat": "final;" + " ".join(urls),
            "Upload-Metadata": metadata(filename="whole.txt"),
        },
    )
    assert r.status_code == 201, r.text
    assert await s3_object(upload_services, r.headers["sluice-document-id"]) == data
    session = await upload_services.db.fetchrow(
        "SELECT chunk_size, total_parts, file_size FROM upload_sessions WHERE id = $1::uuid",
        upload_id(r.headers["location"]),
    )
    assert (session["chunk_size"], session["total_parts"]) == (6 * MiB, 4)
    assert session["file_size"] == len(data)


async def test_a_final_upload_needs_finished_partials_of_the_caller(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str], headers_for: Any
) -> None:
    async def partial(headers: dict[str, str], length: int) -> str:
        r = await uploads.post(
            f"{TUS}/",
            headers={**headers, **V, "Upload-Length": str(length), "Upload-Concat": "partial"},
        )
        assert r.status_code == 201, r.text
        return str(r.headers["location"])

    done = await partial(auth_headers, 3)
    assert (await patch(uploads, auth_headers, done, 0, b"abc")).status_code == 204
    unfinished = await partial(auth_headers, 10)
    foreign = await partial(headers_for("someone-else"), 0)
    final = {**auth_headers, **V, "Upload-Metadata": metadata(filename="x.txt")}
    r = await uploads.post(
        f"{TUS}/", headers={**final, "Upload-Concat": f"final;{done} {unfinished}"}
    )
    assert (r.status_code, r.json()["error"]) == (400, "invalid_upload_concat")
    r = await uploads.post(f"{TUS}/", headers={**final, "Upload-Concat": f"final;{done} {foreign}"})
    assert r.status_code == 404
    plain = await created(uploads, auth_headers, 3)
    r = await uploads.post(f"{TUS}/", headers={**final, "Upload-Concat": f"final;{plain}"})
    assert (r.status_code, r.json()["error"]) == (400, "invalid_upload_concat")
    r = await uploads.post(f"{TUS}/", headers={**final, "Upload-Concat": f"final;{done}"})
    assert r.status_code == 201, r.text


async def test_cors_lets_browser_clients_speak_tus(uploads: httpx.AsyncClient) -> None:
    r = await uploads.options(
        f"{TUS}/",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "PATCH",
            "Access-Control-Request-Headers": "authorization,tus-resumable,upload-offset,"
            "upload-length,upload-metadata,upload-checksum,upload-concat,content-type",
        },
    )
    assert r.status_code == 200, r.text
    assert "PATCH" in r.headers["access-control-allow-methods"]
    r = await uploads.options(f"{TUS}/", headers={"Origin": "https://app.example"})
    exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
    assert {
        "location",
        "upload-offset",
        "upload-length",
        "upload-expires",
        "tus-resumable",
        "tus-version",
        "sluice-job-id",
    } <= exposed


async def test_patches_are_part_transfers_for_the_rate_limiter(
    upload_services: Services, auth_headers: dict[str, str]
) -> None:
    settings = msgspec.structs.replace(upload_services.settings, rate_limit_requests_per_minute=3)
    async with app_client(dataclasses.replace(upload_services, settings=settings)) as c:
        url = await created(c, auth_headers, 8)
        for i in range(8):  # eight PATCHes, with a request limit of 3
            r = await patch(c, auth_headers, url, i, b"x")
            assert r.status_code == 204, r.text


async def test_storage_outage_is_503(
    upload_services: Services, auth_headers: dict[str, str]
) -> None:

    async with (
        aioboto3.Session().client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{fx.free_port()}",
            aws_access_key_id="x",
            aws_secret_access_key="y",
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}, connect_timeout=1),
        ) as s3,
        app_client(dataclasses.replace(upload_services, s3=s3, s3_public=s3)) as c,
    ):
        r = await create(c, auth_headers, 10)
        assert (r.status_code, r.json()["error"]) == (503, "storage_unavailable")
        r = await c.post(
            f"{TUS}/",
            headers={**auth_headers, **V, "Upload-Length": "5", "Upload-Concat": "partial"},
        )
        assert (r.status_code, r.json()["error"]) == (503, "storage_unavailable")


async def test_a_stalled_body_is_408_and_keeps_what_arrived(
    upload_services: Services, auth_headers: dict[str, str]
) -> None:
    settings = msgspec.structs.replace(upload_services.settings, upload_body_timeout_seconds=1)
    async with app_client(dataclasses.replace(upload_services, settings=settings)) as c:
        url = await created(c, auth_headers, 10_000)

        async def stalls() -> AsyncIterator[bytes]:
            yield b"s" * 1000
            await asyncio.sleep(3)
            yield b"never read"

        r = await patch(c, auth_headers, url, 0, stalls())
        assert (r.status_code, r.json()["error"]) == (408, "body_timeout")
        assert (await head(c, auth_headers, url)).headers["upload-offset"] == "1000"


async def test_lock_holders_per_process_are_bounded_then_503(
    upload_services: Services, uploads: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    first = await created(uploads, auth_headers, 10)
    second = await created(uploads, auth_headers, 10)
    runtime = TusRuntime(max_patches=1, busy_seconds=0.2)
    ctx = upload_context(upload_services)
    async with runtime.lock(ctx, upload_id(first)):
        try:
            async with runtime.lock(ctx, upload_id(second)):
                raise AssertionError("a second lock holder in a process of one slot")
        except ServiceUnavailable as exc:
            assert exc.code == "uploads_busy" and exc.headers["Retry-After"] == "1"
    async with runtime.lock(ctx, upload_id(second)):  # the slot is back
        pass


async def test_termination_right_after_small_patches_filled_a_part(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str], upload_services: Services
) -> None:
    """The part the last 1 MiB PATCH filled is stored in the background; a DELETE at
    once waits for it, aborts the S3 upload, and leaves no segment behind."""
    data = payload(2 * PART, seed=106)
    url = await created(uploads, auth_headers, len(data))
    uid = upload_id(url)
    for offset in range(0, PART + MiB, MiB):
        r = await patch(uploads, auth_headers, url, offset, data[offset : offset + MiB])
        assert r.status_code == 204, r.text
    row = await upload_services.db.fetchrow(
        "SELECT s3_upload_id, object_key FROM upload_sessions WHERE id = $1::uuid", uid
    )
    r = await uploads.delete(url, headers={**auth_headers, **V})
    assert r.status_code == 204, r.text
    assert row["s3_upload_id"] not in await fx.s3_upload_ids(upload_services, row["object_key"])
    assert await tus_objects(upload_services, uid) == []
    assert (await head(uploads, auth_headers, url)).status_code == 404
