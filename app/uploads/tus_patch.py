"""Writing to a tus upload: one PATCH at a time across replicas, offsets only grow by stored bytes.

* **The lock.**  A PATCH (and a termination) holds a Postgres advisory lock on
  the upload for its whole duration, on a pool connection that it also uses
  for its own statements; a second one, on any replica, is refused with 423.
  The lock is released with the connection: asyncpg's pool resets every
  connection it takes back (``pg_advisory_unlock_all()``), and a gateway that
  dies drops its connections, so a lock never outlives its holder.
  :class:`TusRuntime` bounds the lock holders of a process to half the pool:
  each also needs one more connection briefly (to record a part), so holders
  can never take every connection and wait on each other.
* **Offsets.**  ``upload_offset`` is written only after S3 holds the bytes it
  covers.  Without ``Upload-Checksum`` every stored part is committed at once
  (a gateway killed mid-PATCH loses at most the part in progress) and, when the
  body stops early (client gone, stalled), what arrived is kept as an
  incomplete part; with a checksum nothing is committed before the whole body
  is verified (460 otherwise).  The last byte is committed only once the
  upload is completed, so ``Upload-Offset == Upload-Length`` always means done.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import msgspec
from asyncpg.pool import PoolConnectionProxy

from app.core.errors import BadRequest, Conflict, ServiceUnavailable
from app.core.logging import get_logger
from app.core.settings import Settings
from app.uploads.completion import complete
from app.uploads.model import UploadContext, UploadSession, UploadSessionStatus
from app.uploads.parts import upload_part
from app.uploads.rules import MiB, check_size
from app.uploads.sessions import get_session
from app.uploads.tus_protocol import Checksum, Locked
from app.uploads.tus_state import TusUpload, load, parse_upload_id, storage_of
from app.uploads.tus_writer import PartWriter, PendingCache

log = get_logger(__name__)

BUSY_SECONDS = 30.0
"""How long a PATCH waits for one of this process's lock slots before 503."""
PENDING_CACHE_BYTES = 32 * MiB

Body = Callable[[int], AsyncIterator[bytes]]
"""The request body, read with a limit: more bytes than that is the reader's 413."""


class BodyInterrupted(Exception):
    """The body ended early (client gone, or stalled): what arrived is kept.

    The reader raises it ``from`` the original exception, which the caller re-raises.
    """


