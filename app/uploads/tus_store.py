"""The S3 side of tus uploads: incomplete-part segments, partial uploads, concatenation.

Object layout, everything of one upload under ``tus/<upload id>/`` (deleted as a
prefix when the upload finishes, is terminated or expires):

* ``pending/<start offset>``: one *incomplete-part segment* per PATCH that ended
  between part boundaries, and a small PATCH's share of a part it filled while
  that part is stored in the background (see :mod:`app.uploads.tus_writer`);
* ``partial``: a partial upload's object (``Upload-Concat: partial``), built by
  its own multipart upload and completed when its last byte arrives.

:func:`copy_parts` builds a final upload server-side from completed partial
uploads with S3 ``UploadPartCopy`` (as tusd's s3store does).  Every operation
maps S3 failures through :func:`~app.core.storage.storage_errors` (503
``storage_unavailable``); deletions are best effort.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
from collections.abc import Sequence
from typing import Any

from botocore.exceptions import ClientError

from app.core.errors import Conflict
from app.core.logging import get_logger
from app.core.storage import S3Client, client_error_code, storage_errors

log = get_logger(__name__)

COPY_PARALLELISM = 4
MAX_PART_SIZE = 5 * 1024 * 1024 * 1024
"""S3's largest part (and largest ``UploadPartCopy`` range)."""
_MD5_IN_THREAD = 1024 * 1024


def segment_key(upload_id: str, start: int) -> str:
    return f"tus/{upload_id}/pending/{start:020d}"


def partial_key(upload_id: str) -> str:
    return f"tus/{upload_id}/partial"


def _md5(body: io.BytesIO) -> bytes:
    with body.getbuffer() as view:
        return hashlib.md5(view, usedforsecurity=False).digest()


def size_of(body: io.BytesIO) -> int:
    with body.getbuffer() as view:
        return view.nbytes


async def md5_of(body: io.BytesIO) -> bytes:
    """The body's MD5; big bodies are hashed off the event loop (hashlib drops the GIL)."""
    if size_of(body) >= _MD5_IN_THREAD:
        return await asyncio.to_thread(_md5, body)
    return _md5(body)


