"""``sluice dev``: the whole of Sluice on one machine, from pip packages alone.

Starts the embedded PostgreSQL (+pgvector), Redis and S3 servers with their
data under ``data_dir`` (Postgres and Redis persist across restarts; the S3
server keeps objects in memory), applies migrations, creates the bucket, then
runs the gateway, one worker, the WebSocket server and the embedding service
(``sluice embedder``, which the gateway embeds search queries with) as child processes
(:class:`~devstack.supervise.Children`: a crashed one is started again, a crash
loop stops everything with a non-zero exit).  Prints the URLs and a dev token
once the gateway is ready, and the dashboard's link with an admin dev token in
its URL fragment (``#token=...``: browsers never send a fragment to the server).
Tokens are printed to stdout only, never logged.  Ctrl-C (or SIGTERM) stops the children, then the
servers; a second Ctrl-C during that is ignored, so nothing is left half-stopped.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from app.core.auth import TokenService
from app.core.db import migrate_dsn
from app.core.errors import ConfigError
from app.core.logging import configure_logging, get_logger
from app.core.settings import Settings
from app.core.storage import ensure_bucket, open_s3
from devstack.postgres import EmbeddedPostgres
from devstack.process import EmbeddedServerError
from devstack.redis import EmbeddedRedis
from devstack.s3 import EmbeddedS3
from devstack.secret import dev_secret
from devstack.stack import EmbeddedStack
from devstack.supervise import Children

log = get_logger("sluice.dev")
READY_TIMEOUT = 120.0
TOKEN_TTL_SECONDS = 30 * 24 * 3600
CHILDREN = {
    "gateway": [sys.executable, "-m", "app", "gateway"],
    "worker": [sys.executable, "-m", "workers"],
    "ws": [sys.executable, "-m", "app", "ws"],
    "embedder": [sys.executable, "-m", "app", "embedder"],
}


@dataclass(frozen=True, slots=True)
class DevOptions:
    """Where ``sluice dev`` keeps its data and the ports everything listens on
    (the defaults are the command line's, in :mod:`app.cli`)."""

    data_dir: Path
    port: int
    ws_port: int
    postgres_port: int
    redis_port: int
    s3_port: int
    worker_metrics_port: int
    embedder_port: int = 8090


class _Stop(Exception):
    """Raised from the signal handler to unwind ``run_dev``."""


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def dev_environ(
    options: DevOptions, environ: Mapping[str, str], stack: EmbeddedStack, secret: str
) -> dict[str, str]:
    """The children's environment: the caller's, pointed at the stack, on loopback."""
    return {
        **environ,
        **stack.environ(),
        "JWT_SECRET": secret,
        "LOG_FORMAT": environ.get("LOG_FORMAT", "console"),
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(options.port),
        "WEBSOCKET_HOST": "127.0.0.1",
        "WEBSOCKET_PORT": str(options.ws_port),
        "WORKER_METRICS_HOST": "127.0.0.1",
        "WORKER_METRICS_PORT": str(options.worker_metrics_port),
        "EMBEDDER_HOST": "127.0.0.1",
        "EMBEDDER_PORT": str(options.embedder_port),
        "SEARCH_EMBEDDING_URL": f"http://127.0.0.1:{options.embedder_port}/v1",
        "HF_HUB_OFFLINE": "1",
    }


async def _prepare(settings: Settings) -> None:
    await migrate_dsn(settings.database_url.reveal())
    async with open_s3(settings) as s3:
        await ensure_bucket(s3, settings.minio_bucket_name)


def _wait_ready(url: str, children: Children) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        children.supervise()
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise EmbeddedServerError(f"gateway not ready at {url} after {READY_TIMEOUT:.0f}s")


def run_dev(options: DevOptions, environ: Mapping[str, str]) -> int:
    """Run the stack until Ctrl-C or SIGTERM (0) or a failure (1)."""
    data_dir = options.data_dir.resolve()
    secret = environ.get("JWT_SECRET") or dev_secret(data_dir, create=True)
    assert secret is not None
    configure_logging(environ.get("LOG_LEVEL", "INFO"), "console", secrets=[secret])
    stack = EmbeddedStack(
        EmbeddedPostgres(data_dir, port=options.postgres_port, durable=True),
        EmbeddedRedis(data_dir, port=options.redis_port, durable=True),
        EmbeddedS3(data_dir, port=options.s3_port),
    )
    children: Children | None = None
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        log.info("starting_embedded_servers", data_dir=str(data_dir))
        stack.start()
        env = dev_environ(options, environ, stack, secret)
        asyncio.run(_prepare(Settings.from_environ(env)))
        children = Children(CHILDREN, env)
        children.start()
        gateway = f"http://127.0.0.1:{options.port}"
        _wait_ready(f"{gateway}/health/ready", children)
        announce(gateway, options, stack, data_dir, secret)
        while True:
            children.supervise()
            time.sleep(0.5)
    except _Stop as stop:
        log.info("stopping", signal=str(stop))
        return 0
    except (EmbeddedServerError, ConfigError) as exc:
        log.error("dev_failed", error=exc.message)
        return 1
    finally:
        # Ignore further Ctrl-C while shutting down, so nothing is left half-stopped.
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        if children is not None:
            children.stop()
        stack.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
        log.info("stopped")


def announce(
    gateway: str, options: DevOptions, stack: EmbeddedStack, data_dir: Path, secret: str
) -> None:
    """Print the banner with the dev token and the dashboard link (an admin token for
    the ``dev`` user in the URL fragment) to stdout.

    Invariant: the tokens go to stdout only, never through structlog; the log line
    says where the dashboard is, without its token.
    """
    tokens = TokenService(secret)
    token = tokens.mint("dev", ttl_seconds=TOKEN_TTL_SECONDS)
    admin_token = tokens.mint("dev", ttl_seconds=TOKEN_TTL_SECONDS, admin=True)
    print(_banner(gateway, options, stack, data_dir, token, admin_token=admin_token), flush=True)
    log.info("dev_ready", gateway=gateway, dashboard=f"{gateway}/")


def dashboard_line(gateway: str, admin_token: str) -> str:
    """``dashboard: http://127.0.0.1:8000/#token=...``: the page reads the fragment,
    keeps the token in the tab's session storage and removes it from the URL."""
    return f"dashboard: {gateway}/#token={admin_token}"


def _banner(
    gateway: str,
    options: DevOptions,
    stack: EmbeddedStack,
    data_dir: Path,
    token: str,
    *,
    admin_token: str,
) -> str:
    """What ``sluice dev`` prints.  The dashboard link carries an admin token for the
    dev user in the URL fragment (never sent to the server); the page keeps it in
    the tab's sessionStorage and drops it from the address bar."""
    return f"""
Sluice is running. Ctrl-C stops everything.

{dashboard_line(gateway, admin_token)}

  gateway     {gateway}          API docs: {gateway}/docs
  websocket   ws://127.0.0.1:{options.ws_port}/api/v1/ws/progress
  embedder    http://127.0.0.1:{options.embedder_port}/v1/embeddings   (search queries)
  postgres    {stack.postgres.dsn}
  redis       {stack.redis.url}
  s3          {stack.s3.endpoint}   (in memory: objects vanish on restart)
  data dir    {data_dir}

  export SLUICE_TOKEN={token}
  curl -H "Authorization: Bearer $SLUICE_TOKEN" {gateway}/api/v1/me

dev token (user "dev"): {token}
"""
