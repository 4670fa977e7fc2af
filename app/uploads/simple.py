"""Single-request uploads: stream a body of unknown length into one S3 object.

:class:`StreamingObjectWriter` holds at most one part in memory: a body that
fits in one part becomes a ``PutObject``; a longer one becomes a multipart
upload whose parts are sent as they fill.  :func:`finalize_simple` then
registers the document (``stored``) and its job (``queued``) through
:func:`~app.uploads.register.register_upload`, the same path as a resumable
upload's, and enqueues the job once that has committed.  A Redis outage at
that point does not fail the upload: the job stays ``queued`` and the
workers' ``resync_queue`` enqueues it (``enqueue_or_defer``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import uuid
from typing import Any

from app.core.errors import PayloadTooLarge
from app.core.logging import get_logger
from app.core.queue import Priority
from app.core.storage import S3Client, storage_errors
from app.jobs.documents import object_key_for
from app.jobs.transitions import job_transaction
from app.uploads.model import UploadContext
from app.uploads.register import NewUpload, register_upload
from app.uploads.rules import MiB
from app.uploads.schemas import CompletedUpload

log = get_logger(__name__)
_THREAD_HASH_MIN = 1 * MiB


async def _md5_b64(data: bytes | bytearray) -> str:
    if len(data) >= _THREAD_HASH_MIN:  # hashlib releases the GIL: keep the loop free
        digest = await asyncio.to_thread(lambda: hashlib.md5(data, usedforsecurity=False).digest())
    else:
        digest = hashlib.md5(data, usedforsecurity=False).digest()
    return base64.b64encode(digest).decode()


class StreamingObjectWriter:
    """Write a stream to ``key`` without holding more than one part in memory."""

    def __init__(
        self, s3: S3Client, bucket: str, key: str, *, content_type: str, part_size: int, limit: int
    ) -> None:
        self._s3 = s3
        self._bucket = bucket
        self.key = key
        self._content_type = content_type
        self._part_size = part_size
        self._limit = limit
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self.size = 0

    async def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self._limit:
            raise PayloadTooLarge(
                f"file exceeds the limit of {self._limit} bytes ({self._limit // MiB} MiB) "
                "for this route",
                code="file_too_large",
                details={"field": "file", "limit": self._limit, "limit_mb": self._limit // MiB},
            )
        self._buf += data
        while len(self._buf) >= self._part_size:
            part = bytes(self._buf[: self._part_size])
            del self._buf[: self._part_size]
            await self._send_part(part)

    async def _send_part(self, part: bytes) -> None:
        async with storage_errors("upload_part"):
            if self._upload_id is None:
                created = await self._s3.create_multipart_upload(
                    Bucket=self._bucket, Key=self.key, ContentType=self._content_type
                )
                self._upload_id = str(created["UploadId"])
            number = len(self._parts) + 1
            resp = await self._s3.upload_part(
                Bucket=self._bucket,
                Key=self.key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=io.BytesIO(part),
                ContentMD5=await _md5_b64(part),
                ContentLength=len(part),
            )
        self._parts.append({"ETag": resp["ETag"], "PartNumber": number})

    async def finish(self) -> int:
        """Store what remains; return the object's size."""
        if self._upload_id is None:
            data = bytes(self._buf)
            async with storage_errors("put_object"):
                await self._s3.put_object(
                    Bucket=self._bucket,
                    Key=self.key,
                    Body=io.BytesIO(data),
                    ContentType=self._content_type,
                    ContentMD5=await _md5_b64(data),
                )
        else:
            if self._buf:
                await self._send_part(bytes(self._buf))
            async with storage_errors("complete_multipart_upload"):
                await self._s3.complete_multipart_upload(
                    Bucket=self._bucket,
                    Key=self.key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": self._parts},
                )
        self._buf = bytearray()
        return self.size

    async def abort(self) -> None:
        """Forget everything written (best effort; never raises)."""
        self._buf = bytearray()
        with contextlib.suppress(Exception):
            if self._upload_id is not None:
                await self._s3.abort_multipart_upload(
                    Bucket=self._bucket, Key=self.key, UploadId=self._upload_id
                )
            else:
                await self._s3.delete_object(Bucket=self._bucket, Key=self.key)


def new_simple_writer(ctx: UploadContext, content_type: str) -> tuple[str, StreamingObjectWriter]:
    """A fresh document id and a writer for its object (limit: the multipart threshold)."""
    document_id = str(uuid.uuid4())
    writer = StreamingObjectWriter(
        ctx.s3,
        ctx.bucket,
        object_key_for(document_id),
        content_type=content_type,
        part_size=max(ctx.settings.upload_chunk_size_bytes, 5 * MiB),
        limit=ctx.settings.multipart_upload_threshold_bytes,
    )
    return document_id, writer


async def finalize_simple(
    ctx: UploadContext,
    owner_id: str,
    *,
    document_id: str,
    filename: str,
    content_type: str,
    document_type: str,
    size: int,
    priority: Priority,
    processing_options: dict[str, Any] | None = None,
) -> CompletedUpload:
    """Register a stored object as a document with a queued job, then enqueue it."""
    upload = NewUpload(
        owner_id=owner_id,
        document_id=document_id,
        job_id=str(uuid.uuid4()),
        filename=filename,
        content_type=content_type,
        document_type=document_type,
        size=size,
        priority=priority,
        processing_options=processing_options or {},
    )
    async with job_transaction(ctx.db, ctx.redis) as changes:
        await register_upload(changes, upload, stored=True)
    await ctx.queue.enqueue_or_defer(upload.job_id, priority)
    log.info("simple_upload_stored", job_id=upload.job_id, document_id=document_id, size=size)
    return CompletedUpload(
        upload_id=None,
        job_id=upload.job_id,
        document_id=document_id,
        status="queued",
        size=size,
        filename=filename,
    )
