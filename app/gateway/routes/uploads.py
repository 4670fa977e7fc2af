"""Upload routes: resumable multipart sessions (the single-request upload is in :mod:`.simple`).

The handlers only read HTTP (paths, headers, bodies) and call the services of
:mod:`app.uploads` (sessions, parts, presign, completion, listing, simple).
Every body is read through :func:`~app.gateway.requests.iter_body` with the
route's limit (the part size for parts, plus :data:`FORM_OVERHEAD` for forms;
the simple-upload threshold for ``/simple``; ``MAX_JSON_BODY_KB`` for JSON).
Part bodies are written into a :class:`~app.uploads.parts.PartBuffer` that
grows as the bytes arrive (never reserved up front) while their MD5 is
computed piece by piece, so a request never holds more than what it has
sent, at most one part; a user has at most
``MAX_PARTS_IN_FLIGHT_PER_USER`` part requests in progress per gateway process
(:class:`~app.gateway.admission.PartSlots`).  The multipart form routes use the streaming reader in
:mod:`app.gateway.formstream` rather than Starlette's spooling parser.
"""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response

from app.core.errors import BadRequest, PayloadTooLarge, ValidationFailed
from app.core.schemas import Page, PageQuery
from app.core.settings import Settings
from app.gateway.admission import part_slots
from app.gateway.formstream import FormPart, read_form
from app.gateway.requests import (
    convert,
    declared_length,
    identity,
    iter_body,
    query_params,
    read_json,
    read_optional_json,
    too_large,
)
from app.gateway.responses import json_response
from app.gateway.routes.documents import document_links
from app.gateway.routes.jobs import job_links
from app.gateway.routing import ApiLink, ApiRoute, HeaderParam, RateLimit
from app.gateway.services import Services, services
from app.uploads import listing, sessions
from app.uploads.completion import complete as complete_upload
from app.uploads.model import UploadContext
from app.uploads.parts import PartBuffer, check_part, read_exact, upload_part
from app.uploads.presign import presign_part
from app.uploads.rules import decide_chunk_size, parse_md5
from app.uploads.schemas import (
    ActiveUpload,
    CancelledUpload,
    ChunkFields,
    CompletedUpload,
    InitiatedUpload,
    InitiateUpload,
    PartAccepted,
    PresignBody,
    PresignedPart,
    UploadStatus,
)

PREFIX = "/api/v1/documents/upload"
FORM_OVERHEAD = 64 * 1024
"""Allowance for form field headers and text fields around a file."""


def upload_context(svc: Services) -> UploadContext:
    return UploadContext(
        db=svc.db,
        redis=svc.redis,
        s3=svc.s3,
        s3_public=svc.s3_public,
        queue=svc.queue,
        settings=svc.settings,
        clock=svc.clock,
    )


def _ctx(request: Request) -> UploadContext:
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
    return decide_chunk_size(settings.max_upload_size_bytes, settings.upload_chunk_size_bytes)[0]


# --- sessions --------------------------------------------------------------------------


async def initiate(request: Request) -> Response:
    ident = identity(request)
    body = await read_json(request, InitiateUpload)
    result = await sessions.initiate(_ctx(request), ident.user_id, body)
    services(request).metrics.uploads.sessions.labels("initiated").inc()
    return json_response(result, 201)


async def put_part(request: Request) -> Response:
    """Raw part body, with ``Content-MD5`` (base64) or ``X-Chunk-Hash`` (hex).

    Everything that can refuse the part (token, size, slot, session, state) is
    checked before its body is read.
    """
    ident = identity(request)
    ctx = _ctx(request)
    started = time.perf_counter()
    part_number = _int(request.path_params["part_number"], "part_number")
    declared = parse_md5(
        content_md5=request.headers.get("content-md5"), hex_md5=request.headers.get("x-chunk-hash")
    )
    limit = max_part_size(ctx.settings)
    length = declared_length(request)
    if length is not None and length > limit:
        raise too_large(limit, code="part_too_large", field="Content-Length")
    with part_slots(request).hold(ident.user_id):
        session = await sessions.get_session(
            ctx.db, ident.user_id, request.path_params["upload_id"]
        )
        sessions.ensure_writable(session, ctx.now())
        expected = check_part(session, part_number)
        if length is not None:
            check_part(session, part_number, length, size_field="Content-Length")
        chunks = iter_body(request, limit, code="part_too_large")
        body, md5 = await read_exact(chunks, expected)
        with body:
            accepted = await upload_part(
                ctx, session, part_number, body, computed_md5=md5, declared_md5=declared
            )
    _count_part(request, "put", accepted.size, started)
    return json_response(accepted)


