"""The worker's ``/health`` and ``/metrics`` listen where WORKER_METRICS_HOST says:
loopback by default, every interface only when asked (containers)."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

from devstack.process import free_port
from tests import test_no_secrets_in_logs as probe
from tests.test_no_secrets_in_logs import Proc

unmigrated_dsn = probe.unmigrated_dsn

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _reachable(host: str, port: int) -> bool:
    try:
        return httpx.get(f"http://{host}:{port}/health", timeout=5).status_code == 200
    except httpx.ConnectError:
        return False


def test_metrics_bind_to_the_configured_interface(
    settings_env: dict[str, str], unmigrated_dsn: str, tmp_path: Path
) -> None:
    env = {
        **settings_env,
        "PYTHONPATH": str(probe.ROOT),
        # no model to load, no shared queue to take jobs from
        "DATABASE_URL": unmigrated_dsn,
        "REDIS_URL": settings_env["REDIS_URL"].rsplit("/", 1)[0] + "/9",
        "EMBEDDING_PROVIDER": "openai",
        "EMBEDDING_API_URL": "http://127.0.0.1:9/v1",
    }
    ports = {"127.0.0.1": free_port(), "0.0.0.0": free_port()}
    workers = {
        host: Proc(
            f"worker on {host}",
            [sys.executable, "-m", "workers"],
            {**env, "WORKER_METRICS_HOST": host, "WORKER_METRICS_PORT": str(port)},
            tmp_path / f"worker-{port}.log",
        )
        for host, port in ports.items()
    }
    try:
        for host, worker in workers.items():
            worker.wait_healthy(f"http://127.0.0.1:{ports[host]}/health")
        # 127.0.0.2 is another address of this host, not the loopback one bound.
        assert not _reachable("127.0.0.2", ports["127.0.0.1"])
        assert _reachable("127.0.0.2", ports["0.0.0.0"])
    finally:
        for worker in workers.values():
            worker.stop()
