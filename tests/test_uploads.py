"""Resumable uploads through the gateway, against the real Postgres, Redis and S3."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from arq.constants import job_key_prefix
from starlette.requests import Request as StarletteRequest

from app.core.errors import BadRequest
from app.gateway.formstream import FormPart, iter_form
from app.gateway.services import Services
from app.jobs.events import decode_event, stream_key
from app.uploads.model import UploadSessionStatus
from app.uploads.rules import MAX_PARTS, MIN_PART_SIZE, decide_chunk_size
from tests.fixtures_uploads import (
    PART,
    MiB,
    initiate,
    md5_b64,
    payload,
    put_part,
    s3_object,
    s3_upload_ids,
)

BASE = "/api/v1/documents/upload"


def test_chunk_size_rules() -> None:
    assert decide_chunk_size(10, 8 * MiB) == (8 * MiB, 1)
    assert decide_chunk_size(17 * MiB, 8 * MiB) == (8 * MiB, 3)
    assert decide_chunk_size(20 * MiB, 1 * MiB) == (MIN_PART_SIZE, 4)  # never below 5 MiB
    size = 100_000 * MiB  # ~98 GiB: 8 MiB parts would need 12,500
    chunk, parts = decide_chunk_size(size, 8 * MiB)
    assert parts <= MAX_PARTS and chunk % MiB == 0 and chunk * parts >= size
    assert (chunk - MiB) * MAX_PARTS < size  # raised no more than needed


async def test_upload_session_statuses_are_the_tables(upload_services: Services) -> None:
    """Every stored status is one the table's CHECK admits; ``lost`` is only reported."""
    check = await upload_services.db.fetchval(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = 'upload_sessions'::regclass AND contype = 'c' "
        "AND pg_get_constraintdef(oid) LIKE '%status%'"
    )
    assert isinstance(check, str)
    stored = set(UploadSessionStatus) - {UploadSessionStatus.LOST}
    assert all(f"'{s}'" in check for s in stored), check
    assert f"'{UploadSessionStatus.LOST}'" not in check


async def test_multipart_happy_path_stores_exact_bytes(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str], upload_services: Services
) -> None:
    data = payload(2 * PART + 12345, seed=1)
    init = await initiate(
        uploads,
        auth_headers,
        len(data),
        filename="Été report ünïcode.txt",
        priority="high",
        processing_options={"chunk_size": 500},
    )
    assert init["chunk_size"] == PART and init["total_parts"] == 3
    assert init["filename"] == "Été report ünïcode.txt"
    upload_id = init["upload_id"]
    # the job exists before any byte is sent
    job = await upload_services.db.fetchrow(
        "SELECT status, priority FROM jobs WHERE id = $1::uuid", init["job_id"]
    )
    assert (job["status"], job["priority"]) == ("awaiting_upload", "high")

    status = (await uploads.get(f"{BASE}/status/{upload_id}", headers=auth_headers)).json()
    assert status["status"] == "initiated" and status["missing_parts"] == [1, 2, 3]

    received = []
    for n, chunk in enumerate([data[:PART], data[PART : 2 * PART], data[2 * PART :]], 1):
        r = await put_part(uploads, auth_headers, upload_id, n, chunk)
        assert r.status_code == 200, r.text
        received.append(r.json())
    assert received[-1]["parts_received"] == 3
    assert received[-1]["bytes_received"] == len(data)
    assert received[-1]["progress"] == 1.0
    assert received[0]["etag"] == hashlib.md5(data[:PART]).hexdigest()

    status = (await uploads.get(f"{BASE}/status/{upload_id}", headers=auth_headers)).json()
    assert status["status"] == "uploading" and status["missing_parts"] == []

    r = await uploads.post(f"{BASE}/complete/{upload_id}", headers=auth_headers)
    assert r.status_code == 200, r.text
    done = r.json()
    assert done == {
        "upload_id": upload_id,
        "job_id": init["job_id"],
        "document_id": init["document_id"],
        "status": "queued",
        "size": len(data),
        "filename": init["filename"],
    }
    assert await s3_object(upload_services, init["document_id"]) == data
    row = await upload_services.db.fetchrow(
        "SELECT d.status AS doc, d.object_key, j.status AS job FROM documents d "
        "JOIN jobs j ON j.document_id = d.id WHERE d.id = $1::uuid",
        init["document_id"],
    )
    assert (row["doc"], row["job"]) == ("stored", "queued")
    assert "report" not in row["object_key"]  # keys never carry the filename
    status = (await uploads.get(f"{BASE}/status/{upload_id}", headers=auth_headers)).json()
    assert status["status"] == "completed" and status["bytes_received"] == len(data)


