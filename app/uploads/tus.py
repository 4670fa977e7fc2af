"""tus 1.0 uploads on Sluice's upload sessions (HTTP-free; the gateway's tus routes call this).

One tus upload is one upload session: :func:`create` validates and starts it
with :func:`~app.uploads.multipart.initiate` (same rules, same codes), so it has
a document, a job (``awaiting_upload``), an S3 multipart upload and a TTL, and
shows in ``GET .../upload/status/{id}`` and ``.../upload/active``; the sweeper
expires it like any other.  Its tus state lives beside the session in
``tus_uploads`` (migration 0004): the committed ``Upload-Offset``, the declared
length (NULL while deferred), the raw ``Upload-Metadata`` and the incomplete
part's segments.  When the offset reaches the length the session is completed
by :func:`~app.uploads.multipart.complete`, exactly as ``complete`` does it
(S3 completed, the job queued at its priority, once).

* **Deferred length.**  ``upload_sessions.file_size`` is NOT NULL and
  ``total_parts`` at most 10,000, so a deferred upload's session is sized for
  the largest file the settings allow (``Tus-Max-Size``): its chunk size then
  fits any length, and when the client declares the length the session's
  ``file_size`` and ``total_parts`` (and the document's size) are set to it.
* **Partial uploads** (``Upload-Concat: partial``) never become documents:
  they are not sessions, only ``tus_uploads`` rows with their own S3 multipart
  upload under ``tus/<id>/partial``, completed into an object when their last
  byte arrives.  A ``final`` upload is a session whose parts S3 copies from the
  partials (:func:`~app.uploads.tus_store.copy_parts`); then it completes as
  above and the partials are deleted.
* **One PATCH at a time, across replicas.**  A PATCH (and a termination) holds
  a Postgres advisory lock on the upload for its duration, on a connection of
  the pool; a second one is refused with 423.  :class:`TusRuntime` bounds how
  many a process holds at once (half the pool), so lock holders can never
  starve each other of connections.
* **Offsets only grow by committed bytes.**  ``upload_offset`` is written only
  after S3 holds the bytes it covers (full parts, or incomplete-part
  segments); without ``Upload-Checksum`` every stored part commits at once, with
  one nothing is committed before the whole body is verified (460 otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from enum import StrEnum

import msgspec
from asyncpg.pool import PoolConnectionProxy

from app.core.db import Queryable
from app.core.errors import BadRequest, Conflict, Gone, NotFound, ServiceUnavailable
from app.core.logging import get_logger
from app.core.settings import Settings
from app.jobs.model import JobStatus
from app.uploads.multipart import (
    UploadContext,
    cancel,
    complete,
    get_session,
    initiate,
    upload_part,
)
from app.uploads.rules import MiB, check_size, decide_chunk_size
from app.uploads.schemas import InitiateUpload
from app.uploads.tus_protocol import NO_CONCAT, Checksum, Concat, Locked
from app.uploads.tus_store import PartWriter, PendingCache, TusStorage, copy_parts, partial_key

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


class SessionStatus(StrEnum):
    """``upload_sessions.status`` (the uploads package's session status enum, issue 9)."""

    INITIATED = "initiated"
    UPLOADING = "uploading"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


OPEN = frozenset({SessionStatus.INITIATED, SessionStatus.UPLOADING})


class TusRuntime:
    """What a gateway process shares between its tus requests.

    ``max_patches`` lock holders at most (each holds one pool connection and
    needs one more, briefly, to record a part), and the incomplete-part cache.
    """

    def __init__(self, *, max_patches: int, cache_bytes: int = PENDING_CACHE_BYTES) -> None:
        self.max_patches = max_patches
        self._slots = asyncio.Semaphore(max_patches)
        self.cache = PendingCache(cache_bytes)

    @classmethod
    def of(cls, settings: Settings) -> TusRuntime:
        return cls(max_patches=max(1, settings.database_pool_size // 2))

    @asynccontextmanager
    async def lock(self, ctx: UploadContext, upload_id: str) -> AsyncIterator[PoolConnectionProxy]:
        """The upload's cross-replica lock, on a connection the caller may use; 423 if held."""
        key = f"sluice:tus:{upload_id}"
        try:
            async with asyncio.timeout(BUSY_SECONDS):
                await self._slots.acquire()
        except TimeoutError:
            raise ServiceUnavailable(
                "too many uploads are being written to at once; retry shortly",
                code="uploads_busy",
                headers={"Retry-After": "1"},
            ) from None
        try:
            async with ctx.db.acquire() as conn:
                if not await conn.fetchval(
                    "SELECT pg_try_advisory_lock(hashtextextended($1, 0))", key
                ):
                    raise Locked(
                        "another request is writing to this upload; retry when it ends",
                        details={"upload_id": upload_id},
                        headers={"Retry-After": "1"},
                    )
                try:
                    yield conn
                finally:
                    with contextlib.suppress(Exception):  # the pool's reset unlocks anyway
                        await conn.execute(
                            "SELECT pg_advisory_unlock(hashtextextended($1, 0))", key
                        )
        finally:
            self._slots.release()


class TusUpload(msgspec.Struct, kw_only=True):
    """One tus upload: its ``tus_uploads`` row joined with its session and job."""

    id: str
    owner_id: str
    session_id: str | None
    concat: str
    upload_length: int | None
    upload_offset: int
    chunk_size: int
    pending_starts: list[int]
    metadata: str
    concat_header: str
    object_key: str
    s3_upload_id: str | None
    expires_at: datetime
    session_status: str | None
    job_status: str | None
    job_id: str | None
    document_id: str | None

    @property
    def partial(self) -> bool:
        return self.session_id is None

    @property
    def done(self) -> bool:
        """Every byte is stored and the upload completed (its session, or a partial's object)."""
        if self.partial:
            return self.upload_length == self.upload_offset and self.s3_upload_id is None
        return self.session_status == SessionStatus.COMPLETED

    @property
    def offset(self) -> int:
        """``Upload-Offset``: a completed upload has all its bytes, whatever a crash left."""
        if self.done and self.upload_length is not None:
            return self.upload_length
        return self.upload_offset

    def check_usable(self, now: datetime) -> None:
        """410 for an expired upload, or one whose job was cancelled."""
        if self.done:
            return
        status = self.session_status
        if status == SessionStatus.EXPIRED or (
            (status is None or status in OPEN) and self.expires_at <= now
        ):
            raise Gone(
                "the upload expired before it was completed",
                code="upload_expired",
                details={"expires_at": self.expires_at.isoformat()},
            )
        if status == SessionStatus.CANCELLED or self.job_status == JobStatus.CANCELLED:
            raise Gone("the upload was cancelled", code="upload_cancelled")


_COLUMNS = """
    t.id::text AS id, t.owner_id, t.session_id::text AS session_id, t.concat,
    t.upload_length, t.upload_offset, t.chunk_size, t.pending_starts, t.metadata,
    t.concat_header, COALESCE(s.object_key, t.object_key) AS object_key,
    CASE WHEN t.session_id IS NULL THEN t.s3_upload_id ELSE s.s3_upload_id END AS s3_upload_id,
    COALESCE(s.expires_at, t.expires_at) AS expires_at, s.status AS session_status,
    j.status AS job_status, s.job_id::text AS job_id, s.document_id::text AS document_id
"""


def _uuid(upload_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(upload_id)
    except ValueError:
        raise NotFound("upload not found", code="upload_not_found") from None


async def load(db: Queryable, owner_id: str, upload_id: str) -> TusUpload:
    """The caller's tus upload; unknown, malformed, terminated and foreign ids are all 404."""
    row = await db.fetchrow(
        f"SELECT {_COLUMNS} FROM tus_uploads t "
        "LEFT JOIN upload_sessions s ON s.id = t.session_id LEFT JOIN jobs j ON j.id = s.job_id "
        "WHERE t.id = $1 AND t.owner_id = $2",
        _uuid(upload_id),
        owner_id,
    )
    if row is None:
        raise NotFound("upload not found", code="upload_not_found")
    return TusUpload(**dict(row))


def storage_of(ctx: UploadContext) -> TusStorage:
    return TusStorage(ctx.s3, ctx.bucket)


# --- creation ------------------------------------------------------------------------------


async def create(
    ctx: UploadContext,
    owner_id: str,
    req: InitiateUpload,
    *,
    length: int | None,
    metadata: str,
    concat: Concat = NO_CONCAT,
) -> TusUpload:
    """A tus upload on a new session; ``req`` is validated exactly as ``initiate`` does.

    With ``length`` None (deferred) the session is sized for the largest allowed file.
    """
    limit = ctx.settings.max_upload_size_bytes
    if length is not None:
        check_size(length, limit, field="Upload-Length")
    size = length if length is not None else limit
    started = await initiate(ctx, owner_id, msgspec.structs.replace(req, file_size=size))
    try:
        await ctx.db.execute(
            "INSERT INTO tus_uploads (id, owner_id, session_id, upload_length, chunk_size, "
            "metadata, concat, concat_header) VALUES ($1, $2, $1, $3, $4, $5, $6, $7)",
            uuid.UUID(started.upload_id),
            owner_id,
            length,
            started.chunk_size,
            metadata,
            concat.kind,
            concat.header,
        )
    except BaseException:
        with contextlib.suppress(Exception):
            await cancel(ctx, owner_id, started.upload_id)
        raise
    log.info("tus_upload_created", upload_id=started.upload_id, deferred=length is None)
    return await load(ctx.db, owner_id, started.upload_id)


async def create_partial(
    ctx: UploadContext, owner_id: str, *, length: int | None, metadata: str
) -> TusUpload:
    """A partial upload (``Upload-Concat: partial``): its own S3 upload, no document."""
    limit = ctx.settings.max_upload_size_bytes
    if length is not None and length:
        check_size(length, limit, field="Upload-Length")
    chunk = decide_chunk_size(length or limit, ctx.settings.upload_chunk_size_bytes)[0]
    upload_id = str(uuid.uuid4())
    key = partial_key(upload_id)
    storage = storage_of(ctx)
    s3_upload_id = await storage.create_multipart(key) if length != 0 else None
    try:
        await ctx.db.execute(
            "INSERT INTO tus_uploads (id, owner_id, concat, upload_length, chunk_size, metadata, "
            "object_key, s3_upload_id, expires_at) "
            "VALUES ($1, $2, 'partial', $3, $4, $5, $6, $7, $8)",
            uuid.UUID(upload_id),
            owner_id,
            length,
            chunk,
            metadata,
            key,
            s3_upload_id,
            ctx.now() + timedelta(hours=ctx.settings.upload_session_ttl_hours),
        )
    except BaseException:
        if s3_upload_id is not None:
            with contextlib.suppress(Exception):
                await storage.abort_multipart(key, s3_upload_id)
        raise
    return await load(ctx.db, owner_id, upload_id)


async def create_final(
    ctx: UploadContext,
    owner_id: str,
    concat: Concat,
    *,
    metadata: str,
    request_for: Callable[[int], InitiateUpload],
) -> TusUpload:
    """A final upload: a session built server-side from finished partials, then completed.

    ``request_for(total size)`` gives the validated ``initiate`` request (the
    metadata names the file).  400 when a partial is unfinished or not a
    partial, 404 when one is unknown or another user's.
    """
    partials = [await load(ctx.db, owner_id, pid) for pid in concat.partial_ids]
    for p in partials:
        if not p.partial or not p.done or p.upload_length is None:
            raise BadRequest(
                f"upload {p.id} is not a finished partial upload",
                code="invalid_upload_concat",
                details={"field": "Upload-Concat", "upload_id": p.id},
            )
    total = sum(p.upload_length or 0 for p in partials)
    req = request_for(total)
    final = await create(ctx, owner_id, req, length=total, metadata=metadata, concat=concat)
    try:
        await copy_parts(
            storage_of(ctx),
            (final.object_key, final.s3_upload_id or ""),
            chunk=final.chunk_size,
            sources=[(p.object_key, p.upload_length or 0) for p in partials],
        )
        await complete(ctx, owner_id, final.id)
        await ctx.db.execute(
            "UPDATE tus_uploads SET upload_offset = upload_length, updated_at = now() "
            "WHERE id = $1::uuid",
            final.id,
        )
    except BaseException:
        with contextlib.suppress(Exception):
            await cancel(ctx, owner_id, final.id)
        raise
    for p in {p.id: p for p in partials}.values():
        await _remove_partial(ctx, p)
    log.info("tus_upload_concatenated", upload_id=final.id, partials=len(partials), size=total)
    return await load(ctx.db, owner_id, final.id)


async def _remove_partial(ctx: UploadContext, upload: TusUpload) -> None:
    await ctx.db.execute("DELETE FROM tus_uploads WHERE id = $1::uuid", upload.id)
    await _discard_partial(ctx, upload.id, upload.object_key, upload.s3_upload_id)


async def _discard_partial(
    ctx: UploadContext, upload_id: str, key: str, s3_upload_id: str | None
) -> None:
    """Abort a partial upload's S3 upload and delete its objects, best effort."""
    storage = storage_of(ctx)
    if s3_upload_id is not None:
        with contextlib.suppress(Exception):
            await storage.abort_multipart(key, s3_upload_id)
    await storage.delete_prefix(f"tus/{upload_id}/")


# --- reading, writing, termination -----------------------------------------------------------


async def info(ctx: UploadContext, runtime: TusRuntime, owner_id: str, upload_id: str) -> TusUpload:
    """``HEAD``: the upload's state; 404 unknown, 410 expired or cancelled.

    An upload that has every byte but is not completed (its completion failed,
    or the length was declared last) is completed here: a client that reads
    ``Upload-Offset == Upload-Length`` considers it done and sends nothing more.
    """
    upload = await load(ctx.db, owner_id, upload_id)
    upload.check_usable(ctx.now())
    if not upload.done and upload.upload_offset == upload.upload_length:
        with contextlib.suppress(Locked):  # the PATCH holding it finishes it
            upload = await patch(
                ctx,
                runtime,
                owner_id,
                upload_id,
                offset=upload.upload_offset,
                length=None,
                checksum=None,
                body=_no_body,
            )
    return upload


async def _no_body(_limit: int) -> AsyncIterator[bytes]:
    return
    yield b""  # an async generator that yields nothing


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
    PATCH holds the upload.
    """
    _uuid(upload_id)
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
        limit = (upload.upload_length or ctx.settings.max_upload_size_bytes) - upload.offset
        writer = await _writer(ctx, runtime, conn, upload, checksum)
        try:
            async for piece in body(limit):
                await writer.write(piece)
            await writer.wait()
        except BodyInterrupted:
            if checksum is None:
                await _keep(conn, upload, writer)
            raise
        except BaseException:
            with contextlib.suppress(Exception):
                await writer.wait()
            raise
        if checksum is not None:
            checksum.verify(writer.digest() or b"")
        if writer.end == upload.upload_length:
            await writer.finish_last()
            await _finish(ctx, conn, upload)
            await writer.discard_consumed()
        else:
            await _keep(conn, upload, writer)
        return await load(conn, owner_id, upload_id)


async def _writer(
    ctx: UploadContext,
    runtime: TusRuntime,
    conn: PoolConnectionProxy,
    upload: TusUpload,
    checksum: Checksum | None,
) -> PartWriter:
    storage = storage_of(ctx)
    if upload.partial:
        key, s3_id = upload.object_key, upload.s3_upload_id or ""

        async def sink(number: int, body: io.BytesIO, md5: bytes) -> None:
            await storage.upload_part(key, s3_id, number, body, md5)

    else:
        session = await get_session(ctx.db, upload.owner_id, upload.id)

        async def sink(number: int, body: io.BytesIO, md5: bytes) -> None:
            await upload_part(ctx, session, number, body, computed_md5=md5, declared_md5=md5)

    async def on_part(offset: int) -> None:
        if offset == upload.upload_length:
            return  # the last byte: committed once the upload is completed (_finish)
        await conn.execute(
            "UPDATE tus_uploads SET upload_offset = $2, pending_starts = '{}', updated_at = now() "
            "WHERE id = $1::uuid",
            upload.id,
            offset,
        )

    return PartWriter(
        storage=storage,
        cache=runtime.cache,
        upload_id=upload.id,
        chunk=upload.chunk_size,
        offset=upload.upload_offset,
        pending=upload.pending_starts,
        sink=sink,
        on_part=on_part if checksum is None else None,
        checksum=checksum,
    )


async def _keep(conn: PoolConnectionProxy, upload: TusUpload, writer: PartWriter) -> None:
    """Commit every byte received: the rest after the last full part becomes a segment."""
    pending = await writer.keep_rest()
    await conn.execute(
        "UPDATE tus_uploads SET upload_offset = $2, pending_starts = $3, updated_at = now() "
        "WHERE id = $1::uuid",
        upload.id,
        writer.end,
        pending,
    )
    writer.committed()
    await writer.discard_consumed()


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
    """A deferred upload learns its length (``Upload-Length`` on a PATCH)."""
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


async def terminate(ctx: UploadContext, runtime: TusRuntime, owner_id: str, upload_id: str) -> None:
    """``DELETE``: abort the S3 upload, cancel the session and its job, forget the upload.

    Later requests answer 404.  409 once the upload completed (its document exists).
    """
    _uuid(upload_id)
    async with runtime.lock(ctx, upload_id) as conn:
        upload = await load(conn, owner_id, upload_id)
        if upload.partial:
            if upload.s3_upload_id is not None:
                await storage_of(ctx).abort_multipart(upload.object_key, upload.s3_upload_id)
        elif upload.session_status in OPEN and upload.expires_at > ctx.now():
            await cancel(ctx, owner_id, upload.id)
        elif upload.done:
            raise Conflict(
                "the upload is complete; its document is processed on its own",
                code="upload_completed",
                details={"document_id": upload.document_id},
            )
        await conn.execute("DELETE FROM tus_uploads WHERE id = $1::uuid", upload.id)
    await storage_of(ctx).delete_prefix(f"tus/{upload.id}/")
    log.info("tus_upload_terminated", upload_id=upload.id)


# --- the sweeper's part --------------------------------------------------------------------


async def discard_leftovers(ctx: UploadContext, session_id: str) -> None:
    """A swept session (expired, or its job cancelled): delete its incomplete-part objects."""
    if await ctx.db.fetchval("SELECT 1 FROM tus_uploads WHERE id = $1::uuid", session_id):
        await storage_of(ctx).delete_prefix(f"tus/{session_id}/")


async def sweep_partials(ctx: UploadContext, now: datetime, *, batch: int = 200) -> int:
    """Remove partial uploads past their TTL (no session covers them); how many."""
    rows = await ctx.db.fetch(
        "DELETE FROM tus_uploads WHERE id IN (SELECT id FROM tus_uploads "
        "WHERE session_id IS NULL AND expires_at <= $1 LIMIT $2) "
        "RETURNING id::text AS id, object_key, s3_upload_id",
        now,
        batch,
    )
    for row in rows:
        await _discard_partial(ctx, row["id"], row["object_key"], row["s3_upload_id"])
    if rows:
        log.info("tus_partials_expired", count=len(rows))
    return len(rows)
