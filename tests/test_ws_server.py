"""The WebSocket progress server against the real Redis and Postgres: real
``python -m app ws`` processes (and an in-process server where a test needs
shrunken limits), real clients, events recorded through ``change_job``
exactly as workers record them."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import msgspec
import pytest
from prometheus_client import CollectorRegistry
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from app.core.auth import TokenService
from app.core.settings import Settings
from app.jobs.events import job_channel, publish_event, stream_key
from app.jobs.model import JobStatus, Stage
from app.jobs.transitions import change_job, job_snapshot
from app.ws.history import HistoryReader
from app.ws.messages import SYSTEM_CHANNEL, SystemNotice, encode_system_notice
from app.ws.server import ServerOptions, WsServer, serve
from app.ws.snapshots import SnapshotLoader
from devstack.process import free_port
from tests.conftest import JWT_SECRET
from tests.fixtures_uploads import initiate, put_part
from tests.fixtures_ws import ROOT, Client, Deps, WsProcess, make_job, ws_client

# Fixtures used here (imported by assignment so pytest finds them).

TERMINAL = {"completed", "failed", "cancelled"}


@contextlib.asynccontextmanager
async def inproc(settings: Settings, **options: Any) -> AsyncIterator[WsServer]:
    async with serve(settings, host="127.0.0.1", port=0, options=ServerOptions(**options)) as s:
        yield s


async def progress(deps: Deps, job_id: str, n: int, **fields: Any) -> list[int]:
    seqs = []
    for i in range(n):
        ev = await change_job(
            deps.db,
            deps.redis,
            job_id,
            status=JobStatus.RUNNING,
            stage=Stage.EXTRACT,
            stage_progress=(i + 1) / n,
            overall_progress=0.2,
            message=f"step {i}",
            **fields,
        )
        assert ev is not None
        seqs.append(ev.seq)
    return seqs


async def progress_started(deps: Deps, job_id: str, *, above: int) -> None:
    """Wait until the job's seq passes ``above``: a publisher is running."""
    for _ in range(500):
        snap = await job_snapshot(deps.db, job_id)
        if snap is not None and snap.seq > above:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("publisher did not start")


async def complete(deps: Deps, job_id: str) -> int:
    ev = await change_job(
        deps.db,
        deps.redis,
        job_id,
        status=JobStatus.COMPLETED,
        stage=Stage.INDEX,
        stage_progress=1.0,
        overall_progress=1.0,
        message="done",
    )
    assert ev is not None
    return ev.seq


async def subscribed(client: Client, job_ids: list[str], **extra: Any) -> dict[str, Any]:
    await client.send({"type": "subscribe", "job_ids": job_ids, "channels": ["progress"], **extra})
    ack = await client.expect("subscribed")
    assert ack["job_ids"] == job_ids
    return ack


# --- HTTP side ---------------------------------------------------------------------------


async def test_health_and_metrics_on_the_ws_port(ws_server: WsProcess, deps_token: str) -> None:
    async with ws_client(ws_server.url, deps_token) as c:
        await c.expect("connected")
        async with httpx.AsyncClient(base_url=ws_server.http) as http:
            health = await http.get("/health")
            assert health.status_code == 200
            assert health.json()["status"] == "ok" and health.json()["connections"] >= 1
            metrics = await http.get("/metrics")
            assert metrics.status_code == 200
            assert metrics.headers["content-type"].startswith("text/plain")
            text = metrics.text
            for series in (
                'sluice_ws_connections{endpoint="progress"}',
                "sluice_ws_subscriptions",
                "sluice_ws_messages_sent_total",
                'sluice_ws_drops_total{reason="slow_consumer"}',
            ):
                assert series in text, series
            assert (await http.get("/nope")).status_code == 404


@pytest.fixture
def deps_token(tokens: TokenService, user: str) -> str:
    return tokens.mint(user)


# --- authentication ------------------------------------------------------------------------


