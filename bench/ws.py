"""Benchmark the WebSocket progress server against a bare ``websockets`` broadcast.

    python bench/ws.py [--subscribers 1000] [--jobs 100] [--rate 100] [--duration 15]
                       [--idle 10000] [--clients 4] [--runs 1] [--target-ms 20]

1. Progress traffic: ``--subscribers`` connections on one ``sluice ws`` process,
   spread over ``--jobs`` jobs; a separate publisher process publishes ``--rate``
   events/s in total through the real path (``publish_event``: XADD + PUBLISH,
   as a worker does, ``ts`` set at publish time).  Publish-to-receipt latency
   p50/p99 and deliveries/s are measured by ``--clients`` client processes.
   Baseline: the same clients fed by a bare ``websockets`` server that creates
   the same events itself and calls ``websockets.broadcast`` (no Redis).
   Beside the latencies, each server's event-loop lag (how late a 5 ms sleep
   wakes: ``sluice_event_loop_lag_seconds`` on its ``/metrics``) over its own
   publishing slices, and its CPU time per 1,000 deliveries (the bare server's
   includes making the events).  ``--runs N`` repeats this phase on fresh servers.
2. Idle capacity: ``--idle`` subscribed idle connections on one process; the
   server's RSS growth per connection, for both servers.

Everything runs on an embedded stack started here and stopped at the end.
The script re-invokes itself for the helper processes (``client``,
``bare``, ``publisher`` roles).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import msgspec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

JWT_SECRET = "bench-secret-" + "x" * 32
USER = "bench-user"


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


# --- helper roles ----------------------------------------------------------------------------


class _Data(msgspec.Struct):
    ts: float = 0.0


class _Msg(msgspec.Struct):
    type: str
    snapshot: bool = False
    data: _Data | None = None


_decode_msg = msgspec.json.Decoder(_Msg).decode


async def client_role(args: argparse.Namespace) -> None:
    """Open connections, subscribe, report READY; record latencies between go/stop."""
    from websockets.asyncio.client import ClientConnection, connect

    raise_fd_limit()
    jobs: list[str] = args.jobs_list
    latencies: list[float] = []
    state = {"recording": False, "received": 0, "failed": 0, "retries": 0}
    ready = 0
    opened: list[ClientConnection] = []
    sem = asyncio.Semaphore(64)
    all_ready = asyncio.Event()

    async def one(i: int) -> None:
        nonlocal ready
        job = jobs[(args.offset + i) % len(jobs)]
        try:
            for attempt in range(4):  # as real clients do: retry a refused handshake
                try:
                    async with sem:
                        ws = await connect(
                            args.url,
                            compression=None,
                            open_timeout=120,
                            ping_interval=None,
                            close_timeout=1,
                            max_queue=64,
                        )
                        opened.append(ws)
                        await ws.send(
                            json.dumps(
                                {"type": "subscribe", "job_ids": [job], "channels": ["progress"]}
                            )
                        )
                        while _decode_msg(await ws.recv()).type != "subscribed":
                            pass
                    break
                except Exception as exc:
                    if attempt == 3:
                        raise
                    state["retries"] += 1
                    if state["retries"] <= 2:
                        print(f"connect retried: {exc!r}", file=sys.stderr, flush=True)
                    await asyncio.sleep(0.5 * (attempt + 1))
        except Exception as exc:
            state["failed"] += 1
            if state["failed"] <= 3:
                print(f"connect failed: {exc!r}", file=sys.stderr, flush=True)
            return
        finally:
            ready += 1
            if ready == args.conns:
                all_ready.set()
        with contextlib.suppress(Exception):
            async for raw in ws:
                msg = _decode_msg(raw)
                if msg.type == "job_progress" and not msg.snapshot and state["recording"]:
                    assert msg.data is not None
                    latencies.append(time.time() - msg.data.ts)
                    state["received"] += 1

    tasks = [asyncio.create_task(one(i)) for i in range(args.conns)]
    await all_ready.wait()
    print(f"READY {args.conns - state['failed']} {state['retries']}", flush=True)
    loop = asyncio.get_running_loop()
    started = 0.0
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if line == "go":
            started = time.monotonic()
            state["recording"] = True
        elif line in ("stop", ""):
            state["recording"] = False
            elapsed = time.monotonic() - started if started else 0.0
            print(
                json.dumps(
                    {
                        "latencies": latencies,
                        "received": state["received"],
                        "elapsed": elapsed,
                        "connected": args.conns - state["failed"],
                    }
                ),
                flush=True,
            )
            break
    for ws in opened:
        with contextlib.suppress(Exception):
            ws.transport.abort()
    for t in tasks:
        t.cancel()


def _event(job_id: str, seq: int, ts: float | None = None) -> Any:
    from app.jobs.model import ProgressEvent

    return ProgressEvent(
        job_id=job_id,
        seq=seq,
        status="running",
        stage="embed",
        stage_progress=min(1.0, seq / 1000),
        overall_progress=0.5,
        message=f"embedded batch {seq}",
        ts=time.time() if ts is None else ts,
        owner_id=USER,
        document_id="00000000-0000-0000-0000-000000000000",
    )


async def _paced(
    rate: float, jobs: list[str], emit: Any, probe_jobs: list[str] | None = None
) -> None:
    """Call ``emit(job, seq)`` ``rate`` times a second, round-robin over ``jobs``, while
    stdin's last command was ``on`` (``probe``: over ``probe_jobs``; ``off`` pauses;
    EOF stops)."""
    loop = asyncio.get_running_loop()
    active = asyncio.Event()
    done = asyncio.Event()
    target = {"jobs": jobs}

    async def control() -> None:
        while True:
            line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
            if line in ("on", "probe"):
                target["jobs"] = probe_jobs if line == "probe" and probe_jobs else jobs
                active.set()
            elif line == "off":
                active.clear()
            elif line == "":
                done.set()
                active.set()
                return

    controller = asyncio.create_task(control())
    seqs: dict[str, int] = defaultdict(int)
    interval, n = 1.0 / rate, 0
    wall_offset = time.time() - loop.time()  # next_at + wall_offset: when an event is due
    next_at = loop.time()
    while not done.is_set():
        if not active.is_set():
            await active.wait()
            next_at = loop.time()
            continue
        current = target["jobs"]
        job = current[n % len(current)]
        seqs[job] += 1
        await emit(job, seqs[job], next_at + wall_offset)
        n += 1
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - loop.time()))
    await controller


async def bare_role(args: argparse.Namespace) -> None:
    """The baseline: a bare websockets server broadcasting the events it creates."""
    from http import HTTPStatus

    from prometheus_client import CollectorRegistry, generate_latest
    from websockets.asyncio.server import ServerConnection, broadcast, serve
    from websockets.datastructures import Headers
    from websockets.http11 import Request, Response

    from app.core.looplag import LoopLagMetrics, LoopLagProbe
    from app.jobs.events import encode_event

    raise_fd_limit()
    registry = CollectorRegistry()
    probe = LoopLagProbe(LoopLagMetrics(registry), "bare")

    def metrics(_conn: ServerConnection, request: Request) -> Response | None:
        if request.path != "/metrics":
            return None
        body = generate_latest(registry)
        headers = Headers([("Content-Length", str(len(body)))])
        return Response(HTTPStatus.OK.value, "OK", headers, body)

    jobs: list[str] = args.jobs_list
    subs: dict[str, set[ServerConnection]] = defaultdict(set)

    async def handler(ws: ServerConnection) -> None:
        msg = json.loads(await ws.recv())
        job = msg["job_ids"][0]
        subs[job].add(ws)
        try:
            await ws.send(json.dumps({"type": "subscribed", "job_ids": [job]}))
            await ws.wait_closed()
        finally:
            subs[job].discard(ws)

    async def emit(job: str, seq: int, due: float) -> None:
        # --baseline-ts due: stamp the event with when it was due, so that this
        # server's own stalls count in its latency as the sluice server's do.
        payload = encode_event(_event(job, seq, due if args.baseline_ts == "due" else None))
        frame = b'{"type":"job_progress","job_id":"' + job.encode() + b'","data":' + payload + b"}"
        broadcast(subs[job], frame, text=True)

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with serve(
        handler,
        "127.0.0.1",
        args.port,
        compression=None,
        ping_interval=30,
        process_request=metrics,
    ):
        probe.start()
        task = asyncio.create_task(_paced(args.rate, jobs, emit))
        await stop.wait()
        task.cancel()
        await probe.stop()


async def hop_role(args: argparse.Namespace) -> None:
    """A bare Redis subscriber on the jobs' channels: the Redis hop's own latency."""
    from redis.asyncio import Redis

    jobs: list[str] = args.jobs_list
    redis: Redis = Redis.from_url(args.redis_url)
    pubsub = redis.pubsub()
    await pubsub.connect()  # type: ignore[no-untyped-call]
    await pubsub.execute_command("SUBSCRIBE", *[f"sluice:job:{j}" for j in jobs])
    print("READY 1 0", flush=True)
    decode = msgspec.json.Decoder(_Data).decode
    latencies: list[float] = []
    loop = asyncio.get_running_loop()
    command = loop.run_in_executor(None, sys.stdin.readline)
    recording = False
    while True:
        response = await pubsub.parse_response(block=False, timeout=0.05)
        if response and response[0] == b"message" and recording:
            latencies.append(time.time() - decode(response[2]).ts)
        if command.done():
            line = command.result().strip()
            if line == "go":
                recording = True
            else:
                print(
                    json.dumps(
                        {
                            "latencies": latencies,
                            "received": len(latencies),
                            "elapsed": 0,
                            "connected": 1,
                        }
                    ),
                    flush=True,
                )
                break
            command = loop.run_in_executor(None, sys.stdin.readline)
    await redis.aclose()


async def publisher_role(args: argparse.Namespace) -> None:
    """Publish progress events through the real path, as a worker does."""
    from redis.asyncio import Redis

    from app.jobs.events import publish_event

    jobs: list[str] = args.jobs_list
    redis: Redis = Redis.from_url(args.redis_url)

    async def emit(job: str, seq: int, _due: float) -> None:
        await publish_event(redis, _event(job, seq))

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    probe_jobs: list[str] | None = args.probe_list
    task = asyncio.create_task(_paced(args.rate, jobs, emit, probe_jobs))
    await stop.wait()
    task.cancel()
    await redis.aclose()


# --- orchestration -----------------------------------------------------------------------------


def _spawn(role: str, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, role, *extra],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _wait_port(port: int, timeout: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port}")


class Server:
    """A server under test: the real ``sluice ws`` or the bare baseline, plus
    the process that feeds it events (the publisher, or the bare server itself)."""

    def __init__(
        self,
        kind: str,
        env: dict[str, str],
        jobs_file: Path,
        rate: float,
        baseline_ts: str = "created",
    ) -> None:
        from devstack.process import free_port

        self.kind = kind
        self.port = free_port()
        self.feeder: subprocess.Popen[str] | None = None
        if kind == "sluice":
            senv = {**env, "WEBSOCKET_HOST": "127.0.0.1", "WEBSOCKET_PORT": str(self.port)}
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "app", "ws"],
                cwd=ROOT,
                env=senv,
                stdin=subprocess.DEVNULL,
                text=True,
            )
            _wait_port(self.port)
            if rate > 0:
                self.feeder = _spawn(
                    "publisher",
                    "--jobs-file",
                    str(jobs_file),
                    "--rate",
                    str(rate),
                    "--redis-url",
                    env["REDIS_URL"],
                    "--probe-jobs-file",
                    str(jobs_file.with_name("probe.json")),
                    env=env,
                )
        else:
            self.proc = _spawn(
                "bare",
                "--jobs-file",
                str(jobs_file),
                "--rate",
                str(rate or 1),
                "--port",
                str(self.port),
                "--baseline-ts",
                baseline_ts,
                env=env,
            )
            self.feeder = self.proc
            _wait_port(self.port)

    def url(self, token: str) -> str:
        return f"ws://127.0.0.1:{self.port}/api/v1/ws/progress?token={token}"

    def publish(self, on: bool, command: str = "on") -> None:
        assert self.feeder is not None and self.feeder.stdin is not None
        self.feeder.stdin.write(f"{command}\n" if on else "off\n")
        self.feeder.stdin.flush()

    def stop(self) -> None:
        for proc in (self.feeder, self.proc):
            if proc is not None:
                with contextlib.suppress(Exception):
                    if proc.stdin:
                        proc.stdin.close()
                _stop(proc)


class ClientSet:
    """``n_clients`` client processes holding ``total`` subscribed connections."""

    def __init__(
        self,
        server: Server | None,
        token: str,
        jobs_file: Path,
        total: int,
        n_clients: int,
        env: dict[str, str],
    ) -> None:
        self.retries = 0
        if server is None:  # the Redis-hop probe instead of WebSocket clients
            self.procs = [
                _spawn(
                    "hop", "--jobs-file", str(jobs_file), "--redis-url", env["REDIS_URL"], env=env
                )
            ]
            return
        per = total // n_clients
        self.procs = [
            _spawn(
                "client",
                "--url",
                server.url(token),
                "--jobs-file",
                str(jobs_file),
                "--conns",
                str(per),
                "--offset",
                str(i * per),
                env=env,
            )
            for i in range(n_clients)
        ]

    def wait_ready(self) -> int:
        connected = 0
        for c in self.procs:
            assert c.stdout is not None
            line = c.stdout.readline()
            if not line.startswith("READY"):
                raise RuntimeError(f"client failed to start: {line!r}")
            connected += int(line.split()[1])
            self.retries += int(line.split()[2])
        return connected

    def tell(self, command: str) -> None:
        for c in self.procs:
            assert c.stdin is not None
            c.stdin.write(command + "\n")
            c.stdin.flush()

    def results(self) -> dict[str, Any]:
        self.tell("stop")
        results = []
        for c in self.procs:
            assert c.stdout is not None
            results.append(json.loads(c.stdout.readline()))
        return {
            "latencies": sorted(x for r in results for x in r["latencies"]),
            "received": sum(r["received"] for r in results),
        }

    def stop(self) -> None:
        for c in self.procs:
            with contextlib.suppress(Exception):
                if c.stdin:
                    c.stdin.close()
            _stop(c)


def _pct(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k] * 1000


async def _make_jobs(dsn: str, n: int) -> list[str]:
    from app.core.db import create_pool, migrate_dsn
    from app.jobs.documents import create_document, create_job
    from app.jobs.model import JobStatus

    await migrate_dsn(dsn)
    pool = await create_pool(dsn, max_size=2)
    try:
        jobs = []
        for _ in range(n):
            doc = await create_document(
                pool,
                owner_id=USER,
                filename="b.txt",
                content_type="text/plain",
                document_type="txt",
                size_bytes=1,
            )
            jobs.append(
                await create_job(pool, owner_id=USER, document_id=doc, status=JobStatus.RUNNING)
            )
        return jobs
    finally:
        await pool.close()


LAG_SERIES = "sluice_event_loop_lag_seconds_bucket"


def _lag_buckets(port: int) -> dict[float, float]:
    """The server's loop-lag histogram (cumulative count per bucket bound) from /metrics."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(LAG_SERIES):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[float(le)] = out.get(float(le), 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def _lag_text(delta: dict[float, float]) -> str:
    """p50/p99/max of a loop-lag histogram delta, as bucket upper bounds in ms."""
    total = delta.get(float("inf"), 0.0)
    if total <= 0:
        return "no samples"

    def bound(q: float) -> str:
        for le in sorted(delta):
            if delta[le] >= q * total:
                return "inf" if le == float("inf") else f"{le * 1000:g}"
        return "inf"

    return f"p50 <={bound(0.5)} p99 <={bound(0.99)} max <={bound(1.0)} ms ({total:.0f} samples)"


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class LagMeter:
    """A server's loop-lag histogram and CPU time, summed over the slices in which it
    was publishing."""

    def __init__(self, port: int, pid: int) -> None:
        self.port = port
        self.pid = pid
        self.total: dict[float, float] = defaultdict(float)
        self.cpu = 0.0
        self._before: dict[float, float] = {}
        self._cpu_before = 0.0

    def begin(self) -> None:
        self._before = _lag_buckets(self.port)
        self._cpu_before = _cpu_seconds(self.pid)

    def end(self) -> None:
        self.cpu += _cpu_seconds(self.pid) - self._cpu_before
        for le, n in _lag_buckets(self.port).items():
            self.total[le] += n - self._before.get(le, 0.0)


