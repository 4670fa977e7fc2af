"""The dashboard's server side (issue 11), against the real stack: the admin policy,
the dashboard's configuration, a job's events, every user's jobs, the queue's
statistics, the fleet and the WebSocket servers' totals, and the link
``sluice dev`` prints."""

from __future__ import annotations

import dataclasses
import io
import logging
import re
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path

import httpx
import msgspec
import pytest
from arq.constants import job_key_prefix

from app.core.auth import TokenService
from app.core.fleet import WS_INSTANCES_KEY, WS_STALE_SECONDS, WsInstanceReport, publish_ws_report
from app.core.logging import configure_logging, flush_logs
from app.core.queue import QUEUE_NAME, Priority, aging_rule
from app.gateway.app import api_routes, create_app
from app.gateway.routing import ApiRoute
from app.gateway.services import Services
from app.jobs.events import stream_key
from app.jobs.model import JobStatus, Stage
from app.jobs.timeline import covered, read_history
from app.jobs.transitions import change_job, job_snapshot
from app.ws.feed import JobFeed, can_resume
from app.ws.history import HistoryReader
from devstack.dev import DevOptions, announce
from devstack.stack import EmbeddedStack
from tests.conftest import JWT_SECRET
from tests.fixtures_pipeline import MakeJob
from tests.fixtures_ws import WsProcess, ws_client
from workers import lease
from workers.context import WorkerContext
from workers.fleet import heartbeat, leave

Headers = Callable[[str], dict[str, str]]
ADMIN_ROUTES = {
    "/api/v1/admin/jobs",
    "/api/v1/admin/queue",
    "/api/v1/admin/fleet",
    "/api/v1/ws/stats",
}


@pytest.fixture
def admin_headers(tokens: TokenService) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens.mint('ops-' + uuid.uuid4().hex[:8], admin=True)}"}


async def record_steps(services: Services, job_id: str, n: int) -> list[int]:
    """``n`` progress changes of a running job, recorded and published as workers do."""
    seqs = []
    for i in range(n):
        event = await change_job(
            services.db,
            services.redis,
            job_id,
            status=JobStatus.RUNNING,
            stage=Stage.EXTRACT,
            stage_progress=(i + 1) / n,
            message=f"step {i}",
        )
        assert event is not None
        seqs.append(event.seq)
    return seqs


# --- who may call what ------------------------------------------------------------------


def _concrete(template: str) -> str:
    return re.sub(
        r"{([a-z_]+)(?::[a-z]+)?}",
        lambda m: str(uuid.uuid4()) if m.group(1).endswith("_id") else "1",
        template,
    )


async def test_every_routes_policy_replayed_over_http(
    services: Services, tokens: TokenService
) -> None:
    """Each declared route, called without a token, with a user's and with an admin's:
    401 exactly where ``auth`` is declared, 403 ``admin_required`` exactly where
    ``admin`` is, and an admin token passes everywhere."""
    app = create_app(services.settings, services=services)
    user = {"Authorization": f"Bearer {tokens.mint('policy-user')}"}
    admin = {"Authorization": f"Bearer {tokens.mint('policy-admin', admin=True)}"}
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    admin_paths = set()
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        for route in api_routes():
            assert isinstance(route, ApiRoute)
            if route.admin:
                admin_paths.add(route.path)
                assert route.auth and 403 in route.errors, route.path
            for method in sorted((route.methods or set()) - {"HEAD"}):
                path = _concrete(route.path)
                anonymous = await c.request(method, path)
                assert (anonymous.status_code == 401) is route.auth, (method, path)
                as_user = await c.request(method, path, headers=user)
                assert as_user.status_code not in (401, 500), (method, path, as_user.text)
                refused = as_user.status_code == 403
                assert refused is route.admin, (method, path, as_user.text)
                if refused:
                    assert as_user.json()["error"] == "admin_required"
                as_admin = await c.request(method, path, headers=admin)
                assert as_admin.status_code not in (401, 403, 500), (method, path, as_admin.text)
    assert admin_paths == ADMIN_ROUTES


