"""``sluice dev``: the whole of Sluice on one machine, from pip packages alone.

Starts the embedded PostgreSQL (+pgvector), Redis and S3 servers with their
data under ``--data-dir`` (Postgres and Redis persist across restarts; the S3
server keeps objects in memory), applies migrations, creates the bucket, then
runs the gateway, one worker and the WebSocket server as child processes.
Prints the URLs and a dev token once the gateway is ready.  Ctrl-C (or
SIGTERM) stops the children, then the servers.

A child that dies (a crash, an OOM kill) is logged and started again after a
backoff (:class:`RestartPolicy`: 0.5 s doubling up to 10 s); only a crash loop
(:data:`CRASH_LOOP_LIMIT` crashes of one child within
:data:`CRASH_LOOP_WINDOW_SECONDS`) stops everything, with a non-zero exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType

from app.core.auth import TokenService
from app.core.db import migrate_dsn
from app.core.errors import ConfigError
from app.core.logging import configure_logging, get_logger
from app.core.settings import Settings
from app.core.storage import ensure_bucket, open_s3
from devstack.secret import dev_secret
from devstack.servers import (
    EmbeddedPostgres,
    EmbeddedRedis,
    EmbeddedS3,
    EmbeddedServerError,
    EmbeddedStack,
    die_with_parent,
)

log = get_logger("sluice.dev")
READY_TIMEOUT = 120.0
CRASH_LOOP_LIMIT = 5
CRASH_LOOP_WINDOW_SECONDS = 60.0
RESTART_BACKOFF = (0.5, 10.0)
"""First and largest delay (seconds) before a crashed child is started again."""


class _Stop(Exception):
    """Raised from the signal handler to unwind ``run_dev``."""


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def dev_environ(
    args: argparse.Namespace, environ: Mapping[str, str], stack: EmbeddedStack, secret: str
) -> dict[str, str]:
    return {
        **environ,
        **stack.environ(),
        "JWT_SECRET": secret,
        "LOG_FORMAT": environ.get("LOG_FORMAT", "console"),
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(args.port),
        "WEBSOCKET_HOST": "127.0.0.1",
        "WEBSOCKET_PORT": str(args.ws_port),
        "WORKER_METRICS_HOST": "127.0.0.1",
        "WORKER_METRICS_PORT": str(args.worker_metrics_port),
        "HF_HUB_OFFLINE": "1",
    }


async def _prepare(settings: Settings) -> None:
    await migrate_dsn(settings.database_url.reveal())
    async with open_s3(settings) as s3:
        await ensure_bucket(s3, settings.minio_bucket_name)


class RestartPolicy:
    """When to start a crashed child again (no I/O: crashes in, delays out).

    Each crash of a child within the last ``window`` seconds doubles its
    delay (from ``backoff[0]`` up to ``backoff[1]``); the ``limit``-th such
    crash is a crash loop: :meth:`after_crash` returns None and the stack stops.
    """

    def __init__(
        self,
        *,
        limit: int = CRASH_LOOP_LIMIT,
        window: float = CRASH_LOOP_WINDOW_SECONDS,
        backoff: tuple[float, float] = RESTART_BACKOFF,
    ) -> None:
        self.limit = limit
        self.window = window
        self.backoff = backoff
        self._crashes: dict[str, deque[float]] = {}

    def after_crash(self, name: str, now: float) -> float | None:
        recent = self._crashes.setdefault(name, deque())
        recent.append(now)
        while recent and now - recent[0] > self.window:
            recent.popleft()
        if len(recent) >= self.limit:
            return None
        return float(min(self.backoff[0] * 2 ** (len(recent) - 1), self.backoff[1]))


class Children:
    """The gateway, worker and WebSocket server, restarted when they crash."""

    def __init__(
        self,
        commands: Mapping[str, list[str]],
        env: Mapping[str, str],
        *,
        policy: RestartPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.commands = dict(commands)
        self.env = dict(env)
        self.policy = policy or RestartPolicy()
        self.clock = clock
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._restart_at: dict[str, float] = {}

    def _spawn(self, name: str) -> None:
        self.procs[name] = subprocess.Popen(
            self.commands[name],
            env=self.env,
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM),  # noqa: PLW1509
        )

    def start(self) -> None:
        for name in self.commands:
            self._spawn(name)

    def supervise(self) -> None:
        """Notice crashed children, start due ones again; raise on a crash loop."""
        now = self.clock()
        for name, proc in self.procs.items():
            if name in self._restart_at or proc.poll() is None:
                continue
            delay = self.policy.after_crash(name, now)
            if delay is None:
                raise EmbeddedServerError(
                    f"{name} keeps crashing ({self.policy.limit} times within "
                    f"{self.policy.window:.0f} s; last exit code {proc.returncode}); stopping"
                )
            log.error("child_crashed", child=name, code=proc.returncode, restart_in_s=delay)
            self._restart_at[name] = now + delay
        for name, when in list(self._restart_at.items()):
            if when <= now:
                del self._restart_at[name]
                self._spawn(name)
                log.warning("child_restarted", child=name, pid=self.procs[name].pid)

    def stop(self) -> None:
        self._restart_at.clear()
        _stop_children(self.procs)


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


def _stop_children(children: dict[str, subprocess.Popen[bytes]]) -> None:
    for proc in children.values():
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
    deadline = time.monotonic() + 15
    for proc in children.values():
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def run_dev(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    data_dir = Path(args.data_dir).resolve()
    secret = environ.get("JWT_SECRET") or dev_secret(data_dir, create=True)
    assert secret is not None
    configure_logging(environ.get("LOG_LEVEL", "INFO"), "console", secrets=[secret])
    stack = EmbeddedStack(
        EmbeddedPostgres(data_dir, port=args.postgres_port, durable=True),
        EmbeddedRedis(data_dir, port=args.redis_port, durable=True),
        EmbeddedS3(data_dir, port=args.s3_port),
    )
    children: Children | None = None
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        log.info("starting_embedded_servers", data_dir=str(data_dir))
        stack.start()
        env = dev_environ(args, environ, stack, secret)
        settings = Settings.from_environ(env)
        asyncio.run(_prepare(settings))
        commands = {
            "gateway": [sys.executable, "-m", "app", "gateway"],
            "worker": [sys.executable, "-m", "workers"],
            "ws": [sys.executable, "-m", "app", "ws"],
        }
        children = Children(commands, env)
        children.start()
        gateway = f"http://127.0.0.1:{args.port}"
        _wait_ready(f"{gateway}/health/ready", children)
        token = TokenService(secret).mint("dev", ttl_seconds=30 * 24 * 3600)
        print(_banner(gateway, args, stack, data_dir, token), flush=True)
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


def _banner(
    gateway: str, args: argparse.Namespace, stack: EmbeddedStack, data_dir: Path, token: str
) -> str:
    return f"""
Sluice is running. Ctrl-C stops everything.

  gateway     {gateway}          API docs: {gateway}/docs
  websocket   ws://127.0.0.1:{args.ws_port}/api/v1/ws/progress
  postgres    {stack.postgres.dsn}
  redis       {stack.redis.url}
  s3          {stack.s3.endpoint}   (in memory: objects vanish on restart)
  data dir    {data_dir}

  export SLUICE_TOKEN={token}
  curl -H "Authorization: Bearer $SLUICE_TOKEN" {gateway}/api/v1/me

dev token (user "dev"): {token}
"""


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: sluice dev")