@pytest.mark.parametrize("token", ["garbage", "expired"])
async def test_bad_query_token_is_accepted_then_closed_4401(
    ws_server: WsProcess, tokens: TokenService, token: str
) -> None:
    """Browsers see a refused handshake only as 1006; an accepted one closed with
    4401 and a reason tells them it is the token, not the network."""
    if token == "expired":
        past = TokenService(JWT_SECRET, clock=lambda: time.time() - 7200)
        token = past.mint("u", ttl_seconds=60)
    async with connect(f"{ws_server.url}/api/v1/ws/progress?token={token}", open_timeout=5) as ws:
        error = msgspec.json.decode(await asyncio.wait_for(ws.recv(), 5))
        assert error["type"] == "error"
        assert error["code"] in ("invalid_token", "token_expired")
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(ws.recv(), 5)
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 4401
    assert info.value.rcvd.reason == error["code"]
    assert token not in ws_server.log()


async def test_first_message_auth_and_identity_from_token_only(
    ws_server: WsProcess, ws_deps: Deps, tokens: TokenService, user: str
) -> None:
    job = await make_job(ws_deps.db, user)
    async with ws_client(ws_server.url) as c:  # no token in the URL
        await c.send({"type": "get_job_status", "job_id": job})
        assert (await c.expect("error"))["code"] == "auth_required"
        await c.send({"type": "auth", "token": tokens.mint(user)})
        connected = await c.expect("connected")
        assert connected["user_id"] == user
        assert connected["heartbeat_interval"] == 30
        # user_id in a message is ignored: the token decides who is asking.
        await c.send({"type": "get_job_status", "job_id": job, "user_id": "someone-else"})
        status = await c.expect("job_status_response")
        assert status["job_id"] == job and status["data"]["status"] == "queued"


async def test_auth_timeout_closes_4401(migrated: Settings) -> None:
    async with (
        inproc(migrated, auth_timeout=0.3) as server,
        ws_client(f"ws://127.0.0.1:{server.port}") as c,
    ):
        t0 = time.monotonic()
        with pytest.raises(ConnectionClosed) as info:
            await c.recv(timeout=5)
        assert info.value.rcvd is not None and info.value.rcvd.code == 4401
        assert 0.2 < time.monotonic() - t0 < 3


async def test_bad_auth_message_closes_4401(ws_server: WsProcess) -> None:
    async with ws_client(ws_server.url) as c:
        await c.send({"type": "auth", "token": "nope"})
        assert (await c.expect("error"))["code"] == "invalid_token"
        with pytest.raises(ConnectionClosed) as info:
            await c.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 4401


async def test_expired_token_closes_4401_unless_refreshed(
    ws_server: WsProcess, tokens: TokenService, user: str
) -> None:
    short = tokens.mint(user, ttl_seconds=2)
    async with ws_client(ws_server.url, short) as expiring, ws_client(ws_server.url, short) as kept:
        await expiring.expect("connected")
        await kept.expect("connected")
        await kept.send({"type": "auth", "token": tokens.mint(user, ttl_seconds=600), "id": 1})
        assert (await kept.expect("connected"))["token_expires_at"] > time.time() + 500
        with pytest.raises(ConnectionClosed) as info:
            await expiring.recv(timeout=5)
        assert info.value.rcvd is not None and info.value.rcvd.code == 4401
        await kept.send({"type": "ping", "id": "still-here"})
        assert (await kept.expect("pong"))["id"] == "still-here"


# --- protocol basics -----------------------------------------------------------------------


async def test_ping_pong_and_bad_input_keep_the_connection(
    ws_server: WsProcess, deps_token: str
) -> None:
    async with ws_client(ws_server.url, deps_token) as c:
        await c.expect("connected")
        await c.send({"type": "ping", "id": 9})
        pong = await c.expect("pong")
        assert pong["id"] == 9 and abs(pong["server_time"] - time.time()) < 5
        cases: list[tuple[dict[str, Any] | str, str]] = [
            ("{not json", "invalid_json"),
            ({"type": "explode"}, "unknown_type"),
            ({"job_ids": ["x"]}, "missing_type"),
            ({"type": "subscribe"}, "invalid_message"),
            ({"type": "cancel_job"}, "invalid_message"),
            ({"type": "subscribe", "job_ids": ["x"], "channels": ["chat"]}, "unsupported_channel"),
        ]
        for message, code in cases:
            await c.send(message)
            error = await c.expect("error")
            assert error["code"] == code, (message, error)
            assert error["message"]
        missing = c.seen[-3]
        assert "job_ids" in missing["message"] and missing["details"]["field"] == "job_ids"
        await c.send({"type": "ping"})
        await c.expect("pong")  # still open