async def test_every_part_publishes_upload_progress(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str], upload_services: Services
) -> None:
    data = payload(PART + 10, seed=2)
    init = await initiate(uploads, auth_headers, len(data))
    for n, chunk in [(2, data[PART:]), (1, data[:PART])]:
        assert (await put_part(uploads, auth_headers, init["upload_id"], n, chunk)).is_success
    await uploads.post(f"{BASE}/complete/{init['upload_id']}", headers=auth_headers)
    entries = await upload_services.redis.xrange(stream_key(init["job_id"]))
    events = [decode_event(fields[b"e"]) for _, fields in entries]
    assert [e.stage for e in events] == ["upload", "upload", "upload"]
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    assert [e.stage_progress for e in events] == [round(10 / len(data), 4), 1.0, 1.0]
    assert events[0].details["part_number"] == 2 and events[1].details["parts_received"] == 2
    assert [e.status for e in events] == ["awaiting_upload", "awaiting_upload", "queued"]


async def test_parts_out_of_order_and_concurrent(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str], upload_services: Services
) -> None:
    data = payload(3 * PART, seed=3)
    init = await initiate(uploads, auth_headers, len(data))
    chunks = [data[i * PART : (i + 1) * PART] for i in range(3)]
    results = await asyncio.gather(
        *[put_part(uploads, auth_headers, init["upload_id"], n, chunks[n - 1]) for n in (3, 1, 2)]
    )
    assert all(r.status_code == 200 for r in results), [r.text for r in results]
    assert sorted(r.json()["parts_received"] for r in results) == [1, 2, 3]
    # resending a part replaces it
    assert (await put_part(uploads, auth_headers, init["upload_id"], 2, chunks[1])).is_success
    r = await uploads.post(f"{BASE}/complete/{init['upload_id']}", headers=auth_headers)
    assert r.status_code == 200, r.text
    assert await s3_object(upload_services, init["document_id"]) == data


async def test_form_chunk_route_like_the_spec_client(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str], upload_services: Services
) -> None:
    data = payload(PART + 777, seed=4)
    init = await initiate(uploads, auth_headers, len(data), filename="notes.md", content_type="")
    chunks = [data[:PART], data[PART:]]
    for n, chunk in enumerate(chunks, 1):
        r = await uploads.post(
            f"{BASE}/chunk",
            headers=auth_headers,
            data={
                "upload_id": init["upload_id"],
                "part_number": str(n),
                "total_parts": "2",
                "chunk_hash": hashlib.md5(chunk).hexdigest(),
                "is_final_chunk": "true" if n == 2 else "false",
            },
            files={"chunk_file": ("blob", chunk, "application/octet-stream")},
        )
        assert r.status_code == 200, r.text
        assert r.json()["part_number"] == n
    r = await uploads.post(f"{BASE}/complete/{init['upload_id']}", headers=auth_headers)
    assert r.status_code == 200, r.text
    assert await s3_object(upload_services, init["document_id"]) == data