async def test_admin_routes_answer_admins_only(
    client: httpx.AsyncClient, auth_headers: dict[str, str], admin_headers: dict[str, str]
) -> None:
    for path in sorted(ADMIN_ROUTES):
        r = await client.get(path)
        assert (r.status_code, r.json()["error"]) == (401, "missing_token"), path
        r = await client.get(path, headers=auth_headers)
        assert (r.status_code, r.json()["error"]) == (403, "admin_required"), path
        assert "admin" in r.json()["message"] and "request_id" in r.json()
        r = await client.get(path, headers=admin_headers)
        assert r.status_code == 200, (path, r.text)
    me = (await client.get("/api/v1/me", headers=admin_headers)).json()
    assert me["admin"] is True


async def test_openapi_lists_the_dashboard_routes(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    paths = spec["paths"]
    for path in [*ADMIN_ROUTES, "/api/v1/dashboard/config", "/api/v1/jobs/{job_id}/events"]:
        op = paths[path]["get"]
        assert "200" in op["responses"] and "401" in op["responses"], path
        assert ("403" in op["responses"]) is (path in ADMIN_ROUTES), path
    params = {p["name"]: p for p in paths["/api/v1/jobs/{job_id}/events"]["get"]["parameters"]}
    assert (
        params["limit"]["schema"]["maximum"] == 1000 and params["since"]["schema"]["minimum"] == 0
    )
    assert "400" in paths["/api/v1/jobs/{job_id}/events"]["get"]["responses"]


# --- the dashboard's configuration ----------------------------------------------------------


async def test_dashboard_config(
    services: Services, client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    r = await client.get("/api/v1/dashboard/config", headers=auth_headers)
    assert r.status_code == 200, r.text
    body = r.json()
    settings = services.settings
    assert body["ws_url"] == f"ws://gateway:{settings.websocket_port}"
    upload = body["upload"]
    assert upload["min_part_size"] == 5 * 1024 * 1024
    assert upload["default_part_size"] == max(settings.upload_chunk_size_bytes, 5 * 1024 * 1024)
    assert upload["max_part_size"] >= upload["default_part_size"]
    assert upload["max_part_size"] * upload["max_parts"] >= upload["max_file_size"]
    assert upload["max_file_size"] == settings.max_upload_size_bytes
    assert upload["parallel_parts"] == 4 and "application/pdf" in upload["accepted_types"]
    assert ".pdf" in upload["accepted_extensions"]
    assert body["priorities"] == ["low", "normal", "high", "critical"]
    assert body["aging_rule"] == aging_rule() and "never starved" in body["aging_rule"]
    assert (await client.get("/api/v1/dashboard/config")).status_code == 401

    # https -> wss with the request's host; PUBLIC_WS_URL wins over both.
    for base, configured, expected in (
        ("https://ops.example.com", "", f"wss://ops.example.com:{settings.websocket_port}"),
        ("http://10.0.0.7:8000", "wss://ws.example.com/", "wss://ws.example.com"),
    ):
        svc = dataclasses.replace(
            services, settings=msgspec.structs.replace(settings, public_ws_url=configured)
        )
        app = create_app(svc.settings, services=svc)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url=base) as c:
            r = await c.get("/api/v1/dashboard/config", headers=auth_headers)
        assert r.json()["ws_url"] == expected


# --- a job's events ---------------------------------------------------------------------------


async def test_job_events_pages_after_since_and_are_owner_scoped(
    services: Services,
    client: httpx.AsyncClient,
    make_job: MakeJob,
    auth_headers: dict[str, str],
    headers_for: Headers,
    admin_headers: dict[str, str],
) -> None:
    job = await make_job(b"x", "txt")
    url = f"/api/v1/jobs/{job.job_id}/events"
    fresh = (await client.get(url, headers=auth_headers)).json()
    assert fresh == {
        "job_id": job.job_id,
        "events": [],
        "truncated": False,
        "next_since": 0,
        "has_more": False,
        "oldest_retained_seq": None,
    }
    seqs = await record_steps(services, job.job_id, 5)
    body = (await client.get(url, headers=auth_headers)).json()
    assert [e["seq"] for e in body["events"]] == seqs == [1, 2, 3, 4, 5]
    assert body["truncated"] is False and body["next_since"] == 5 and not body["has_more"]
    first = body["events"][0]
    assert first["job_id"] == job.job_id and first["owner_id"] == job.owner_id
    assert (first["status"], first["stage"], first["message"]) == ("running", "extract", "step 0")

    page = (await client.get(f"{url}?since=2&limit=2", headers=auth_headers)).json()
    assert [e["seq"] for e in page["events"]] == [3, 4]
    assert page["next_since"] == 4 and page["has_more"] is True
    rest = (await client.get(f"{url}?since=4", headers=auth_headers)).json()
    assert [e["seq"] for e in rest["events"]] == [5] and rest["has_more"] is False
    done = (await client.get(f"{url}?since=5", headers=auth_headers)).json()
    assert done["events"] == [] and done["next_since"] == 5 and not done["truncated"]

    # Another user's job is a missing job; an admin reads any job's events.
    for path in (url, f"/api/v1/jobs/{uuid.uuid4()}/events", "/api/v1/jobs/nope/events"):
        r = await client.get(path, headers=headers_for("someone-else"))
        assert (r.status_code, r.json()["error"]) == (404, "job_not_found"), path
    r = await client.get(url, headers=admin_headers)
    assert r.status_code == 200 and [e["seq"] for e in r.json()["events"]] == seqs
    assert (await client.get(url)).status_code == 401


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("since=-1", "invalid_since"),
        ("since=abc", "invalid_since"),
        ("since=1.5", "invalid_since"),
        (f"since={2**63}", "invalid_since"),
        ("limit=0", "invalid_limit"),
        ("limit=1001", "invalid_limit"),
        ("limit=", "invalid_limit"),
    ],
)
async def test_job_events_bad_since_or_limit_is_400(
    client: httpx.AsyncClient,
    make_job: MakeJob,
    auth_headers: dict[str, str],
    query: str,
    code: str,
) -> None:
    job = await make_job(b"x", "txt")
    r = await client.get(f"/api/v1/jobs/{job.job_id}/events?{query}", headers=auth_headers)
    assert (r.status_code, r.json()["error"]) == (400, code), r.text
    assert r.json()["details"]["field"] == code.removeprefix("invalid_")


