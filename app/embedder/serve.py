"""``sluice embedder``: the embedding service under uvicorn, until SIGTERM/SIGINT."""

from __future__ import annotations

import uvicorn

from app.core.settings import Settings
from app.embedder.app import create_app


def run(settings: Settings, *, host: str | None = None, port: int | None = None) -> int:
    """Serve on ``host:port`` (default: EMBEDDER_HOST/EMBEDDER_PORT); exit status 0."""
    config = uvicorn.Config(
        create_app(settings),
        host=host or settings.embedder_host,
        port=port or settings.embedder_port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
        timeout_keep_alive=settings.http_keepalive_seconds,
    )
    uvicorn.Server(config).run()
    return 0
