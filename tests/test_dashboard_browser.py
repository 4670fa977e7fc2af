"""The dashboard in a real browser (Playwright driving the Debian ``chromium``).

One real stack per module: the gateway and the WebSocket server as child
processes on the session's Postgres/Redis/S3, and one real worker, all stopped
at the end, also on failure.  Each test has its own browser context (its own
sessionStorage and localStorage) and its own users.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.core.auth import TokenService
from app.core.settings import Settings
from devstack.embedder import EmbedderProcess
from tests.fixtures_pipeline import ROOT, WorkerProcs, make_pdf, page_sentence
from tests.fixtures_uploads import GatewayProcess, gateway_env
from tests.fixtures_ws import WsProcess

try:
    from playwright.sync_api import Browser, Page, Route, expect, sync_playwright
except ImportError:  # pragma: no cover - the dev extras install it
    sync_playwright = None

CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.skipif(
        CHROMIUM is None or sync_playwright is None,
        reason="browser tests need Chromium: apt-get install chromium; pip install -e '.[dev]'",
    ),
    pytest.mark.timeout(300),  # a whole pipeline run through a browser, on a busy CI machine
]
CHUNK_MB = 5
STAGE_TRAIL = " \u203a ".join(["upload", "validate", "extract", "chunk", "embed", "index"])


@dataclass
class Dash:
    gateway: GatewayProcess
    ws: WsProcess
    ws_env: dict[str, str]
    browser: Browser
    tokens: TokenService
    out: Path

    @property
    def ws_url(self) -> str:
        return self.ws.url

    def restart_ws(self) -> None:
        """Start the WebSocket server again on the same port (the page's CSP allows only it)."""
        self.ws.stop()
        log = self.out / f"ws-restarted-{time.monotonic_ns()}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "app", "ws"],
                cwd=ROOT,
                env=self.ws_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.ws = WsProcess(self.ws.port, proc, log)
        _wait_http(f"{self.ws.http}/health", proc)

    def url(self, token: str) -> str:
        return f"{self.gateway.url}/#token={token}&ws={self.ws_url}"

    def http(self, user: str) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens.mint(user)}"}
        return httpx.Client(base_url=self.gateway.url, headers=headers, timeout=30)

    def has_route(self, path: str) -> bool:
        """Whether the gateway has a route (the admin routes come with issue 11's API half)."""
        with self.http("probe") as c:
            return c.get(path).status_code != 404


def _wait_http(url: str, proc: Any, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} not healthy in {timeout}s")


@pytest.fixture(scope="module")
def dash(
    settings_env: dict[str, str],
    migrated: Settings,
    ws_factory: Any,
    tokens: TokenService,
    tmp_path_factory: pytest.TempPathFactory,
    embedder_service: EmbedderProcess,
) -> Iterator[Dash]:
    out = tmp_path_factory.mktemp("dashboard")
    ws = ws_factory()
    ws_env = {**settings_env, "WEBSOCKET_HOST": "127.0.0.1", "WEBSOCKET_PORT": str(ws.port)}
    env = gateway_env(
        settings_env,
        UPLOAD_CHUNK_SIZE_MB=str(CHUNK_MB),
        WEBSOCKET_PORT=str(ws.port),
        SEARCH_EMBEDDING_URL=embedder_service.api_url,  # the page's search box
    )
    gateway = GatewayProcess(env, out / "gateway.log")
    workers = WorkerProcs(settings_env, out)
    assert sync_playwright is not None
    with contextlib.ExitStack() as stack:
        stack.callback(workers.stop_all)
        stack.callback(gateway.stop)
        gateway.start()
        proc, port = workers.start()
        _wait_http(f"http://127.0.0.1:{port}/health", proc)
        expect.set_options(timeout=60_000)
        pw = stack.enter_context(sync_playwright())
        browser = pw.chromium.launch(executable_path=CHROMIUM)
        stack.callback(browser.close)
        dash = Dash(gateway, ws, ws_env, browser, tokens, out)

        def stop_ws() -> None:  # the current one: a test may have restarted it
            dash.ws.stop()

        stack.callback(stop_ws)
        yield dash


@pytest.fixture
def page(dash: Dash) -> Iterator[Page]:
    context = dash.browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(60_000)
    try:
        yield context.new_page()
    finally:
        context.close()


def big_pdf(path: Path, words: str, seed: int) -> Path:
    """A text PDF padded to several upload parts with an incompressible image."""
    from fpdf import FPDF
    from PIL import Image

    rng = random.Random(seed)
    pdf = FPDF()
    pdf.set_font("helvetica", size=11)
    for page_no in range(1, 4):
        pdf.add_page()
        pdf.multi_cell(190, 6, f"{words} " + " ".join(page_sentence(page_no, n) for n in range(6)))
    pdf.add_page()
    noise = Image.frombytes("RGB", (2000, 2000), rng.randbytes(2000 * 2000 * 3))
    pdf.image(noise, x=10, y=10, w=100)
    path.write_bytes(bytes(pdf.output()))
    assert path.stat().st_size > 2 * CHUNK_MB * 1024 * 1024
    return path


