"""``/openapi.json`` generated from the schemas the handlers use, and ``/docs``.

``/docs`` is Swagger UI served entirely by the gateway (its assets come from a
pinned pip package), so it works offline and loads nothing from another host.

Walks the application's :class:`~app.gateway.routing.ApiRoute` objects and asks
msgspec for the JSON Schema of every request, query and response type.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.routing import BaseRoute, Route

from app.core.schemas import ErrorBody
from app.gateway.routing import BINARY, ApiRoute
from app.uploads.rules import MAX_PARTS

_REF = "#/components/schemas/{name}"
_PARAM_RE = re.compile(r"{([a-zA-Z_][a-zA-Z0-9_]*)(?::[a-z]+)?}")
_PATH_PARAMS: dict[str, dict[str, Any]] = {
    "part_number": {"type": "integer", "minimum": 1, "maximum": MAX_PARTS},
}
"""Path parameters that are not ids; every ``*_id`` is a UUID (another string is 404)."""
_UUID: dict[str, Any] = {"type": "string", "format": "uuid"}
_ERRORS: dict[int, str] = {
    400: "Malformed request (invalid_json, invalid_cursor, invalid_filename, invalid_form, "
    "invalid_checksum, invalid_part_size, checksum_mismatch...)",
    401: "Missing, malformed or expired bearer token",
    403: "The route needs an admin token (admin_required): sluice token --admin",
    404: "Not found, or owned by another user (indistinguishable on purpose)",
    408: "The request body stalled (body_timeout)",
    409: "Conflicts with the resource's state (upload_completed, upload_cancelled, job_active...)",
    410: "The upload's storage is gone (upload_lost); start the upload again",
    413: "The body or the file is too large (payload_too_large, part_too_large, file_too_large)",
    415: "The file type or content type is not supported",
    422: "A field or parameter failed validation (validation_error)",
    429: "Rate limited (rate_limited) or too many parts in flight "
    "(too_many_parts_in_flight); see Retry-After",
    503: "A dependency is unavailable (database_unavailable, redis_unavailable, "
    "storage_unavailable, queue_unavailable, embedding_unavailable); see Retry-After",
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying",
        "schema": {"type": "integer", "minimum": 0},
    }
}


def build_openapi(routes: Iterable[BaseRoute], *, title: str, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``routes``.

    Invariants: every operation documents each status its route can answer
    (:meth:`ApiRoute.default_errors` plus its own), every error with the one
    :class:`ErrorBody` schema; every link names an operation of the document.
    """
    api_routes = [r for r in routes if isinstance(r, ApiRoute)]
    types: list[Any] = [ErrorBody]
    for r in api_routes:
        types += [t for t in (r.body, r.query, r.response) if t is not None]
        types += [*r.json_fields.values(), *r.other_responses.values()]
    schemas, components = msgspec.json.schema_components(types, ref_template=_REF)
    lookup = dict(zip(map(id, types), schemas, strict=False))
    paths: dict[str, dict[str, Any]] = {}
    operation_ids: set[str] = set()
    for r in api_routes:
        openapi_path = _PARAM_RE.sub(r"{\1}", r.path)
        for method in sorted(m for m in (r.methods or ()) if m != "HEAD"):
            operation_ids.add(f"{method.lower()}_{r.name}")
            paths.setdefault(openapi_path, {})[method.lower()] = _operation(
                r, method, components, lookup
            )
    for ops in paths.values():
        for op in ops.values():
            for response in op["responses"].values():
                for name, link in response.get("links", {}).items():
                    if link["operationId"] not in operation_ids:
                        raise ValueError(f"link {name} names no operation {link['operationId']}")
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
    }


def _operation(
    r: ApiRoute, method: str, components: dict[str, Any], lookup: dict[int, Any]
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": r.summary,
        "operationId": f"{method.lower()}_{r.name}",
        "tags": list(r.tags),
        "parameters": [
            {
                "name": n,
                "in": "path",
                "required": True,
                "schema": _PATH_PARAMS.get(n, _UUID if n.endswith("_id") else {"type": "string"}),
            }
            for n in _PARAM_RE.findall(r.path)
        ],
        "responses": {},
    }
    if r.query is not None:
        op["parameters"] += _query_parameters(components, lookup[id(r.query)])
    op["parameters"] += [
        {"name": h.name, "in": "header", "required": h.required, "description": h.description}
        | {"schema": h.schema}
        for h in r.headers
    ]
    if r.has_body:
        op["requestBody"] = {
            "required": r.body_required,
            "content": {r.body_media_type: _body_content(r, components, lookup)},
        }
    ok: dict[str, Any] = {"description": "OK"}
    if r.response is not None:
        ok["content"] = {r.response_media_type: {"schema": lookup[id(r.response)]}}
    if r.links:
        ok["links"] = {
            link.name: {
                "operationId": link.operation,
                "description": link.description or link.name,
            }
            | ({"parameters": dict(link.parameters)} if link.parameters else {})
            | ({"requestBody": link.request_body} if link.request_body is not None else {})
            for link in r.links
        }
    op["responses"][str(r.status_code)] = ok
    for status, type_ in r.other_responses.items():
        op["responses"][str(status)] = {
            "description": _ERRORS.get(status, "Other"),
            "content": {r.response_media_type: {"schema": lookup[id(type_)]}},
        }
    for status in r.errors:
        response: dict[str, Any] = {
            "description": _ERRORS.get(status, "Error"),
            "content": {"application/json": {"schema": {"$ref": _REF.format(name="ErrorBody")}}},
        }
        if status in (429, 503):
            response["headers"] = _RETRY_AFTER
        op["responses"][str(status)] = response
    if r.auth:
        op["security"] = [{"bearer": []}]
    return op


