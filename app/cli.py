"""``sluice``: the command line.

    sluice dev                      the whole stack locally, Ctrl-C stops it all
    sluice token --user NAME [--admin]  mint a bearer token (last word of the output)
    sluice migrate                  apply database migrations
    sluice gateway [--host --port]  the HTTP gateway (Procfile ``web``)
    sluice ws                       the WebSocket progress server (Procfile ``ws``)
    sluice embedder [--host --port] the warm embedding service (Procfile ``embedder``)
    sluice upload FILE              resumable upload client
    sluice bench NAME               run a benchmark from bench/

This module only parses: ``main()`` builds the :class:`~app.core.settings.Settings`
from the environment for the commands that serve (``migrate``, ``gateway``,
``ws``, ``embedder``) and calls a function that lives with its component.  Components are
imported when their command runs, so ``sluice upload`` never loads the servers.
The worker has its own entry point, ``sluice-worker`` (``python -m workers``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from app.core.errors import ConfigError
from app.core.logging import configure_logging
from app.core.settings import Settings
from devstack.secret import DEFAULT_DATA_DIR

Environ = Mapping[str, str]


def load_settings(environ: Environ) -> Settings:
    settings = Settings.from_environ(environ)
    configure_logging(settings.log_level, settings.log_format, secrets=settings.secrets)
    return settings


# --- commands that serve: they get Settings ---------------------------------------------


def cmd_migrate(_args: argparse.Namespace, settings: Settings) -> int:
    from app.core.db import migrate_dsn

    applied = asyncio.run(migrate_dsn(settings.database_url.reveal()))
    names = ", ".join(f"{m.version:04d}_{m.name}" for m in applied) or "none (up to date)"
    print(f"migrations applied: {names}")
    return 0


def cmd_gateway(args: argparse.Namespace, settings: Settings) -> int:
    from app.gateway.serve import run

    return run(settings, host=args.host, port=args.port)


def cmd_embedder(args: argparse.Namespace, settings: Settings) -> int:
    from app.embedder.serve import run

    return run(settings, host=args.host, port=args.port)


def cmd_ws(_args: argparse.Namespace, settings: Settings) -> int:
    from app.ws.server import run

    return int(run(settings))


# --- commands that read only a few variables: they get the environment -------------------


def cmd_token(args: argparse.Namespace, environ: Environ) -> int:
    from app.core.auth import TokenService
    from devstack.secret import jwt_secret

    secret = jwt_secret(environ, Path(args.data_dir))
    token = TokenService(secret).mint(
        args.user, ttl_seconds=int(args.ttl_hours * 3600), admin=args.admin
    )
    role = ", admin" if args.admin else ""
    print(f"token for {args.user} (valid {args.ttl_hours:g}h{role}): {token}")
    return 0


def cmd_upload(args: argparse.Namespace, environ: Environ) -> int:
    from app.client.command import UploadOptions, run

    options = UploadOptions(
        file=Path(args.file),
        priority=args.priority,
        parallel=args.parallel,
        follow=args.follow,
        json=args.json,
        url=args.url,
        ws_url=args.ws_url,
        token=args.token,
        state_dir=Path(args.state_dir) if args.state_dir else None,
        document_type=args.document_type,
    )
    return run(options, environ)


def cmd_dev(args: argparse.Namespace, environ: Environ) -> int:
    from devstack.dev import DevOptions, run_dev

    options = DevOptions(
        data_dir=Path(args.data_dir),
        port=args.port,
        ws_port=args.ws_port,
        postgres_port=args.postgres_port,
        redis_port=args.redis_port,
        s3_port=args.s3_port,
        worker_metrics_port=args.worker_metrics_port,
        embedder_port=args.embedder_port,
    )
    return run_dev(options, environ)


def cmd_bench(args: argparse.Namespace, _environ: Environ) -> int:
    from devstack.bench import run_bench

    return run_bench(args.name, args.rest)


# --- parsing -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluice", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(
        name: str, handler: Callable[..., int], help_: str, *, settings: bool = False
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(handler=handler, needs_settings=settings)
        return p

    p = add("dev", cmd_dev, "run the embedded stack and every Sluice process")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    p.add_argument("--port", type=int, default=8000, help="gateway port")
    p.add_argument("--ws-port", type=int, default=8765)
    p.add_argument("--postgres-port", type=int, default=15432)
    p.add_argument("--redis-port", type=int, default=16379)
    p.add_argument("--s3-port", type=int, default=19000)
    p.add_argument("--worker-metrics-port", type=int, default=9100)
    p.add_argument("--embedder-port", type=int, default=8090)

    p = add("token", cmd_token, "mint a bearer token for a user")
    p.add_argument("--user", required=True)
    p.add_argument("--admin", action="store_true", help="grant the fleet-wide views")
    p.add_argument("--ttl-hours", type=float, default=24 * 30)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))

    add("migrate", cmd_migrate, "apply database migrations", settings=True)

    p = add("gateway", cmd_gateway, "run the HTTP gateway", settings=True)
    p.add_argument("--host")
    p.add_argument("--port", type=int)

    add("ws", cmd_ws, "run the WebSocket progress server", settings=True)

    p = add("embedder", cmd_embedder, "run the warm embedding service", settings=True)
    p.add_argument("--host")
    p.add_argument("--port", type=int)

    p = add("upload", cmd_upload, "upload a file (resumable), optionally following its job")
    p.add_argument("file", type=Path)
    p.add_argument("--priority", choices=["low", "normal", "high", "critical"], default="normal")
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--follow", action="store_true", help="stream the job's progress until it ends")
    p.add_argument(
        "--json",
        action="store_true",
        help="print only the result as one JSON object on stdout (no summary line)",
    )
    p.add_argument(
        "--url", default=None, help="gateway URL (default: SLUICE_URL or localhost:8000)"
    )
    p.add_argument("--ws-url", default=None, help="WebSocket URL (default: SLUICE_WS_URL)")
    p.add_argument("--token", default=None, help="bearer token (default: SLUICE_TOKEN)")
    p.add_argument("--state-dir", default=str(DEFAULT_DATA_DIR / "uploads"))
    p.add_argument("--document-type", default=None)

    p = add("bench", cmd_bench, "run a benchmark script from bench/")
    p.add_argument("name")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None, environ: Environ | None = None) -> int:
    args = build_parser().parse_args(argv)
    env = os.environ if environ is None else environ
    try:
        context = load_settings(env) if args.needs_settings else env
        return int(args.handler(args, context))
    except ConfigError as exc:
        print(f"sluice: configuration error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