async def test_oversized_frame_gets_error_then_1009(ws_server: WsProcess, deps_token: str) -> None:
    async with ws_client(ws_server.url, deps_token) as c:
        await c.expect("connected")
        await c.send({"type": "ping", "pad": "x" * (65 * 1024)})
        error = await c.expect("error")
        assert error["code"] == "message_too_large" and error["details"]["limit"] == 65536
        with pytest.raises(ConnectionClosed) as info:
            await c.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009


@pytest.mark.parametrize("authenticated", [True, False])
async def test_deeply_nested_frame_gets_error_then_1007(
    ws_server: WsProcess, deps_token: str, authenticated: bool
) -> None:
    """Nesting 5,000 deep in the untyped ``user_id`` was a RecursionError: close
    1011 and a traceback.  It is refused as invalid data before decoding."""
    deep = '{"type": "auth", "token": "x", "user_id": ' + "[" * 5000 + "]" * 5000 + "}"
    async with ws_client(ws_server.url, deps_token if authenticated else None) as c:
        if authenticated:
            await c.expect("connected")
        await c.send(deep)
        error = await c.expect("error")
        assert error["code"] == "invalid_json" and error["details"]["max_depth"] == 64
        with pytest.raises(ConnectionClosed) as info:
            await c.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1007
    assert "RecursionError" not in ws_server.log()
    async with ws_client(ws_server.url, deps_token) as c:  # the server is fine
        await c.expect("connected")


async def test_other_users_job_is_indistinguishable_from_unknown(
    ws_server: WsProcess, ws_deps: Deps, deps_token: str
) -> None:
    foreign = await make_job(ws_deps.db, f"other-{uuid.uuid4().hex[:8]}")
    unknown = str(uuid.uuid4())
    async with ws_client(ws_server.url, deps_token) as c:
        await c.expect("connected")
        answers: dict[str, list[tuple[str, str]]] = {}
        for job_id in (foreign, unknown, "not-a-uuid"):
            got = []
            for kind in ("subscribe", "get_job_status", "cancel_job"):
                msg: dict[str, Any] = (
                    {"type": kind, "job_ids": [job_id]}
                    if kind == "subscribe"
                    else {"type": kind, "job_id": job_id}
                )
                await c.send(msg)
                error = await c.expect("error")
                assert error["job_id"] == job_id
                got.append((error["code"], error["message"]))
            answers[job_id] = got
        assert answers[foreign] == answers[unknown] == answers["not-a-uuid"]
        assert {code for code, _ in answers[foreign]} == {"job_not_found"}
    snapshot = await job_snapshot(ws_deps.db, foreign)
    assert snapshot is not None and snapshot.status == "queued"  # the cancel did nothing


async def test_an_admin_token_follows_any_users_job_but_cancels_only_its_own(
    ws_server: WsProcess, ws_deps: Deps, tokens: TokenService, user: str
) -> None:
    """The dashboard's fleet-wide table: an admin follows every user's jobs live (as
    ``GET /api/v1/admin/jobs`` lists them); cancelling stays the owner's."""
    foreign = await make_job(ws_deps.db, f"other-{uuid.uuid4().hex[:8]}")
    async with ws_client(ws_server.url, tokens.mint(user, admin=True)) as c:
        await c.expect("connected")
        await subscribed(c, [foreign])
        snapshot_frame = await c.expect("job_progress")
        assert snapshot_frame["job_id"] == foreign and snapshot_frame["snapshot"] is True
        await c.send({"type": "get_job_status", "job_id": foreign})
        status = await c.expect("job_status_response")
        assert status["job_id"] == foreign and status["data"]["status"] == "queued"
        await c.send({"type": "cancel_job", "job_id": foreign})
        assert (await c.expect("error"))["code"] == "job_not_found"
    snapshot = await job_snapshot(ws_deps.db, foreign)
    assert snapshot is not None and snapshot.status == "queued"


