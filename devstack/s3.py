"""An S3 API server: ``moto``'s standalone server, objects in memory (for trying Sluice out)."""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from devstack.process import ServerProcess, free_port, wait_until


class EmbeddedS3(ServerProcess):
    """moto's S3 API server on 127.0.0.1.  Objects vanish when it stops."""

    name = "s3"
    access_key = "sluice-dev"
    secret_key = "sluice-dev-secret"

    def __init__(self, data_dir: Path, *, port: int | None = None) -> None:
        super().__init__(data_dir / "s3.log")
        self.port = port or free_port()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> str:
        env = {**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"}
        argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        proc = self._spawn(argv, env=env)
        wait_until(self._ready, proc, "s3", 60, self.log_path)
        return self.endpoint

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False
