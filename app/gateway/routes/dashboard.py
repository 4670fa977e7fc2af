"""The operations dashboard: ``GET /`` and its static files under ``/dashboard/``.

The page is plain HTML, CSS and JavaScript modules kept in the package
(``app/gateway/dashboard/``); it talks to the documented JSON routes and the
WebSocket server like any other client.  Invariants:

* the routes are public plain Starlette routes (no token: the token lives in
  the browser's ``sessionStorage``) and are not in ``/openapi.json``;
* only the files present in the package directory when the app is built are
  served, read once into memory (the whole page is well under 200 KB): a path
  outside that set is a 404, so there is no path traversal and no disk I/O per
  request;
* every response carries a strict Content-Security-Policy (same origin only,
  plus the WebSocket server's origin in ``connect-src``), ``nosniff``, an ETag
  and ``Cache-Control: no-cache`` (revalidate, so an upgrade is seen at once).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from app.core.settings import Settings
from app.uploads.client_config import public_ws_url

STATIC_DIR = Path(__file__).resolve().parent.parent / "dashboard"
STATIC_PREFIX = "/dashboard/"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".txt": "text/plain; charset=utf-8",
}


@dataclass(frozen=True, slots=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str


def load_files(directory: Path = STATIC_DIR) -> dict[str, StaticFile]:
    """Every servable file of ``directory`` (one level, known types), by name."""
    files: dict[str, StaticFile] = {}
    for path in sorted(directory.iterdir()):
        content_type = CONTENT_TYPES.get(path.suffix)
        if content_type is None or not path.is_file():
            continue
        body = path.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
        files[path.name] = StaticFile(body, content_type, etag)
    return files


def ws_origin(request: Request, settings: Settings) -> str:
    """The WebSocket server's origin as the page sees it (``connect-src``): the one
    ``GET /api/v1/dashboard/config`` hands the page (``PUBLIC_WS_URL``, else the
    request's host name on ``WEBSOCKET_PORT``), without its path."""
    url = urlsplit(
        public_ws_url(
            settings,
            host=request.url.hostname or "127.0.0.1",
            secure=request.url.scheme == "https",
        )
    )
    return f"{url.scheme}://{url.netloc}"


def security_policy(ws_origin: str) -> str:
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "worker-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            f"connect-src 'self' {ws_origin}",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )


class DashboardFiles:
    """Serves the loaded files with their headers (see the module's invariants)."""

    def __init__(self, settings: Settings, files: dict[str, StaticFile]) -> None:
        self._settings = settings
        self._files = files

    def respond(self, request: Request, name: str) -> Response:
        found = self._files.get(name)
        if found is None:
            return Response(b"not found\n", status_code=404, media_type="text/plain")
        headers = {
            "Cache-Control": "no-cache",
            "ETag": found.etag,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Content-Security-Policy": security_policy(ws_origin(request, self._settings)),
        }
        if request.headers.get("if-none-match") == found.etag:
            return Response(status_code=304, headers=headers)
        return Response(found.body, headers=headers, media_type=found.content_type)

    async def index(self, request: Request) -> Response:
        return self.respond(request, "index.html")

    async def static(self, request: Request) -> Response:
        return self.respond(request, str(request.path_params["name"]))


def routes(settings: Settings) -> list[BaseRoute]:
    """``GET /`` (the page) and ``GET /dashboard/{name}`` (its files); not in OpenAPI."""
    files = DashboardFiles(settings, load_files())
    return [
        Route("/", files.index, methods=["GET"], include_in_schema=False),
        Route(
            STATIC_PREFIX + "{name}",
            files.static,
            methods=["GET"],
            include_in_schema=False,
        ),
    ]
