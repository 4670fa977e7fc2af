"""Writing to a tus upload: one PATCH at a time across replicas, offsets only grow by stored bytes.

* **The lock.**  A PATCH (and a termination) holds a Postgres advisory lock on
  the upload for its whole duration, on a pool connection that it also uses
  for its own statements; a second one, on any replica, is refused with 423.
  The lock is released before the connection goes back to the pool
  (``pg_advisory_unlock_all()``; if that fails or is cancelled, the connection
  is terminated instead, which drops it: the pools run no reset query), and a
  gateway that dies drops its connections, so a lock never outlives its holder.
  :class:`TusRuntime` bounds the lock holders of a process to half the pool:
  each also needs one more connection briefly (to record a part), so holders
  can never take every connection and wait on each other.
* **Offsets.**  ``upload_offset`` is written only after S3 holds the bytes it
  covers, and only grows (``GREATEST``).  Without ``Upload-Checksum`` every
  stored part is committed at once (a gateway killed mid-PATCH loses at most
  the part in progress) and, when the body stops early (client gone, stalled),
  what arrived is kept as an incomplete part; with a checksum nothing is
  committed before the whole body is verified (460 otherwise).  The last byte
  is committed only once the upload is completed, so
  ``Upload-Offset == Upload-Length`` always means done.
* **Segments.**  ``pending_starts`` lists the incomplete-part segments in S3
  (sorted).  Those before the part the offset is in belong to full parts not
  yet stored: a *fold* that a small PATCH left running in the background (see
  :mod:`app.uploads.tus_writer`), or one that failed or died with its gateway.
  Every change to the list is relative (add these starts, drop those in a
  range), so a fold that commits while the next PATCH runs loses nothing.  A
  PATCH folds, before it writes, every full part no fold of its own process is
  storing; the PATCH that completes the upload first waits for its process's
  fold and folds what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import msgspec
from asyncpg.pool import PoolConnectionProxy

from app.core.db import Queryable
from app.core.errors import BadRequest, Conflict, ServiceUnavailable, SluiceError
from app.core.logging import get_logger
from app.core.settings import Settings
from app.uploads.completion import complete
from app.uploads.model import UploadContext, UploadSession, UploadSessionStatus
from app.uploads.parts import upload_part
from app.uploads.rules import MiB, check_size
from app.uploads.sessions import get_session
from app.uploads.tus_protocol import Checksum, Locked
from app.uploads.tus_state import TusUpload, load, parse_upload_id, storage_of
from app.uploads.tus_store import md5_of
from app.uploads.tus_writer import Part, PartSink, PartWriter, PendingCache, read_segments

log = get_logger(__name__)

BUSY_SECONDS = 30.0
"""How long a PATCH waits for one of this process's lock slots before 503."""
PENDING_CACHE_BYTES = 32 * MiB
CLOSE_SECONDS = 10.0
"""How long a stopping gateway waits for its folds (a fold it drops is redone later)."""

Body = Callable[[int], AsyncIterator[bytes]]
"""The request body, read with a limit: more bytes than that is the reader's 413."""


class BodyInterrupted(Exception):
    """The body ended early (client gone, or stalled): what arrived is kept.

    The reader raises it ``from`` the original exception, which the caller re-raises.
    """


async def _unlock(conn: PoolConnectionProxy) -> None:
    """Release the connection's advisory locks before the pool takes it back; if
    that fails (an outage, a cancellation), terminate it: the server drops a
    connection's locks with it, and the pool replaces it."""
    try:
        await conn.execute("SELECT pg_advisory_unlock_all()")
    except asyncio.CancelledError:
        conn.terminate()
        raise
    except Exception as exc:  # whatever failed, the lock must go
        log.warning("tus_unlock_failed", error=repr(exc)[:200])
        conn.terminate()


