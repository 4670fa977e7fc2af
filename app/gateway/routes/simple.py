"""``POST /documents/upload/simple``: a small file in one multipart/form-data request.

The file field is streamed to S3 as it is parsed (:mod:`app.gateway.formstream`),
its size counted against ``MULTIPART_UPLOAD_THRESHOLD_MB`` as it arrives; the
document and its job are registered only once the object is stored, and a
refused or abandoned upload leaves no object behind.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from app.core.schemas import ProcessingOptions
from app.gateway.formstream import FormPart, read_form
from app.gateway.requests import convert, decode_json, identity
from app.gateway.responses import json_response
from app.gateway.routes.uploads import FORM_OVERHEAD, PREFIX, UPLOAD_LINKS, upload_context
from app.gateway.routing import ApiRoute, RateLimit
from app.gateway.services import services
from app.uploads.rules import check_filename, check_size, classify
from app.uploads.schemas import CompletedUpload, SimpleFields
from app.uploads.simple import StreamingObjectWriter, finalize_simple, new_simple_writer


async def simple(request: Request) -> Response:
    """``file`` (+ ``priority``, ``document_type``, ``processing_options``), streamed to S3."""
    ident = identity(request)
    ctx = upload_context(services(request))
    limit = ctx.settings.multipart_upload_threshold_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit + FORM_OVERHEAD:
        check_size(int(length) - FORM_OVERHEAD, limit, field="file")
    writer: StreamingObjectWriter | None = None
    document_id = ""
    finalizing = False

    async def open_file(part: FormPart, fields: dict[str, str]) -> StreamingObjectWriter:
        nonlocal writer, document_id
        check_filename(part.filename or "")
        _options(fields.get("processing_options"))  # refuse bad options before storing
        _, content_type = classify(
            part.filename or "", part.content_type, fields.get("document_type")
        )
        document_id, writer = new_simple_writer(ctx, content_type)
        return writer

    try:
        fields, file_part = await read_form(request, "file", open_file, limit=limit + FORM_OVERHEAD)
        assert writer is not None
        form = convert(fields, SimpleFields)
        options = _options(form.processing_options)
        filename = check_filename(file_part.filename or "")
        document_type, content_type = classify(filename, file_part.content_type, form.document_type)
        check_size(writer.size, limit, field="file")
        size = await writer.finish()
        finalizing = True
        result = await finalize_simple(
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
    m = services(request).metrics.uploads
    m.sessions.labels("simple").inc()
    m.bytes.inc(result.size)
    return json_response(result, 201)


def _options(raw: str | None) -> dict[str, Any]:
    """The ``processing_options`` form field: JSON text, validated like ``reprocess``'s."""
    if not raw:
        return {}
    decode_json(raw, Any, field="processing_options")  # malformed JSON: 400 before 422
    return decode_json(raw, ProcessingOptions, field="processing_options").to_dict()


def routes() -> list[ApiRoute]:
    return [
        ApiRoute(
            f"{PREFIX}/simple",
            simple,
            methods=["POST"],
            status_code=201,
            summary="Upload a small file in one multipart/form-data request",
            body=SimpleFields,
            body_media_type="multipart/form-data",
            files=["file"],
            json_fields={"processing_options": ProcessingOptions},
            response=CompletedUpload,
            errors=[415],
            links=UPLOAD_LINKS,
            rate_limit=RateLimit.UPLOAD_START,
            tags=["uploads"],
        ),
    ]
