"""Upload routes: resumable multipart sessions and single-request uploads.

The handlers only read HTTP (paths, headers, bodies) and call
:mod:`app.core.multipart` / :mod:`app.core.direct_upload`.  Part bodies are
read into one buffer of exactly the part's size while their MD5 is computed
piece by piece, so a request never holds more than one part in memory; the
multipart form routes use the streaming reader in :mod:`app.gateway.formstream`
rather than Starlette's spooling parser.
"""

from __future__ import annotations

import hashlib
import io
import time
import weakref
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.requests import Request
from starlette.responses import Response

from app.core import multipart as mp
from app.core import upload_rules as rules
from app.core import upload_schemas as us
from app.core.direct_upload import StreamingObjectWriter, finalize_direct, new_direct_writer
from app.core.errors import BadRequest, PayloadTooLarge, ValidationFailed
from app.core.events import Priority
from app.core.schemas import Page, PageQuery
from app.core.schemas import Request as RequestSchema
from app.core.settings import Settings
from app.gateway.documents import document_links
from app.gateway.formstream import FormPart, read_form
from app.gateway.http import (
    ApiLink,
    ApiRoute,
    HeaderParam,
    convert,
    convert_strict,
    decode_json,
    identity,
    json_response,
    query_params,
    read_json,
    whole_floats_as_ints,
)
from app.gateway.jobs import job_links
from app.gateway.services import Services, services

PREFIX = "/api/v1/documents/upload"
FORM_OVERHEAD = 64 * 1024
"""Allowance for form field headers and text fields around a file."""


_PART_NUMBER = msgspec.Meta(extra_json_schema={"minimum": 1, "maximum": rules.MAX_PARTS})


class ChunkFields(RequestSchema):
    upload_id: Annotated[str, msgspec.Meta(extra_json_schema={"format": "uuid"})]
    part_number: Annotated[int, _PART_NUMBER]
    chunk_hash: us.HexMd5
    total_parts: Annotated[int, _PART_NUMBER] | None = None
    is_final_chunk: bool | None = None


class SimpleFields(RequestSchema):
    priority: Priority = Priority.NORMAL
    document_type: us.DocumentType | None = None
    processing_options: str | None = None
    """A JSON object, as text."""


_MAYBE_HEX_MD5 = msgspec.Meta(extra_json_schema={"pattern": "^(?:[0-9a-fA-F]{32})?$"})


class PresignBody(RequestSchema):
    content_md5: Annotated[str, _MAYBE_HEX_MD5] | None = None
    """Hex MD5 of the part (empty is the same as absent); when given, storage rejects
    any other bytes."""