class TusRuntime:
    """What a gateway process shares between its tus requests: lock slots, the
    segment cache, and the folds running in the background (one per upload at
    most, ``max_patches`` in all: each holds one part in memory)."""

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
        self._folds: dict[str, tuple[asyncio.Task[None], Part]] = {}

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
            async with ctx.db.acquire() as conn:
                try:
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
                    await _unlock(conn)
        finally:
            self._slots.release()

    def folding(self, upload_id: str) -> Part | None:
        """The part this process is storing in the background for the upload, if any."""
        got = self._folds.get(upload_id)
        return got[1] if got is not None and not got[0].done() else None

    def can_fold(self) -> bool:
        return sum(not task.done() for task, _ in self._folds.values()) < self.max_patches

    def adopt(self, upload_id: str, task: asyncio.Task[None], part: Part) -> None:
        """Let ``task`` store ``part`` in the background (the caller's PATCH answers)."""
        self._folds[upload_id] = (task, part)

        def done(task: asyncio.Task[None]) -> None:
            if self._folds.get(upload_id, (None,))[0] is task:
                del self._folds[upload_id]
            if not task.cancelled() and (exc := task.exception()) is not None:
                # the segments stay listed: the next PATCH folds them
                log.warning("tus_fold_failed", upload_id=upload_id, error=repr(exc)[:300])

        task.add_done_callback(done)

    async def settle(self, upload_id: str) -> None:
        """Wait for the upload's fold in this process to end (how it ended is logged)."""
        got = self._folds.get(upload_id)
        if got is not None:
            await asyncio.wait([got[0]])

    async def aclose(self) -> None:
        """Wait (bounded) for every fold, then cancel what is left: its segments stay
        listed, so the part is folded again by the upload's next PATCH."""
        tasks = [task for task, _ in self._folds.values()]
        if not tasks:
            return
        _, left = await asyncio.wait(tasks, timeout=CLOSE_SECONDS)
        for task in left:
            task.cancel()
        if left:
            await asyncio.wait(left)


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
        await _fold_strays(ctx, runtime, upload, upload.pending_starts, runtime.folding(upload.id))
        writer = _writer(ctx, runtime, upload, checksum)
        length = upload.upload_length
        limit = (ctx.settings.max_upload_size_bytes if length is None else length) - upload.offset
        await _receive(ctx, runtime, conn, upload, writer, pieces=body(limit), checksum=checksum)
        if writer.end != upload.upload_length:
            await _keep_deferring(ctx, runtime, conn, upload, writer)
            return msgspec.structs.replace(upload, upload_offset=writer.end)
        return await _complete(ctx, runtime, conn, upload, writer)


async def _complete(
    ctx: UploadContext,
    runtime: TusRuntime,
    conn: PoolConnectionProxy,
    upload: TusUpload,
    writer: PartWriter,
) -> TusUpload:
    """The body reached the length: every part stored (this process's fold waited for,
    full parts still listed folded), the last one sent, the upload completed."""
    await runtime.settle(upload.id)
    pending = await conn.fetchval(
        "SELECT pending_starts FROM tus_uploads WHERE id = $1::uuid", upload.id
    )
    await _fold_strays(ctx, runtime, upload, pending, None)
    await writer.finish_last()
    await _finish(ctx, conn, upload)
    await storage_of(ctx).delete_prefix(f"tus/{upload.id}/pending/")
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
    ctx: UploadContext,
    runtime: TusRuntime,
    conn: PoolConnectionProxy,
    upload: TusUpload,
    writer: PartWriter,
    *,
    pieces: AsyncIterator[bytes],
    checksum: Checksum | None,
) -> None:
    """Every piece into the writer; on an early end keep what arrived (without checksum).

    The part in flight when the body ends is not waited for here (see
    :func:`_keep_deferring`), unless the checksum must be verified first.
    """
    try:
        async for piece in pieces:
            await writer.write(piece)
    except BodyInterrupted:
        if checksum is None:
            await _keep(ctx, runtime, conn, upload, writer)
        else:
            with contextlib.suppress(Exception):
                await writer.wait()
        raise
    except BaseException:
        with contextlib.suppress(Exception):  # its part has all its bytes: let it land
            await writer.wait()
        raise
    if checksum is not None:
        try:
            checksum.verify(writer.digest() or b"")
        except SluiceError:
            with contextlib.suppress(Exception):
                await writer.wait()
            raise


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


def _sink(ctx: UploadContext, upload: TusUpload) -> PartSink:
    if not upload.partial:
        return _SessionSink(ctx, upload)
    storage = storage_of(ctx)
    key, s3_id = upload.object_key, upload.s3_upload_id or ""

    async def partial_sink(number: int, body: io.BytesIO, md5: bytes) -> None:
        await storage.upload_part(key, s3_id, number, body, md5)

    return partial_sink


def own_base(upload: TusUpload) -> int:
    """Where the part the offset is in starts: segments before it are full parts."""
    return upload.upload_offset - upload.upload_offset % upload.chunk_size


def _writer(
    ctx: UploadContext, runtime: TusRuntime, upload: TusUpload, checksum: Checksum | None
) -> PartWriter:
    """The PATCH's writer: each part it stores commits at once (after the PATCH's own
    commit for a deferred one; with a checksum, only a deferred one: the PATCH
    commits the rest once the body is verified)."""

    async def on_part(part: Part) -> None:
        if part.deferred:
            await part.patch_committed.wait()
        elif checksum is not None:
            writer.uncommitted += part.consumed
            return
        last = part.end == upload.upload_length  # the last byte: committed by _finish
        await _commit(ctx.db, upload.id, offset=0 if last else part.end, drop=part.range)
        await _discard(ctx, runtime, part.consumed)

    base = own_base(upload)
    writer = PartWriter(
        storage=storage_of(ctx),
        cache=runtime.cache,
        upload_id=upload.id,
        chunk=upload.chunk_size,
        offset=upload.upload_offset,
        pending=[s for s in upload.pending_starts if s >= base],
        sink=_sink(ctx, upload),
        on_part=on_part,
        checksum=checksum,
    )
    return writer