async def test_form_chunk_bad_input(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    data = payload(PART + 1, seed=5)
    init = await initiate(uploads, auth_headers, len(data))

    async def send(fields: dict[str, str], chunk: bytes) -> httpx.Response:
        return await uploads.post(
            f"{BASE}/chunk", headers=auth_headers, data=fields, files={"chunk_file": ("c", chunk)}
        )

    good = {
        "upload_id": init["upload_id"],
        "part_number": "1",
        "total_parts": "2",
        "chunk_hash": hashlib.md5(data[:PART]).hexdigest(),
    }
    r = await send({**good, "total_parts": "3"}, data[:PART])
    assert (r.status_code, r.json()["details"]["field"]) == (400, "total_parts")
    r = await send({**good, "chunk_hash": "0" * 32}, data[:PART])
    assert (r.status_code, r.json()["error"]) == (400, "checksum_mismatch")
    r = await send({k: v for k, v in good.items() if k != "chunk_hash"}, data[:PART])
    assert (r.status_code, r.json()["details"]["field"]) == (422, "chunk_hash")
    r = await uploads.post(
        f"{BASE}/chunk", headers=auth_headers, data=good, files={"note": (None, b"no file here")}
    )
    assert (r.status_code, r.json()["details"]["field"]) == (422, "chunk_file")
    r = await uploads.post(f"{BASE}/chunk", headers=auth_headers, data=good)  # urlencoded
    assert (r.status_code, r.json()["details"]["field"]) == (400, "Content-Type")
    r = await uploads.post(f"{BASE}/chunk", headers=auth_headers, json=good)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_form")
    status = (await uploads.get(f"{BASE}/status/{init['upload_id']}", headers=auth_headers)).json()
    assert status["parts"] == []  # nothing was kept


async def test_bad_parts_are_rejected_and_not_kept(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str], upload_services: Services
) -> None:
    data = payload(PART + 100, seed=6)
    init = await initiate(uploads, auth_headers, len(data))
    uid = init["upload_id"]
    first = data[:PART]

    r = await put_part(uploads, auth_headers, uid, 1, first, md5=md5_b64(b"other bytes"))
    assert (r.status_code, r.json()["error"]) == (400, "checksum_mismatch")
    r = await put_part(uploads, auth_headers, uid, 1, first[:-1])
    assert (r.status_code, r.json()["details"]["field"]) == (400, "Content-Length")
    r = await put_part(uploads, auth_headers, uid, 2, data[PART:] + b"x")
    assert r.status_code == 400 and r.json()["error"] == "invalid_part_size"
    for bad in ("0", "3", "-1", "two"):
        r = await put_part(uploads, auth_headers, uid, 1, first)
        r = await uploads.put(
            f"{BASE}/{uid}/parts/{bad}",
            content=b"x",
            headers={**auth_headers, "Content-MD5": md5_b64(b"x")},
        )
        assert (r.status_code, r.json()["details"]["field"]) == (400, "part_number"), bad
    r = await uploads.put(f"{BASE}/{uid}/parts/2", content=data[PART:], headers=auth_headers)
    assert (r.status_code, r.json()["error"]) == (400, "checksum_required")
    r = await uploads.put(
        f"{BASE}/{uid}/parts/2", content=data[PART:], headers={**auth_headers, "X-Chunk-Hash": "zz"}
    )
    assert (r.status_code, r.json()["error"]) == (400, "invalid_checksum")
    # X-Chunk-Hash (hex) works like Content-MD5
    r = await uploads.put(
        f"{BASE}/{uid}/parts/2",
        content=data[PART:],
        headers={**auth_headers, "X-Chunk-Hash": hashlib.md5(data[PART:]).hexdigest()},
    )
    assert r.status_code == 200, r.text
    status = (await uploads.get(f"{BASE}/status/{uid}", headers=auth_headers)).json()
    assert [p["part_number"] for p in status["parts"]] == [1, 2]


