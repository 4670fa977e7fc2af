"""tus uploads under failure: a gateway killed mid-PATCH, a client gone mid-PATCH,
and the per-upload lock held across two gateway processes.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from botocore.exceptions import ClientError

from app.gateway.services import Services
from tests.fixtures_uploads import PART, MiB, payload, s3_object, wait_for

TUS = "/api/v1/tus"
V = {"Tus-Resumable": "1.0.0"}
OCTETS = "application/offset+octet-stream"
NAMED = "filename YS50eHQ="  # a.txt


async def _create(c: httpx.AsyncClient, headers: dict[str, str], length: int) -> str:
    r = await c.post(
        f"{TUS}/",
        headers={
            **headers,
            **V,
            "Upload-Length": str(length),
            "Upload-Metadata": "filename YS50eHQ=",
        },
    )
    assert r.status_code == 201, r.text
    return str(r.headers["location"])


def _patch_headers(headers: dict[str, str], offset: int) -> dict[str, str]:
    return {**headers, **V, "Upload-Offset": str(offset), "Content-Type": OCTETS}


async def _offset(svc: Services, url: str) -> int:
    value = await svc.db.fetchval(
        "SELECT upload_offset FROM tus_uploads WHERE id = $1::uuid", url.rsplit("/", 1)[1]
    )
    return int(value)


async def _locked(svc: Services, url: str) -> bool:
    """Whether some connection holds the upload's PATCH lock (its advisory lock)."""
    return bool(
        await svc.db.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND ((classid::bigint << 32) | objid::bigint) = hashtextextended($1, 0))",
            f"sluice:tus:{url.rsplit('/', 1)[1]}",
        )
    )


async def test_gateway_killed_mid_patch_then_head_and_resume(
    gateway_factory: Callable[..., Any], auth_headers: dict[str, str], upload_services: Services
) -> None:
    data = payload(3 * PART + 4567, seed=201)
    gw = gateway_factory()
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
        url = await _create(c, auth_headers, len(data))
        r = await c.patch(url, headers=_patch_headers(auth_headers, 0), content=data[:MiB])
        assert r.status_code == 204, r.text  # an incomplete part, kept in S3

        killed = asyncio.Event()

        async def slow() -> AsyncIterator[bytes]:
            yield data[MiB : 7 * MiB]  # fills part 1 (its first MiB comes back from S3)
            await killed.wait()  # the gateway dies while this PATCH is open
            yield data[7 * MiB :]

        in_flight = asyncio.create_task(
            c.patch(url, headers=_patch_headers(auth_headers, MiB), content=slow())
        )

        async def part_one_committed() -> bool:
            return await _offset(upload_services, url) == PART

        await wait_for(part_one_committed, timeout=30)
        gw.kill()  # SIGKILL: no graceful shutdown, 2 MiB of part 2 only in its memory
        killed.set()
        try:
            await asyncio.wait_for(in_flight, 10)
            raise AssertionError("the in-flight PATCH should have failed")
        except httpx.TransportError:
            pass
    gw2 = gateway_factory(port=gw.port)
    async with httpx.AsyncClient(base_url=gw2.url, timeout=30) as c:
        r = await c.head(url, headers={**auth_headers, **V})
        assert r.status_code == 200, r.text
        offset = int(r.headers["upload-offset"])
        assert offset == PART  # every committed byte, nothing that was not
        r = await c.patch(url, headers=_patch_headers(auth_headers, offset), content=data[offset:])
        assert r.status_code == 204, r.text
    stored = await s3_object(upload_services, r.headers["sluice-document-id"])
    assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(data).hexdigest()


async def test_a_client_gone_mid_patch_keeps_what_arrived(
    gateway_factory: Callable[..., Any], auth_headers: dict[str, str], upload_services: Services
) -> None:
    data = payload(PART + 999, seed=202)
    gw = gateway_factory()
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
        url = await _create(c, auth_headers, len(data))
    sent = MiB + 5
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    head = "".join(
        f"{k}: {v}\r\n"
        for k, v in {
            **_patch_headers(auth_headers, 0),
            "Host": "127.0.0.1",
            "Content-Length": str(len(data)),
        }.items()
    )
    writer.write(f"PATCH {url} HTTP/1.1\r\n{head}\r\n".encode() + data[:sent])
    await writer.drain()
    await asyncio.sleep(1.0)  # the gateway reads what was sent...
    writer.close()  # ...then the client is gone
    await writer.wait_closed()
    del reader

    async def kept() -> bool:
        return await _offset(upload_services, url) == sent

    await wait_for(kept, timeout=20)
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
        r = await c.head(url, headers={**auth_headers, **V})
        assert r.headers["upload-offset"] == str(sent)
        r = await c.patch(url, headers=_patch_headers(auth_headers, sent), content=data[sent:])
        assert r.status_code == 204, r.text
    assert await s3_object(upload_services, r.headers["sluice-document-id"]) == data