class UploadMetrics:
    """Upload counters on the gateway's Prometheus registry (errors are in the
    per-route HTTP metrics)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.bytes = Counter(
            "sluice_upload_bytes_total", "Part and file bytes accepted", registry=registry
        )
        self.parts = Counter(
            "sluice_upload_parts_total", "Parts accepted", ["route"], registry=registry
        )
        self.part_seconds = Histogram(
            "sluice_upload_part_seconds",
            "Receiving, verifying and storing one part",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=registry,
        )
        self.sessions = Counter(
            "sluice_uploads_total", "Upload lifecycle events", ["event"], registry=registry
        )


_metrics: weakref.WeakKeyDictionary[CollectorRegistry, UploadMetrics] = weakref.WeakKeyDictionary()


def metrics_of(svc: Services) -> UploadMetrics:
    found = _metrics.get(svc.registry)
    if found is None:
        found = _metrics[svc.registry] = UploadMetrics(svc.registry)
    return found


def upload_context(svc: Services) -> mp.UploadContext:
    return mp.UploadContext(
        db=svc.db,
        redis=svc.redis,
        s3=svc.s3,
        s3_public=svc.s3_public,
        queue=svc.queue,
        settings=svc.settings,
        clock=svc.clock,
    )


def _ctx(request: Request) -> mp.UploadContext:
    return upload_context(services(request))


def _int(value: str, field: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise BadRequest(
            f"{field} must be an integer", code=f"invalid_{field}", details={"field": field}
        ) from None


def max_part_size(settings: Settings) -> int:
    """The largest part any session can have under these settings."""
    return rules.decide_chunk_size(
        settings.max_upload_size_bytes, settings.upload_chunk_size_bytes
    )[0]


async def read_exact(
    chunks: AsyncIterator[bytes], size: int, *, field: str = "body"
) -> tuple[io.BytesIO, bytes]:
    """Read exactly ``size`` bytes (400 on more or fewer) and their MD5.

    The buffer is sized once up front and the pieces are written into it in
    place: no regrowth copies, and S3's client reads it without another copy
    (a ``BytesIO`` sharing a joined ``bytes`` would be copied on ``getbuffer``).
    """
    buf = io.BytesIO()
    if size:
        buf.seek(size - 1)
        buf.write(b"\0")
        buf.seek(0)
    md5 = hashlib.md5(usedforsecurity=False)
    got = 0
    async for piece in chunks:
        if got + len(piece) > size:
            raise BadRequest(
                f"part must be exactly {size} bytes; more were sent",
                code="invalid_part_size",
                details={"field": field, "expected_size": size},
            )
        buf.write(piece)
        md5.update(piece)
        got += len(piece)
    if got != size:
        raise BadRequest(
            f"part must be exactly {size} bytes, got {got}",
            code="invalid_part_size",
            details={"field": field, "expected_size": size, "size": got},
        )
    return buf, md5.digest()


# --- sessions --------------------------------------------------------------------------


async def initiate(request: Request) -> Response:
    ident = identity(request)
    body = await read_json(request, us.InitiateUpload)
    result = await mp.initiate(_ctx(request), ident.user_id, body)
    metrics_of(services(request)).sessions.labels("initiated").inc()
    return json_response(result, 201)


async def put_part(request: Request) -> Response:
    """Raw part body, with ``Content-MD5`` (base64) or ``X-Chunk-Hash`` (hex)."""
    ident = identity(request)
    ctx = _ctx(request)
    started = time.perf_counter()
    part_number = _int(request.path_params["part_number"], "part_number")
    declared = rules.parse_md5(
        content_md5=request.headers.get("content-md5"), hex_md5=request.headers.get("x-chunk-hash")
    )
    session = await mp.get_session(ctx.db, ident.user_id, request.path_params["upload_id"])
    mp.ensure_writable(session, ctx.now())
    expected = mp.check_part(session, part_number)
    length = request.headers.get("content-length")
    if length is not None and length.isdigit():
        mp.check_part(session, part_number, int(length), size_field="Content-Length")
    body, md5 = await read_exact(request.stream(), expected)
    accepted = await mp.upload_part(
        ctx, session, part_number, body, computed_md5=md5, declared_md5=declared
    )
    _count_part(request, "put", accepted.size, started)
    return json_response(accepted)


async def chunk_form(request: Request) -> Response:
    """The originating spec's form route: fields plus ``chunk_file``."""
    ident = identity(request)
    ctx = _ctx(request)
    started = time.perf_counter()
    part = _PartBuffer(max_part_size(ctx.settings))

    async def open_part(_part: FormPart, _fields: dict[str, str]) -> _PartBuffer:
        return part

    fields, _ = await read_form(request, "chunk_file", open_part)
    for required in ("upload_id", "part_number", "chunk_hash"):
        if required not in fields:
            raise ValidationFailed(
                f"{required}: a form field is required", details={"field": required}
            )
    form = convert(fields, ChunkFields)
    session = await mp.get_session(ctx.db, ident.user_id, form.upload_id)
    mp.ensure_writable(session, ctx.now())
    mp.check_part(session, form.part_number, part.size, form.total_parts)
    if form.is_final_chunk is not None and form.is_final_chunk != (
        form.part_number == session.total_parts
    ):
        raise BadRequest(
            "is_final_chunk disagrees with part_number and total_parts",
            code="invalid_is_final_chunk",
            details={"field": "is_final_chunk"},
        )
    declared = rules.parse_md5(content_md5=None, hex_md5=form.chunk_hash)
    accepted = await mp.upload_part(
        ctx,
        session,
        form.part_number,
        part.body,
        computed_md5=part.md5.digest(),
        declared_md5=declared,
    )
    _count_part(request, "form", accepted.size, started)
    return json_response(accepted)


def _count_part(request: Request, route: str, size: int, started: float) -> None:
    m = metrics_of(services(request))
    m.parts.labels(route).inc()
    m.bytes.inc(size)
    m.part_seconds.observe(time.perf_counter() - started)