async def test_initiate_rejects_bad_files(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    async def post(**body: Any) -> httpx.Response:
        full = {"filename": "a.pdf", "file_size": 100, "content_type": "application/pdf", **body}
        return await uploads.post(f"{BASE}/initiate", json=full, headers=auth_headers)

    r = await post(file_size=65 * MiB)
    assert r.status_code == 413
    assert r.json()["details"]["limit"] == 64 * MiB and r.json()["details"]["limit_mb"] == 64
    for body, field in [
        ({"filename": "virus.exe", "content_type": ""}, "filename"),
        ({"filename": "noext"}, "filename"),
        ({"content_type": "image/png"}, "content_type"),
        ({"document_type": "csv"}, "document_type"),
    ]:
        r = await post(**body)
        assert r.status_code == 415, body
        assert r.json()["details"]["field"] == field
    r = await post(file_size=0)
    assert (r.status_code, r.json()["details"]["field"]) == (400, "file_size")
    r = await post(priority="urgent")
    assert (r.status_code, r.json()["details"]["field"]) == (422, "priority")
    r = await post(surprise=1)
    assert r.status_code == 422
    r = await post(filename="../../etc/passwd\x00.pdf")
    assert (r.status_code, r.json()["details"]["field"]) == (400, "filename")
    r = await post(filename="../../../etc/évil\n.pdf")  # control characters: refused
    assert (r.status_code, r.json()["error"]) == (400, "invalid_filename")
    r = await post(filename="../../../etc/évil.pdf")
    assert r.status_code == 201  # kept for display; the key is the document id
    assert r.json()["filename"] == "../../../etc/évil.pdf"


async def test_missing_parts_block_complete(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    data = payload(2 * PART + 5, seed=7)
    init = await initiate(uploads, auth_headers, len(data))
    await put_part(uploads, auth_headers, init["upload_id"], 2, data[PART : 2 * PART])
    r = await uploads.post(f"{BASE}/complete/{init['upload_id']}", headers=auth_headers)
    assert r.status_code == 409
    assert r.json()["error"] == "missing_parts"
    assert r.json()["details"]["missing_parts"] == [1, 3]


async def test_double_and_racing_complete_enqueue_once(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str], upload_services: Services
) -> None:
    data = payload(PART + 3, seed=8)
    init = await initiate(uploads, auth_headers, len(data), priority="critical")
    for n, chunk in enumerate([data[:PART], data[PART:]], 1):
        assert (await put_part(uploads, auth_headers, init["upload_id"], n, chunk)).is_success
    url = f"{BASE}/complete/{init['upload_id']}"
    results = await asyncio.gather(*[uploads.post(url, headers=auth_headers) for _ in range(4)])
    assert [r.status_code for r in results] == [200] * 4, [r.text for r in results]
    assert len({r.text for r in results}) == 1
    again = await uploads.post(url, headers=auth_headers)
    assert again.json() == results[0].json()
    entries = await upload_services.redis.xrange(stream_key(init["job_id"]))
    queued = [e for e in (decode_event(f[b"e"]) for _, f in entries) if e.status == "queued"]
    assert len(queued) == 1  # one transition, one event
    # ARQ holds exactly one job under the Sluice job id
    keys = await upload_services.redis.keys(job_key_prefix + init["job_id"])
    assert len(keys) == 1
    row = await upload_services.db.fetchrow(
        "SELECT enqueued_at, completed_at FROM upload_sessions WHERE id = $1::uuid",
        init["upload_id"],
    )
    assert row["enqueued_at"] is not None and row["completed_at"] is not None
    # parts and cancel after completion are 409
    r = await put_part(uploads, auth_headers, init["upload_id"], 1, data[:PART])
    assert (r.status_code, r.json()["error"]) == (409, "upload_completed")
    r = await uploads.delete(f"{BASE}/cancel/{init['upload_id']}", headers=auth_headers)
    assert (r.status_code, r.json()["error"]) == (409, "upload_completed")


async def test_cancel_aborts_s3_upload_and_job(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str], upload_services: Services
) -> None:
    data = payload(PART + 9, seed=9)
    init = await initiate(uploads, auth_headers, len(data))
    uid = init["upload_id"]
    await put_part(uploads, auth_headers, uid, 1, data[:PART])
    key = f"documents/{init['document_id']}/original"
    s3_id = await upload_services.db.fetchval(
        "SELECT s3_upload_id FROM upload_sessions WHERE id = $1::uuid", uid
    )
    assert s3_id in await s3_upload_ids(upload_services, key)

    r = await uploads.delete(f"{BASE}/cancel/{uid}", headers=auth_headers)
    assert r.status_code == 200, r.text
    assert r.json() == {"upload_id": uid, "job_id": init["job_id"], "status": "cancelled"}
    assert s3_id not in await s3_upload_ids(upload_services, key)
    job = await upload_services.db.fetchval(
        "SELECT status FROM jobs WHERE id = $1::uuid", init["job_id"]
    )
    assert job == "cancelled"
    again = await uploads.delete(f"{BASE}/cancel/{uid}", headers=auth_headers)
    assert again.status_code == 200 and again.json() == r.json()  # idempotent
    r = await put_part(uploads, auth_headers, uid, 2, data[PART:])
    assert (r.status_code, r.json()["error"]) == (409, "upload_cancelled")
    r = await uploads.post(f"{BASE}/complete/{uid}", headers=auth_headers)
    assert (r.status_code, r.json()["error"]) == (409, "upload_cancelled")
    status = (await uploads.get(f"{BASE}/status/{uid}", headers=auth_headers)).json()
    assert status["status"] == "cancelled"


