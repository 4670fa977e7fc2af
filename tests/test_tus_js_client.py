"""The real tus-js-client (its Node build, pinned in tests/js/package.json) against a real
gateway process, with the options of the README's snippet: the endpoint, the bearer token
as a header, ``filename``/``filetype``/``priority`` metadata, ``Sluice-Job-Id`` read in
``onAfterResponse``.  A plain upload in 1 MiB chunks; the same file sent in the creation
POST, through ``X-HTTP-Method-Override`` and as a stream of deferred length;
``parallelUploads: 4`` (partials and a final concatenation); and a single and a parallel
upload aborted by one node process and finished by another that finds it in
tus-js-client's ``FileUrlStorage``.  Every test checks the one document and job Sluice made
and the stored object's sha256.

Each upload is one ``node tests/js/tus_upload.mjs`` process that prints one JSON line of
what the client saw; the test checks it against S3 and Postgres.  The node process is
killed if the test fails or times out.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fpdf import FPDF

from app.gateway.services import Services
from tests.fixtures_uploads import ROOT, MiB, s3_object

JS = ROOT / "tests" / "js"
NODE = shutil.which("node")
pytestmark = [
    pytest.mark.skipif(
        NODE is None or not (JS / "node_modules" / "tus-js-client").is_dir(),
        reason="tus-js-client tests need Node 18+ and npm: npm ci --prefix tests/js (make install)",
    ),
    pytest.mark.timeout(180),  # two node uploads, each bounded by NODE_TIMEOUT
]
NODE_TIMEOUT = 75.0
"""Seconds one node upload may take on a busy CI machine before it is killed (the script
gives up by itself after 60 s and still prints what it saw)."""


def report_pdf(path: Path, noise: int, seed: int) -> bytes:
    """A one-page text PDF made ``noise`` bytes larger by an attached binary file."""
    pdf = FPDF()
    pdf.set_font("helvetica", size=11)
    pdf.add_page()
    pdf.multi_cell(190, 6, "Sent with tus-js-client, the way the README shows.")
    pdf.embed_file(bytes=random.Random(seed).randbytes(noise), basename="noise.bin", compress=False)
    data = bytes(pdf.output())
    path.write_bytes(data)
    return data


async def tus_js(
    mode: str, url: str, token: str, file: Path, *extra: str, source: str = "file", **options: Any
) -> dict[str, Any]:
    """Run one tus-js-client upload in a node process and return what it printed.

    ``source``: ``file`` (an ``fs.ReadStream`` of the path) or ``stream`` (a Readable
    without a path); ``options``: more tus-js-client options, over the README's."""
    assert NODE is not None
    proc = await asyncio.create_subprocess_exec(
        NODE,
        str(JS / "tus_upload.mjs"),
        mode,
        f"{url}/api/v1/tus/",
        str(file),
        *extra,
        cwd=JS,
        env={
            **os.environ,
            "SLUICE_TOKEN": token,
            "TUS_OPTIONS": json.dumps(options),
            "TUS_INPUT": source,
        },
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), NODE_TIMEOUT)
    finally:
        if proc.returncode is None:  # timed out, or the test was cancelled
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    lines = out.decode().strip().splitlines()
    assert lines, f"node printed nothing (exit {proc.returncode}): {err.decode()[-2000:]}"
    seen: dict[str, Any] = json.loads(lines[-1])
    assert proc.returncode == 0, f"{seen}\n{err.decode()[-2000:]}"
    return seen


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def head(url: str, token: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as c:
        r = await c.head(
            url, headers={"Authorization": f"Bearer {token}", "Tus-Resumable": "1.0.0"}
        )
    assert r.status_code == 200, r.text
    return r


async def assert_one_document(svc: Services, user: str, seen: dict[str, Any], data: bytes) -> None:
    """The client saw one job and one document; they are the user's only ones, the job is
    queued at the metadata's priority, and S3 holds exactly the file's bytes."""
    assert len(seen["jobIds"]) == 1, seen
    assert len(seen["documentIds"]) == 1, seen
    job = await svc.db.fetchrow(
        "SELECT owner_id, document_id::text AS document_id, priority, status FROM jobs "
        "WHERE id = $1::uuid",
        seen["jobIds"][0],
    )
    assert job is not None, f"Sluice-Job-Id {seen['jobIds'][0]} names no job"
    assert (job["owner_id"], job["document_id"]) == (user, seen["documentIds"][0])
    assert (job["priority"], job["status"]) == ("high", "queued")
    documents = await svc.db.fetch(
        "SELECT id::text AS id, filename, content_type, size_bytes, status FROM documents "
        "WHERE owner_id = $1",
        user,
    )
    assert [tuple(d) for d in documents] == [
        (job["document_id"], "report.pdf", "application/pdf", len(data), "stored")
    ]
    jobs = await svc.db.fetchval("SELECT count(*) FROM jobs WHERE owner_id = $1", user)
    assert jobs == 1
    stored = await s3_object(svc, job["document_id"])
    assert sha256(stored) == sha256(data)


async def test_plain_upload_in_1_mib_chunks(
    gateway_factory: Callable[..., Any],
    upload_services: Services,
    tokens: Any,
    user: str,
    tmp_path: Path,
) -> None:
    gw = gateway_factory()
    token = tokens.mint(user)
    data = report_pdf(tmp_path / "report.pdf", noise=6 * MiB + 12_345, seed=1)  # 2 S3 parts

    seen = await tus_js("plain", gw.url, token, tmp_path / "report.pdf")

    assert seen["ok"] and seen["error"] is None, seen
    methods = [r[0] for r in seen["requests"]]
    assert methods == ["POST"] + ["PATCH"] * -(-len(data) // MiB), methods
    assert seen["patchedBytes"] == len(data)
    await assert_one_document(upload_services, user, seen, data)
    r = await head(seen["url"], token)
    assert r.headers["upload-offset"] == r.headers["upload-length"] == str(len(data))


@pytest.mark.parametrize(
    ("source", "options"),
    [
        ("file", {"uploadDataDuringCreation": True}),
        ("file", {"overridePatchMethod": True}),
        ("stream", {"uploadLengthDeferred": True}),
    ],
    ids=["creation-with-upload", "method-override", "deferred-length-stream"],
)
async def test_other_request_shapes_store_the_same_bytes(
    gateway_factory: Callable[..., Any],
    upload_services: Services,
    tokens: Any,
    user: str,
    tmp_path: Path,
    source: str,
    options: dict[str, Any],
) -> None:
    """tus-js-client's other ways to send the file: the first chunk in the creation POST,
    PATCH as ``POST`` + ``X-HTTP-Method-Override``, and a stream of unknown length
    (``Upload-Defer-Length``, the length sent with the last PATCH; with a path's
    ``fs.ReadStream`` tus-js-client 4.3.1 declares a whole chunk for the last PATCH and
    stalls, so a deferred length takes a stream)."""
    gw = gateway_factory()
    token = tokens.mint(user)
    # not a multiple of the 1 MiB chunk: a deferred-length stream of such a size stalls
    # in tus-js-client 4.3.1 itself (tus/tus-js-client#779)
    data = report_pdf(tmp_path / "report.pdf", noise=3 * MiB + 999, seed=4)
    assert len(data) % MiB

    seen = await tus_js("plain", gw.url, token, tmp_path / "report.pdf", source=source, **options)

    assert seen["ok"] and seen["error"] is None, seen
    assert seen["patchedBytes"] == len(data)
    await assert_one_document(upload_services, user, seen, data)


async def test_parallel_uploads_concatenate_into_one_document(
    gateway_factory: Callable[..., Any],
    upload_services: Services,
    tokens: Any,
    user: str,
    tmp_path: Path,
) -> None:
    gw = gateway_factory()
    token = tokens.mint(user)
    data = report_pdf(tmp_path / "report.pdf", noise=9 * MiB + 777, seed=2)

    seen = await tus_js("parallel", gw.url, token, tmp_path / "report.pdf")

    assert seen["ok"] and seen["error"] is None, seen
    posts = [r for r in seen["requests"] if r[0] == "POST"]
    assert [r[1] for r in posts] == [201] * 5, seen["requests"]  # 4 partials, then the final
    assert [r[4] is None for r in posts] == [True] * 4 + [False]  # only the final has a job
    assert seen["patchedBytes"] == len(data)  # every byte sent once, in the partials
    await assert_one_document(upload_services, user, seen, data)  # partials: no documents
    kinds = await upload_services.db.fetch(
        "SELECT concat FROM tus_uploads WHERE owner_id = $1", user
    )
    assert [k["concat"] for k in kinds] == ["final"]  # the partials were joined and removed


async def test_aborted_upload_resumes_from_a_new_process_through_file_url_storage(
    gateway_factory: Callable[..., Any],
    upload_services: Services,
    tokens: Any,
    user: str,
    tmp_path: Path,
) -> None:
    gw = gateway_factory()
    token = tokens.mint(user)
    data = report_pdf(tmp_path / "report.pdf", noise=7 * MiB + 4321, seed=3)
    urls = str(tmp_path / "tus-urls.json")

    first = await tus_js("start", gw.url, token, tmp_path / "report.pdf", urls, str(3 * MiB))
    assert first["aborted"] and not first["ok"] and first["error"] is None, first
    assert len(first["jobIds"]) == 1, first  # the creation named the job...
    status = await upload_services.db.fetchval(
        "SELECT status FROM jobs WHERE id = $1::uuid", first["jobIds"][0]
    )
    assert status == "awaiting_upload"  # ...which waits for the rest of the bytes
    stored_offset = int((await head(first["url"], token)).headers["upload-offset"])
    assert stored_offset == first["patchedBytes"] == 3 * MiB  # 3 PATCHes, then abort()

    second = await tus_js("resume", gw.url, token, tmp_path / "report.pdf", urls)

    assert second["ok"] and second["error"] is None, second
    assert second["resumedFrom"] == second["url"] == first["url"]
    assert second["requests"][0][:2] == ["HEAD", 200]  # asked where to go on
    assert second["requests"][0][3] == str(stored_offset)
    assert "POST" not in [r[0] for r in second["requests"]]  # no new upload
    assert second["patchedBytes"] == len(data) - stored_offset  # not from 0
    assert second["jobIds"] == first["jobIds"]  # the last PATCH names the same job
    seen = {
        "jobIds": first["jobIds"],
        "documentIds": sorted(set(first["documentIds"] + second["documentIds"])),
    }
    await assert_one_document(upload_services, user, seen, data)


async def test_aborted_parallel_upload_resumes_its_partials_from_a_new_process(
    gateway_factory: Callable[..., Any],
    upload_services: Services,
    tokens: Any,
    user: str,
    tmp_path: Path,
) -> None:
    """``parallelUploads: 4`` stores the four partial URLs; a new process finds them, asks
    each partial's offset and sends only what is missing, then the final joins them."""
    gw = gateway_factory()
    token = tokens.mint(user)
    data = report_pdf(tmp_path / "report.pdf", noise=9 * MiB + 777, seed=5)
    urls = str(tmp_path / "tus-urls.json")
    parallel = {"parallelUploads": 4}

    first = await tus_js(
        "start", gw.url, token, tmp_path / "report.pdf", urls, str(MiB), **parallel
    )
    assert first["aborted"] and first["error"] is None, first
    assert not first["jobIds"]  # partials name no job

    second = await tus_js("resume", gw.url, token, tmp_path / "report.pdf", urls, **parallel)

    assert second["ok"] and second["error"] is None, second
    heads = [r for r in second["requests"] if r[0] == "HEAD"]
    assert [r[1] for r in heads] == [200] * 4, second["requests"]
    kept = sum(int(r[3]) for r in heads)
    assert kept >= MiB  # at least the chunk that triggered abort() was kept
    assert [r[0] for r in second["requests"]].count("POST") == 1  # only the final
    assert second["patchedBytes"] == len(data) - kept  # not from 0
    await assert_one_document(upload_services, user, second, data)
