"""``sluice dev`` end to end: the stack comes up, answers with the printed token,
a crashed child is started again, Ctrl-C leaves no process behind, and Postgres
and Redis data survive a restart."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import suppress
from pathlib import Path

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from app.core.db import create_pool
from app.jobs.documents import create_document
from devstack.process import free_port
from devstack.supervise import RestartPolicy

pytestmark = pytest.mark.timeout(400)


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        text = (task / "children").read_text().split()
        found.update(int(x) for x in text)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _worker_child(pid: int) -> int | None:
    found = [c for c in _children(pid) if "-m workers" in _cmdline(c) and _alive(c)]
    return found[0] if found else None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _processes_mentioning(text: str) -> list[str]:
    hits = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in args:
            hits.append(f"{cmdline.parent.name}: {args}")
    return hits


class Dev:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.ports = {
            name: free_port()
            for name in (
                "port",
                "ws-port",
                "postgres-port",
                "redis-port",
                "s3-port",
                "worker-metrics-port",
                "embedder-port",
            )
        }
        self.proc: subprocess.Popen[str] | None = None
        self.token = ""
        self.dashboard = ""
        self.output: list[str] = []

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.ports['port']}"

    def start(self) -> None:
        # Default data dir (.sluice/ in the working directory), as a user would run it.
        argv = [sys.executable, "-m", "app", "dev"]
        for name, port in self.ports.items():
            argv += [f"--{name}", str(port)]
        env = {
            "PATH": os.environ["PATH"],
            "HOME": os.environ.get("HOME", "/tmp"),
            "LOG_LEVEL": "WARNING",
        }
        if "PYTHONPATH" in os.environ:  # run the code under test, not an installed copy
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=self.data_dir,
        )
        token_seen = threading.Event()
        threading.Thread(target=self._drain, args=(token_seen,), daemon=True).start()
        if not token_seen.wait(300):
            raise AssertionError("sluice dev did not print a token:\n" + "".join(self.output))

    def _drain(self, token_seen: threading.Event) -> None:
        """Read all output, so a chatty child can never block on a full pipe."""
        assert self.proc is not None and self.proc.stdout is not None
        with self.proc.stdout as stream:
            for line in stream:
                self.output.append(line)
                if line.startswith("dashboard: "):
                    self.dashboard = line.split()[-1]
                if line.startswith("dev token"):
                    self.token = line.split()[-1]
                    token_seen.set()

    def dashboard_token(self) -> str:
        """The token of the printed ``dashboard: http://127.0.0.1:PORT/#token=...`` line."""
        prefix = f"dashboard: {self.gateway}/#token="
        for _ in range(100):
            for line in list(self.output):
                if line.startswith(prefix):
                    return line.strip().removeprefix(prefix)
            time.sleep(0.1)
        raise AssertionError("no dashboard link:\n" + "".join(self.output))

    def interrupt(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(60)
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for child in _children(self.proc.pid):
                with suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait(10)


def test_dev_stack_serves_stops_cleanly_and_keeps_data(tmp_path: Path) -> None:
    dev = Dev(tmp_path)
    try:
        dev.start()
        assert dev.proc is not None
        children = _children(dev.proc.pid)
        # postgres, redis, s3 + gateway, worker, WebSocket server, embedder
        assert len(children) == 7, children
        with httpx.Client(base_url=dev.gateway, timeout=10) as http:
            assert http.get("/health/ready").status_code == 200
            assert http.get("/api/v1/me").status_code == 401
            me = http.get("/api/v1/me", headers={"Authorization": f"Bearer {dev.token}"})
            assert me.status_code == 200 and me.json()["user_id"] == "dev"
            # The dashboard link carries an admin token for "dev", printed once, never logged.
            admin_token = dev.dashboard_token()
            me = http.get("/api/v1/me", headers={"Authorization": f"Bearer {admin_token}"})
            assert me.json() | {"token_expires_at": None} == {
                "user_id": "dev",
                "admin": True,
                "token_expires_at": None,
            }
            assert sum(admin_token in line for line in dev.output) == 1
            # `sluice token`, run in the same directory, shares dev's secret.
            out = subprocess.run(
                [sys.executable, "-m", "app", "token", "--user", "alice"],
                cwd=tmp_path,
                env={"PATH": os.environ["PATH"]},
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            ).stdout
            alice = http.get("/api/v1/me", headers={"Authorization": f"Bearer {out.split()[-1]}"})
            assert alice.status_code == 200 and alice.json()["user_id"] == "alice"
            # The dashboard link: the page, with an admin token for "dev" in the fragment.
            page, _, admin = dev.dashboard.partition("#token=")
            assert page == dev.gateway + "/" and http.get("/").status_code == 200
            me = http.get("/api/v1/me", headers={"Authorization": f"Bearer {admin}"}).json()
            assert me["user_id"] == "dev" and me["admin"] is True
        # A crashed child (here the worker, SIGKILLed) is started again; the rest
        # of the stack keeps serving meanwhile.
        worker = _worker_child(dev.proc.pid)
        assert worker is not None
        os.kill(worker, signal.SIGKILL)
        metrics = f"http://127.0.0.1:{dev.ports['worker-metrics-port']}/health"
        deadline = time.monotonic() + 120
        with httpx.Client(timeout=5) as http:
            while True:
                me = http.get(
                    f"{dev.gateway}/api/v1/me", headers={"Authorization": f"Bearer {dev.token}"}
                )
                assert me.status_code == 200, "".join(dev.output[-30:])
                restarted = _worker_child(dev.proc.pid)
                if restarted not in (None, worker):
                    with suppress(httpx.HTTPError):
                        if http.get(metrics).status_code == 200:
                            break
                assert time.monotonic() < deadline, "".join(dev.output[-30:])
                time.sleep(0.5)
        assert dev.proc.poll() is None
        assert "child_crashed" in "".join(dev.output)
        children = _children(dev.proc.pid)
        assert len(children) == 7, children

        pg = f"postgresql://postgres@127.0.0.1:{dev.ports['postgres-port']}/sluice"
        rd = f"redis://127.0.0.1:{dev.ports['redis-port']}/0"
        doc_id = asyncio.run(_write_data(pg, rd))

        assert dev.interrupt() == 0
        leftovers = [pid for pid in children if _alive(pid)]
        assert leftovers == [], leftovers
        assert _processes_mentioning(str(tmp_path)) == []

        dev.start()
        assert asyncio.run(_read_data(pg, rd, doc_id)) == ("kept.txt", b"still here")
        assert dev.interrupt() == 0
        assert _processes_mentioning(str(tmp_path)) == []
    finally:
        dev.kill()


def test_a_crashing_child_is_restarted_with_backoff_until_it_crash_loops() -> None:
    policy = RestartPolicy(limit=5, window=60, backoff=(0.5, 10))
    assert [policy.after_crash("worker", t) for t in (0, 1, 2, 3)] == [0.5, 1, 2, 4]
    assert policy.after_crash("gateway", 4) == 0.5  # counted per child
    assert policy.after_crash("worker", 5) is None  # 5 crashes within 60 s: a crash loop
    calm = RestartPolicy(limit=5, window=60, backoff=(0.5, 10))
    delays = [calm.after_crash("worker", t * 31.0) for t in range(10)]
    assert delays == [0.5] + [1.0] * 9  # now and then is not a loop: never given up


async def _write_data(pg: str, rd: str) -> str:
    pool = await create_pool(pg, max_size=1)
    try:
        doc_id = await create_document(
            pool,
            owner_id="dev",
            filename="kept.txt",
            content_type="text/plain",
            document_type="txt",
            size_bytes=1,
        )
    finally:
        await pool.close()
    client = aioredis.from_url(rd)
    await client.set("sluice:test:persist", b"still here")
    await client.aclose()
    return doc_id


async def _read_data(pg: str, rd: str, doc_id: str) -> tuple[str, bytes | None]:
    conn = await asyncpg.connect(pg)
    try:
        name = await conn.fetchval("SELECT filename FROM documents WHERE id = $1::uuid", doc_id)
    finally:
        await conn.close()
    client = aioredis.from_url(rd)
    value = await client.get("sluice:test:persist")
    await client.aclose()
    return name, value