def progress_run(
    args: argparse.Namespace,
    env: dict[str, str],
    token: str,
    jobs_file: Path,
    say: Any,
    n: int,
) -> dict[str, Any]:
    """One run of phase 1 on fresh servers and clients; returns the p99s and the lag text."""
    servers = {
        kind: Server(kind, env, jobs_file, args.rate, args.baseline_ts)
        for kind in ("bare", "sluice")
    }
    lag = {kind: LagMeter(server.port, server.proc.pid) for kind, server in servers.items()}
    sets: dict[str, ClientSet] = {}
    try:
        connected: dict[str, tuple[int, float]] = {}
        for kind, server in servers.items():
            t0 = time.monotonic()
            sets[kind] = ClientSet(server, token, jobs_file, args.subscribers, args.clients, env)
            connected[kind] = (sets[kind].wait_ready(), time.monotonic() - t0)
        sets["redis hop"] = ClientSet(None, token, jobs_file.with_name("probe.json"), 1, 1, env)
        sets["redis hop"].wait_ready()
        time.sleep(1.0)
        for cs in sets.values():
            cs.tell("go")
        # Interleave the two so that background load hits both alike.
        kinds = ["bare", "sluice", "redis hop"]
        for i in range(round(args.duration)):
            for kind in kinds[i % 3 :] + kinds[: i % 3]:
                server = servers["sluice" if kind == "redis hop" else kind]
                meter = lag.get(kind)
                if meter is not None:
                    meter.begin()
                # the Redis hop: the publisher feeds jobs only the probe hears
                server.publish(True, "probe" if kind == "redis hop" else "on")
                time.sleep(1.0)
                server.publish(False)
                time.sleep(0.2)  # let in-flight events land
                if meter is not None:
                    meter.end()
        outcome = {kind: cs.results() for kind, cs in sets.items()}
    finally:
        for cs in sets.values():
            cs.stop()
        for server in servers.values():
            server.stop()
    expected = args.rate * args.subscribers / args.jobs
    say(f"  run {n} (load average {os.getloadavg()[0]:.2f}):")
    for kind in ("bare", "sluice"):
        r = outcome[kind]
        say(
            f"  {kind:<7} p50 {_pct(r['latencies'], 50):6.2f} ms  "
            f"p99 {_pct(r['latencies'], 99):6.2f} ms  "
            f"max {_pct(r['latencies'], 100):7.2f} ms  "
            f"delivered {r['received'] / round(args.duration):7.0f}/s while publishing "
            f"(expected {expected:.0f}/s)  "
            f"{connected[kind][0]} connected in {connected[kind][1]:.1f}s"
        )
        say(f"          loop lag (5 ms sleep, while publishing): {_lag_text(lag[kind].total)}")
        per_k = 1000 * lag[kind].cpu / max(1, r["received"])
        say(f"          server CPU while publishing: {per_k * 1000:.1f} ms per 1,000 deliveries")
    hop = outcome["redis hop"]["latencies"]
    say(
        f"  Redis hop alone (publisher -> Redis -> a bare subscriber, in its own 1s "
        f"slices): p50 {_pct(hop, 50):.2f} ms  p99 {_pct(hop, 99):.2f} ms  "
        f"max {_pct(hop, 100):.2f} ms"
    )
    p99 = {k: _pct(outcome[k]["latencies"], 99) for k in ("bare", "sluice")}
    d50 = _pct(outcome["sluice"]["latencies"], 50) - _pct(outcome["bare"]["latencies"], 50)
    say(
        f"  difference (sluice - bare): p50 {d50:+.2f} ms, p99 {p99['sluice'] - p99['bare']:+.2f} "
        f"ms (target: p99 < {args.target_ms:g} ms and within 2 ms of the baseline)"
    )
    return {**p99, "lag": _lag_text(lag["sluice"].total)}