def open_dashboard(page: Page, dash: Dash, token: str) -> None:
    page.goto(dash.url(token))
    expect(page.locator("#main")).to_be_visible()
    expect(page.locator("#live-state")).to_have_text("live updates: live")
    assert "token=" not in page.url  # the fragment is read once and dropped


def drop_file(page: Page, path: Path) -> None:
    """Drop a file on the drop zone with a real DataTransfer holding a real File."""
    page.evaluate(
        "() => { const i = document.createElement('input'); i.type = 'file';"
        " i.id = 'test-source'; i.hidden = true; document.body.append(i); }"
    )
    page.set_input_files("#test-source", str(path))
    page.evaluate(
        """() => {
          const dt = new DataTransfer();
          dt.items.add(document.querySelector('#test-source').files[0]);
          const zone = document.querySelector('#dropzone');
          for (const type of ['dragenter', 'dragover', 'drop']) {
            const init = {dataTransfer: dt, bubbles: true, cancelable: true};
            zone.dispatchEvent(new DragEvent(type, init));
          }
        }"""
    )


def job_row(page: Page, name: str) -> Any:
    return page.locator("#jobs-table tbody tr", has_text=name)


JOB_URL = re.compile(r".*/api/v1/jobs/[0-9a-f-]{36}$")


def late_first_read(route: Route, dash: Dash, user: str) -> None:
    """Answer a job read only after the job has left the validate stage."""
    job_id = route.request.url.rsplit("/", 1)[1]
    deadline = time.monotonic() + 60
    with dash.http(user) as api:
        while time.monotonic() < deadline:
            r = api.get(f"/api/v1/jobs/{job_id}")
            if r.status_code == 429:  # this poller shares the user's API budget with the page
                time.sleep(float(r.headers.get("retry-after", "1")))
                continue
            if r.status_code == 404:  # another user's job: the admin's table shows them all
                break
            assert r.status_code == 200, r.text
            job = r.json()
            if job["stage"] not in (None, "validate") or job["status"] in ("completed", "failed"):
                break
            time.sleep(0.2)
    route.continue_()
    route.request.frame.page.unroute(JOB_URL)


def test_drop_a_pdf_and_watch_it_become_searchable(page: Page, dash: Dash) -> None:
    user = f"dash-{uuid.uuid4().hex[:8]}"
    pdf = big_pdf(dash.out / "harbour-report.pdf", "Quarterly harbour sediment dredging", seed=1)
    open_dashboard(page, dash, dash.tokens.mint(user, admin=True))
    expect(page.locator("#who")).to_have_text(f"{user} (admin)")
    page.evaluate("() => { window.__noReload = true; }")

    # The page reads the new job only once the worker is past validate (as on a busy
    # machine): the stages already run must still show, replayed over the WebSocket.
    page.route(JOB_URL, lambda route: late_first_read(route, dash, user))
    drop_file(page, pdf)
    upload = page.locator("#uploads li", has_text=pdf.name)
    expect(upload).to_have_attribute("data-state", "done")
    row = job_row(page, pdf.name)
    expect(row).to_have_attribute("data-status", "completed", timeout=120_000)
    # Every stage was seen live, over the WebSocket, on the page as loaded.
    expect(row.locator(".stage .trail")).to_have_text(STAGE_TRAIL)
    expect(row.locator(".status")).to_have_text("completed")
    assert page.evaluate("() => window.__noReload") is True
    page.screenshot(path=str(dash.out / "dashboard.png"), full_page=True)
    if os.environ.get("SLUICE_DASHBOARD_SCREENSHOT"):
        shutil.copy(dash.out / "dashboard.png", ROOT + "/docs/dashboard.png")

    page.fill("#search-input", "harbour sediment dredging")
    page.click("#search-form button")
    first = page.locator("#search-results li").first
    expect(first).to_contain_text(pdf.name)
    expect(first).to_contain_text("p. 1")

    row.locator("td").first.get_by_role("button").click()
    detail = page.locator("#job-detail")
    expect(detail.locator("#chunks-table tbody tr").first).to_contain_text("p. 1")
    job_id = row.get_attribute("data-job-id")
    assert page.url.endswith(f"/#job={job_id}")  # a job's page has its own link
    page.reload()
    expect(detail.locator("#job-facts")).to_contain_text(f"{job_id}")
    expect(detail.locator("#job-facts")).to_contain_text("completed")
    if dash.has_route("/api/v1/jobs/00000000-0000-0000-0000-000000000000/events"):
        expect(detail.locator("#timeline li").last).to_contain_text("completed")
        expect(detail.locator("#stage-durations tbody tr")).to_have_count(5)


