"""Every long-running process exports its event-loop lag on its own ``/metrics``:
the gateway and a worker, as real processes (the WebSocket server's is checked in
``test_ws_report.py``)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.process import free_port
from tests import test_no_secrets_in_logs as probe
from tests.test_no_secrets_in_logs import Proc

unmigrated_dsn = probe.unmigrated_dsn

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def lag_samples(url: str, component: str) -> float:
    """The count of ``sluice_event_loop_lag_seconds`` samples for ``component`` (after
    waiting until there is at least one)."""
    series = f'sluice_event_loop_lag_seconds_count{{component="{component}"}}'
    deadline = time.monotonic() + 10
    while True:
        for line in httpx.get(url, timeout=5).text.splitlines():
            if line.startswith(series) and float(line.rsplit(" ", 1)[1]) > 0:
                return float(line.rsplit(" ", 1)[1])
        assert time.monotonic() < deadline, f"no {component} loop-lag samples on {url}"
        time.sleep(0.1)


def test_gateway_exports_its_loop_lag(gateway_factory: Any) -> None:
    gateway = gateway_factory()
    first = lag_samples(f"{gateway.url}/metrics", "gateway")
    time.sleep(0.3)
    assert lag_samples(f"{gateway.url}/metrics", "gateway") > first  # sampled continuously


def test_worker_exports_its_loop_lag(
    settings_env: dict[str, str], unmigrated_dsn: str, tmp_path: Path
) -> None:
    port = free_port()
    env = {
        **settings_env,
        "PYTHONPATH": str(probe.ROOT),
        # no model to load, no shared queue to take jobs from
        "DATABASE_URL": unmigrated_dsn,
        "REDIS_URL": settings_env["REDIS_URL"].rsplit("/", 1)[0] + "/9",
        "EMBEDDING_PROVIDER": "openai",
        "EMBEDDING_API_URL": "http://127.0.0.1:9/v1",
        "WORKER_METRICS_PORT": str(port),
    }
    worker = Proc("worker", [sys.executable, "-m", "workers"], env, tmp_path / "worker.log")
    try:
        worker.wait_healthy(f"http://127.0.0.1:{port}/health")
        assert lag_samples(f"http://127.0.0.1:{port}/metrics", "worker") > 0
    finally:
        worker.stop()
