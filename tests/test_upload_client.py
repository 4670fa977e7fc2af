"""The resumable client: UploadClient and ``sluice upload`` resuming after failures."""

from __future__ import annotations

import asyncio
import io
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.client import UploadClient, UploadError
from app.client.command import summary_line
from app.client.follow import follow_job, ws_url_for
from app.client.progress import UploadProgress
from app.client.upload import UploadResult
from app.gateway.app import create_app
from app.gateway.services import Services
from app.jobs.service import request_cancel
from tests import fixtures_uploads as fx
from tests.fixtures_uploads import (
    PART,
    ROOT,
    payload,
    s3_object,
)
from tests.fixtures_ws import WsProcess


class DroppingTransport(httpx.AsyncBaseTransport):
    """Passes requests through until ``drop_after`` parts were sent, then the
    network is gone (every later PUT fails to connect)."""

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport,
        *,
        drop_after: int | None = None,
        flaky_first_try: bool = False,
    ) -> None:
        self.inner = inner
        self.drop_after = drop_after
        self.flaky_first_try = flaky_first_try
        self.puts: list[str] = []
        self.failed: set[str] = set()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "PUT":
            path = request.url.path
            if self.drop_after is not None and len(self.puts) >= self.drop_after:
                raise httpx.ConnectError("network is unreachable", request=request)
            if self.flaky_first_try and path not in self.failed:
                self.failed.add(path)
                raise httpx.ReadError("connection reset by peer", request=request)
            self.puts.append(path)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def part_numbers(paths: list[str]) -> list[int]:
    return sorted(int(p.rsplit("/", 1)[1]) for p in paths)


async def _no_sleep(_seconds: float) -> None:
    return None


@pytest.fixture
def big_file(tmp_path: Path) -> Path:
    path = tmp_path / "large report.txt"
    path.write_bytes(payload(2 * PART + 4321, seed=30))
    return path


async def test_client_resumes_and_sends_only_missing_parts(
    upload_services: Services, tokens: Any, user: str, big_file: Path, tmp_path: Path
) -> None:
    app = create_app(upload_services.settings, services=upload_services)
    asgi = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    token = tokens.mint(user)
    state_dir = tmp_path / "state"

    dropping = DroppingTransport(asgi, drop_after=1)
    async with httpx.AsyncClient(transport=dropping) as http:
        client = UploadClient(
            "http://gateway",
            token,
            parallel=1,
            state_dir=state_dir,
            http=http,
            max_attempts=2,
            sleep=_no_sleep,
            progress_stream=io.StringIO(),
        )
        async with client:
            with pytest.raises(UploadError):
                await client.upload(big_file, priority="high")
    assert part_numbers(dropping.puts) == [1]
    assert len(list(state_dir.glob("*.json"))) == 1  # the session is remembered

    counting = DroppingTransport(asgi)
    progress = io.StringIO()
    async with (
        httpx.AsyncClient(transport=counting) as http,
        UploadClient(
            "http://gateway",
            token,
            parallel=2,
            state_dir=state_dir,
            http=http,
            progress_stream=progress,
        ) as client,
    ):
        result = await client.upload(big_file, priority="high")
    assert result.resumed and result.parts_sent == [2, 3]
    assert part_numbers(counting.puts) == [2, 3]  # part 1 was not sent again
    assert result.status == "queued"
    assert await s3_object(upload_services, result.document_id) == big_file.read_bytes()
    assert list(state_dir.glob("*.json")) == []  # forgotten once complete
    assert "MB/s" in progress.getvalue() and "ETA" in progress.getvalue()


async def test_client_retries_failed_parts(
    upload_services: Services, tokens: Any, user: str, big_file: Path
) -> None:
    app = create_app(upload_services.settings, services=upload_services)
    flaky = DroppingTransport(
        httpx.ASGITransport(app=app, raise_app_exceptions=False), flaky_first_try=True
    )
    delays: list[float] = []

    async def record(seconds: float) -> None:
        delays.append(seconds)

    async with (
        httpx.AsyncClient(transport=flaky) as http,
        UploadClient(
            "http://gateway", tokens.mint(user), parallel=3, http=http, sleep=record, progress=False
        ) as client,
    ):
        result = await client.upload(big_file)
    assert len(flaky.failed) == 3 and part_numbers(flaky.puts) == [1, 2, 3]
    assert len(delays) == 3 and all(0 <= d <= 1.0 for d in delays)  # jittered backoff
    assert await s3_object(upload_services, result.document_id) == big_file.read_bytes()


