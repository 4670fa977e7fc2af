"""``GET /api/v1/dashboard/config``: what the dashboard page reads before anything else
(where the WebSocket server is, the upload limits, the priorities and the aging rule).

Any authenticated caller may read it (it holds nothing user-specific or secret);
the answer is built by :func:`app.uploads.client_config.dashboard_config`.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from app.gateway.responses import json_response
from app.gateway.routing import ApiRoute
from app.gateway.services import services
from app.uploads.client_config import DashboardConfig, dashboard_config, public_ws_url


async def get_config(request: Request) -> Response:
    settings = services(request).settings
    ws_url = public_ws_url(
        settings, host=request.url.hostname or "localhost", secure=request.url.scheme == "https"
    )
    return json_response(dashboard_config(settings, ws_url))


def routes() -> list[ApiRoute]:
    return [
        ApiRoute(
            "/api/v1/dashboard/config",
            get_config,
            methods=["GET"],
            summary="The dashboard's configuration: WebSocket URL, upload limits, priorities",
            response=DashboardConfig,
            tags=["dashboard"],
        )
    ]