async def chunk_form(request: Request) -> Response:
    """The originating spec's form route: fields plus ``chunk_file``."""
    ident = identity(request)
    ctx = _ctx(request)
    started = time.perf_counter()
    limit = max_part_size(ctx.settings)
    part = _FormPart(limit)

    async def open_part(_part: FormPart, _fields: dict[str, str]) -> _FormPart:
        return part

    with part_slots(request).hold(ident.user_id), part.body:
        fields, _ = await read_form(request, "chunk_file", open_part, limit=limit + FORM_OVERHEAD)
        for required in ("upload_id", "part_number", "chunk_hash"):
            if required not in fields:
                raise ValidationFailed(
                    f"{required}: a form field is required", details={"field": required}
                )
        form = convert(fields, ChunkFields)
        session = await sessions.get_session(ctx.db, ident.user_id, form.upload_id)
        sessions.ensure_writable(session, ctx.now())
        check_part(session, form.part_number, part.size, form.total_parts)
        if form.is_final_chunk is not None and form.is_final_chunk != (
            form.part_number == session.total_parts
        ):
            raise BadRequest(
                "is_final_chunk disagrees with part_number and total_parts",
                code="invalid_is_final_chunk",
                details={"field": "is_final_chunk"},
            )
        declared = parse_md5(content_md5=None, hex_md5=form.chunk_hash)
        accepted = await upload_part(
            ctx,
            session,
            form.part_number,
            part.finish(),
            computed_md5=part.md5.digest(),
            declared_md5=declared,
        )
    _count_part(request, "form", accepted.size, started)
    return json_response(accepted)


def _count_part(request: Request, route: str, size: int, started: float) -> None:
    m = services(request).metrics.uploads
    m.parts.labels(route).inc()
    m.bytes.inc(size)
    m.part_seconds.observe(time.perf_counter() - started)


class _FormPart(PartBuffer):
    """A form route's part (the ``chunk_file`` sink), at most ``capacity`` bytes."""

    async def write(self, data: bytes) -> None:
        if self.size + len(data) > self.capacity:
            raise PayloadTooLarge(
                f"a part can be at most {self.capacity} bytes",
                code="part_too_large",
                details={"field": "chunk_file", "limit": self.capacity},
            )
        self.add(data)


async def presign(request: Request) -> Response:
    ident = identity(request)
    ctx = _ctx(request)
    part_number = _int(request.path_params["part_number"], "part_number")
    body = await read_optional_json(request, PresignBody, PresignBody())
    session = await sessions.get_session(ctx.db, ident.user_id, request.path_params["upload_id"])
    return json_response(await presign_part(ctx, session, part_number, body.content_md5))


async def complete(request: Request) -> Response:
    ident = identity(request)
    return json_response(
        await complete_upload(_ctx(request), ident.user_id, request.path_params["upload_id"])
    )


async def status(request: Request) -> Response:
    ident = identity(request)
    return json_response(
        await listing.status(_ctx(request), ident.user_id, request.path_params["upload_id"])
    )


async def restart(request: Request) -> Response:
    """A lost upload (410 ``upload_lost``) starts again in place: same ids, no parts."""
    ident = identity(request)
    ctx = _ctx(request)
    upload_id = request.path_params["upload_id"]
    await sessions.restart(ctx, ident.user_id, upload_id)
    return json_response(await listing.status(ctx, ident.user_id, upload_id))