async def _commit(
    db: Queryable,
    upload_id: str,
    *,
    offset: int,
    drop: tuple[int, int],
    add: Sequence[int] = (),
) -> None:
    """Raise the offset to ``offset`` (never lower it), forget the segments starting in
    ``drop`` (stored as parts), list the new ones ``add``; one statement, relative to
    what the row holds, so commits of a PATCH and of a fold never undo each other."""
    await db.execute(
        "UPDATE tus_uploads SET upload_offset = GREATEST(upload_offset, $2), "
        "pending_starts = ARRAY(SELECT DISTINCT s FROM unnest(pending_starts || $5::bigint[]) "
        "AS s WHERE s < $3 OR s >= $4 ORDER BY s), updated_at = now() WHERE id = $1::uuid",
        upload_id,
        offset,
        drop[0],
        drop[1],
        list(add),
    )


async def _discard(
    ctx: UploadContext, runtime: TusRuntime, consumed: Sequence[tuple[str, int]]
) -> None:
    """Delete segments folded into stored parts (after the commit that dropped them)."""
    for key, size in consumed:
        runtime.cache.drop(key, size)
    await storage_of(ctx).delete_keys([key for key, _ in consumed])


async def _keep(
    ctx: UploadContext,
    runtime: TusRuntime,
    conn: PoolConnectionProxy,
    upload: TusUpload,
    writer: PartWriter,
) -> None:
    """Commit every byte received: the rest after the last full part becomes a segment."""
    added = await writer.keep_rest()
    if writer.end != upload.upload_offset or added or writer.stored[0] != writer.stored[1]:
        await _commit(conn, upload.id, offset=writer.end, drop=writer.stored, add=added)
    writer.committed()
    consumed, writer.uncommitted = writer.uncommitted, []
    await _discard(ctx, runtime, consumed)


async def _keep_deferring(
    ctx: UploadContext,
    runtime: TusRuntime,
    conn: PoolConnectionProxy,
    upload: TusUpload,
    writer: PartWriter,
) -> None:
    """:func:`_keep`, answering without waiting for a part a small share of this PATCH
    filled: that share is kept as a segment too and the part left to a fold."""
    deferred: Part | None = None
    if writer.deferrable() and runtime.folding(upload.id) is None and runtime.can_fold():
        task, deferred = writer.defer()
        runtime.adopt(upload.id, task, deferred)
    try:
        await _keep(ctx, runtime, conn, upload, writer)
    finally:
        if deferred is not None:
            deferred.patch_committed.set()


async def _fold_strays(
    ctx: UploadContext,
    runtime: TusRuntime,
    upload: TusUpload,
    pending: Sequence[int],
    running: Part | None,
) -> None:
    """Store the full parts listed as segments (before the part the offset is in) that
    no fold of this process (``running``) is storing: a fold that failed, or died
    with its gateway.  Another replica's fold of the same part is harmless: both
    store the same bytes under the same part number."""
    chunk, base = upload.chunk_size, own_base(upload)
    parts: dict[int, list[int]] = {}
    for start in sorted(s for s in pending if s < base):
        if running is None or not running.start <= start < running.end:
            parts.setdefault(start // chunk, []).append(start)
    if not parts:
        return
    sink = _sink(ctx, upload)
    for index, starts in parts.items():
        begin, end = index * chunk, (index + 1) * chunk
        body = io.BytesIO()
        with body:
            try:
                consumed = await read_segments(
                    storage_of(ctx), runtime.cache, upload.id, starts, end, into=body
                )
            except (Conflict, ServiceUnavailable):
                if not await _still_listed(ctx.db, upload.id, begin, end):
                    continue  # folded meanwhile by another replica
                raise
            body.seek(0)
            await sink(index + 1, body, await md5_of(body))
        await _commit(ctx.db, upload.id, offset=0, drop=(begin, end))
        await _discard(ctx, runtime, consumed)
        log.info("tus_part_folded", upload_id=upload.id, part_number=index + 1)


async def _still_listed(db: Queryable, upload_id: str, begin: int, end: int) -> bool:
    return bool(
        await db.fetchval(
            "SELECT EXISTS (SELECT 1 FROM tus_uploads, unnest(pending_starts) AS s "
            "WHERE id = $1::uuid AND s >= $2 AND s < $3)",
            upload_id,
            begin,
            end,
        )
    )


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
