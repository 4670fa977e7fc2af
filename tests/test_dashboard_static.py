"""The dashboard page is served by the gateway: public, strict headers, only its own files."""

from __future__ import annotations

import httpx

from app.gateway.routes.dashboard import STATIC_DIR, load_files

VENDORED_BUDGET = 200 * 1024


async def test_page_is_public_with_a_strict_policy(client: httpx.AsyncClient) -> None:
    r = await client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="/dashboard/main.js">' in r.text
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "connect-src 'self' ws://gateway:" in csp  # the WebSocket server on the page's host
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert r.headers["cache-control"] == "no-cache"
    assert r.headers["x-content-type-options"] == "nosniff"


async def test_static_files_revalidate_with_their_etag(client: httpx.AsyncClient) -> None:
    r = await client.get("/dashboard/main.js")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/javascript")
    again = await client.get("/dashboard/main.js", headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


async def test_only_the_packaged_files_are_served(client: httpx.AsyncClient) -> None:
    for path in ("/dashboard/nope.js", "/dashboard/..%2Froutes%2Fdashboard.py", "/dashboard/"):
        r = await client.get(path)
        assert r.status_code == 404, path
        assert b"Traceback" not in r.content


async def test_the_page_is_not_an_api_operation(client: httpx.AsyncClient) -> None:
    paths = (await client.get("/openapi.json")).json()["paths"]
    assert "/" not in paths and not any(p.startswith("/dashboard") for p in paths)


def test_the_whole_page_stays_small() -> None:
    files = load_files()
    assert {"index.html", "main.js", "style.css", "md5.js", "md5worker.js"} <= set(files)
    assert sum(len(f.body) for f in files.values()) < VENDORED_BUDGET
    assert not [p.name for p in STATIC_DIR.iterdir() if p.name not in files]  # nothing unservable