def _body_content(r: ApiRoute, components: dict[str, Any], lookup: dict[int, Any]) -> Any:
    if r.raw_body:
        return {"schema": BINARY}
    if not r.files and not r.json_fields:
        assert r.body is not None
        return {"schema": lookup[id(r.body)]}
    # A multipart form: text fields from the Struct (a form field is a string or
    # absent, never null), JSON fields with their own schema, binary files.
    fields = _resolve(components, lookup[id(r.body)]) if r.body is not None else {}
    properties = {
        name: _not_null(prop)
        for name, prop in fields.get("properties", {}).items()
        if name not in r.json_fields
    }
    properties |= {name: lookup[id(t)] for name, t in r.json_fields.items()}
    properties |= dict.fromkeys(r.files, BINARY)
    required = [n for n in fields.get("required", []) if n not in r.json_fields]
    content: dict[str, Any] = {
        "schema": {
            "type": "object",
            "properties": properties,
            "required": [*required, *r.files],
            "additionalProperties": False,
        }
    }
    if r.json_fields:
        content["encoding"] = {n: {"contentType": "application/json"} for n in r.json_fields}
    return content


def _resolve(components: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref", "")
    found: dict[str, Any] = components.get(ref.rsplit("/", 1)[-1], schema)
    return found


def _not_null(prop: dict[str, Any]) -> dict[str, Any]:
    options = prop.get("anyOf")
    if options is None:
        return prop
    kept = [o for o in options if o.get("type") != "null"]
    rest = {k: v for k, v in prop.items() if k not in ("anyOf", "default")}
    return (kept[0] if len(kept) == 1 else {"anyOf": kept}) | rest


def _query_parameters(components: dict[str, Any], schema: dict[str, Any]) -> list[dict[str, Any]]:
    resolved = _resolve(components, schema)
    required = set(resolved.get("required", []))
    return [
        {"name": name, "in": "query", "required": name in required, "schema": _not_null(prop)}
        for name, prop in resolved.get("properties", {}).items()
    ]


def openapi_endpoint(spec: dict[str, Any]) -> Any:
    encoded = msgspec.json.encode(spec)

    async def openapi_json(_request: Request) -> Response:
        return Response(encoded, media_type="application/json")

    return openapi_json


SWAGGER_UI_PACKAGE = "swagger_ui"
"""The pip package (``swagger-ui-py``, pinned in pyproject.toml) whose ``static/``
folder holds Swagger UI's built assets; the gateway serves them itself."""
DOCS_ASSETS: dict[str, str] = {
    "swagger-ui.css": "text/css; charset=utf-8",
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "favicon-32x32.png": "image/png",
}
"""The only files ``/docs/assets/{name}`` serves (an allowlist, never a path)."""

_DOCS_INIT = b"""window.addEventListener("load", function () {
  var root = document.getElementById("ui");
  window.ui = SwaggerUIBundle({
    url: root.getAttribute("data-spec"),
    domNode: root,
    deepLinking: true,
    validatorUrl: null,
    persistAuthorization: false,
  });
});
"""

_DOCS_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sluice API</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" type="image/png" href="/docs/assets/favicon-32x32.png">
<link rel="stylesheet" href="/docs/assets/swagger-ui.css">
</head><body><div id="ui" data-spec="/openapi.json"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script src="/docs/assets/init.js"></script>
</body></html>"""

# Everything the page loads comes from this gateway: no CDN, works offline.
_DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; font-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_ASSET_CACHE = "public, max-age=3600"


def swagger_ui_dir() -> Path | None:
    """Where the installed Swagger UI assets are (found without importing the package)."""
    spec = importlib.util.find_spec(SWAGGER_UI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    static = Path(next(iter(spec.submodule_search_locations))) / "static"
    return static if (static / "swagger-ui-bundle.js").is_file() else None


def docs_routes() -> list[BaseRoute]:
    """``/docs`` (Swagger UI) and its assets, all served by the gateway itself."""
    static = swagger_ui_dir()

    async def docs(_request: Request) -> Response:
        return HTMLResponse(_DOCS_HTML, headers={"Content-Security-Policy": _DOCS_CSP})

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name == "init.js":
            return Response(
                _DOCS_INIT,
                media_type="text/javascript; charset=utf-8",
                headers={"Cache-Control": _ASSET_CACHE},
            )
        media_type = DOCS_ASSETS.get(name)
        if media_type is None:
            return Response(b"not found\n", status_code=404, media_type="text/plain")
        if static is None:
            return Response(
                f"{SWAGGER_UI_PACKAGE} is not installed\n".encode(),
                status_code=503,
                media_type="text/plain",
            )
        return FileResponse(
            static / name, media_type=media_type, headers={"Cache-Control": _ASSET_CACHE}
        )

    return [
        Route("/docs", docs, methods=["GET"], include_in_schema=False),
        Route("/docs/assets/{name}", asset, methods=["GET"], include_in_schema=False),
    ]


__all__ = ["build_openapi", "docs_routes", "openapi_endpoint"]