class TusStorage:
    """The S3 operations of tus uploads, each mapped by :func:`storage_errors` (503)."""

    def __init__(self, s3: S3Client, bucket: str) -> None:
        self.s3 = s3
        self.bucket = bucket

    async def put_object(self, key: str, data: bytes) -> None:
        if len(data) >= _MD5_IN_THREAD:
            digest = await asyncio.to_thread(hashlib.md5, data, usedforsecurity=False)
        else:
            digest = hashlib.md5(data, usedforsecurity=False)
        md5 = base64.b64encode(digest.digest()).decode()
        async with storage_errors("put_object"):
            await self.s3.put_object(Bucket=self.bucket, Key=key, Body=data, ContentMD5=md5)

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of an object (exactly that many, or 503)."""
        async with storage_errors("get_object"):
            obj = await self.s3.get_object(
                Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end - 1}"
            )
            async with obj["Body"] as stream:
                data: bytes = await stream.read()
        if len(data) != end - start:
            raise Conflict(
                f"stored object {key} is shorter than expected",
                code="incomplete_part_lost",
                details={"expected": end - start, "got": len(data)},
            )
        return data

    async def delete_keys(self, keys: Sequence[str]) -> None:
        """Delete objects, best effort (a leftover is removed with its upload's prefix).

        One ``DeleteObjects`` per 1,000 keys; a server that refuses it (some S3
        implementations want a Content-MD5 that botocore no longer sends) gets
        one ``DeleteObject`` per key instead.
        """
        for i in range(0, len(keys), 1000):
            batch = keys[i : i + 1000]
            try:
                try:
                    await self.s3.delete_objects(
                        Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch]}
                    )
                except ClientError:
                    for key in batch:
                        await self.s3.delete_object(Bucket=self.bucket, Key=key)
            except Exception:
                log.warning("tus_delete_failed", keys=len(batch), exc_info=True)

    async def delete_prefix(self, prefix: str) -> None:
        """Delete every object under ``prefix`` (an upload's ``tus/<id>/``), best effort."""
        try:
            keys: list[str] = []
            paginator = self.s3.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                keys += [str(o["Key"]) for o in page.get("Contents", [])]
        except Exception:
            log.warning("tus_list_failed", prefix=prefix, exc_info=True)
            return
        await self.delete_keys(keys)

    async def create_multipart(self, key: str) -> str:
        async with storage_errors("create_multipart_upload"):
            created = await self.s3.create_multipart_upload(
                Bucket=self.bucket, Key=key, ContentType="application/octet-stream"
            )
        return str(created["UploadId"])

    async def upload_part(
        self, key: str, upload_id: str, number: int, body: io.BytesIO, md5: bytes
    ) -> str:
        size = size_of(body)
        async with storage_errors("upload_part"):
            resp = await self.s3.upload_part(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                Body=body,
                ContentMD5=base64.b64encode(md5).decode(),
                ContentLength=size,
            )
        return str(resp["ETag"])

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        async with storage_errors("abort_multipart_upload"):
            try:
                await self.s3.abort_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id
                )
            except ClientError as exc:
                if client_error_code(exc) not in {"NoSuchUpload", "404"}:
                    raise

    async def complete_multipart(self, key: str, upload_id: str, size: int) -> None:
        """Complete a partial upload's object from S3's own part list; idempotent."""
        async with storage_errors("complete_multipart_upload"):
            try:
                parts: list[dict[str, Any]] = []
                paginator = self.s3.get_paginator("list_parts")
                async for page in paginator.paginate(
                    Bucket=self.bucket, Key=key, UploadId=upload_id
                ):
                    parts += [
                        {"ETag": p["ETag"], "PartNumber": p["PartNumber"]}
                        for p in page.get("Parts", [])
                    ]
                await self.s3.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": sorted(parts, key=lambda p: p["PartNumber"])},
                )
            except ClientError as exc:
                if client_error_code(exc) not in {"NoSuchUpload", "404"}:
                    raise
                # completed by an earlier attempt that crashed before recording it?
            head = await self.s3.head_object(Bucket=self.bucket, Key=key)
        if int(head["ContentLength"]) != size:
            raise Conflict(
                f"stored partial upload has {head['ContentLength']} bytes, expected {size}",
                code="size_mismatch",
                details={"size": int(head["ContentLength"]), "upload_length": size},
            )

    async def copy_part(
        self, dest: tuple[str, str], number: int, source: str, start: int, end: int
    ) -> None:
        """``UploadPartCopy`` of bytes ``[start, end)`` of ``source`` as part ``number``."""
        key, upload_id = dest
        async with storage_errors("upload_part_copy"):
            await self.s3.upload_part_copy(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=number,
                CopySource={"Bucket": self.bucket, "Key": source},
                CopySourceRange=f"bytes={start}-{end - 1}",
            )


async def copy_parts(
    storage: TusStorage,
    dest: tuple[str, str],
    *,
    chunk: int,
    sources: Sequence[tuple[str, int]],
) -> None:
    """Build a multipart upload ``dest`` (key, upload id) from ``sources`` in order.

    Every part has ``chunk`` bytes but the last, as the session expects.  A part
    inside one source is copied by S3 (``UploadPartCopy``); a part that spans two
    sources (their sizes are not multiples of ``chunk``) is read and sent again,
    at most one part per boundary, through :meth:`TusStorage.upload_part`.
    """
    spans: list[tuple[str, int, int]] = []  # (key, start, end) within the whole
    position = 0
    for key, size in sources:
        if size:
            spans.append((key, position, position + size))
            position += size
    total_parts = -(-position // chunk)
    gate = asyncio.Semaphore(COPY_PARALLELISM)

    async def build(number: int) -> None:
        start, end = (number - 1) * chunk, min(number * chunk, position)
        pieces = [
            (k, max(s, start) - s, min(e, end) - s) for k, s, e in spans if s < end and e > start
        ]
        async with gate:
            if len(pieces) == 1:
                key, a, b = pieces[0]
                await storage.copy_part(dest, number, key, a, b)
                return
            body = io.BytesIO(b"".join([await storage.get_range(k, a, b) for k, a, b in pieces]))
            with body:
                await storage.upload_part(*dest, number, body, await md5_of(body))

    tasks = [asyncio.create_task(build(n)) for n in range(1, total_parts + 1)]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