def test_the_pages_md5_matches_hashlib_at_every_padding_boundary(page: Page, dash: Dash) -> None:
    open_dashboard(page, dash, dash.tokens.mint(f"dash-{uuid.uuid4().hex[:8]}"))
    lengths = [*range(0, 140), 1000, 65536, 1_000_003]
    digests = page.evaluate(
        """async (lengths) => {
          const { md5hex } = await import('/dashboard/md5.js');
          const bytes = (n) => Uint8Array.from({ length: n }, (_, i) => (i * 31 + 7) & 255);
          return lengths.map((n) => md5hex(bytes(n)));
        }""",
        lengths,
    )
    pattern = bytes((i * 31 + 7) & 255 for i in range(max(lengths)))
    assert digests == [hashlib.md5(pattern[:n]).hexdigest() for n in lengths]


def test_reload_mid_upload_then_resume(page: Page, dash: Dash) -> None:
    user = f"dash-{uuid.uuid4().hex[:8]}"
    pdf = big_pdf(dash.out / "resume-me.pdf", "Resumable ledger of tidal gauges", seed=2)
    held: list[Route] = []

    def hold_later_parts(route: Route) -> None:
        if route.request.url.endswith("/parts/1"):
            route.continue_()
        else:
            held.append(route)

    page.route("**/api/v1/documents/upload/*/parts/*", hold_later_parts)
    open_dashboard(page, dash, dash.tokens.mint(user))
    with page.expect_response(lambda r: r.url.endswith("/parts/1") and r.status == 200):
        page.set_input_files("#file-input", str(pdf))
    page.reload()  # parts 2 and 3 are still held: the reload cuts them off
    page.unroute("**/api/v1/documents/upload/*/parts/*")
    for route in held:
        with contextlib.suppress(Exception):
            route.abort()
    expect(page.locator("#live-state")).to_have_text("live updates: live")

    sent: list[str] = []

    def record(route: Route) -> None:
        sent.append(route.request.url)
        route.continue_()

    page.route("**/api/v1/documents/upload/*/parts/*", record)
    page.set_input_files("#file-input", str(pdf))
    upload = page.locator("#uploads li", has_text=pdf.name)
    expect(upload).to_have_attribute("data-state", "done")
    expect(upload).to_contain_text("resumed")
    assert sorted(u.rsplit("/", 1)[1] for u in sent) == ["2", "3"]  # part 1 was not sent again
    expect(job_row(page, pdf.name)).to_have_attribute("data-status", "completed", timeout=120_000)


def test_pause_and_resume_send_only_the_missing_parts(page: Page, dash: Dash) -> None:
    pdf = big_pdf(dash.out / "pause-me.pdf", "Pausable survey of estuary salinity", seed=3)
    held: list[Route] = []

    def hold_later_parts(route: Route) -> None:
        if route.request.url.endswith("/parts/1"):
            route.continue_()
        else:
            held.append(route)

    page.route("**/api/v1/documents/upload/*/parts/*", hold_later_parts)
    open_dashboard(page, dash, dash.tokens.mint(f"dash-{uuid.uuid4().hex[:8]}"))
    with page.expect_response(lambda r: r.url.endswith("/parts/1") and r.status == 200):
        page.set_input_files("#file-input", str(pdf))
    upload = page.locator("#uploads li", has_text=pdf.name)
    upload.get_by_role("button", name="Pause").click()
    expect(upload).to_have_attribute("data-state", "paused")
    expect(upload).to_contain_text("paused at 5.2 MB")
    page.unroute("**/api/v1/documents/upload/*/parts/*")
    for route in held:
        with contextlib.suppress(Exception):
            route.abort()
    resent: list[str] = []

    def record(route: Route) -> None:
        resent.append(route.request.url.rsplit("/", 1)[1])
        route.continue_()

    page.route("**/api/v1/documents/upload/*/parts/*", record)
    upload.get_by_role("button", name="Resume").click()
    expect(upload).to_have_attribute("data-state", "done")
    assert sorted(resent) == ["2", "3"]  # the server's status said part 1 had arrived


