"""``/openapi.json`` generated from the schemas the handlers use, and ``/docs``.

``/docs`` is Swagger UI served entirely by the gateway (its assets come from a
pinned pip package), so it works offline and loads nothing from another host.

Walks the application's :class:`~app.gateway.http.ApiRoute` objects and asks
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


__all__ = ["build_openapi", "docs_routes", "json_response", "openapi_endpoint"]