async def test_unsubscribe_stops_delivery(
    ws_server: WsProcess, ws_deps: Deps, deps_token: str, user: str
) -> None:
    a, b = await make_job(ws_deps.db, user), await make_job(ws_deps.db, user)
    async with ws_client(ws_server.url, deps_token) as c:
        await c.expect("connected")
        await subscribed(c, [a, b])
        await c.expect("job_progress")
        await c.expect("job_progress")
        await c.send({"type": "unsubscribe", "job_ids": [a], "id": "u"})
        assert (await c.expect("unsubscribed"))["job_ids"] == [a]
        await progress(ws_deps, a, 2)
        [seq_b] = await progress(ws_deps, b, 1)
        message = await c.expect("job_progress")
        assert message["job_id"] == b and message["data"]["seq"] == seq_b


# --- delivery guarantees -------------------------------------------------------------------


async def test_no_gap_when_joining_mid_stream(
    ws_server: WsProcess, ws_deps: Deps, deps_token: str, user: str
) -> None:
    job = await make_job(ws_deps.db, user)
    await progress(ws_deps, job, 5)
    joined = asyncio.Event()

    async def publisher() -> None:
        # Publish without pause until the subscriber holds its snapshot (so events
        # race the subscription however fast the machine is), then 20 more, then end.
        while not joined.is_set():
            await progress(ws_deps, job, 1)
        await progress(ws_deps, job, 20)
        await complete(ws_deps, job)

    task = asyncio.create_task(publisher())
    try:
        await progress_started(ws_deps, job, above=5)
        async with ws_client(ws_server.url, deps_token) as c:
            await c.expect("connected")
            await subscribed(c, [job])
            first = await c.expect("job_progress")
            joined.set()
            assert first["snapshot"] is True and "recovered" not in first
            assert first["data"]["status"] == "running"
            rest = await c.progress_until_terminal(job, timeout=20)
        await task
    finally:
        task.cancel()
    seqs = [first["data"]["seq"], *(d["seq"] for d in rest)]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs  # +1 each: nothing missed
    final = await job_snapshot(ws_deps.db, job)
    assert final is not None and seqs[-1] == final.seq and rest[-1]["status"] == "completed"


async def test_resume_with_since_replays_missed_events(
    ws_server: WsProcess, ws_deps: Deps, deps_token: str, user: str
) -> None:
    job = await make_job(ws_deps.db, user)
    seqs = await progress(ws_deps, job, 10)
    since = seqs[3]
    async with ws_client(ws_server.url, deps_token) as c:
        await c.expect("connected")
        ack = await subscribed(c, [job], since={job: since})
        assert ack["recovered"] == {job: True}
        replay = [await c.expect("job_progress") for _ in seqs[4:]]
        assert [m["data"]["seq"] for m in replay] == seqs[4:]
        assert all("snapshot" not in m for m in replay)
        assert [m["data"]["message"] for m in replay] == [f"step {i}" for i in range(4, 10)]
        last = await complete(ws_deps, job)
        assert (await c.progress_until_terminal(job))[-1]["seq"] == last


async def test_resume_up_to_date_sends_nothing_old(
    ws_server: WsProcess, ws_deps: Deps, deps_token: str, user: str
) -> None:
    job = await make_job(ws_deps.db, user)
    seqs = await progress(ws_deps, job, 3)
    await ws_deps.redis.delete(stream_key(job))  # even with the history gone
    async with ws_client(ws_server.url, deps_token) as c:
        await c.expect("connected")
        ack = await subscribed(c, [job], since={job: seqs[-1]})
        assert ack["recovered"] == {job: True}
        last = await complete(ws_deps, job)
        [terminal] = await c.progress_until_terminal(job)
        assert terminal["seq"] == last