async def test_other_users_and_unknown_uploads_are_404(
    uploads: httpx.AsyncClient,
    auth_headers: dict[str, str],
    headers_for: Callable[[str], dict[str, str]],
) -> None:
    data = payload(PART + 1, seed=10)
    init = await initiate(uploads, auth_headers, len(data))
    uid = init["upload_id"]
    mallory = headers_for("mallory-" + uid[:8])
    requests = [
        ("GET", f"{BASE}/status/{uid}"),
        ("POST", f"{BASE}/complete/{uid}"),
        ("DELETE", f"{BASE}/cancel/{uid}"),
        ("POST", f"{BASE}/{uid}/parts/1/presign"),
    ]
    for method, url in requests:
        for headers, target in [
            (mallory, url),
            (auth_headers, url.replace(uid, "nope")),
            (auth_headers, url.replace(uid, "0" * 8 + uid[8:])),
        ]:
            r = await uploads.request(method, target, headers=headers)
            assert r.status_code == 404, (method, target, r.text)
            assert r.json()["error"] == "upload_not_found"
    r = await put_part(uploads, mallory, uid, 1, data[:PART])
    assert r.status_code == 404
    active = (await uploads.get(f"{BASE}/active", headers=mallory)).json()
    assert active["items"] == []
    # the owner's upload is untouched
    status = (await uploads.get(f"{BASE}/status/{uid}", headers=auth_headers)).json()
    assert status["status"] == "initiated" and status["parts"] == []


