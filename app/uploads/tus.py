"""tus 1.0 uploads on Sluice's upload sessions (HTTP-free; the gateway's tus routes call this).

One tus upload is one upload session: :func:`create` validates and starts it
with :func:`~app.uploads.sessions.initiate` (same rules, same codes), so it has
a document, a job (``awaiting_upload``), an S3 multipart upload and a TTL, and
shows in ``GET .../upload/status/{id}`` and ``.../upload/active``; the sweeper
expires it like any other.  Its tus state lives beside the session in
``tus_uploads`` (migration 0004, :mod:`app.uploads.tus_state`).  PATCHes
(:mod:`app.uploads.tus_patch`) stream into the session's S3 parts
(:mod:`app.uploads.tus_writer`); when the offset reaches the length the session
is completed by :func:`~app.uploads.completion.complete`, exactly as
``complete`` does it (S3 completed, the job queued at its priority, once).

* **Deferred length.**  ``upload_sessions.file_size`` is NOT NULL and
  ``total_parts`` at most 10,000, so a deferred upload's session is sized for
  the largest file the settings allow (``Tus-Max-Size``) until the client
  declares the length; ``tus_uploads.upload_length`` is NULL meanwhile.
* **Partial uploads** (``Upload-Concat: partial``) never become documents:
  they are not sessions, only ``tus_uploads`` rows with their own S3 multipart
  upload under ``tus/<id>/partial``, completed into an object when their last
  byte arrives.  A ``final`` upload is a session whose parts S3 copies from the
  partials (:func:`~app.uploads.tus_store.copy_parts`); then it completes as
  above and the partials are deleted.
"""

from __future__ import annotations

import contextlib
import math
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta

import msgspec

from app.core.errors import BadRequest, Conflict
from app.core.logging import get_logger
from app.uploads.completion import complete
from app.uploads.model import OPEN_UPLOAD_STATUSES, UploadContext
from app.uploads.rules import MAX_PARTS, MIN_PART_SIZE, check_size, decide_chunk_size
from app.uploads.schemas import InitiateUpload
from app.uploads.sessions import cancel, initiate
from app.uploads.tus_patch import Body, BodyInterrupted, TusRuntime, patch
from app.uploads.tus_protocol import NO_CONCAT, Concat, Locked
from app.uploads.tus_state import TusUpload, load, parse_upload_id, storage_of
from app.uploads.tus_store import MAX_PART_SIZE, copy_parts, partial_key

__all__ = [
    "Body",
    "BodyInterrupted",
    "TusRuntime",
    "TusUpload",
    "create",
    "create_final",
    "create_partial",
    "info",
    "patch",
    "sweep",
    "terminate",
]

log = get_logger(__name__)


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
    sizes = [p.upload_length or 0 for p in partials]
    req = request_for(sum(sizes))
    final = await create(ctx, owner_id, req, length=sum(sizes), metadata=metadata, concat=concat)
    try:
        chunk = await _align_parts(ctx, final, sizes)
        await copy_parts(
            storage_of(ctx),
            (final.object_key, final.s3_upload_id or ""),
            chunk=chunk,
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
    log.info("tus_upload_concatenated", upload_id=final.id, partials=len(sizes), size=sum(sizes))
    return await load(ctx.db, owner_id, final.id)


async def _align_parts(ctx: UploadContext, final: TusUpload, sizes: list[int]) -> int:
    """The final upload's part size: the partials' own size when they share one.

    tus-js-client's ``parallelUploads`` cuts a file into equal partials (the last
    takes the rest); with that size as the session's part size every part is one
    ``UploadPartCopy`` of a whole partial, instead of one per 8 MiB.  Otherwise (or
    when that size is not a valid S3 part size) the session keeps its own.
    """
    first, total = sizes[0], sum(sizes)
    if not (
        MIN_PART_SIZE <= first <= MAX_PART_SIZE
        and all(size == first for size in sizes[:-1])
        and math.ceil(total / first) <= MAX_PARTS
        and first != final.chunk_size
    ):
        return final.chunk_size
    async with ctx.db.acquire() as conn, conn.transaction():
        await conn.execute(
            "UPDATE upload_sessions SET chunk_size = $2, total_parts = $3, updated_at = now() "
            "WHERE id = $1::uuid",
            final.id,
            first,
            math.ceil(total / first),
        )
        await conn.execute(
            "UPDATE tus_uploads SET chunk_size = $2 WHERE id = $1::uuid", final.id, first
        )
    return first


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


# --- reading, termination ------------------------------------------------------------------


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


async def terminate(ctx: UploadContext, runtime: TusRuntime, owner_id: str, upload_id: str) -> None:
    """``DELETE``: abort the S3 upload, cancel the session and its job, forget the upload.

    Later requests answer 404.  409 once the upload completed (its document exists).
    """
    parse_upload_id(upload_id)
    async with runtime.lock(ctx, upload_id) as conn:
        upload = await load(conn, owner_id, upload_id)
        await runtime.settle(upload.id)  # a part stored in the background lands first
        if upload.partial:
            if upload.s3_upload_id is not None:
                await storage_of(ctx).abort_multipart(upload.object_key, upload.s3_upload_id)
        elif upload.session_status in OPEN_UPLOAD_STATUSES and upload.expires_at > ctx.now():
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


async def sweep(ctx: UploadContext, now: datetime, *, batch: int = 200) -> int:
    """The sweeper's tus round: partial uploads past their TTL (no session covers them)
    are removed, and so are the incomplete parts of sessions that closed without
    completing (expired, cancelled by any path).  How many uploads it cleaned."""
    partials = await ctx.db.fetch(
        "DELETE FROM tus_uploads WHERE id IN (SELECT id FROM tus_uploads "
        "WHERE session_id IS NULL AND expires_at <= $1 LIMIT $2) "
        "RETURNING id::text AS id, object_key, s3_upload_id",
        now,
        batch,
    )
    for row in partials:
        await _discard_partial(ctx, row["id"], row["object_key"], row["s3_upload_id"])
    closed = await ctx.db.fetch(
        "UPDATE tus_uploads t SET pending_starts = '{}', updated_at = now() "
        "WHERE t.id IN (SELECT t2.id FROM tus_uploads t2 JOIN upload_sessions s "
        "ON s.id = t2.session_id WHERE t2.pending_starts <> '{}' "
        "AND s.status NOT IN ('initiated', 'uploading') LIMIT $1) RETURNING t.id::text AS id",
        batch,
    )
    for row in closed:
        await storage_of(ctx).delete_prefix(f"tus/{row['id']}/")
    if partials or closed:
        log.info("tus_swept", partials=len(partials), incomplete_parts=len(closed))
    return len(partials) + len(closed)