@pytest.mark.parametrize("loss", ["deleted", "trimmed"])
async def test_resume_falls_back_to_snapshot_when_history_is_gone(
    ws_server: WsProcess, ws_deps: Deps, deps_token: str, user: str, loss: str
) -> None:
    job = await make_job(ws_deps.db, user)
    seqs = await progress(ws_deps, job, 8)
    if loss == "deleted":
        await ws_deps.redis.delete(stream_key(job))
    else:
        await ws_deps.redis.xtrim(stream_key(job), maxlen=2, approximate=False)
    async with ws_client(ws_server.url, deps_token) as c:
        await c.expect("connected")
        ack = await subscribed(c, [job], since={job: seqs[1]})
        assert ack["recovered"] == {job: False}
        snap = await c.expect("job_progress")
        assert snap["snapshot"] is True and snap["recovered"] is False
        assert snap["data"]["seq"] == seqs[-1] and snap["data"]["message"] == "step 7"
        more = await progress(ws_deps, job, 1)
        assert (await c.expect("job_progress"))["data"]["seq"] == more[0]


async def test_exactly_one_terminal_event_per_subscriber(
    ws_server: WsProcess, ws_deps: Deps, deps_token: str, user: str
) -> None:
    job = await make_job(ws_deps.db, user)
    seqs = await progress(ws_deps, job, 2)
    async with (
        ws_client(ws_server.url, deps_token) as fresh,
        ws_client(ws_server.url, deps_token) as resumed,
        ws_client(ws_server.url, deps_token) as both,
    ):
        for c in (fresh, resumed, both):
            await c.expect("connected")
        await subscribed(fresh, [job])
        await subscribed(resumed, [job], since={job: seqs[0]})
        await subscribed(both, [job])
        await both.expect("job_progress")
        await subscribed(both, [job])  # subscribing twice is idempotent
        last = await complete(ws_deps, job)
        terminal = await job_snapshot(ws_deps.db, job)
        assert terminal is not None
        await publish_event(ws_deps.redis, terminal)  # a duplicate publish of the terminal
        for c in (fresh, resumed, both):
            await c.progress_until_terminal(job)
            await c.send({"type": "ping"})
            await c.expect("pong")  # nothing else arrived in between
            terminals = [
                m for m in c.seen if m["type"] == "job_progress" and m["data"]["status"] in TERMINAL
            ]
            assert len(terminals) == 1 and terminals[0]["data"]["seq"] == last
        # Subscribing to a finished job yields its terminal state once.
        late_events = []
        async with ws_client(ws_server.url, deps_token) as late:
            await late.expect("connected")
            await subscribed(late, [job])
            late_events.append(await late.expect("job_progress"))
            await change_job(ws_deps.db, ws_deps.redis, job, message="late note")
            await late.send({"type": "ping"})
            await late.expect("pong")
        assert late_events[0]["data"]["status"] == "completed"


async def test_cross_instance_fan_out(
    ws_factory: Callable[..., WsProcess],
    ws_server: WsProcess,
    ws_deps: Deps,
    deps_token: str,
    user: str,
) -> None:
    second = ws_factory()
    job = await make_job(ws_deps.db, user)
    async with ws_client(ws_server.url, deps_token) as a, ws_client(second.url, deps_token) as b:
        for c in (a, b):
            await c.expect("connected")
            await subscribed(c, [job])
            await c.expect("job_progress")  # snapshot
        seqs = await progress(ws_deps, job, 20)
        seqs.append(await complete(ws_deps, job))
        got_a = [d["seq"] for d in await a.progress_until_terminal(job)]
        got_b = [d["seq"] for d in await b.progress_until_terminal(job)]
    assert got_a == got_b == seqs
    assert second.stop() == 0