async def test_client_reports_refusals_without_retrying(
    upload_services: Services, tokens: Any, user: str, tmp_path: Path
) -> None:
    app = create_app(upload_services.settings, services=upload_services)
    bad = tmp_path / "program.exe"
    bad.write_bytes(b"MZ")
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as http,
        UploadClient("http://gateway", tokens.mint(user), http=http, progress=False) as client,
    ):
        with pytest.raises(UploadError) as info:
            await client.upload(bad)
    assert (info.value.status, info.value.code) == (415, "unsupported_file_type")


def test_progress_bar_shows_rate_and_eta() -> None:
    now = [0.0]
    out = io.StringIO()
    bar = UploadProgress(100_000_000, stream=out, clock=lambda: now[0])
    now[0] = 2.0
    bar.advance(50_000_000)
    bar.close()
    line = out.getvalue().strip().splitlines()[-1]
    assert "50.0%" in line and "25.0 MB/s" in line and "ETA 00:02" in line


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_redraws_on_a_terminal_and_writes_one_plain_line_elsewhere() -> None:
    now = [0.0]
    log = io.StringIO()  # a pipe or a CI log: the final state, once, no control characters
    with UploadProgress(100_000_000, done=20_000_000, stream=log, clock=lambda: now[0]) as bar:
        for _ in range(8):
            now[0] += 1.0
            bar.advance(10_000_000)
            assert log.getvalue() == ""
    assert log.getvalue().count("\n") == 1 and "\r" not in log.getvalue()
    assert "\x1b" not in log.getvalue()
    # Resumed bytes are not speed: 80 MB sent in 8 s.
    assert "100.0%" in log.getvalue() and "10.0 MB/s" in log.getvalue()

    tty = _Terminal()
    with UploadProgress(100_000_000, stream=tty, clock=lambda: now[0]) as bar:
        bar.advance(10_000_000)
        bar._progress.refresh()  # what rich's refresh thread does ten times a second
        bar.advance(10_000_000)
    drawn = tty.getvalue()
    assert "10.0%" in drawn and "20.0%" in drawn and "\r" in drawn  # redrawn in place


def test_summary_line_names_the_file_size_time_rate_ids_and_status(tmp_path: Path) -> None:
    result = UploadResult(
        upload_id="u-1",
        job_id="j-1",
        document_id="d-1",
        size=3_000_000,
        status="queued",
        resumed=True,
        parts_sent=[3],
        bytes_sent=1_000_000,
    )
    line = summary_line(tmp_path / "notes.md", result, 0.5, "completed")
    assert line == (
        "notes.md: 3.0 MB in 0.5 s (2.0 MB/s, resumed: 1 part(s) sent); "
        "upload u-1, job j-1: completed"
    )


