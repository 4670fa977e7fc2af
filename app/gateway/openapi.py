"""``/openapi.json`` generated from the schemas the handlers use, and ``/docs``.

Walks the application's :class:`~app.gateway.http.ApiRoute` objects and asks
msgspec for the JSON Schema of every request, query and response type.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute

from app.core.schemas import ErrorBody
from app.gateway.http import ApiRoute, json_response

_REF = "#/components/schemas/{name}"
_PARAM_RE = re.compile(r"{([a-zA-Z_][a-zA-Z0-9_]*)(?::[a-z]+)?}")


def build_openapi(routes: Iterable[BaseRoute], *, title: str, version: str) -> dict[str, Any]:
    api_routes = [r for r in routes if isinstance(r, ApiRoute)]
    types: list[Any] = [ErrorBody]
    for r in api_routes:
        types += [t for t in (r.body, r.query, r.response) if t is not None]
    schemas, components = msgspec.json.schema_components(types, ref_template=_REF)
    lookup = dict(zip(map(id, types), schemas, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for r in api_routes:
        openapi_path = _PARAM_RE.sub(r"{\1}", r.path)
        for method in sorted(m for m in (r.methods or ()) if m != "HEAD"):
            op: dict[str, Any] = {
                "summary": r.summary,
                "operationId": f"{method.lower()}_{r.name}",
                "tags": list(r.tags),
                "parameters": [
                    {"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                    for n in _PARAM_RE.findall(r.path)
                ],
                "responses": {},
            }
            if r.query is not None:
                op["parameters"] += _query_parameters(components, lookup[id(r.query)])
            if r.body is not None:
                op["requestBody"] = {
                    "required": True,
                    "content": {r.body_media_type: {"schema": lookup[id(r.body)]}},
                }
            ok: dict[str, Any] = {"description": "OK"}
            if r.response is not None:
                ok["content"] = {r.response_media_type: {"schema": lookup[id(r.response)]}}
            op["responses"][str(r.status_code)] = ok
            for status in sorted({*r.errors, *((401,) if r.auth else ())}):
                op["responses"][str(status)] = {
                    "description": "Error",
                    "content": {
                        "application/json": {"schema": {"$ref": _REF.format(name="ErrorBody")}}
                    },
                }
            if r.auth:
                op["security"] = [{"bearer": []}]
            paths.setdefault(openapi_path, {})[method.lower()] = op
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


def _query_parameters(components: dict[str, Any], schema: dict[str, Any]) -> list[dict[str, Any]]:
    ref = schema.get("$ref", "")
    resolved = components.get(ref.rsplit("/", 1)[-1], schema)
    required = set(resolved.get("required", []))
    return [
        {"name": name, "in": "query", "required": name in required, "schema": prop}
        for name, prop in resolved.get("properties", {}).items()
    ]


def openapi_endpoint(spec: dict[str, Any]) -> Any:
    encoded = msgspec.json.encode(spec)

    async def openapi_json(_request: Request) -> Response:
        return Response(encoded, media_type="application/json")

    return openapi_json


_DOCS = """<!doctype html>
<html><head><meta charset="utf-8"><title>Sluice API</title>
<link rel="stylesheet" href="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css">
</head><body><div id="ui"></div>
<script src="https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.json", dom_id: "#ui"});</script>
</body></html>"""


async def docs(_request: Request) -> Response:
    return HTMLResponse(_DOCS)


__all__ = ["build_openapi", "docs", "json_response", "openapi_endpoint"]