async def test_cancel_job_on_a_queued_job(
    ws_server: WsProcess, ws_deps: Deps, deps_token: str, user: str
) -> None:
    job = await make_job(ws_deps.db, user)
    async with (
        ws_client(ws_server.url, deps_token) as c,
        ws_client(ws_server.url, deps_token) as watcher,
    ):
        for client in (c, watcher):
            await client.expect("connected")
            await subscribed(client, [job])
            await client.expect("job_progress")
        await c.send({"type": "cancel_job", "job_id": job, "id": 5})
        messages = [await c.recv(), await c.recv()]
        cancelled = next(m for m in messages if m["type"] == "job_cancelled")
        assert cancelled["job_id"] == job and cancelled["id"] == 5
        assert cancelled["data"]["status"] == "cancelled"
        terminal = next(m for m in messages if m["type"] == "job_progress")
        assert terminal["data"]["status"] == "cancelled"
        assert (await watcher.progress_until_terminal(job))[-1]["status"] == "cancelled"
        await c.send({"type": "cancel_job", "job_id": job})  # idempotent
        assert (await c.expect("job_cancelled"))["data"]["status"] == "cancelled"
    row = await ws_deps.db.fetchrow(
        "SELECT status, cancel_requested FROM jobs WHERE id = $1", uuid.UUID(job)
    )
    assert row is not None
    assert row["status"] == "cancelled" and row["cancel_requested"] is True


async def test_cancel_finished_job_is_a_conflict(
    ws_server: WsProcess, ws_deps: Deps, deps_token: str, user: str
) -> None:
    job = await make_job(ws_deps.db, user)
    await complete(ws_deps, job)
    async with ws_client(ws_server.url, deps_token) as c:
        await c.expect("connected")
        await c.send({"type": "cancel_job", "job_id": job})
        error = await c.expect("error")
        assert error["code"] == "job_finished" and error["job_id"] == job


async def test_notifications_carry_terminal_events_and_system_notices(
    ws_server: WsProcess, ws_deps: Deps, deps_token: str, user: str
) -> None:
    job = await make_job(ws_deps.db, user)
    foreign = await make_job(ws_deps.db, f"other-{uuid.uuid4().hex[:8]}")
    async with ws_client(ws_server.url, deps_token, path="/api/v1/ws/notifications") as c:
        assert (await c.expect("connected"))["endpoint"] == "notifications"
        await c.send({"type": "ping"})
        await c.expect("pong")  # the user channel is subscribed before any reply
        await progress(ws_deps, job, 2)  # not terminal: no notification
        await complete(ws_deps, foreign)  # someone else's: never seen
        last = await complete(ws_deps, job)
        note = await c.expect("notification")
        assert note["kind"] == "job_completed" and note["job_id"] == job
        assert note["data"]["seq"] == last
        await ws_deps.redis.publish(
            SYSTEM_CHANNEL,
            encode_system_notice(SystemNotice(message="maintenance at 13:00", level="warning")),
        )
        system = await c.expect("notification")
        assert system == {
            "type": "notification",
            "kind": "system",
            "message": "maintenance at 13:00",
            "level": "warning",
        }


async def test_lost_pubsub_connection_is_resynchronised(
    migrated: Settings, ws_deps: Deps, tokens: TokenService, user: str
) -> None:
    job = await make_job(ws_deps.db, user)
    async with (
        inproc(migrated) as server,
        ws_client(f"ws://127.0.0.1:{server.port}", tokens.mint(user)) as c,
    ):
        await c.expect("connected")
        await subscribed(c, [job])
        await c.expect("job_progress")
        await ws_deps.redis.client_kill_filter(_type="pubsub")
        seqs = await progress(ws_deps, job, 5)  # published while nobody listens
        seqs.append(await complete(ws_deps, job))
        got = [d["seq"] for d in await c.progress_until_terminal(job, timeout=15)]
        assert got == seqs


