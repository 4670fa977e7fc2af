"""``sluice gateway``: the gateway app under uvicorn, until SIGTERM/SIGINT.

Behind a proxy (``proxy_headers``); uvicorn's own logging off, Sluice's
structlog lines are the log; ten seconds for in-flight requests on shutdown.
"""

from __future__ import annotations

import uvicorn

from app.core.settings import Settings
from app.gateway.app import create_app


def run(settings: Settings, *, host: str | None = None, port: int | None = None) -> int:
    """Serve on ``host:port`` (default: GATEWAY_HOST/GATEWAY_PORT); exit status 0."""
    config = uvicorn.Config(
        create_app(settings),
        host=host or settings.gateway_host,
        port=port or settings.gateway_port,
        log_config=None,
        access_log=False,
        proxy_headers=True,
        timeout_graceful_shutdown=10,
        timeout_keep_alive=settings.http_keepalive_seconds,
        h11_max_incomplete_event_size=64 * 1024,
    )
    uvicorn.Server(config).run()
    return 0
