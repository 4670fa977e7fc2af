"""How tus bytes reach S3: PATCH bodies streamed into parts, incomplete parts kept.

S3 parts must be at least 5 MiB (all but the last) while a tus PATCH may carry
any number of bytes, so :class:`PartWriter` cuts the stream at the upload's
chunk size (the session's ``chunk_size``) as bytes arrive:

* every full part goes to S3 at once (through a :data:`PartSink`), while the
  next one is being received -- at most two parts of an upload are in memory,
  never the whole body;
* the bytes after the last full part, when a PATCH ends (or its client goes
  away), are kept in S3 as an *incomplete part*: one small object per PATCH
  (``tus/<upload id>/pending/<start offset>``), listed in the upload's row by
  start offset, so ``Upload-Offset`` counts every byte received and any gateway
  replica can continue.  When a later PATCH fills the part, the segments are
  read back (from :class:`PendingCache` when the same process wrote them,
  which is the common case) and put in front of the new bytes.  Writing one
  segment per PATCH instead of rewriting one growing object keeps the extra
  storage traffic linear in the bytes: small PATCHes cost one extra PUT and at
  most one GET per byte, not a rewrite of the whole incomplete part each time.

Invariants: a segment's bytes are never changed once its start is committed
(a later PATCH starts after it); segments are deleted only after the commit
that stopped listing them; nothing here writes Postgres (the caller commits
offsets, and gives :class:`PartWriter` a callback for per-part commits).

:func:`copy_parts` builds a concatenated upload server-side from completed
partial uploads with S3 ``UploadPartCopy`` (as tusd's s3store does).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from botocore.exceptions import ClientError

from app.core.errors import Conflict
from app.core.logging import get_logger
from app.core.storage import S3Client, client_error_code, storage_errors
from app.uploads.tus_protocol import Checksum

log = get_logger(__name__)

PartSink = Callable[[int, io.BytesIO, bytes], Awaitable[None]]
"""Stores part ``number`` (the body, positioned at 0, and its MD5)."""
OnPart = Callable[[int], Awaitable[None]]
"""Commits a new offset once a part is stored (per-part progress)."""
COPY_PARALLELISM = 4
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


class PendingCache:
    """Incomplete-part segments this process wrote, most recent first kept.

    Bounded by ``max_bytes`` (least recently used dropped first).  Keys are
    ``(segment key, size)``; an entry is added only after its start offset
    was committed, so it always holds the bytes S3 holds under that key.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._size = 0

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        self.drop(key, len(data))
        self._entries[(key, len(data))] = data
        self._size += len(data)
        while self._size > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self._size -= len(old)

    def get(self, key: str, size: int) -> bytes | None:
        return self._entries.get((key, size))

    def drop(self, key: str, size: int) -> None:
        old = self._entries.pop((key, size), None)
        if old is not None:
            self._size -= len(old)

    @property
    def size(self) -> int:
        return self._size


class TusStorage:
    """The S3 operations of tus uploads, each mapped by :func:`storage_errors` (503)."""

    def __init__(self, s3: S3Client, bucket: str) -> None:
        self.s3 = s3
        self.bucket = bucket

    async def put_object(self, key: str, data: bytes) -> None:
        md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
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
        """Delete objects, best effort (a leftover is removed with its upload's prefix)."""
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            try:
                await self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": batch})
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