async def test_slow_consumer_is_dropped_without_delaying_others(
    migrated: Settings, ws_deps: Deps, tokens: TokenService, user: str
) -> None:
    job = await make_job(ws_deps.db, user)
    token = tokens.mint(user)
    async with inproc(migrated, max_buffer_bytes=256 * 1024) as server:
        url = f"ws://127.0.0.1:{server.port}"
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        async with (
            ws_client(url, token, sock=sock, max_queue=1) as slow,
            ws_client(url, token) as healthy,
        ):
            for c in (slow, healthy):
                await c.expect("connected")
                await subscribed(c, [job])
                await c.expect("job_progress")
            blob = "x" * 48_000  # enough to fill the kernel's socket buffers quickly
            latencies: list[float] = []
            seqs: list[int] = []
            for i in range(200):
                t0 = time.monotonic()
                [seq] = await progress(ws_deps, job, 1, details={"blob": blob, "i": i})
                seqs.append(seq)
                message = await healthy.expect("job_progress")
                latencies.append(time.monotonic() - t0)
                assert message["data"]["seq"] == seq
            assert max(latencies) < 1.0, max(latencies)
            assert (
                server.metrics.registry.get_sample_value(
                    "sluice_ws_drops_total", {"reason": "slow_consumer"}
                )
                == 1
            )
            # The slow client finds its connection closed once it reads again...
            received: list[int] = []
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    m = await slow.recv(timeout=10)
                    if m["type"] == "job_progress":
                        received.append(m["data"]["seq"])
            assert info.value.rcvd is None or info.value.rcvd.code == 4429
            assert received and received[-1] < seqs[-1]
        # ...and resumes where it stopped.
        async with ws_client(url, token) as again:
            await again.expect("connected")
            ack = await subscribed(again, [job], since={job: received[-1]})
            assert ack["recovered"] == {job: True}
            replay = [
                (await again.expect("job_progress"))["data"]["seq"]
                for _ in range(seqs[-1] - received[-1])
            ]
            assert replay == list(range(received[-1] + 1, seqs[-1] + 1))


async def test_sigterm_closes_connections_with_1001(
    ws_factory: Callable[..., WsProcess], deps_token: str
) -> None:
    server = ws_factory()
    async with ws_client(server.url, deps_token) as c:
        await c.expect("connected")
        server.proc.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as info:
            await c.recv(timeout=10)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    assert await asyncio.to_thread(server.proc.wait, 15) == 0
    assert deps_token not in server.log()


async def test_redis_channel_is_released_after_last_subscriber(
    ws_server: WsProcess, ws_deps: Deps, deps_token: str, user: str
) -> None:
    job = await make_job(ws_deps.db, user)
    async with ws_client(ws_server.url, deps_token) as c:
        await c.expect("connected")
        await subscribed(c, [job])
        assert (await ws_deps.redis.pubsub_numsub(job_channel(job)))[0][1] == 1
    for _ in range(50):
        if (await ws_deps.redis.pubsub_numsub(job_channel(job)))[0][1] == 0:
            break
        await asyncio.sleep(0.05)
    assert (await ws_deps.redis.pubsub_numsub(job_channel(job)))[0][1] == 0


# --- end to end: gateway upload + real worker ----------------------------------------------

E2E_TEXT = "\n\n".join(
    f"Paragraph {i}: the quick brown fox jumps over the lazy dog number {i}. " * 4
    for i in range(12)
).encode()


@pytest.mark.slow
async def test_end_to_end_upload_is_seen_stage_by_stage(
    ws_server: WsProcess,
    uploads: httpx.AsyncClient,
    auth_headers: dict[str, str],
    deps_token: str,
    settings_env: dict[str, str],
    tmp_path: Any,
) -> None:
    port = free_port()
    env = {
        **settings_env,
        "WORKER_METRICS_PORT": str(port),
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
    }
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "workers"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            for _ in range(450):
                assert worker.poll() is None, log_path.read_text(errors="replace")[-3000:]
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get("/health", timeout=1)).status_code == 200:
                        break
                await asyncio.sleep(0.2)
        init = await initiate(
            uploads, auth_headers, len(E2E_TEXT), filename="e2e.txt", content_type="text/plain"
        )
        job = init["job_id"]
        async with ws_client(ws_server.url, deps_token) as c:
            await c.expect("connected")
            await subscribed(c, [job])
            first = await c.expect("job_progress")
            assert first["data"]["status"] == "awaiting_upload"
            r = await put_part(uploads, auth_headers, init["upload_id"], 1, E2E_TEXT)
            assert r.status_code in (200, 201), r.text
            r = await uploads.post(
                f"/api/v1/documents/upload/complete/{init['upload_id']}", headers=auth_headers
            )
            assert r.status_code in (200, 201), r.text
            events = [first["data"], *await c.progress_until_terminal(job, timeout=90)]
        seqs = [e["seq"] for e in events]
        assert seqs == sorted(set(seqs)), seqs
        assert events[-1]["status"] == "completed", events[-1]
        stages: list[str] = []
        for e in events:
            if e["stage"] and (not stages or stages[-1] != e["stage"]):
                stages.append(e["stage"])
        assert stages == ["upload", "validate", "extract", "chunk", "embed", "index"], stages
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(5)