async def test_cli_resumes_an_interrupted_upload(
    gateway_factory: Callable[..., Any],
    tokens: Any,
    user: str,
    big_file: Path,
    tmp_path: Path,
    upload_services: Services,
    settings_env: dict[str, str],
) -> None:
    gw = gateway_factory()
    token = tokens.mint(user)
    state_dir = tmp_path / "cli-state"
    dropping = DroppingTransport(httpx.AsyncHTTPTransport(), drop_after=2)
    async with (
        httpx.AsyncClient(transport=dropping) as http,
        UploadClient(
            gw.url,
            token,
            parallel=1,
            state_dir=state_dir,
            http=http,
            max_attempts=1,
            progress=False,
        ) as client,
    ):
        with pytest.raises(UploadError):
            await client.upload(big_file)
    assert part_numbers(dropping.puts) == [1, 2]

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app",
        "upload",
        str(big_file),
        "--url",
        gw.url,
        "--token",
        token,
        "--state-dir",
        str(state_dir),
        "--parallel",
        "2",
        "--json",
        cwd=ROOT,
        env={**settings_env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    [line] = out.decode().splitlines()  # --json: the JSON object and nothing else
    result = json.loads(line)
    assert result["resumed"] is True and result["parts_sent"] == 1  # only part 3
    assert result["status"] == "queued"
    assert await s3_object(upload_services, result["document_id"]) == big_file.read_bytes()
    assert set(result) == {
        "upload_id",
        "job_id",
        "document_id",
        "status",
        "size",
        "resumed",
        "parts_sent",
    }

    # no token: a clear message, not a traceback
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app",
        "upload",
        str(big_file),
        "--url",
        gw.url,
        cwd=ROOT,
        env={"PATH": settings_env["PATH"], "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2 and b"SLUICE_TOKEN" in err


async def test_cli_prints_one_summary_line_and_no_json_by_default(
    gateway_factory: Callable[..., Any],
    tokens: Any,
    user: str,
    big_file: Path,
    tmp_path: Path,
    settings_env: dict[str, str],
) -> None:
    gw = gateway_factory()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app",
        "upload",
        str(big_file),
        "--url",
        gw.url,
        "--token",
        tokens.mint(user),
        "--state-dir",
        str(tmp_path / "s"),
        cwd=ROOT,
        env={**settings_env, "PYTHONPATH": str(ROOT)},  # stdout and stderr are pipes
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    [line] = out.decode().splitlines()
    with pytest.raises(ValueError):
        json.loads(line)
    size = f"{big_file.stat().st_size / 1e6:.1f} MB"
    assert line.startswith(f"{big_file.name}: {size} in ") and " MB/s" in line, line
    assert re.search(r"upload [0-9a-f-]{36}, job [0-9a-f-]{36}: queued$", line), line
    # Not a terminal: no colours, no cursor movement, no \r; the bar's final state once.
    for stream in (out, err):
        assert b"\x1b" not in stream and b"\r" not in stream, stream
    [bar] = err.decode().splitlines()
    assert "100.0%" in bar and "MB/s" in bar, bar


async def test_cli_follow_streams_progress_until_the_job_ends(
    gateway_factory: Callable[..., Any],
    tokens: Any,
    user: str,
    tmp_path: Path,
    upload_services: Services,
    settings_env: dict[str, str],
) -> None:
    ws_port = fx.free_port()
    env = fx.gateway_env(settings_env, WEBSOCKET_PORT=str(ws_port), WEBSOCKET_HOST="127.0.0.1")
    gw = gateway_factory()
    small = tmp_path / "notes.md"
    small.write_text("# notes\n\nhello\n")
    log = (tmp_path / "ws.log").open("wb")
    ws = subprocess.Popen(
        [sys.executable, "-m", "app", "ws"], env=env, cwd=ROOT, stdout=log, stderr=log
    )
    cli = None
    try:
        await fx.wait_for(lambda: _port_open(ws_port), timeout=30)
        cli = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "app",
            "upload",
            str(small),
            "--url",
            gw.url,
            "--ws-url",
            f"ws://127.0.0.1:{ws_port}/api/v1/ws/progress",
            "--token",
            tokens.mint(user),
            "--follow",
            "--json",
            "--state-dir",
            str(tmp_path / "s"),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert cli.stdout is not None and cli.stderr is not None
        first = await asyncio.wait_for(cli.stdout.readline(), 60)
        job_id = json.loads(first)["job_id"]
        # With --json, the progress lines go to stderr, after the bar's one line.
        line = await asyncio.wait_for(cli.stderr.readline(), 30)
        if b"MB/s" in line:
            line = await asyncio.wait_for(cli.stderr.readline(), 30)
        assert "queued" in line.decode()  # the job's current state
        await request_cancel(upload_services.db, upload_services.redis, job_id, user)
        rest, err = await asyncio.wait_for(cli.communicate(), 30)
        assert "cancelled" in err.decode(), err.decode()
        assert rest == b""  # stdout: the JSON object only
        assert cli.returncode == 1  # the job did not complete
    finally:
        if cli is not None and cli.returncode is None:
            cli.kill()
            await cli.wait()
        ws.terminate()
        try:
            ws.wait(15)
        except subprocess.TimeoutExpired:
            ws.kill()
            ws.wait()
        log.close()


async def _port_open(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


def test_ws_url_accepts_a_base_or_a_full_url() -> None:
    full = "ws://127.0.0.1:9999/api/v1/ws/progress"
    assert ws_url_for("http://gw:8000", "ws://127.0.0.1:9999") == full
    assert ws_url_for("http://gw:8000", "ws://127.0.0.1:9999/") == full
    assert ws_url_for("http://gw:8000", full) == full
    assert ws_url_for("https://gw.example") == "wss://gw.example:8765/api/v1/ws/progress"


async def test_follow_gives_up_at_once_when_refused_for_good(
    ws_server: WsProcess, tokens: Any, user: str
) -> None:
    """A wrong URL or a bad token cannot be fixed by reconnecting: fail fast, say why."""
    loop = asyncio.get_running_loop()
    cases = [
        (f"{ws_server.url}/no/such/path", tokens.mint(user), "404"),
        (f"{ws_server.url}/api/v1/ws/progress", "not-a-token", "token is malformed"),
    ]
    for url, token, reason in cases:
        started = loop.time()
        with pytest.raises(UploadError, match=reason):
            await follow_job(url, token, "00000000-0000-0000-0000-000000000000", reconnects=5)
        assert loop.time() - started < 3, url