async def test_job_events_other_bad_parameters(
    client: httpx.AsyncClient, make_job: MakeJob, auth_headers: dict[str, str]
) -> None:
    job = await make_job(b"x", "txt")
    url = f"/api/v1/jobs/{job.job_id}/events"
    r = await client.get(f"{url}?sinse=1", headers=auth_headers)
    assert (r.status_code, r.json()["error"]) == (422, "validation_error")
    r = await client.get(f"{url}?since=1&since=2", headers=auth_headers)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_since")


@pytest.mark.parametrize("loss", ["trimmed", "deleted"])
async def test_job_events_truncated_history_starts_with_the_snapshot(
    services: Services,
    client: httpx.AsyncClient,
    make_job: MakeJob,
    auth_headers: dict[str, str],
    loss: str,
) -> None:
    job = await make_job(b"x", "txt")
    seqs = await record_steps(services, job.job_id, 8)
    if loss == "deleted":
        await services.redis.delete(stream_key(job.job_id))
    else:
        await services.redis.xtrim(stream_key(job.job_id), maxlen=3, approximate=False)
    url = f"/api/v1/jobs/{job.job_id}/events"
    body = (await client.get(f"{url}?since=1", headers=auth_headers)).json()
    assert body["truncated"] is True
    [snapshot] = body["events"]
    assert snapshot["seq"] == seqs[-1] and snapshot["message"] == "step 7"
    assert body["next_since"] == seqs[-1]
    if loss == "trimmed":
        assert body["oldest_retained_seq"] == seqs[-3]
        kept = (
            await client.get(f"{url}?since={body['oldest_retained_seq'] - 1}", headers=auth_headers)
        ).json()
        assert kept["truncated"] is False and [e["seq"] for e in kept["events"]] == seqs[-3:]
    else:
        assert body["oldest_retained_seq"] is None
    # Already up to date: nothing is missing, whatever the history holds.
    current = (await client.get(f"{url}?since={seqs[-1]}", headers=auth_headers)).json()
    assert current["truncated"] is False and current["events"] == []