async def test_concurrent_snapshot_reads_are_coalesced(ws_deps: Deps, user: str) -> None:
    jobs = [await make_job(ws_deps.db, user) for _ in range(40)]
    loader = SnapshotLoader(ws_deps.db, max_inflight=2)
    results = await asyncio.gather(
        *(loader.load([job]) for job in jobs), loader.load([str(uuid.uuid4())])
    )
    assert [set(r) for r in results[:-1]] == [{job} for job in jobs]
    assert all(
        r[job].seq == 0 and r[job].owner_id == user
        for r, job in zip(results[:-1], jobs, strict=True)
    )
    assert results[-1] == {}
    assert loader.queries <= 4  # 41 requests: 2 go out at once, the rest share the next ones


async def test_history_reader_pages_back_to_the_floor(ws_deps: Deps, user: str) -> None:
    job = await make_job(ws_deps.db, user)
    seqs = await progress(ws_deps, job, 8)
    reader = HistoryReader(ws_deps.redis, page=3)  # several pages per read
    histories = await reader.after({job: seqs[1], str(uuid.uuid4()): 0})
    events, reached_back = histories[job]
    assert [e.seq for e in events] == seqs[2:] and reached_back
    assert [e.message for e in events] == [f"step {i}" for i in range(2, 8)]
    await ws_deps.redis.xtrim(stream_key(job), maxlen=4, approximate=False)
    events, reached_back = (await reader.after({job: seqs[1]}))[job]
    assert [e.seq for e in events] == seqs[4:] and not reached_back  # seqs 2..3 aged out
    assert all(h == ([], False) for j, h in histories.items() if j != job)


async def test_metrics_go_to_the_registry_passed_in(migrated: Settings, deps_token: str) -> None:
    registry = CollectorRegistry()
    options = ServerOptions()
    async with serve(migrated, host="127.0.0.1", port=0, options=options, registry=registry) as s:
        assert s.metrics.registry is registry
        async with ws_client(f"ws://127.0.0.1:{s.port}", deps_token) as c:
            await c.expect("connected")
            labels = {"endpoint": "progress"}
            assert registry.get_sample_value("sluice_ws_connections", labels) == 1
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{s.port}") as http:
                text = (await http.get("/metrics")).text
            assert 'sluice_ws_connections{endpoint="progress"} 1.0' in text


async def test_dead_peer_is_dropped_by_protocol_pings(
    migrated: Settings, tokens: TokenService, user: str
) -> None:
    fast = msgspec.structs.replace(migrated, websocket_heartbeat_interval=1)
    async with inproc(fast, ping_timeout=0.5, close_timeout=0.5) as server:
        # A peer that completes the handshake and then never answers (nor reads) anything.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        request = (
            f"GET /api/v1/ws/progress?token={tokens.mint(user)} HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        writer.write(request.encode())
        status = await asyncio.wait_for(reader.readline(), 5)
        assert status.startswith(b"HTTP/1.1 101")
        assert len(server.connections) == 1
        t0 = time.monotonic()
        while server.connections and time.monotonic() - t0 < 10:
            await asyncio.sleep(0.1)
        assert not server.connections  # pinged at 1 s, no pong in 0.5 s, no close in 0.5 s
        assert time.monotonic() - t0 < 5
        writer.close()
