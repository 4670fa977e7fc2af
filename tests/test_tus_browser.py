"""tus in a real browser, cross-origin: the README's tus-js-client and Uppy snippets in the
Debian ``chromium`` (driven by Playwright, as tests/test_dashboard_browser.py does), on a page
served by a small static HTTP server on another port than the gateway's, so every tus request
is a real cross-origin request and, with its ``Authorization`` header, is preflighted.  The
gateway's ``CORS_ORIGINS`` names the page's origin.

- tus-js-client's browser build (``tests/js/node_modules/tus-js-client/dist/tus.min.js``)
  uploads a PDF Blob in 1 MiB chunks with the README's options; ``onAfterResponse`` reads
  ``Sluice-Job-Id`` (only possible when CORS exposes it) and follows the job over the
  WebSocket server, as the README's ``follow()`` does;
- the same with ``parallelUploads: 2`` (``Upload-Concat`` through the preflight);
- an upload cut off by a page reload, found again in localStorage by ``findPreviousUploads()``
  and resumed after a cross-origin ``HEAD``;
- a page from an origin not in ``CORS_ORIGINS``: the browser blocks it and the gateway made
  nothing for it;
- refusals (401, 415) carry the CORS headers too: the page reads their status and code;
- Uppy's standalone bundle (``uppy``, pinned in tests/js/package.json) with the Tus plugin.

The static server and the browser are stopped at the end of each test, also on failure.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from app.gateway.services import Services
from tests.fixtures_uploads import ROOT, MiB
from tests.fixtures_ws import WsProcess
from tests.test_tus_js_client import assert_one_document, report_pdf

try:
    from playwright.async_api import Browser, Page, async_playwright
except ImportError:  # pragma: no cover - the dev extras install it
    async_playwright = None

CHROMIUM = shutil.which("chromium")
JS = ROOT / "tests" / "js"
TUS_JS = JS / "node_modules" / "tus-js-client" / "dist" / "tus.min.js"
UPPY_JS = JS / "node_modules" / "uppy" / "dist" / "uppy.min.js"
pytestmark = [
    pytest.mark.skipif(
        CHROMIUM is None or async_playwright is None,
        reason="browser tests need Chromium: apt-get install chromium; pip install -e '.[dev]'",
    ),
    pytest.mark.skipif(
        not TUS_JS.is_file(),
        reason="tus-js-client's browser build: npm ci --prefix tests/js (make install)",
    ),
    pytest.mark.timeout(120),
]
PAGE = b"""<!doctype html><meta charset="utf-8"><title>tus client</title>
<script src="/tus.min.js"></script><script src="/uppy.min.js"></script>
<script src="/tus_browser.js"></script>"""


class _Files(BaseHTTPRequestHandler):
    files: Mapping[str, tuple[bytes, str]] = {}

    def do_GET(self) -> None:
        body, content_type = self.files.get(self.path, (b"not found", "text/plain"))
        self.send_response(200 if self.path in self.files else 404)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # quiet: no access log
        pass


@contextmanager
def page_origin(files: Mapping[str, tuple[bytes, str]]) -> Iterator[str]:
    """Serve ``files`` (path -> body, content type) on a free 127.0.0.1 port; yield the origin."""
    handler = type("Files", (_Files,), {"files": dict(files)})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def site(pdf: bytes) -> dict[str, tuple[bytes, str]]:
    files = {
        "/": (PAGE, "text/html; charset=utf-8"),
        "/tus.min.js": (TUS_JS.read_bytes(), "text/javascript"),
        "/tus_browser.js": ((JS / "tus_browser.js").read_bytes(), "text/javascript"),
        "/report.pdf": (pdf, "application/pdf"),
    }
    if UPPY_JS.is_file():
        files["/uppy.min.js"] = (UPPY_JS.read_bytes(), "text/javascript")
    return files


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    assert async_playwright is not None
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM)
        try:
            yield chromium
        finally:
            await chromium.close()


@asynccontextmanager
async def page_at(browser: Browser, origin: str) -> AsyncIterator[tuple[Page, list[str]]]:
    """A fresh browser context (its own localStorage) on the page at ``origin``, and the
    page's console lines; the context is closed at the end, also on failure."""
    context = await browser.new_context()
    try:
        page = await context.new_page()
        console: list[str] = []
        page.on("console", lambda message: console.append(message.text))
        await page.goto(f"{origin}/")
        yield page, console
    finally:
        await context.close()