async def cancel(request: Request) -> Response:
    ident = identity(request)
    return json_response(
        await sessions.cancel(_ctx(request), ident.user_id, request.path_params["upload_id"])
    )


async def active(request: Request) -> Response:
    ident = identity(request)
    query = query_params(request, PageQuery)
    return json_response(await listing.list_active(_ctx(request), ident.user_id, query))


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


UPLOAD_LINKS = [
    *job_links("$response.body#/job_id"),
    *document_links("$response.body#/document_id"),
]
"""Links from an upload's answer to its job's and its document's routes."""


TAGS = ["uploads"]


def routes() -> list[ApiRoute]:
    return [*_start(), *_parts(), *_session_routes()]


def _start() -> list[ApiRoute]:
    tags = TAGS
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
            body=InitiateUpload,
            response=InitiatedUpload,
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
                *UPLOAD_LINKS,
            ],
            rate_limit=RateLimit.UPLOAD_START,
            tags=tags,
        ),
    ]


def _parts() -> list[ApiRoute]:
    tags = TAGS
    return [
        ApiRoute(
            f"{PREFIX}/chunk",
            chunk_form,
            methods=["POST"],
            summary="Send one part as multipart/form-data (upload_id, part_number, "
            "total_parts, chunk_hash, chunk_file)",
            body=ChunkFields,
            body_media_type="multipart/form-data",
            files=["chunk_file"],
            response=PartAccepted,
            errors=[404, 409, 410],
            rate_limit=RateLimit.PART_TRANSFER,
            tags=tags,
        ),
        ApiRoute(
            f"{PREFIX}/{{upload_id}}/parts/{{part_number}}",
            put_part,
            methods=["PUT"],
            summary="Send one part as the raw body with Content-MD5 or X-Chunk-Hash",
            raw_body=True,
            headers=_PART_HEADERS,
            response=PartAccepted,
            errors=[404, 409, 410],
            rate_limit=RateLimit.PART_TRANSFER,
            tags=tags,
        ),
        ApiRoute(
            f"{PREFIX}/{{upload_id}}/parts/{{part_number}}/presign",
            presign,
            methods=["POST"],
            summary="A presigned S3 UploadPart URL for one part",
            body=PresignBody,
            body_required=False,
            response=PresignedPart,
            errors=[404, 409, 410],
            rate_limit=RateLimit.PART_TRANSFER,
            tags=tags,
        ),
    ]


def _session_routes() -> list[ApiRoute]:
    tags = TAGS
    return [
        ApiRoute(
            f"{PREFIX}/complete/{{upload_id}}",
            complete,
            methods=["POST"],
            summary="Complete the upload and queue its job (idempotent)",
            response=CompletedUpload,
            errors=[404, 409, 410],
            tags=tags,
        ),
        ApiRoute(
            f"{PREFIX}/status/{{upload_id}}",
            status,
            methods=["GET"],
            summary="Upload progress, received and missing parts",
            response=UploadStatus,
            errors=[404],
            tags=tags,
        ),
        ApiRoute(
            f"{PREFIX}/restart/{{upload_id}}",
            restart,
            methods=["POST"],
            summary="Restart a lost upload (410 upload_lost): a fresh storage upload for "
            "the same session and job; send every part again (idempotent)",
            response=UploadStatus,
            errors=[404, 409, 503],
            tags=tags,
        ),
        ApiRoute(
            f"{PREFIX}/cancel/{{upload_id}}",
            cancel,
            methods=["DELETE"],
            summary="Abort the upload and cancel its job (idempotent)",
            response=CancelledUpload,
            errors=[404, 409],
            tags=tags,
        ),
        ApiRoute(
            f"{PREFIX}/active",
            active,
            methods=["GET"],
            query=PageQuery,
            summary="The caller's unfinished uploads, newest first",
            response=Page[ActiveUpload],
            errors=[400, 422],
            tags=tags,
        ),
    ]