async def test_active_lists_unfinished_uploads_newest_first(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    ids = [(await initiate(uploads, auth_headers, 1000 + i))["upload_id"] for i in range(5)]
    await uploads.delete(f"{BASE}/cancel/{ids[1]}", headers=auth_headers)
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = (await uploads.get(f"{BASE}/active", params=params, headers=auth_headers)).json()
        seen += [item["upload_id"] for item in page["items"]]
        cursor = page.get("next_cursor")
        if not cursor:
            break
    assert seen == [ids[4], ids[3], ids[2], ids[0]]
    r = await uploads.get(f"{BASE}/active", params={"cursor": "garbage!"}, headers=auth_headers)
    assert (r.status_code, r.json()["details"]["field"]) == (400, "cursor")


async def test_simple_upload_streams_and_enqueues(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str], upload_services: Services
) -> None:
    data = b'{"title": "hello", "body": "' + b"x" * 2000 + b'"}'
    r = await uploads.post(
        f"{BASE}/simple",
        headers=auth_headers,
        files={"file": ("data.json", data, "application/json")},
        data={"priority": "low", "processing_options": '{"chunk_size": 64}'},
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["status"] == "queued" and body["size"] == len(data)
    assert await s3_object(upload_services, body["document_id"]) == data
    row = await upload_services.db.fetchrow(
        "SELECT j.priority, j.status, d.processing_options, d.document_type FROM jobs j "
        "JOIN documents d ON d.id = j.document_id WHERE j.id = $1::uuid",
        body["job_id"],
    )
    assert dict(row) == {
        "priority": "low",
        "status": "queued",
        "processing_options": {"chunk_size": 64},
        "document_type": "json",
    }


async def test_simple_upload_of_several_parts(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str], upload_services: Services
) -> None:
    data = payload(PART + 4321, seed=11)  # above one part, below the 6 MiB threshold
    r = await uploads.post(
        f"{BASE}/simple", headers=auth_headers, files={"file": ("big.csv", data, "text/csv")}
    )
    assert r.status_code == 201, r.text
    assert await s3_object(upload_services, r.json()["document_id"]) == data


async def test_simple_upload_rejections(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str], upload_services: Services
) -> None:
    r = await uploads.post(
        f"{BASE}/simple",
        headers=auth_headers,
        files={"file": ("big.txt", payload(6 * MiB + 1), "text/plain")},
    )
    assert r.status_code == 413
    assert r.json()["details"]["limit"] == 6 * MiB
    r = await uploads.post(
        f"{BASE}/simple",
        headers=auth_headers,
        files={"file": ("x.exe", b"MZ", "application/octet-stream")},
    )
    assert (r.status_code, r.json()["error"]) == (415, "unsupported_file_type")
    r = await uploads.post(
        f"{BASE}/simple",
        headers=auth_headers,
        files={"file": ("x.txt", b"hi", "text/plain")},
        data={"document_type": "pdf"},
    )
    assert r.status_code == 415
    r = await uploads.post(
        f"{BASE}/simple",
        headers=auth_headers,
        files={"file": ("x.txt", b"hi", "text/plain")},
        data={"processing_options": "[1, 2"},
    )
    assert (r.status_code, r.json()["details"]["field"]) == (400, "processing_options")
    r = await uploads.post(f"{BASE}/simple", headers=auth_headers, data={"priority": "low"})
    assert r.status_code in (400, 422)
    count = await upload_services.db.fetchval(
        "SELECT count(*) FROM documents WHERE owner_id = (SELECT $1::text)", "none-will-match"
    )
    assert count == 0


async def test_presigned_part_then_complete_verifies_with_listparts(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str], upload_services: Services
) -> None:
    data = payload(PART + 50, seed=12)
    init = await initiate(uploads, auth_headers, len(data))
    uid = init["upload_id"]
    r = await uploads.post(f"{BASE}/{uid}/parts/1/presign", headers=auth_headers)
    assert r.status_code == 200, r.text
    signed = r.json()
    assert signed["method"] == "PUT" and signed["size"] == PART
    assert "X-Amz-Signature" in signed["url"]
    async with httpx.AsyncClient() as raw:
        put = await raw.put(signed["url"], content=data[:PART])
        assert put.status_code == 200, put.text
    # part 2 through the gateway
    assert (await put_part(uploads, auth_headers, uid, 2, data[PART:])).is_success
    status = (await uploads.get(f"{BASE}/status/{uid}", headers=auth_headers)).json()
    assert status["missing_parts"] == []  # the presigned part was found via ListParts
    r = await uploads.post(f"{BASE}/complete/{uid}", headers=auth_headers)
    assert r.status_code == 200, r.text
    assert await s3_object(upload_services, init["document_id"]) == data
    r = await uploads.post(f"{BASE}/{uid}/parts/1/presign", headers=auth_headers)
    assert r.status_code == 409
    r = await uploads.post(f"{BASE}/{uid}/parts/9/presign", headers=auth_headers)
    assert r.status_code == 409  # completed beats a bad number