async def upload_in(
    page: Page,
    client: str,
    gateway: str,
    token: str,
    ws_url: str | None = None,
    abort_after: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Run one upload with ``client`` (a function of tests/js/tus_browser.js) against
    ``gateway``; ``extra``: client options over the README's.  What the client saw."""
    seen: dict[str, Any] = await page.evaluate(
        f"(args) => {client}(args)",
        {
            "endpoint": f"{gateway}/api/v1/tus/",
            "token": token,
            "path": "/report.pdf",
            "wsUrl": ws_url,
            "abortAfter": abort_after,
            "extra": extra,
        },
    )
    return seen


async def run_in_page(
    browser: Browser,
    origin: str,
    client: str,
    gateway: str,
    token: str,
    ws_url: str | None = None,
    **extra: Any,
) -> tuple[dict[str, Any], list[str]]:
    """One upload on a fresh page at ``origin``: what the client saw, and the console."""
    async with page_at(browser, origin) as (page, console):
        return await upload_in(page, client, gateway, token, ws_url, **extra), console


def assert_followed_until_queued(seen: dict[str, Any]) -> None:
    """The page followed the job it read from ``Sluice-Job-Id`` over the WebSocket, on one
    connection, until the upload's last event: stored and queued for processing."""
    types = [e["type"] for e in seen["events"]]
    assert types[:2] == ["connected", "subscribed"] and types.count("connected") == 1, types
    progress = [e["data"] for e in seen["events"] if e["type"] == "job_progress"]
    assert {p["job_id"] for p in progress} == set(seen["jobIds"]), seen["events"]
    seqs = [p["seq"] for p in progress]
    assert seqs == sorted(set(seqs))  # in order, none twice
    assert (progress[-1]["status"], progress[-1]["stage"]) == ("queued", "upload"), progress


async def test_tus_js_client_uploads_from_another_origin_in_1_mib_chunks(
    gateway_factory: Callable[..., Any],
    upload_services: Services,
    ws_server: WsProcess,
    browser: Browser,
    tokens: Any,
    user: str,
    tmp_path: Path,
) -> None:
    """The README's whole snippet: the upload, then ``follow(jobId)`` over the WebSocket
    server (another origin again) until the job is queued for processing."""
    data = report_pdf(tmp_path / "report.pdf", noise=3 * MiB + 4321, seed=11)
    with page_origin(site(data)) as origin:
        gw = gateway_factory(CORS_ORIGINS=origin)
        seen, console = await run_in_page(
            browser,
            origin,
            "uploadWithTusJsClient",
            gw.url,
            tokens.mint(user),
            ws_url=ws_server.url,
            chunkSize=MiB,
        )

    assert seen["ok"] and seen["error"] is None, (seen, console)
    methods = [r[0] for r in seen["requests"]]
    assert methods == ["POST"] + ["PATCH"] * -(-len(data) // MiB), seen["requests"]
    assert seen["requests"][-1][2] == str(len(data))  # Upload-Offset exposed
    assert seen["jobIds"], "Sluice-Job-Id unreadable in the page: CORS must expose it"
    assert seen["requests"][0][3] == seen["jobIds"][0]  # the creation named the job
    assert seen["url"].startswith(f"{gw.url}/api/v1/tus/")  # Location exposed
    await assert_one_document(upload_services, user, seen, data)
    assert_followed_until_queued(seen)


async def test_parallel_uploads_from_another_origin_pass_the_preflight(
    gateway_factory: Callable[..., Any],
    upload_services: Services,
    ws_server: WsProcess,
    browser: Browser,
    tokens: Any,
    user: str,
    tmp_path: Path,
) -> None:
    data = report_pdf(tmp_path / "report.pdf", noise=5 * MiB + 77, seed=12)
    with page_origin(site(data)) as origin:
        gw = gateway_factory(CORS_ORIGINS=origin)
        seen, console = await run_in_page(
            browser,
            origin,
            "uploadWithTusJsClient",
            gw.url,
            tokens.mint(user),
            ws_url=ws_server.url,
            chunkSize=MiB,
            parallelUploads=2,
        )

    assert seen["ok"] and seen["error"] is None, (seen, console)
    posts = [r for r in seen["requests"] if r[0] == "POST"]
    assert [(r[1], r[3] is None) for r in posts] == [(201, True)] * 2 + [(201, False)], posts
    await assert_one_document(upload_services, user, seen, data)
    assert_followed_until_queued(seen)
    kinds = await upload_services.db.fetch(
        "SELECT concat FROM tus_uploads WHERE owner_id = $1", user
    )
    assert [k["concat"] for k in kinds] == ["final"]  # two partials joined, then removed


async def test_an_upload_cut_off_by_a_reload_resumes_from_local_storage(
    gateway_factory: Callable[..., Any],
    upload_services: Services,
    browser: Browser,
    tokens: Any,
    user: str,
    tmp_path: Path,
) -> None:
    """The README's ``findPreviousUploads()``: the browser's URL storage (localStorage)
    finds the upload after a reload; a cross-origin ``HEAD`` (its ``Upload-Offset``
    exposed) says where to go on, and only the missing bytes are sent."""
    data = report_pdf(tmp_path / "report.pdf", noise=3 * MiB + 555, seed=15)
    token = tokens.mint(user)
    with page_origin(site(data)) as origin:
        gw = gateway_factory(CORS_ORIGINS=origin)
        async with page_at(browser, origin) as (page, console):
            first = await upload_in(
                page, "uploadWithTusJsClient", gw.url, token, abort_after=2 * MiB, chunkSize=MiB
            )
            assert first["aborted"] and first["error"] is None, (first, console)
            await page.reload()
            second = await upload_in(page, "uploadWithTusJsClient", gw.url, token, chunkSize=MiB)

    assert second["ok"] and second["error"] is None, (second, console)
    assert second["url"] == first["url"]
    assert second["requests"][0][:3] == ["HEAD", 200, str(2 * MiB)], second["requests"]
    methods = [r[0] for r in second["requests"]]
    assert methods == ["HEAD"] + ["PATCH"] * -(-(len(data) - 2 * MiB) // MiB), methods
    assert second["jobIds"] == first["jobIds"]  # the last PATCH names the same job
    await assert_one_document(upload_services, user, second, data)


async def test_a_page_from_an_origin_not_allowed_is_blocked_and_creates_nothing(
    gateway_factory: Callable[..., Any],
    upload_services: Services,
    browser: Browser,
    tokens: Any,
    user: str,
    tmp_path: Path,
) -> None:
    data = report_pdf(tmp_path / "report.pdf", noise=MiB, seed=13)
    with page_origin(site(data)) as allowed, page_origin(site(data)) as other:
        gw = gateway_factory(CORS_ORIGINS=allowed)
        seen, console = await run_in_page(
            browser, other, "uploadWithTusJsClient", gw.url, tokens.mint(user), retryDelays=None
        )

    assert not seen["ok"] and seen["error"] and seen["errorStatus"] is None, seen
    assert seen["requests"] == [] and seen["jobIds"] == [], seen  # no answer reached the page
    assert any("blocked by CORS policy" in line for line in console), console
    for table in ("tus_uploads", "upload_sessions", "jobs", "documents"):
        count = await upload_services.db.fetchval(
            f"SELECT count(*) FROM {table} WHERE owner_id = $1",
            user,
        )
        assert count == 0, table


async def test_refusals_reach_the_page_with_their_status_and_code(
    gateway_factory: Callable[..., Any],
    upload_services: Services,
    browser: Browser,
    tokens: Any,
    user: str,
    tmp_path: Path,
) -> None:
    """An error answer carries the CORS headers too: the page reads 401 and 415 and the
    error code (not a bare network error), and nothing was created."""
    data = report_pdf(tmp_path / "report.pdf", noise=MiB, seed=16)
    with page_origin(site(data)) as origin:
        gw = gateway_factory(CORS_ORIGINS=origin)
        bad_token, _ = await run_in_page(
            browser, origin, "uploadWithTusJsClient", gw.url, "not-a-token", retryDelays=None
        )
        odd_type, _ = await run_in_page(
            browser,
            origin,
            "uploadWithTusJsClient",
            gw.url,
            tokens.mint(user),
            retryDelays=None,
            metadata={"filename": "report.exe", "filetype": "application/x-msdownload"},
        )

    assert bad_token["errorStatus"] == 401 and not bad_token["ok"], bad_token
    assert odd_type["errorStatus"] == 415 and not odd_type["ok"], odd_type
    assert json.loads(odd_type["errorBody"])["error"] == "unsupported_file_type", odd_type
    assert odd_type["requests"] == [["POST", 415, None, None]]
    for table in ("tus_uploads", "upload_sessions", "jobs"):
        count = await upload_services.db.fetchval(
            f"SELECT count(*) FROM {table} WHERE owner_id = $1", user
        )
        assert count == 0, table


@pytest.mark.skipif(not UPPY_JS.is_file(), reason="uppy: npm ci --prefix tests/js")
async def test_uppy_with_the_tus_plugin_uploads_from_another_origin(
    gateway_factory: Callable[..., Any],
    upload_services: Services,
    ws_server: WsProcess,
    browser: Browser,
    tokens: Any,
    user: str,
    tmp_path: Path,
) -> None:
    data = report_pdf(tmp_path / "report.pdf", noise=2 * MiB + 999, seed=14)
    with page_origin(site(data)) as origin:
        gw = gateway_factory(CORS_ORIGINS=origin)
        seen, console = await run_in_page(
            browser,
            origin,
            "uploadWithUppy",
            gw.url,
            tokens.mint(user),
            ws_url=ws_server.url,
            chunkSize=MiB,
        )

    assert seen["ok"] and seen["error"] is None, (seen, console)
    methods = [r[0] for r in seen["requests"]]
    assert methods == ["POST"] + ["PATCH"] * -(-len(data) // MiB), seen["requests"]
    assert seen["url"].startswith(f"{gw.url}/api/v1/tus/")
    await assert_one_document(upload_services, user, seen, data)
    assert_followed_until_queued(seen)