class TusRuntime:
    """What a gateway process shares between its tus requests: lock slots, the cache."""

    def __init__(
        self,
        *,
        max_patches: int,
        cache_bytes: int = PENDING_CACHE_BYTES,
        busy_seconds: float = BUSY_SECONDS,
    ) -> None:
        self.max_patches = max_patches
        self.busy_seconds = busy_seconds
        self._slots = asyncio.Semaphore(max_patches)
        self.cache = PendingCache(cache_bytes)

    @classmethod
    def of(cls, settings: Settings) -> TusRuntime:
        return cls(max_patches=max(1, settings.database_pool_size // 2))

    @asynccontextmanager
    async def lock(self, ctx: UploadContext, upload_id: str) -> AsyncIterator[PoolConnectionProxy]:
        """The upload's cross-replica lock, on a connection the caller may use; 423 if held."""
        try:
            async with asyncio.timeout(self.busy_seconds):
                await self._slots.acquire()
        except TimeoutError:
            raise ServiceUnavailable(
                "too many uploads are being written to at once; retry shortly",
                code="uploads_busy",
                headers={"Retry-After": "1"},
            ) from None
        try:
            async with ctx.db.acquire() as conn:  # released (and so unlocked) on exit
                if not await conn.fetchval(
                    "SELECT pg_try_advisory_lock(hashtextextended($1, 0))",
                    f"sluice:tus:{upload_id}",
                ):
                    raise Locked(
                        "another request is writing to this upload; retry when it ends",
                        details={"upload_id": upload_id},
                        headers={"Retry-After": "1"},
                    )
                yield conn
        finally:
            self._slots.release()


async def patch(
    ctx: UploadContext,
    runtime: TusRuntime,
    owner_id: str,
    upload_id: str,
    *,
    offset: int,
    length: int | None,
    checksum: Checksum | None,
    body: Body,
) -> TusUpload:
    """Append a PATCH body at ``offset``; complete the upload when it reaches its length.

    409 when ``offset`` is not the stored offset, 413 for bytes past the length,
    460 when ``checksum`` does not match (nothing kept), 423 while another
    PATCH holds the upload, 404/410 as :func:`~app.uploads.tus_state.load` and
    :meth:`~app.uploads.tus_state.TusUpload.check_usable` say.  Returns the
    upload as stored afterwards.
    """
    parse_upload_id(upload_id)
    async with runtime.lock(ctx, upload_id) as conn:
        upload = await load(conn, owner_id, upload_id)
        upload.check_usable(ctx.now())
        if offset != upload.offset:
            raise Conflict(
                f"Upload-Offset is {offset} but the upload has {upload.offset} bytes",
                code="offset_mismatch",
                details={"field": "Upload-Offset", "offset": upload.offset},
            )
        if length is not None:
            upload = await _declare_length(ctx, conn, upload, length)
        if upload.done:
            async for _ in body(0):  # nothing more can be written; any byte is 413
                pass
            return upload
        writer = _writer(ctx, runtime, conn, upload, checksum)
        length = upload.upload_length
        limit = (ctx.settings.max_upload_size_bytes if length is None else length) - upload.offset
        await _receive(conn, upload, writer, body(limit), checksum)
        if writer.end != upload.upload_length:
            pending = await _keep(conn, upload, writer)
            return msgspec.structs.replace(upload, upload_offset=writer.end, pending_starts=pending)
        await writer.finish_last()
        await _finish(ctx, conn, upload)
        await writer.discard_consumed()
        if upload.partial:  # its object is complete
            return msgspec.structs.replace(
                upload, upload_offset=writer.end, pending_starts=[], s3_upload_id=None
            )
        return msgspec.structs.replace(
            upload,
            upload_offset=writer.end,
            pending_starts=[],
            session_status=UploadSessionStatus.COMPLETED,
        )


async def _receive(
    conn: PoolConnectionProxy,
    upload: TusUpload,
    writer: PartWriter,
    pieces: AsyncIterator[bytes],
    checksum: Checksum | None,
) -> None:
    """Every piece into the writer; on an early end keep what arrived (without checksum)."""
    try:
        async for piece in pieces:
            await writer.write(piece)
        await writer.wait()
    except BodyInterrupted:
        if checksum is None:
            await _keep(conn, upload, writer)
        raise
    except BaseException:
        with contextlib.suppress(Exception):  # its part has all its bytes: let it land
            await writer.wait()
        raise
    if checksum is not None:
        checksum.verify(writer.digest() or b"")


class _SessionSink:
    """Parts of a session's upload go through ``upload_part`` (verified, recorded, and
    published as upload progress); the session is read when the first part is full."""

    def __init__(self, ctx: UploadContext, upload: TusUpload) -> None:
        self.ctx, self.upload = ctx, upload
        self.session: UploadSession | None = None

    async def __call__(self, number: int, body: io.BytesIO, md5: bytes) -> None:
        if self.session is None:
            self.session = await get_session(self.ctx.db, self.upload.owner_id, self.upload.id)
        await upload_part(self.ctx, self.session, number, body, computed_md5=md5, declared_md5=md5)


def _writer(
    ctx: UploadContext,
    runtime: TusRuntime,
    conn: PoolConnectionProxy,
    upload: TusUpload,
    checksum: Checksum | None,
) -> PartWriter:
    storage = storage_of(ctx)
    key, s3_id = upload.object_key, upload.s3_upload_id or ""

    async def partial_sink(number: int, body: io.BytesIO, md5: bytes) -> None:
        await storage.upload_part(key, s3_id, number, body, md5)

    async def commit(offset: int) -> bool:
        if offset == upload.upload_length:  # the last byte: committed by _finish
            return False
        await _commit(conn, upload, offset, [])
        return True

    return PartWriter(
        storage=storage,
        cache=runtime.cache,
        upload_id=upload.id,
        chunk=upload.chunk_size,
        offset=upload.upload_offset,
        pending=upload.pending_starts,
        sink=partial_sink if upload.partial else _SessionSink(ctx, upload),
        on_part=commit if checksum is None else None,
        checksum=checksum,
    )


async def _commit(
    conn: PoolConnectionProxy, upload: TusUpload, offset: int, pending: list[int]
) -> None:
    await conn.execute(
        "UPDATE tus_uploads SET upload_offset = $2, pending_starts = $3, updated_at = now() "
        "WHERE id = $1::uuid",
        upload.id,
        offset,
        pending,
    )


async def _keep(conn: PoolConnectionProxy, upload: TusUpload, writer: PartWriter) -> list[int]:
    """Commit every byte received: the rest after the last full part becomes a segment."""
    pending = await writer.keep_rest()
    if (writer.end, pending) != writer.saved:
        await _commit(conn, upload, writer.end, pending)
        writer.committed()
    await writer.discard_consumed()
    return pending


async def _finish(ctx: UploadContext, conn: PoolConnectionProxy, upload: TusUpload) -> None:
    """Every byte is in S3: complete the session (or the partial's object), then commit."""
    length = upload.upload_length
    assert length is not None
    if upload.partial:
        storage = storage_of(ctx)
        if upload.s3_upload_id is not None and length == 0:  # deferred, then declared empty
            await storage.abort_multipart(upload.object_key, upload.s3_upload_id)
        elif upload.s3_upload_id is not None:
            await storage.complete_multipart(upload.object_key, upload.s3_upload_id, length)
    else:
        await complete(ctx, upload.owner_id, upload.id)
    await conn.execute(
        "UPDATE tus_uploads SET upload_offset = $2, pending_starts = '{}', updated_at = now(), "
        "s3_upload_id = NULL WHERE id = $1::uuid",
        upload.id,
        length,
    )
    log.info("tus_upload_finished", upload_id=upload.id, size=length, partial=upload.partial)


async def _declare_length(
    ctx: UploadContext, conn: PoolConnectionProxy, upload: TusUpload, length: int
) -> TusUpload:
    """A deferred upload learns its length (``Upload-Length`` on a PATCH).

    Its session was sized for the largest allowed file, so its chunk size fits
    any length: the session's ``file_size`` and ``total_parts`` (and the
    document's size) become the real ones.
    """
    if upload.upload_length is not None:
        if length != upload.upload_length:
            raise BadRequest(
                f"Upload-Length is {upload.upload_length} and cannot change",
                code="invalid_upload_length",
                details={"field": "Upload-Length", "upload_length": upload.upload_length},
            )
        return upload
    if length or not upload.partial:
        check_size(length, ctx.settings.max_upload_size_bytes, field="Upload-Length")
    if length < upload.offset:
        raise BadRequest(
            f"Upload-Length {length} is below the {upload.offset} bytes already received",
            code="invalid_upload_length",
            details={"field": "Upload-Length", "offset": upload.offset},
        )
    async with conn.transaction():
        await conn.execute(
            "UPDATE tus_uploads SET upload_length = $2, updated_at = now() WHERE id = $1::uuid",
            upload.id,
            length,
        )
        if not upload.partial:
            await conn.execute(
                "UPDATE upload_sessions SET file_size = $2, total_parts = $3, updated_at = now() "
                "WHERE id = $1::uuid",
                upload.id,
                length,
                max(1, math.ceil(length / upload.chunk_size)),
            )
            await conn.execute(
                "UPDATE documents SET size_bytes = $2, updated_at = now() WHERE id = $1::uuid",
                upload.document_id,
                length,
            )
    return msgspec.structs.replace(upload, upload_length=length)
