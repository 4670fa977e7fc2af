"""``sluice``: the command line.

    sluice dev                      the whole stack locally, Ctrl-C stops it all
    sluice token --user NAME        mint a bearer token (last word of the output)
    sluice migrate                  apply database migrations
    sluice gateway [--host --port]  the HTTP gateway (Procfile ``web``)
    sluice ws                       the WebSocket progress server (Procfile ``ws``)
    sluice upload FILE              resumable upload client
    sluice bench NAME               run a benchmark from bench/

Each command builds its :class:`~app.core.settings.Settings` from the
environment here, in ``main()``, and passes it down.  The worker has its own
entry point, ``sluice-worker`` (``python -m workers``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from app.core.auth import TokenService
from app.core.errors import ConfigError
from app.core.logging import configure_logging
from app.core.settings import Settings
from devstack.secret import DEFAULT_DATA_DIR, SECRET_FILE, dev_secret


def load_settings(environ: Mapping[str, str]) -> Settings:
    settings = Settings.from_environ(environ)
    configure_logging(settings.log_level, settings.log_format, secrets=settings.secrets)
    return settings


def cmd_token(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    secret = environ.get("JWT_SECRET") or dev_secret(Path(args.data_dir), create=False)
    if not secret:
        raise ConfigError(
            f"JWT_SECRET is not set and {Path(args.data_dir) / SECRET_FILE} does not exist "
            "(run 'sluice dev' first or set JWT_SECRET)"
        )
    token = TokenService(secret).mint(args.user, ttl_seconds=int(args.ttl_hours * 3600))
    print(f"token for {args.user} (valid {args.ttl_hours:g}h): {token}")
    return 0


def cmd_migrate(_args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from app.core.db import migrate_dsn

    settings = load_settings(environ)
    applied = asyncio.run(migrate_dsn(settings.database_url.reveal()))
    names = ", ".join(f"{m.version:04d}_{m.name}" for m in applied) or "none (up to date)"
    print(f"migrations applied: {names}")
    return 0


def cmd_gateway(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    import uvicorn

    from app.gateway.app import create_app

    settings = load_settings(environ)
    config = uvicorn.Config(
        create_app(settings),
        host=args.host or settings.gateway_host,
        port=args.port or settings.gateway_port,
        log_config=None,
        access_log=False,
        proxy_headers=True,
        timeout_graceful_shutdown=10,
        h11_max_incomplete_event_size=64 * 1024,
    )
    uvicorn.Server(config).run()
    return 0


def cmd_ws(_args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from app.ws.server import run

    return int(run(load_settings(environ)))


def cmd_upload(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from app.client.upload import run_upload_cli

    configure_logging("WARNING", "console")
    return int(asyncio.run(run_upload_cli(args, environ)))


def cmd_bench(args: argparse.Namespace, _environ: Mapping[str, str]) -> int:
    import subprocess

    script = Path(__file__).resolve().parents[1] / "bench" / f"{args.name}.py"
    if not script.exists():
        available = sorted(p.stem for p in script.parent.glob("*.py") if not p.stem.startswith("_"))
        raise ConfigError(f"no benchmark {args.name!r}; available: {', '.join(available)}")
    return subprocess.call([sys.executable, str(script), *args.rest])


def cmd_dev(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    from devstack.dev import run_dev

    return run_dev(args, environ)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluice", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, handler: Callable[..., int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(handler=handler)
        return p

    p = add("dev", cmd_dev, "run the embedded stack, gateway, worker and WebSocket server")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    p.add_argument("--port", type=int, default=8000, help="gateway port")
    p.add_argument("--ws-port", type=int, default=8765)
    p.add_argument("--postgres-port", type=int, default=15432)
    p.add_argument("--redis-port", type=int, default=16379)
    p.add_argument("--s3-port", type=int, default=19000)
    p.add_argument("--worker-metrics-port", type=int, default=9100)

    p = add("token", cmd_token, "mint a bearer token for a user")
    p.add_argument("--user", required=True)
    p.add_argument("--ttl-hours", type=float, default=24 * 30)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))

    add("migrate", cmd_migrate, "apply database migrations")

    p = add("gateway", cmd_gateway, "run the HTTP gateway")
    p.add_argument("--host")
    p.add_argument("--port", type=int)

    add("ws", cmd_ws, "run the WebSocket progress server")

    p = add("upload", cmd_upload, "upload a file (resumable), optionally following its job")
    p.add_argument("file", type=Path)
    p.add_argument("--priority", choices=["low", "normal", "high", "critical"], default="normal")
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--follow", action="store_true", help="stream the job's progress until it ends")
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


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args, os.environ if environ is None else environ))
    except ConfigError as exc:
        print(f"sluice: configuration error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