def test_events_missed_while_the_websocket_was_down_are_replayed(page: Page, dash: Dash) -> None:
    user = f"dash-{uuid.uuid4().hex[:8]}"
    pages = [[" ".join(page_sentence(p, n) for n in range(20))] for p in range(1, 13)]
    with dash.http(user) as api:
        r = api.post(
            "/api/v1/documents/upload/simple",
            files={"file": ("outage.pdf", make_pdf(pages), "application/pdf")},
            data={"processing_options": '{"chunk_size": 16, "chunk_overlap": 0}'},
        )
        job_id = r.json()["job_id"]
        open_dashboard(page, dash, dash.tokens.mint(user))
        row = page.locator(f'#jobs-table tbody tr[data-job-id="{job_id}"]')
        expect(row).to_have_attribute("data-status", "running")
        dash.ws.stop()  # the page's WebSocket server goes away mid-job...
        expect(page.locator("#live-state")).to_have_text("live updates: reconnecting")
        deadline = time.monotonic() + 120
        while api.get(f"/api/v1/jobs/{job_id}").json()["status"] != "completed":
            assert time.monotonic() < deadline, "the job did not complete"
            time.sleep(0.2)
    expect(row).to_have_attribute("data-status", "running")  # nothing arrives meanwhile
    dash.restart_ws()  # ...and comes back on the same address
    expect(page.locator("#live-state")).to_have_text("live updates: live")
    # The events of the outage are replayed from `since`, without reloading the page.
    expect(row).to_have_attribute("data-status", "completed")
    expect(row.locator(".stage .trail")).to_contain_text("embed \u203a index")


def test_cancel_a_running_job_from_the_page(page: Page, dash: Dash) -> None:
    user = f"dash-{uuid.uuid4().hex[:8]}"
    pages = [[" ".join(page_sentence(p, n) for n in range(40))] for p in range(1, 41)]
    with dash.http(user) as api:
        r = api.post(
            "/api/v1/documents/upload/simple",
            files={"file": ("long.pdf", make_pdf(pages), "application/pdf")},
            data={"processing_options": '{"chunk_size": 16, "chunk_overlap": 0}'},
        )
        assert r.status_code in (200, 201, 202), r.text
        job_id = r.json()["job_id"]
    open_dashboard(page, dash, dash.tokens.mint(user))
    row = page.locator(f'#jobs-table tbody tr[data-job-id="{job_id}"]')
    expect(row).to_have_attribute("data-status", "running")
    row.get_by_role("button", name="Cancel").click()
    expect(row).to_have_attribute("data-status", "cancelled")
    expect(row.locator(".status")).to_have_text("cancelled")
    expect(row.get_by_role("button", name="Retry")).to_be_visible()


def test_a_normal_user_sees_only_their_own_jobs_and_no_fleet(page: Page, dash: Dash) -> None:
    owner, other = f"dash-{uuid.uuid4().hex[:8]}", f"dash-{uuid.uuid4().hex[:8]}"
    with dash.http(owner) as api:
        r = api.post(
            "/api/v1/documents/upload/simple",
            files={"file": ("private.pdf", make_pdf([["Private notes."]]), "application/pdf")},
        )
        job_id = r.json()["job_id"]
    page.set_viewport_size({"width": 390, "height": 844})  # and readable at phone width
    open_dashboard(page, dash, dash.tokens.mint(other))
    expect(page.locator("#jobs-status")).to_have_text("0 job(s)")
    assert page.locator(f'tr[data-job-id="{job_id}"]').count() == 0
    expect(page.locator("#queue-panel")).to_be_hidden()
    expect(page.locator("#fleet-panel")).to_be_hidden()
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
    if dash.has_route("/api/v1/admin/queue"):
        status = page.evaluate(
            "async (t) => (await fetch('/api/v1/admin/queue',"
            " {headers: {Authorization: 'Bearer ' + t}})).status",
            dash.tokens.mint(other),
        )
        assert status == 403


def test_an_admin_sees_queue_fleet_and_every_users_jobs(page: Page, dash: Dash) -> None:
    if not dash.has_route("/api/v1/admin/queue"):
        pytest.skip("needs issue 11's admin routes (/api/v1/admin/*, ws/stats): not in this build")
    owner = f"dash-{uuid.uuid4().hex[:8]}"
    with dash.http(owner) as api:
        r = api.post(
            "/api/v1/documents/upload/simple",
            files={"file": ("theirs.pdf", make_pdf([["Someone else's file."]]), "application/pdf")},
        )
        job_id = r.json()["job_id"]
    open_dashboard(page, dash, dash.tokens.mint(f"admin-{uuid.uuid4().hex[:6]}", admin=True))
    expect(page.locator(f'tr[data-job-id="{job_id}"]')).to_contain_text(f"owner {owner}")
    expect(page.locator("#queue-table tbody tr")).to_have_count(4)
    expect(page.locator("#workers-table tbody tr").first).to_contain_text("/")
    expect(page.locator("#deps-table tbody")).to_contain_text("postgres")
    expect(page.locator("#rates-chart svg")).to_be_visible()
