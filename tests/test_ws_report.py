"""The WebSocket server's self-report in Redis, its loop-lag probe and its GC pacing,
against the real Redis and Postgres (and a Redis of the test's own that it kills)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from app.core.fleet import WsInstanceReport, read_ws_reports
from app.core.looplag import LoopLagMetrics, LoopLagProbe, summarise
from app.core.settings import Settings
from app.jobs.model import JobStatus, Stage
from app.jobs.transitions import change_job
from app.ws.gcpacing import NEVER, GcPacer
from app.ws.server import ServerOptions, serve
from devstack.redis import EmbeddedRedis
from tests.fixtures_ws import Deps, WsProcess, make_job, ws_client

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T | None]], timeout: float = 15.0, every: float = 0.05
) -> T:
    """The first non-None, truthy value ``probe`` returns within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(every)


async def report_of(redis: Redis, instance: str) -> WsInstanceReport | None:
    for report in await read_ws_reports(redis, now=time.time()):
        if report.instance == instance:
            return report
    return None


async def test_report_counts_connections_subscriptions_and_messages_then_goes_away(
    migrated: Settings, ws_deps: Deps, user: str
) -> None:
    job = await make_job(ws_deps.db, user, JobStatus.RUNNING)
    token = ws_deps.tokens.mint(user)
    options = ServerOptions(report_interval=0.2)
    async with serve(migrated, host="127.0.0.1", port=0, options=options) as server:
        assert server.reporter is not None
        instance = server.reporter.instance
        assert instance.endswith(f":{server.port}")
        async with (
            ws_client(f"ws://127.0.0.1:{server.port}", token) as a,
            ws_client(f"ws://127.0.0.1:{server.port}") as anonymous,
        ):
            await a.expect("connected")
            await a.send({"type": "subscribe", "job_ids": [job]})
            await a.expect("subscribed")
            for i in range(3):
                await change_job(
                    ws_deps.db,
                    ws_deps.redis,
                    job,
                    status=JobStatus.RUNNING,
                    stage=Stage.EMBED,
                    stage_progress=(i + 1) / 3,
                    overall_progress=0.5,
                    message=f"batch {i}",
                )
            seen = 0
            while seen < 3:  # the snapshot, then the three live events
                message = await a.recv()
                seen += message["type"] == "job_progress" and not message.get("snapshot")

            async def settled() -> WsInstanceReport | None:
                r = await report_of(ws_deps.redis, instance)
                ok = r is not None and r.connections == 2 and r.messages_sent >= 5
                return r if ok else None

            report = await eventually(settled)
            assert (report.authenticated, report.subscriptions, report.jobs_followed) == (1, 1, 1)
            assert report.port == server.port and report.pid > 0
            assert report.loop_lag_p99_ms is not None and report.loop_lag_p99_ms >= 0
            assert anonymous.ws.state.name == "OPEN"

            async def busy() -> WsInstanceReport | None:  # a report covering the burst
                r = await report_of(ws_deps.redis, instance)
                return r if r is not None and r.messages_per_second > 0 else None

            await eventually(busy)
    assert await report_of(ws_deps.redis, instance) is None  # removed on shutdown


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A Redis for one test to kill and restart (on the same port)."""
    server = EmbeddedRedis(tmp_path, durable=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_redis_outage_skips_reports_without_stopping_the_server(
    ws_factory: Callable[..., WsProcess], own_redis: EmbeddedRedis, user: str, ws_deps: Deps
) -> None:
    ws = ws_factory(REDIS_URL=own_redis.url)
    redis: Redis = Redis.from_url(own_redis.url)
    try:
        await eventually(lambda: read_ws_reports(redis, now=time.time()))
        async with ws_client(ws.url, ws_deps.tokens.mint(user)) as c:
            await c.expect("connected")
            own_redis.kill()
            await asyncio.sleep(5)  # two report intervals and more
            assert ws.proc.poll() is None
            async with httpx.AsyncClient(base_url=ws.http) as http:
                assert (await http.get("/health")).status_code == 503
            await c.send({"type": "ping"})
            await c.expect("pong")
            own_redis.start()
            reports = await eventually(lambda: read_ws_reports(redis, now=time.time()))
            assert reports[0].connections == 1
        log = ws.log()
        assert log.count("ws_report_skipped") == 1, log  # once per outage, not per interval
        assert "ws_report_resumed" in log
    finally:
        await redis.aclose()
        ws.stop()
    assert ws.proc.returncode == 0


async def test_loop_lag_probe_sees_a_blocked_loop() -> None:
    registry = CollectorRegistry()
    probe = LoopLagProbe(LoopLagMetrics(registry), "test")
    probe.start()
    try:
        await asyncio.sleep(0.1)
        time.sleep(0.08)  # a callback holding the loop for 80 ms
        await asyncio.sleep(0.05)
    finally:
        await probe.stop()
    summary = probe.take()
    assert summary is not None and summary.samples >= 5
    assert summary.max_ms >= 70 and summary.p50_ms < 20
    assert probe.take() is None  # the window was emptied
    labels = {"component": "test", "le": "0.05"}
    below = registry.get_sample_value("sluice_event_loop_lag_seconds_bucket", labels)
    total = registry.get_sample_value("sluice_event_loop_lag_seconds_count", {"component": "test"})
    assert below is not None and total is not None and below < total  # the stall is in a bucket


def test_lag_summary_quantiles() -> None:
    summary = summarise([i / 1000 for i in range(1, 101)])
    assert summary is not None
    assert (summary.samples, summary.p50_ms, summary.max_ms) == (100, 51.0, 100.0)
    assert summary.p99_ms == 99.0
    assert summarise([]) is None


async def test_ws_port_exports_the_loop_lag(ws_server: WsProcess) -> None:
    async with httpx.AsyncClient(base_url=ws_server.http) as http:
        text = (await http.get("/metrics")).text
    assert 'sluice_event_loop_lag_seconds_bucket{component="ws",le="0.005"}' in text


async def test_gc_pacer_owns_full_passes_and_restores_thresholds() -> None:
    before = gc.get_threshold()
    closed = [0]
    live = [100]
    now = [0.0]
    pacer = GcPacer(
        lambda: live[0], lambda: closed[0], interval=60, min_closed=10, clock=lambda: now[0]
    )
    pacer.install()
    try:
        assert gc.get_threshold() == (before[0], before[1], NEVER)
        assert not pacer.due()
        closed[0] = 49  # fewer than half the live connections
        assert not pacer.due()
        closed[0] = 50
        assert pacer.due()

        class Node:
            other: object = None

        for _ in range(10):  # garbage that only a cyclic collection reclaims
            a, b = Node(), Node()
            a.other, b.other = b, a
        del a, b
        assert pacer.full_pass() >= 20
        assert not pacer.due()  # counted from this pass
        now[0] = 61.0
        assert pacer.due()  # the interval elapsed
    finally:
        await pacer.uninstall()
    assert gc.get_threshold() == before


async def test_connections_opened_together_ping_at_spread_times(
    migrated: Settings, ws_deps: Deps, user: str
) -> None:
    token = ws_deps.tokens.mint(user)
    async with serve(migrated, host="127.0.0.1", port=0, options=ServerOptions()) as server:
        url = f"ws://127.0.0.1:{server.port}"
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(ws_client(url, token)) for _ in range(20)]
            for c in clients:
                await c.expect("connected")
            heartbeat = migrated.websocket_heartbeat_interval
            periods = [c.ws.ping_interval for c in server.connections]
            assert len(periods) == 20 and len(set(periods)) == 20  # no common ping instant
            assert all(p is not None and 0.75 * heartbeat <= p <= heartbeat for p in periods)
