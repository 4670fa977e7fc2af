"""The tus 1.0 endpoint: ``/api/v1/tus/`` (creation) and ``/api/v1/tus/{upload_id}``.

Handlers parse tus headers (:mod:`app.uploads.tus_protocol`), call the service
(:mod:`app.uploads.tus`) and answer with headers only.  What every route of the
gateway gets, these get too: the bearer token (OPTIONS excepted), the body
guard (bounded reads, drain-then-answer, 408 on a stall, a vanished client is
a 499 line), 503 on an outage of Postgres, Redis or S3, and the error JSON body.
A PATCH (and a creation with a body) is metered like a part transfer: exempt
from the request rate limit, at most ``MAX_PARTS_IN_FLIGHT_PER_USER`` at once.
Bodies are read through :func:`~app.gateway.requests.iter_body` bounded by the
bytes the upload still lacks (``Upload-Length - Upload-Offset``), so a body past
the length is 413 before it is read when declared, as soon as it passes when
chunked.

The routes are :class:`~app.gateway.routing.ApiRoute` s (auth declared on each),
mounted outside ``/openapi.json``: tus is its own published protocol
(tus.io, 1.0.0), headers in and out, no JSON bodies, 204s and status 460, with
its own discovery (``OPTIONS``), and the clients that speak it are generated
from that spec, not from ours.  Fuzzing them as JSON operations would test a
contract nobody relies on; ``tests/test_tus_protocol.py`` pins the tus one.

:class:`TusProtocolMiddleware` puts ``Tus-Resumable: 1.0.0`` on every response
under the prefix (401s and 429s of the outer middleware included), answers
412 with ``Tus-Version`` to another protocol version, and honours
``X-HTTP-Method-Override`` (tus-js-client's ``overridePatchMethod``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.errors import BadRequest, RequestTimeout, SluiceError
from app.core.schemas import ProcessingOptions
from app.core.settings import Settings
from app.gateway.admission import part_slots
from app.gateway.requests import convert, decode_json, identity, iter_body
from app.gateway.responses import error_response, request_id_of
from app.gateway.routes.uploads import upload_context
from app.gateway.routing import ApiRoute, RateLimit
from app.gateway.services import services
from app.uploads import tus
from app.uploads import tus_protocol as tp
from app.uploads.schemas import InitiateUpload

CORS_METHODS = ["PATCH", "HEAD"]
CORS_ALLOW_HEADERS = [
    "Tus-Resumable",
    "Upload-Length",
    "Upload-Defer-Length",
    "Upload-Metadata",
    "Upload-Offset",
    "Upload-Checksum",
    "Upload-Concat",
    "X-HTTP-Method-Override",
    "X-Requested-With",
]
CORS_EXPOSE_HEADERS = [
    "Location",
    "Upload-Offset",
    "Upload-Length",
    "Upload-Defer-Length",
    "Upload-Expires",
    "Upload-Metadata",
    "Upload-Concat",
    "Tus-Resumable",
    "Tus-Version",
    "Tus-Extension",
    "Tus-Max-Size",
    "Tus-Checksum-Algorithm",
    "Sluice-Job-Id",
    "Sluice-Document-Id",
]
_OVERRIDABLE = frozenset({"PATCH", "DELETE"})


class TusProtocolMiddleware:
    """Protocol version, ``Tus-Resumable`` on every answer, method override (see module)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path != tp.TUS_PREFIX and not path.startswith(tp.TUS_PREFIX + "/"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        override = headers.get("x-http-method-override", "").upper()
        if scope["method"] == "POST" and override in _OVERRIDABLE:
            scope = {**scope, "method": override}

        async def send_with_version(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    (b"tus-resumable", tp.TUS_VERSION.encode()),
                ]
            await send(message)

        if scope["method"] != "OPTIONS":
            try:
                tp.check_version(headers.get("tus-resumable"))
            except tp.PreconditionFailed as exc:
                response = error_response(exc, request_id_of(scope))
                await response(scope, receive, send_with_version)
                return
        await self.app(scope, receive, send_with_version)


def _runtime(request: Request) -> tus.TusRuntime:
    runtime = request.app.state.tus
    assert isinstance(runtime, tus.TusRuntime)
    return runtime


def location(upload_id: str) -> str:
    return f"{tp.TUS_PREFIX}/{upload_id}"


def upload_headers(upload: tus.TusUpload, *, ids: bool = True) -> dict[str, str]:
    """What ``HEAD`` reports (and creation answers): offset, length, expiry, metadata."""
    found = {"Upload-Offset": str(upload.offset), "Upload-Expires": tp.http_date(upload.expires_at)}
    if upload.upload_length is None:
        found["Upload-Defer-Length"] = "1"
    else:
        found["Upload-Length"] = str(upload.upload_length)
    if upload.metadata:
        found["Upload-Metadata"] = upload.metadata
    if upload.concat == "partial":
        found["Upload-Concat"] = "partial"
    elif upload.concat == "final":
        found["Upload-Concat"] = upload.concat_header
    if ids and upload.job_id is not None and upload.document_id is not None:
        found["Sluice-Job-Id"] = upload.job_id
        found["Sluice-Document-Id"] = upload.document_id
    return found


def initiate_request(metadata: dict[str, str], file_size: int) -> InitiateUpload:
    """The ``initiate`` request the metadata spells; validated as ``initiate`` validates it
    (422 for a bad field, 400 ``invalid_json`` for malformed ``processing_options``)."""
    fields: dict[str, Any] = tp.initiate_fields(metadata, file_size)
    raw = metadata.get("processing_options")
    if raw:
        decode_json(raw, Any, field="processing_options")  # malformed: 400 before 422
        options = decode_json(raw, ProcessingOptions, field="processing_options")
        fields["processing_options"] = options.to_dict()
    return convert(fields, InitiateUpload)


def _body(request: Request) -> tus.Body:
    async def pieces(limit: int) -> AsyncIterator[bytes]:
        try:
            async for piece in iter_body(request, limit, code="upload_length_exceeded"):
                yield piece
        except (ClientDisconnect, RequestTimeout) as exc:
            raise tus.BodyInterrupted(type(exc).__name__) from exc

    return pieces


async def _write(
    request: Request,
    upload_id: str,
    *,
    offset: int,
    length: int | None,
    checksum: tp.Checksum | None,
) -> tus.TusUpload:
    owner = identity(request).user_id
    ctx = upload_context(services(request))
    with part_slots(request).hold(owner):
        try:
            return await tus.patch(
                ctx,
                _runtime(request),
                owner,
                upload_id,
                offset=offset,
                length=length,
                checksum=checksum,
                body=_body(request),
            )
        except tus.BodyInterrupted as exc:
            raise (exc.__cause__ or exc) from None


def _has_body(request: Request) -> bool:
    length = request.headers.get("content-length", "0")
    return length != "0" or "chunked" in request.headers.get("transfer-encoding", "").lower()


# --- handlers ------------------------------------------------------------------------------


async def options(request: Request) -> Response:
    settings: Settings = services(request).settings
    return Response(
        status_code=204,
        headers={
            "Tus-Version": tp.TUS_VERSION,
            "Tus-Max-Size": str(settings.max_upload_size_bytes),
            "Tus-Extension": ",".join(tp.TUS_EXTENSIONS),
            "Tus-Checksum-Algorithm": tp.Checksum.NAMES,
        },
    )


async def create(request: Request) -> Response:
    """Creation (+ creation-with-upload, deferred length, concatenation)."""
    owner = identity(request).user_id
    ctx = upload_context(services(request))
    headers = request.headers
    concat = tp.parse_concat(headers.get("upload-concat"))
    raw_metadata = headers.get("upload-metadata", "").strip()
    metadata = tp.parse_metadata(raw_metadata)
    with_body = _has_body(request)
    if with_body:
        tp.check_content_type(headers.get("content-type"))
    checksum = tp.parse_checksum(headers.get("upload-checksum"))
    if concat.kind == "final":
        if with_body:
            raise BadRequest(
                "a final upload is built from its partial uploads and takes no body",
                code="invalid_upload_concat",
                details={"field": "Upload-Concat"},
            )
        upload = await tus.create_final(
            ctx,
            owner,
            concat,
            metadata=raw_metadata,
            request_for=lambda size: initiate_request(metadata, size),
        )
    else:
        length = tp.parse_length(headers.get("upload-length"), headers.get("upload-defer-length"))
        if concat.kind == "partial":
            upload = await tus.create_partial(ctx, owner, length=length, metadata=raw_metadata)
        else:
            size = ctx.settings.max_upload_size_bytes if length is None else length
            req = initiate_request(metadata, size)
            upload = await tus.create(ctx, owner, req, length=length, metadata=raw_metadata)
    where = location(upload.id)
    if with_body:
        try:
            upload = await _write(request, upload.id, offset=0, length=None, checksum=checksum)
        except SluiceError as exc:  # the upload exists: say where, so it can be resumed
            exc.headers.setdefault("Location", where)
            raise
    return Response(status_code=201, headers={"Location": where, **upload_headers(upload)})


async def head(request: Request) -> Response:
    owner = identity(request).user_id
    ctx = upload_context(services(request))
    upload = await tus.info(ctx, _runtime(request), owner, request.path_params["upload_id"])
    return Response(
        status_code=200, headers={**upload_headers(upload), "Cache-Control": "no-store"}
    )


async def patch(request: Request) -> Response:
    """Append the body at ``Upload-Offset``; the last byte completes the upload."""
    headers = request.headers
    tp.check_content_type(headers.get("content-type"))
    raw_offset = headers.get("upload-offset")
    if raw_offset is None:
        raise BadRequest(
            "Upload-Offset is required",
            code="invalid_upload_offset",
            details={"field": "Upload-Offset"},
        )
    offset = tp.parse_count(raw_offset, "Upload-Offset")
    raw_length = headers.get("upload-length")
    length = None if raw_length is None else tp.parse_count(raw_length, "Upload-Length")
    checksum = tp.parse_checksum(headers.get("upload-checksum"))
    upload = await _write(
        request, request.path_params["upload_id"], offset=offset, length=length, checksum=checksum
    )
    if upload.done:  # the last byte: the ids of the job and document it started
        return Response(status_code=204, headers=upload_headers(upload))
    return Response(
        status_code=204,
        headers={
            "Upload-Offset": str(upload.offset),
            "Upload-Expires": tp.http_date(upload.expires_at),
        },
    )


async def delete(request: Request) -> Response:
    """Termination: the S3 upload aborted, the session and its job cancelled; then 404."""
    owner = identity(request).user_id
    ctx = upload_context(services(request))
    await tus.terminate(ctx, _runtime(request), owner, request.path_params["upload_id"])
    return Response(status_code=204)


def routes() -> list[ApiRoute]:
    """The tus routes (mounted next to, not inside, the OpenAPI document)."""
    upload = f"{tp.TUS_PREFIX}/{{upload_id}}"
    found: list[ApiRoute] = []
    for collection in (f"{tp.TUS_PREFIX}/", tp.TUS_PREFIX):
        found += [
            ApiRoute(
                collection,
                create,
                methods=["POST"],
                status_code=201,
                summary="tus creation (creation-with-upload, deferred length, concatenation)",
                raw_body=True,
                rate_limit=RateLimit.UPLOAD_START,  # a partial upload costs a request only
                tags=["tus"],
            ),
            ApiRoute(collection, options, methods=["OPTIONS"], summary="tus discovery", auth=False),
        ]
    return [
        *found,
        ApiRoute(upload, head, methods=["HEAD"], summary="tus upload offset", tags=["tus"]),
        ApiRoute(
            upload,
            patch,
            methods=["PATCH"],
            status_code=204,
            summary="tus append",
            raw_body=True,
            rate_limit=RateLimit.PART_TRANSFER,
            tags=["tus"],
        ),
        ApiRoute(upload, delete, methods=["DELETE"], summary="tus termination", tags=["tus"]),
        ApiRoute(upload, options, methods=["OPTIONS"], summary="tus discovery", auth=False),
    ]
