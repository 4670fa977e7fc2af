"""``sluice embedder`` as a child process, for tests and benchmarks.

:class:`EmbedderProcess` starts ``python -m app embedder`` on a free loopback
port with the given environment, waits until ``/health/ready`` says the model
is loaded, and stops it (SIGTERM, then SIGKILL) on :meth:`stop` or on leaving
its ``with`` block, also when starting failed; the child also gets SIGTERM if
we die.  ``sluice dev`` runs the embedder under its supervisor instead.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from devstack.process import ServerProcess, free_port, wait_until

READY_TIMEOUT = 180.0
ROOT = Path(__file__).resolve().parents[1]


class EmbedderProcess(ServerProcess):
    """One ``sluice embedder`` child on 127.0.0.1; :attr:`api_url` is its ``.../v1``."""

    name = "embedder"

    def __init__(self, log_path: Path, env: dict[str, str], *, port: int | None = None) -> None:
        super().__init__(log_path)
        self.port = port or free_port()
        # This checkout's ``app``, whatever the environment's install points at.
        path = ":".join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        self._env = {
            **env,
            "PYTHONPATH": path,
            "EMBEDDER_HOST": "127.0.0.1",
            "EMBEDDER_PORT": str(self.port),
        }
        self.ready_statuses: list[int] = []
        """Every status ``/health/ready`` answered while we waited (503s, then 200)."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/v1"

    def start(self, timeout: float = READY_TIMEOUT) -> None:
        proc = self._spawn([sys.executable, "-m", "app", "embedder"], env=self._env)
        try:
            wait_until(self._ready, proc, "sluice embedder", timeout, self.log_path)
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health/ready", timeout=2) as resp:
                self.ready_statuses.append(resp.status)
                return bool(resp.status == 200)
        except urllib.error.HTTPError as exc:
            self.ready_statuses.append(exc.code)
        except (urllib.error.URLError, OSError):
            pass
        return False

    def __enter__(self) -> EmbedderProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