class _PartBuffer:
    """A form route's part, held in memory (one part per request) with its MD5."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.body = io.BytesIO()
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.size = 0

    async def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise PayloadTooLarge(
                f"a part can be at most {self.limit} bytes",
                code="part_too_large",
                details={"field": "chunk_file", "limit": self.limit},
            )
        self.body.write(data)
        self.md5.update(data)


async def presign(request: Request) -> Response:
    ident = identity(request)
    ctx = _ctx(request)
    part_number = _int(request.path_params["part_number"], "part_number")
    raw = await request.body() if request.headers.get("content-length", "0") != "0" else b""
    body = decode_json(raw, PresignBody) if raw.strip() else PresignBody()
    session = await mp.get_session(ctx.db, ident.user_id, request.path_params["upload_id"])
    return json_response(await mp.presign_part(ctx, session, part_number, body.content_md5))


async def complete(request: Request) -> Response:
    ident = identity(request)
    return json_response(
        await mp.complete(_ctx(request), ident.user_id, request.path_params["upload_id"])
    )


async def status(request: Request) -> Response:
    ident = identity(request)
    return json_response(
        await mp.status(_ctx(request), ident.user_id, request.path_params["upload_id"])
    )


async def cancel(request: Request) -> Response:
    ident = identity(request)
    return json_response(
        await mp.cancel(_ctx(request), ident.user_id, request.path_params["upload_id"])
    )


async def active(request: Request) -> Response:
    ident = identity(request)
    query = query_params(request, PageQuery)
    return json_response(await mp.list_active(_ctx(request), ident.user_id, query))


# --- single request ---------------------------------------------------------------------


async def simple(request: Request) -> Response:
    """``file`` (+ ``priority``, ``document_type``, ``processing_options``), streamed to S3."""
    ident = identity(request)
    ctx = _ctx(request)
    limit = ctx.settings.multipart_upload_threshold_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit + FORM_OVERHEAD:
        rules.check_size(int(length) - FORM_OVERHEAD, limit, field="file")
    writer: StreamingObjectWriter | None = None
    document_id = ""
    finalizing = False

    async def open_file(part: FormPart, fields: dict[str, str]) -> StreamingObjectWriter:
        nonlocal writer, document_id
        rules.check_filename(part.filename or "")
        _, content_type = rules.classify(
            part.filename or "", part.content_type, fields.get("document_type")
        )
        document_id, writer = new_direct_writer(ctx, content_type)
        return writer

    try:
        fields, file_part = await read_form(request, "file", open_file)
        assert writer is not None
        form = convert(fields, SimpleFields)
        options = _options(form.processing_options)
        filename = file_part.filename or ""
        document_type, content_type = rules.classify(
            filename, file_part.content_type, form.document_type
        )
        rules.check_size(writer.size, limit, field="file")
        size = await writer.finish()
        finalizing = True
        result = await finalize_direct(
            ctx,
            ident.user_id,
            document_id=document_id,
            filename=filename,
            content_type=content_type,
            document_type=document_type,
            size=size,
            priority=form.priority,
            processing_options=options,
        )
    except BaseException:
        if writer is not None and not finalizing:
            await writer.abort()
        raise
    m = metrics_of(services(request))
    m.sessions.labels("simple").inc()
    m.bytes.inc(result.size)
    return json_response(result, 201)


def _options(raw: str | None) -> dict[str, Any]:
    """The ``processing_options`` form field: JSON text of :class:`~us.ProcessingOptions`."""
    if not raw:
        return {}
    try:
        value = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        value = None
    if not isinstance(value, dict):
        raise BadRequest(
            "processing_options must be a JSON object",
            code="invalid_json",
            details={"field": "processing_options"},
        )
    try:
        return convert_strict(whole_floats_as_ints(value), us.ProcessingOptions).as_dict()
    except ValidationFailed as exc:
        exc.message = f"processing_options: {exc.message}"
        exc.details["field"] = "processing_options"
        raise


_UPLOAD_ID = {"upload_id": "$response.body#/upload_id"}
_PART_HEADERS = (
    HeaderParam(
        name="Content-MD5",
        description="The part's MD5, base64 (RFC 1864; the padding may be left out); "
        "this or X-Chunk-Hash is required",
        schema={"type": "string", "pattern": "^[A-Za-z0-9+/]{21}[AQgw](==)?$"},
    ),
    HeaderParam(
        name="X-Chunk-Hash",
        description="The part's MD5, 32 hex digits; this or Content-MD5 is required",
        schema={"type": "string", "pattern": "^[0-9a-fA-F]{32}$"},
    ),
)


_OTHERS = [
    *job_links("$response.body#/job_id"),
    *document_links("$response.body#/document_id"),
]
"""Links from an upload's answer to its job's and its document's routes."""