def orchestrate(args: argparse.Namespace) -> int:
    from app.core.auth import TokenService
    from devstack.stack import EmbeddedStack

    raise_fd_limit()
    token = TokenService(JWT_SECRET).mint(USER)
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    with (
        tempfile.TemporaryDirectory(prefix="sluice-bench-ws-") as tmp,
        EmbeddedStack.in_dir(Path(tmp), durable=False) as stack,
    ):
        env = {
            **os.environ,
            **stack.environ(),
            "JWT_SECRET": JWT_SECRET,
            "LOG_LEVEL": "WARNING",
            "LOG_FORMAT": "console",
        }
        jobs = asyncio.run(_make_jobs(stack.postgres.dsn, args.jobs))
        jobs_file = Path(tmp) / "jobs.json"
        jobs_file.write_text(json.dumps(jobs))
        probe_jobs = [str(uuid.uuid4()) for _ in range(args.jobs)]
        jobs_file.with_name("probe.json").write_text(json.dumps(probe_jobs))
        say(f"machine: {os.cpu_count()} cores; fd limit {raise_fd_limit()}")

        if args.subscribers:
            say(
                f"\n1. progress traffic: {args.subscribers} subscribers over {args.jobs} jobs, "
                f"{args.rate:g} events/s, {args.duration:g}s per server in alternating 1s "
                f"slices, {args.clients} client processes per server; {args.runs} run(s); "
                f"baseline ts: {args.baseline_ts}"
            )
            runs = [
                progress_run(args, env, token, jobs_file, say, n) for n in range(1, args.runs + 1)
            ]
            if len(runs) > 1:
                say("  summary (p99 ms: bare / sluice / difference / sluice loop lag p99):")
                for n, r in enumerate(runs, 1):
                    say(
                        f"    run {n}: {r['bare']:.2f} / {r['sluice']:.2f} / "
                        f"{r['sluice'] - r['bare']:+.2f} / {r['lag']}"
                    )

        if args.idle:
            say(
                f"\n2. idle capacity: {args.idle} idle subscribed connections, "
                f"{args.clients} client processes"
            )
            for kind in ("bare", "sluice"):
                server = Server(kind, env, jobs_file, 0)
                idle_set: ClientSet | None = None
                try:
                    time.sleep(1.0)
                    before = _rss_kib(server.proc.pid)
                    t0 = time.monotonic()
                    idle_set = ClientSet(server, token, jobs_file, args.idle, args.clients, env)
                    n = idle_set.wait_ready()
                    retries = idle_set.retries
                    elapsed = time.monotonic() - t0
                    time.sleep(2.0)
                    after = _rss_kib(server.proc.pid)
                finally:
                    if idle_set is not None:
                        idle_set.stop()
                    server.stop()
                say(
                    f"  {kind:<7} connected {n} in {elapsed:.1f}s "
                    f"({retries} handshakes retried); RSS "
                    f"{before / 1024:.0f} MiB -> {after / 1024:.0f} MiB; "
                    f"{(after - before) / max(1, n):.1f} KiB per connection; "
                    f"total {after / 1024:.0f} MiB (target < 1024 MiB)"
                )
    if args.output:
        Path(args.output).write_text("\n".join(lines) + "\n")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="role")
    p = sub.add_parser("client")
    p.add_argument("--url", required=True)
    p.add_argument("--jobs-file", required=True)
    p.add_argument("--conns", type=int, required=True)
    p.add_argument("--offset", type=int, default=0)
    p = sub.add_parser("bare")
    p.add_argument("--jobs-file", required=True)
    p.add_argument("--rate", type=float, default=100)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--baseline-ts", choices=("created", "due"), default="created")
    p = sub.add_parser("hop")
    p.add_argument("--jobs-file", required=True)
    p.add_argument("--redis-url", required=True)
    p = sub.add_parser("publisher")
    p.add_argument("--jobs-file", required=True)
    p.add_argument("--rate", type=float, default=100)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--probe-jobs-file", default="", help="jobs only the Redis-hop probe hears")
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--rate", type=float, default=100)
    parser.add_argument("--duration", type=float, default=15)
    parser.add_argument("--idle", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--runs", type=int, default=1, help="repeat phase 1 on fresh servers")
    parser.add_argument("--target-ms", type=float, default=20, help="the p99 target to print")
    parser.add_argument(
        "--baseline-ts",
        choices=("created", "due"),
        default="created",
        help="the baseline's event ts: when its own loop made the event (its stalls do "
        "not count), or when the event was due (they do, as the sluice server's do)",
    )
    parser.add_argument("--output", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    if args.role in ("client", "bare", "publisher", "hop"):
        args.jobs_list = json.loads(Path(args.jobs_file).read_text())
    if args.role == "publisher":
        probe = args.probe_jobs_file
        args.probe_list = json.loads(Path(probe).read_text()) if probe else None
    if args.role == "client":
        asyncio.run(client_role(args))
    elif args.role == "bare":
        asyncio.run(bare_role(args))
    elif args.role == "hop":
        asyncio.run(hop_role(args))
    elif args.role == "publisher":
        asyncio.run(publisher_role(args))
    else:
        return orchestrate(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