async def test_job_events_agree_with_the_websocket_replay(
    services: Services,
    client: httpx.AsyncClient,
    make_job: MakeJob,
    auth_headers: dict[str, str],
    tokens: TokenService,
    user: str,
    ws_server: WsProcess,
) -> None:
    """For each ``since``, the events route answers what a WebSocket subscribe with
    ``since`` replays, and ``truncated`` is the WebSocket's ``recovered: false``."""
    job = await make_job(b"x", "txt")
    seqs = await record_steps(services, job.job_id, 6)
    url = f"/api/v1/jobs/{job.job_id}/events"
    for trim in (None, 3):
        if trim is not None:
            await services.redis.xtrim(stream_key(job.job_id), maxlen=trim, approximate=False)
        for since in (0, 1, seqs[2], seqs[-2], seqs[-1]):
            http = (await client.get(f"{url}?since={since}", headers=auth_headers)).json()
            async with ws_client(ws_server.url, tokens.mint(user)) as ws:
                await ws.expect("connected")
                await ws.send(
                    {"type": "subscribe", "job_ids": [job.job_id], "since": {job.job_id: since}}
                )
                ack = await ws.expect("subscribed")
                recovered = ack["recovered"][job.job_id]
                expected = len(http["events"])
                replay = [(await ws.expect("job_progress"))["data"] for _ in range(expected)]
            assert http["truncated"] is (not recovered), (trim, since)
            assert http["events"] == replay, (trim, since)


async def test_truncation_rule_is_the_websockets(
    services: Services, make_job: MakeJob, auth_headers: dict[str, str]
) -> None:
    """:func:`app.jobs.timeline.covered` against the WebSocket server's own reader and
    rule, over every ``since`` of a job whose history lost its head and has a gap."""
    job = await make_job(b"x", "txt")
    seqs = await record_steps(services, job.job_id, 10)
    await services.redis.xtrim(stream_key(job.job_id), maxlen=7, approximate=False)
    entries = await services.redis.xrange(stream_key(job.job_id))
    await services.redis.xdel(stream_key(job.job_id), entries[3][0])  # a gap in the middle
    snapshot = await job_snapshot(services.db, job.job_id)
    assert snapshot is not None
    reader = HistoryReader(services.redis)
    ours_all, oldest = await read_history(services.redis, job.job_id)
    assert oldest is not None
    for since in range(seqs[-1] + 1):
        (history, reached_back) = (await reader.after({job.job_id: since}))[job.job_id]
        assert [e.seq for e in ours_all if e.seq > since] == [e.seq for e in history]
        assert (oldest <= since) is reached_back, since
        feed = JobFeed(job.job_id)
        ws_ok = can_resume(feed, snapshot, since, history, reached_back=reached_back)
        ours = covered(history, since, reached_back=reached_back, current=snapshot.seq)
        assert ours is ws_ok, since


# --- every user's jobs ---------------------------------------------------------------------