def routes() -> list[ApiRoute]:
    tags = ["uploads"]
    session_links = [
        ApiLink(name="GetStatus", operation="get_status", parameters=_UPLOAD_ID),
        ApiLink(name="Complete", operation="post_complete", parameters=_UPLOAD_ID),
        ApiLink(name="Cancel", operation="delete_cancel", parameters=_UPLOAD_ID),
    ]
    return [
        ApiRoute(
            f"{PREFIX}/initiate",
            initiate,
            methods=["POST"],
            status_code=201,
            summary="Start a resumable upload (creates the job)",
            body=us.InitiateUpload,
            response=us.InitiatedUpload,
            errors=[415],
            links=[
                *session_links,
                ApiLink(
                    name="PutFirstPart",
                    operation="put_put_part",
                    parameters={**_UPLOAD_ID, "part_number": "1"},
                ),
                ApiLink(
                    name="SendFirstPartAsForm",
                    operation="post_chunk_form",
                    request_body={"upload_id": "$response.body#/upload_id", "part_number": 1},
                ),
                ApiLink(
                    name="PresignFirstPart",
                    operation="post_presign",
                    parameters={**_UPLOAD_ID, "part_number": "1"},
                ),
                *_OTHERS,
            ],
            tags=tags,
        ),
        ApiRoute(
            f"{PREFIX}/chunk",
            chunk_form,
            methods=["POST"],
            summary="Send one part as multipart/form-data (upload_id, part_number, "
            "total_parts, chunk_hash, chunk_file)",
            body=ChunkFields,
            body_media_type="multipart/form-data",
            files=["chunk_file"],
            response=us.PartAccepted,
            errors=[404, 409, 410],
            tags=tags,
        ),
        ApiRoute(
            f"{PREFIX}/{{upload_id}}/parts/{{part_number}}",
            put_part,
            methods=["PUT"],
            summary="Send one part as the raw body with Content-MD5 or X-Chunk-Hash",
            raw_body=True,
            headers=_PART_HEADERS,
            response=us.PartAccepted,
            errors=[404, 409, 410],
            tags=tags,
        ),
        ApiRoute(
            f"{PREFIX}/{{upload_id}}/parts/{{part_number}}/presign",
            presign,
            methods=["POST"],
            summary="A presigned S3 UploadPart URL for one part",
            body=PresignBody,
            body_required=False,
            response=us.PresignedPart,
            errors=[404, 409, 410],
            tags=tags,
        ),
        ApiRoute(
            f"{PREFIX}/complete/{{upload_id}}",
            complete,
            methods=["POST"],
            summary="Complete the upload and queue its job (idempotent)",
            response=us.CompletedUpload,
            errors=[404, 409, 410],
            tags=tags,
        ),
        ApiRoute(
            f"{PREFIX}/simple",
            simple,
            methods=["POST"],
            status_code=201,
            summary="Upload a small file in one multipart/form-data request",
            body=SimpleFields,
            body_media_type="multipart/form-data",
            files=["file"],
            json_fields={"processing_options": us.ProcessingOptions},
            response=us.CompletedUpload,
            errors=[415],
            links=_OTHERS,
            tags=tags,
        ),
        ApiRoute(
            f"{PREFIX}/status/{{upload_id}}",
            status,
            methods=["GET"],
            summary="Upload progress, received and missing parts",
            response=us.UploadStatus,
            errors=[404],
            tags=tags,
        ),
        ApiRoute(
            f"{PREFIX}/cancel/{{upload_id}}",
            cancel,
            methods=["DELETE"],
            summary="Abort the upload and cancel its job (idempotent)",
            response=us.CancelledUpload,
            errors=[404, 409],
            tags=tags,
        ),
        ApiRoute(
            f"{PREFIX}/active",
            active,
            methods=["GET"],
            query=PageQuery,
            summary="The caller's unfinished uploads, newest first",
            response=Page[us.ActiveUpload],
            tags=tags,
        ),
    ]