async def test_the_patch_lock_holds_across_gateway_processes(
    gateway_factory: Callable[..., Any], auth_headers: dict[str, str], upload_services: Services
) -> None:
    data = payload(PART + 1, seed=203)
    one, two = gateway_factory(), gateway_factory()
    release = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield data[:MiB]
        await release.wait()
        yield data[MiB:]

    async with (
        httpx.AsyncClient(base_url=one.url, timeout=30) as c1,
        httpx.AsyncClient(base_url=two.url, timeout=30) as c2,
    ):
        url = await _create(c1, auth_headers, len(data))
        first = asyncio.create_task(
            c1.patch(url, headers=_patch_headers(auth_headers, 0), content=slow())
        )

        async def first_holds_the_lock() -> bool:
            return await _locked(upload_services, url)

        await wait_for(first_holds_the_lock, timeout=30)
        for offset, body in ((0, data), (1, b"x")):  # a retry, a second tab: never interleaved
            r = await c2.patch(url, headers=_patch_headers(auth_headers, offset), content=body)
            assert (r.status_code, r.json()["error"]) == (423, "upload_locked"), r.text
        release.set()
        r = await first
        assert r.status_code == 204, r.text
    assert await s3_object(upload_services, r.headers["sluice-document-id"]) == data


async def _durable(svc: Services, url: str) -> int:
    """How many bytes from the start S3 holds for the upload: the parts stored in its
    multipart upload and the incomplete-part segments its row lists (as S3 has them)."""
    uid, bucket = url.rsplit("/", 1)[1], svc.settings.minio_bucket_name
    row = await svc.db.fetchrow(
        "SELECT t.pending_starts, t.upload_offset, s.object_key, s.s3_upload_id "
        "FROM tus_uploads t JOIN upload_sessions s ON s.id = t.session_id WHERE t.id = $1::uuid",
        uid,
    )
    spans: list[tuple[int, int]] = []
    for start in row["pending_starts"]:
        try:
            head = await svc.s3.head_object(Bucket=bucket, Key=f"tus/{uid}/pending/{start:020d}")
        except ClientError:  # folded meanwhile: its part is stored (listed below)
            continue
        spans.append((start, start + int(head["ContentLength"])))
    listed = await svc.s3.list_parts(  # after the segments: a part folded meanwhile shows
        Bucket=bucket, Key=row["object_key"], UploadId=row["s3_upload_id"]
    )
    for p in listed.get("Parts", []):
        spans.append(((p["PartNumber"] - 1) * PART, (p["PartNumber"] - 1) * PART + p["Size"]))
    covered = 0
    for start, end in sorted(spans):
        if start <= covered:
            covered = max(covered, end)
    return covered


async def _tus_objects(svc: Services, url: str) -> list[str]:
    resp = await svc.s3.list_objects_v2(
        Bucket=svc.settings.minio_bucket_name, Prefix=f"tus/{url.rsplit('/', 1)[1]}/"
    )
    return [str(o["Key"]) for o in resp.get("Contents", [])]


async def test_gateway_killed_right_after_a_small_patch_filled_a_part(
    gateway_factory: Callable[..., Any], auth_headers: dict[str, str], upload_services: Services
) -> None:
    """1 MiB PATCHes: the one that fills a part answers before the part is stored (its
    MiB is kept as a segment, the part is stored in the background).  A gateway killed
    right after that answer loses nothing: every byte counted is in S3 at every step,
    and a new gateway stores the part from the segments and completes the upload."""
    data = payload(2 * PART + 4321, seed=204)
    gw = gateway_factory()
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
        url = await _create(c, auth_headers, len(data))
        for offset in range(0, PART, MiB):
            r = await c.patch(
                url, headers=_patch_headers(auth_headers, offset), content=data[offset:][:MiB]
            )
            assert r.status_code == 204, r.text
            assert r.headers["upload-offset"] == str(offset + MiB)
        gw.kill()  # SIGKILL right after the 204: part 1 is most likely not stored yet
    assert await _offset(upload_services, url) == PART
    assert await _durable(upload_services, url) >= PART
    gw2 = gateway_factory(port=gw.port)
    async with httpx.AsyncClient(base_url=gw2.url, timeout=30) as c:
        r = await c.head(url, headers={**auth_headers, **V})
        assert r.headers["upload-offset"] == str(PART)
        for offset in range(PART, len(data), MiB):
            r = await c.patch(
                url, headers=_patch_headers(auth_headers, offset), content=data[offset:][:MiB]
            )
            assert r.status_code == 204, r.text
            if offset + MiB < len(data):
                assert await _durable(upload_services, url) >= offset + MiB
    stored = await s3_object(upload_services, r.headers["sluice-document-id"])
    assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(data).hexdigest()
    assert await _tus_objects(upload_services, url) == []


async def test_small_patches_alternating_between_two_gateways(
    gateway_factory: Callable[..., Any], auth_headers: dict[str, str], upload_services: Services
) -> None:
    """A load balancer sends every other PATCH to another replica: a part left to be
    stored in the background by one is stored by the other if it is still listed;
    either way the object is the file and no segment is left behind."""
    data = payload(3 * PART + 777, seed=205)
    one, two = gateway_factory(), gateway_factory()
    async with (
        httpx.AsyncClient(base_url=one.url, timeout=30) as c1,
        httpx.AsyncClient(base_url=two.url, timeout=30) as c2,
    ):
        url = await _create(c1, auth_headers, len(data))
        size = MiB + 1000  # segments of every length, parts filled by either replica
        for i, offset in enumerate(range(0, len(data), size)):
            c = (c1, c2)[i % 2]
            r = await c.patch(
                url, headers=_patch_headers(auth_headers, offset), content=data[offset:][:size]
            )
            assert r.status_code == 204, r.text
            assert r.headers["upload-offset"] == str(min(offset + size, len(data)))
    stored = await s3_object(upload_services, r.headers["sluice-document-id"])
    assert hashlib.sha256(stored).hexdigest() == hashlib.sha256(data).hexdigest()
    assert await _tus_objects(upload_services, url) == []