class PartWriter:
    """One PATCH body, cut into S3 parts of ``chunk`` bytes as it arrives.

    The upload's committed state is ``offset`` and the incomplete-part segments
    ``pending`` (their start offsets; they cover ``[pending[0], offset)``).  The
    part being filled starts at :attr:`base` (a multiple of ``chunk``); its
    first ``offset - base`` bytes are the segments, fetched only when the part
    is full (or the upload ends).  With ``on_part`` (no checksum to verify
    first), each stored part commits its offset at once, so a gateway killed
    mid-PATCH loses at most the part in progress.
    """

    def __init__(
        self,
        *,
        storage: TusStorage,
        cache: PendingCache,
        upload_id: str,
        chunk: int,
        offset: int,
        pending: Sequence[int],
        sink: PartSink,
        on_part: OnPart | None,
        checksum: Checksum | None,
    ) -> None:
        self.storage, self.cache, self.upload_id = storage, cache, upload_id
        self.chunk, self.sink, self.on_part = chunk, sink, on_part
        self.pending = list(pending)
        self.pending_end = offset
        self.base = self.pending[0] if self.pending else offset
        if self.base % chunk:
            raise ValueError(f"incomplete part starts at {self.base}, not a part boundary")
        self.next_part = self.base // chunk + 1
        self.hasher = checksum.hasher() if checksum is not None else None
        self.received = 0
        self.consumed: list[tuple[str, int]] = []
        """Segments folded into stored parts; deleted once a commit stops listing them."""
        self.new_segment: tuple[str, bytes] | None = None
        self._buf = io.BytesIO()
        self._buf.seek(self._pending_size)
        self._fill = 0
        self._in_flight: asyncio.Task[None] | None = None

    @property
    def _pending_size(self) -> int:
        return self.pending_end - self.base if self.pending else 0

    @property
    def end(self) -> int:
        """The offset of the last byte received so far, plus one."""
        return self.base + self._pending_size + self._fill

    def digest(self) -> bytes | None:
        return self.hasher.digest() if self.hasher is not None else None

    async def write(self, piece: bytes) -> None:
        if self.hasher is not None:
            self.hasher.update(piece)
        self.received += len(piece)
        view = memoryview(piece)
        while view:
            room = self.chunk - self._pending_size - self._fill
            self._buf.write(view[:room])
            taken = min(room, len(view))
            self._fill += taken
            view = view[taken:]
            if self._pending_size + self._fill == self.chunk:
                await self._emit()

    async def _emit(self) -> None:
        body, number = await self._take_part()
        await self.wait()
        self._in_flight = asyncio.create_task(self._store(number, body, self.base))

    async def _take_part(self) -> tuple[io.BytesIO, int]:
        """The part in progress (segments put in front), and a fresh buffer for the next."""
        body = self._buf
        await self._fetch_pending(body)
        body.seek(0)
        number = self.next_part
        self.next_part += 1
        self.base += self._pending_size + self._fill
        self.pending, self._fill = [], 0
        self._buf = io.BytesIO()
        return body, number

    async def _fetch_pending(self, body: io.BytesIO) -> None:
        if not self.pending:
            return
        ends = [*self.pending[1:], self.pending_end]
        for start, end in zip(self.pending, ends, strict=True):
            key = segment_key(self.upload_id, start)
            data = self.cache.get(key, end - start)
            if data is None:
                data = await self.storage.get_range(key, 0, end - start)
            body.seek(start - self.base)
            body.write(data)
            self.consumed.append((key, end - start))

    async def _store(self, number: int, body: io.BytesIO, offset: int) -> None:
        with body:
            await self.sink(number, body, await md5_of(body))
        if self.on_part is not None:
            await self.on_part(offset)
            await self.discard_consumed()

    async def wait(self) -> None:
        """Wait for the part being stored (its failure is raised here)."""
        task, self._in_flight = self._in_flight, None
        if task is not None:
            await task

    async def cancel(self) -> None:
        task, self._in_flight = self._in_flight, None
        if task is not None and not task.done():
            task.cancel()
        if task is not None:
            with contextlib.suppress(BaseException):
                await task

    async def finish_last(self) -> None:
        """Store what is left as the upload's last part (the body reached its length)."""
        await self.wait()
        if self._pending_size + self._fill:
            body, number = await self._take_part()
            with body:
                await self.sink(number, body, await md5_of(body))

    async def keep_rest(self) -> list[int]:
        """Store the bytes after the last full part as a new segment; the pending list."""
        await self.wait()
        if self._fill:
            start = self.base + self._pending_size
            with self._buf.getbuffer() as view:
                data = bytes(view[self._pending_size : self._pending_size + self._fill])
            key = segment_key(self.upload_id, start)
            await self.storage.put_object(key, data)
            self.new_segment = (key, data)
            self.pending.append(start)
            self.pending_end = start + len(data)
            self._fill = 0
        return list(self.pending)

    def committed(self) -> None:
        """The caller committed :attr:`end`: remember the new segment's bytes."""
        if self.new_segment is not None:
            self.cache.put(*self.new_segment)
            self.new_segment = None

    async def discard_consumed(self) -> None:
        """Delete the segments folded into stored parts (after their commit)."""
        consumed, self.consumed = self.consumed, []
        for key, size in consumed:
            self.cache.drop(key, size)
        await self.storage.delete_keys([key for key, _ in consumed])


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