async def test_admin_lists_every_users_jobs(
    client: httpx.AsyncClient,
    make_job: MakeJob,
    auth_headers: dict[str, str],
    admin_headers: dict[str, str],
) -> None:
    alice, bob = f"alice-{uuid.uuid4().hex[:8]}", f"bob-{uuid.uuid4().hex[:8]}"
    mine = [
        await make_job(b"x", "txt", owner=o, priority=Priority.HIGH) for o in (alice, bob, alice)
    ]
    r = await client.get(f"/api/v1/admin/jobs?owner_id={alice}", headers=admin_headers)
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert [(j["job_id"], j["owner_id"]) for j in items] == [
        (mine[2].job_id, alice),
        (mine[0].job_id, alice),
    ]
    seen: list[str] = []
    cursor = None
    while len(seen) < 3:
        q = "limit=1&priority=high&status=queued" + (f"&cursor={cursor}" if cursor else "")
        page = (await client.get(f"/api/v1/admin/jobs?{q}", headers=admin_headers)).json()
        seen += [j["job_id"] for j in page["items"]]
        cursor = page.get("next_cursor")
        assert cursor or len(seen) >= 3
    assert seen == [j.job_id for j in reversed(mine)]  # newest first, across owners
    own = (await client.get("/api/v1/jobs", headers=auth_headers)).json()
    assert all("owner_id" not in j for j in own["items"])
    r = await client.get("/api/v1/admin/jobs?cursor=bogus", headers=admin_headers)
    assert (r.status_code, r.json()["error"]) == (400, "invalid_cursor")
    r = await client.get("/api/v1/admin/jobs?status=nope", headers=admin_headers)
    assert r.status_code == 422


# --- the queue -----------------------------------------------------------------------------


async def test_queue_stats_per_priority_with_oldest_ages_and_rates(
    services: Services,
    client: httpx.AsyncClient,
    make_job: MakeJob,
    admin_headers: dict[str, str],
) -> None:
    before = (await client.get("/api/v1/admin/queue", headers=admin_headers)).json()
    ages = {Priority.CRITICAL: 1, Priority.HIGH: 2, Priority.NORMAL: 3, Priority.LOW: 4}
    when = datetime.now(UTC) - timedelta(seconds=65)
    made: dict[str, dict[str, str]] = {}
    for priority, days in ages.items():
        jobs = {
            s: (await make_job(b"x", "txt", priority=priority)).job_id
            for s in ("queued", "retrying", "running", "completed", "failed")
        }
        made[str(priority)] = jobs
        await services.db.execute(
            "UPDATE jobs SET queued_at = now() - make_interval(days => $2) WHERE id = $1::uuid",
            jobs["queued"],
            days,
        )
        for status in ("retrying", "running", "completed", "failed"):
            await change_job(services.db, services.redis, jobs[status], status=JobStatus(status))
        await services.db.execute(
            "UPDATE jobs SET queued_at = $2::timestamptz, finished_at = CASE WHEN finished_at "
            "IS NULL THEN NULL ELSE $2::timestamptz END WHERE id = ANY($1::uuid[])",
            [jobs[s] for s in ("retrying", "running", "completed", "failed")],
            when,
        )
    for jobs in made.values():
        await services.queue.enqueue(jobs["queued"], Priority.LOW)
    # Other modules' leftovers share the queue and may move meanwhile: the figure
    # must equal Redis's own count around the request (retried until steady).
    for _ in range(5):
        ready_lo = await services.queue.ready()
        after = (await client.get("/api/v1/admin/queue", headers=admin_headers)).json()
        if ready_lo == await services.queue.ready():
            break

    assert [p["priority"] for p in after["priorities"]] == ["critical", "high", "normal", "low"]
    old = {p["priority"]: p for p in before["priorities"]}
    for p in after["priorities"]:
        prev = old[p["priority"]]
        assert (p["queued"] - prev["queued"], p["retrying"] - prev["retrying"]) == (1, 1)
        assert p["running"] - prev["running"] == 1
        days = ages[Priority(p["priority"])]
        assert abs(p["oldest_queued_seconds"] - days * 86400) < 120, p
    assert after["ready_in_redis"] == ready_lo
    now_ms = time.time() * 1000
    for jobs in made.values():  # ours are among them: ready, not deferred
        score = await services.redis.zscore(QUEUE_NAME, jobs["queued"])
        assert score is not None and score <= now_ms
    assert after["aging_rule"] == aging_rule()

    rates = after["rates"]
    assert rates["bucket_seconds"] == 30 and len(rates["buckets"]) == 20
    starts = [datetime.fromisoformat(b["start"]) for b in rates["buckets"]]
    assert starts == sorted(starts) and starts[-1] <= datetime.now(UTC) + timedelta(seconds=5)
    assert all(b - a == timedelta(seconds=30) for a, b in pairwise(starts))
    bucket = next(i for i, s in enumerate(starts) if s <= when < s + timedelta(seconds=30))
    prev_rates = {b["start"]: b for b in before["rates"]["buckets"]}
    now_b = rates["buckets"][bucket]
    was = prev_rates.get(now_b["start"], {"enqueued": 0, "completed": 0, "failed": 0})
    # Four priorities, each: retrying, running, completed and failed queued then; one
    # completed and one failed finished then.
    assert now_b["enqueued"] - was["enqueued"] == 16
    assert (now_b["completed"] - was["completed"], now_b["failed"] - was["failed"]) == (4, 4)
    for jobs in made.values():  # leave nothing waiting or running for other tests
        await services.redis.zrem(QUEUE_NAME, jobs["queued"])
        await services.redis.delete(job_key_prefix + jobs["queued"])
        for status in ("queued", "retrying", "running"):
            await change_job(services.db, None, jobs[status], status=JobStatus.CANCELLED)