async def test_presign_validates_part_number(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    init = await initiate(uploads, auth_headers, 100)
    r = await uploads.post(f"{BASE}/{init['upload_id']}/parts/2/presign", headers=auth_headers)
    assert (r.status_code, r.json()["details"]["field"]) == (400, "part_number")
    r = await uploads.post(
        f"{BASE}/{init['upload_id']}/parts/1/presign",
        headers=auth_headers,
        json={"content_md5": hashlib.md5(b"x").hexdigest()},
    )
    assert r.status_code == 200 and "Content-MD5" in r.json()["headers"]


async def test_cors_preflight_from_an_allowed_origin(uploads: httpx.AsyncClient) -> None:
    r = await uploads.options(
        f"{BASE}/initiate",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in r.headers["access-control-allow-methods"]
    r = await uploads.options(
        f"{BASE}/initiate",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert r.status_code == 400
    assert "access-control-allow-origin" not in r.headers


async def test_openapi_lists_upload_routes(uploads: httpx.AsyncClient) -> None:
    spec = (await uploads.get("/openapi.json")).json()
    for path in (
        "/api/v1/documents/upload/initiate",
        "/api/v1/documents/upload/chunk",
        "/api/v1/documents/upload/complete/{upload_id}",
        "/api/v1/documents/upload/{upload_id}/parts/{part_number}",
        "/api/v1/documents/upload/status/{upload_id}",
        "/api/v1/documents/upload/cancel/{upload_id}",
        "/api/v1/documents/upload/active",
        "/api/v1/documents/upload/simple",
    ):
        assert path in spec["paths"], path


async def _form_events(body: bytes, content_type: str, piece: int) -> list[Any]:
    chunks = [body[i : i + piece] for i in range(0, len(body), piece)]

    async def receive() -> dict[str, Any]:
        data = chunks.pop(0) if chunks else b""
        return {"type": "http.request", "body": data, "more_body": bool(chunks)}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [(b"content-type", content_type.encode())],
    }
    return [e async for e in iter_form(StarletteRequest(scope, receive), limit=len(body))]


async def test_streaming_form_reader_handles_any_chunking() -> None:
    blob = payload(70_000, seed=13) + b"\r\n--not-the-boundary\r\n"
    request = httpx.Request(
        "POST",
        "http://x/",
        data={"upload_id": "abc", "note": 'quote " and ünï'},
        files={"chunk_file": ('we"ird ñame.txt', blob, "text/plain")},
    )
    body = request.read()
    for piece in (1, 7, 4096, len(body)):
        events = await _form_events(body, request.headers["content-type"], piece)
        parts: dict[str, Any] = {}
        current = None
        for e in events:
            if isinstance(e, FormPart):
                current = e
                parts[e.name] = [e, b""]
            elif isinstance(e, bytes):
                parts[current.name][1] += e
        assert parts["upload_id"][1] == b"abc"
        assert parts["note"][1].decode() == 'quote " and ünï'
        file_part, data = parts["chunk_file"]
        assert data == blob, piece
        assert file_part.content_type == "text/plain"
        assert file_part.filename is not None and "ñame.txt" in file_part.filename
    bad = body[: len(body) // 2]
    with pytest.raises(BadRequest):
        await _form_events(bad, request.headers["content-type"], 100)


async def test_upload_metrics_are_exported(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    init = await initiate(uploads, auth_headers, 1234)
    assert (await put_part(uploads, auth_headers, init["upload_id"], 1, payload(1234))).is_success
    text = (await uploads.get("/metrics")).text
    assert 'sluice_upload_parts_total{route="put"}' in text
    assert "sluice_upload_bytes_total" in text
    assert 'sluice_uploads_total{event="initiated"}' in text
    assert "sluice_upload_part_seconds_bucket" in text