# --- the fleet and the WebSocket servers -----------------------------------------------------


def ws_report(instance: str, *, reported_at: float, connections: int) -> WsInstanceReport:
    return WsInstanceReport(
        instance=instance,
        host="test",
        pid=1,
        port=8765,
        started_at=reported_at - 60,
        reported_at=reported_at,
        connections=connections,
        authenticated=connections - 1,
        subscriptions=2 * connections,
        jobs_followed=connections,
        messages_sent=100 * connections,
        messages_per_second=1.5 * connections,
        loop_lag_p99_ms=0.5,
    )


async def test_fleet_shows_workers_their_running_jobs_and_dependencies(
    services: Services,
    client: httpx.AsyncClient,
    make_job: MakeJob,
    worker_ctx: WorkerContext,
    admin_headers: dict[str, str],
) -> None:
    worker = dataclasses.replace(worker_ctx, worker_id=f"dash-worker-{uuid.uuid4().hex[:6]}")
    job = await make_job(b"x", "txt", priority=Priority.HIGH)
    instance = f"dash-ws-{uuid.uuid4().hex[:6]}"
    try:
        await heartbeat(worker, 3)
        assert await lease.acquire(services.db, job.job_id, worker.worker_id, 30.0) is not None
        await change_job(
            services.db, services.redis, job.job_id, status=JobStatus.RUNNING, stage=Stage.EMBED
        )
        await publish_ws_report(
            services.redis, ws_report(instance, reported_at=time.time(), connections=3)
        )
        r = await client.get("/api/v1/admin/fleet", headers=admin_headers)
        assert r.status_code == 200, r.text
        body = r.json()
    finally:
        await leave(worker)
        await services.redis.hdel(WS_INSTANCES_KEY, instance)
    [mine] = [w for w in body["workers"] if w["worker_id"] == worker.worker_id]
    assert mine["slots"] == 3 and 0 <= mine["heartbeat_age_seconds"] < 30
    assert abs(datetime.fromisoformat(mine["last_heartbeat_at"]).timestamp() - time.time()) < 30
    [running] = mine["running"]
    assert running["job_id"] == job.job_id and running["owner_id"] == job.owner_id
    assert (running["stage"], running["priority"]) == ("embed", "high")
    expires = datetime.fromisoformat(running["lease_expires_at"])
    assert timedelta(seconds=20) < expires - datetime.now(UTC) <= timedelta(seconds=31)
    assert instance in {s["instance"] for s in body["ws_servers"]}
    deps = body["dependencies"]
    assert deps["status"] == "ok" and set(deps["checks"]) == {"postgres", "redis", "s3"}
    assert all(c["latency_ms"] >= 0 for c in deps["checks"].values())
    # Once the worker has left the registry it is no longer shown, and its job is unassigned.
    again = (await client.get("/api/v1/admin/fleet", headers=admin_headers)).json()
    assert worker.worker_id not in {w["worker_id"] for w in again["workers"]}
    assert job.job_id in {j["job_id"] for j in again["unassigned_running"]}
    await change_job(services.db, None, job.job_id, status=JobStatus.CANCELLED)


async def test_ws_stats_sums_live_reports_and_ignores_stale_ones(
    services: Services, client: httpx.AsyncClient, admin_headers: dict[str, str]
) -> None:
    now = time.time()
    tag = uuid.uuid4().hex[:6]
    live = [
        ws_report(f"a-{tag}", reported_at=now, connections=4),
        ws_report(f"b-{tag}", reported_at=now - 1, connections=6),
    ]
    stale = ws_report(f"c-{tag}", reported_at=now - WS_STALE_SECONDS - 5, connections=50)
    for report in (*live, stale):
        await publish_ws_report(services.redis, report)
    r = await client.get("/api/v1/ws/stats", headers=admin_headers)
    assert r.status_code == 200, r.text
    body = r.json()
    names = [i["instance"] for i in body["instances"]]
    assert {f"a-{tag}", f"b-{tag}"} <= set(names) and f"c-{tag}" not in names
    total = body["total"]
    assert total["instances"] == len(body["instances"])
    for key in ("connections", "authenticated", "subscriptions"):
        assert total[key] == sum(i[key] for i in body["instances"]), key
    assert total["messages_per_second"] == pytest.approx(
        sum(i["messages_per_second"] for i in body["instances"])
    )
    ours = [i for i in body["instances"] if i["instance"].endswith(tag)]
    assert sum(i["connections"] for i in ours) == 10
    assert sum(i["messages_per_second"] for i in ours) == pytest.approx(15.0)


# --- sluice dev's link ----------------------------------------------------------------------


def test_dev_prints_the_dashboard_link_and_never_logs_a_token(
    stack: EmbeddedStack, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = io.StringIO()
    configure_logging("DEBUG", "console", stream=log)
    options = DevOptions(
        data_dir=tmp_path,
        port=8123,
        ws_port=8765,
        postgres_port=stack.postgres.port,
        redis_port=stack.redis.port,
        s3_port=1,
        worker_metrics_port=9100,
    )
    try:
        announce("http://127.0.0.1:8123", options, stack, tmp_path, JWT_SECRET)
        assert flush_logs(), "the log writer did not catch up"
    finally:
        logging.getLogger().handlers.clear()
    out = capsys.readouterr().out
    [line] = [ln for ln in out.splitlines() if ln.startswith("dashboard: ")]
    url, _, admin_token = line.removeprefix("dashboard: ").partition("#token=")
    assert url == "http://127.0.0.1:8123/"
    identity = TokenService(JWT_SECRET).verify(admin_token)
    assert (identity.user_id, identity.admin) == ("dev", True)
    dev_token = next(ln for ln in out.splitlines() if ln.startswith("dev token")).split()[-1]
    logged = log.getvalue()
    assert "dev_ready" in logged and "http://127.0.0.1:8123/" in logged
    for token in (admin_token, dev_token):
        assert token not in logged
        assert token.split(".")[2] not in logged  # not even its signature


async def test_rate_and_listing_queries_can_read_their_indexes(services: Services) -> None:
    """The rates read a recent range of ``jobs_queued_at`` / ``jobs_finished_at`` and the
    admin listing walks ``jobs_created`` (migration 0007): with sequential scans priced
    out, the planner picks them, so their predicates do match the partial indexes."""
    from app.jobs import queue_stats

    start = datetime.now(UTC) - timedelta(minutes=10)
    async with services.db.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")
        # Bitmap scans of another jobs index (then a sort) can price alike on a small
        # table; an ordered index scan is what the listing relies on.
        await conn.execute("SET LOCAL enable_bitmapscan = off")
        for sql, index in (
            (queue_stats._ENQUEUED, "jobs_queued_at"),
            (queue_stats._FINISHED, "jobs_finished_at"),
        ):
            plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {sql}", start, 30.0))
            assert index in plan, plan
        plan = "\n".join(
            r[0]
            for r in await conn.fetch(
                "EXPLAIN SELECT id FROM jobs ORDER BY created_at DESC, id DESC LIMIT 50"
            )
        )
        assert "jobs_created" in plan, plan
