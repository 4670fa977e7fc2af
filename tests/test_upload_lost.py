"""An upload whose S3 multipart upload is gone: detected, reported as 410
``upload_lost``, status reconciled, and recovered in place by ``restart``.

The multipart upload is aborted behind the gateway's back with AbortMultipartUpload
on the real embedded S3 server, as a lifecycle rule or an operator would.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.client.upload import UploadClient
from app.gateway.app import create_app
from app.gateway.services import Services
from tests.fixtures_uploads import PART, ROOT, initiate, payload, put_part, s3_object
from workers.context import WorkerContext
from workers.run import JobRun, Outcome

BASE = "/api/v1/documents/upload"


async def _abort_behind_the_gateways_back(svc: Services, upload_id: str) -> str:
    row = await svc.db.fetchrow(
        "SELECT s3_upload_id, object_key FROM upload_sessions WHERE id = $1::uuid", upload_id
    )
    await svc.s3.abort_multipart_upload(
        Bucket=svc.settings.minio_bucket_name, Key=row["object_key"], UploadId=row["s3_upload_id"]
    )
    return str(row["s3_upload_id"])


async def test_lost_upload_is_410_status_lost_and_restart_recovers_it(
    uploads: httpx.AsyncClient, auth_headers: dict[str, str], upload_services: Services
) -> None:
    data = payload(PART + 1234, seed=41)
    init = await initiate(uploads, auth_headers, len(data))
    uid = init["upload_id"]
    assert (await put_part(uploads, auth_headers, uid, 1, data[:PART])).is_success
    old_s3_id = await _abort_behind_the_gateways_back(upload_services, uid)

    r = await put_part(uploads, auth_headers, uid, 2, data[PART:])
    assert (r.status_code, r.json()["error"]) == (410, "upload_lost"), r.text
    r = await uploads.post(
        f"{BASE}/chunk",
        headers=auth_headers,
        data={
            "upload_id": uid,
            "part_number": "2",
            "chunk_hash": hashlib.md5(data[PART:]).hexdigest(),
        },
        files={"chunk_file": ("blob", data[PART:], "application/octet-stream")},
    )
    assert (r.status_code, r.json()["error"]) == (410, "upload_lost"), r.text
    r = await uploads.post(f"{BASE}/{uid}/parts/2/presign", headers=auth_headers)
    assert (r.status_code, r.json()["error"]) == (410, "upload_lost"), r.text
    for _ in range(2):  # not "missing_parts" forever: the same clear answer each time
        r = await uploads.post(f"{BASE}/complete/{uid}", headers=auth_headers)
        assert (r.status_code, r.json()["error"]) == (410, "upload_lost"), r.text

    status = (await uploads.get(f"{BASE}/status/{uid}", headers=auth_headers)).json()
    assert status["status"] == "lost"
    assert status["parts"] == [] and status["parts_received"] == 0
    assert status["missing_parts"] == [1, 2] and status["bytes_received"] == 0

    # restart: same upload, job and document; a fresh S3 upload; no parts recorded
    r = await uploads.post(f"{BASE}/restart/{uid}", headers=auth_headers)
    assert r.status_code == 200, r.text
    restarted = r.json()
    assert restarted["status"] == "initiated" and restarted["missing_parts"] == [1, 2]
    assert (restarted["job_id"], restarted["document_id"]) == (init["job_id"], init["document_id"])
    new_s3_id = await upload_services.db.fetchval(
        "SELECT s3_upload_id FROM upload_sessions WHERE id = $1::uuid", uid
    )
    assert new_s3_id != old_s3_id
    recorded = await upload_services.db.fetchval(
        "SELECT count(*) FROM upload_parts WHERE upload_id = $1::uuid", uid
    )
    assert recorded == 0
    # a second restart changes nothing (S3 knows the new upload)
    assert (await uploads.post(f"{BASE}/restart/{uid}", headers=auth_headers)).is_success
    assert (
        await upload_services.db.fetchval(
            "SELECT s3_upload_id FROM upload_sessions WHERE id = $1::uuid", uid
        )
        == new_s3_id
    )

    for n, chunk in ((1, data[:PART]), (2, data[PART:])):
        assert (await put_part(uploads, auth_headers, uid, n, chunk)).is_success
    r = await uploads.post(f"{BASE}/complete/{uid}", headers=auth_headers)
    assert r.status_code == 200, r.text
    assert r.json()["job_id"] == init["job_id"] and r.json()["status"] == "queued"
    assert await s3_object(upload_services, init["document_id"]) == data
    # a completed upload cannot be restarted
    r = await uploads.post(f"{BASE}/restart/{uid}", headers=auth_headers)
    assert (r.status_code, r.json()["error"]) == (409, "upload_completed")


async def test_restart_of_unknown_or_cancelled_upload_is_refused(
    uploads: httpx.AsyncClient,
    auth_headers: dict[str, str],
    headers_for: Any,
    upload_services: Services,
) -> None:
    init = await initiate(uploads, auth_headers, 10)
    uid = init["upload_id"]
    r = await uploads.post(f"{BASE}/restart/{uid}", headers=headers_for("intruder"))
    assert r.status_code == 404
    await _abort_behind_the_gateways_back(upload_services, uid)
    r = await uploads.delete(f"{BASE}/cancel/{uid}", headers=auth_headers)  # lost: still cancels
    assert r.status_code == 200, r.text
    r = await uploads.post(f"{BASE}/restart/{uid}", headers=auth_headers)
    assert (r.status_code, r.json()["error"]) == (409, "upload_cancelled")


class AbortAfterFirstPart(httpx.AsyncBaseTransport):
    """Passes requests through; once the first part is stored, storage loses the upload."""

    def __init__(self, inner: httpx.AsyncBaseTransport, svc: Services) -> None:
        self.inner = inner
        self.svc = svc
        self.aborted = False
        self.puts: list[int] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.method == "PUT":
            self.puts.append(int(request.url.path.rsplit("/", 1)[1]))
            if not self.aborted and response.status_code == 200:
                self.aborted = True
                uid = request.url.path.split("/")[-3]
                await _abort_behind_the_gateways_back(self.svc, uid)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_client_restarts_a_lost_upload_by_itself(
    upload_services: Services, tokens: Any, user: str, tmp_path: Path
) -> None:
    path = tmp_path / "lost.txt"
    path.write_bytes(payload(2 * PART + 99, seed=42))
    app = create_app(upload_services.settings, services=upload_services)
    transport = AbortAfterFirstPart(
        httpx.ASGITransport(app=app, raise_app_exceptions=False), upload_services
    )
    notices = io.StringIO()
    async with (
        httpx.AsyncClient(transport=transport) as http,
        UploadClient(
            "http://gateway", tokens.mint(user), parallel=1, http=http, progress_stream=notices
        ) as client,
    ):
        result = await client.upload(path)
    assert transport.aborted
    assert result.status == "queued"
    assert result.parts_sent == [1, 2, 3]  # every part again after the restart
    assert transport.puts.count(1) == 2  # part 1 was sent before and after
    assert await s3_object(upload_services, result.document_id) == path.read_bytes()
    lines = [line for line in notices.getvalue().splitlines() if "restart" in line]
    assert len(lines) == 1, notices.getvalue()


async def test_sluice_upload_resumes_a_lost_upload_and_the_job_runs(
    gateway_factory: Callable[..., Any],
    upload_services: Services,
    worker_ctx: WorkerContext,
    tokens: Any,
    user: str,
    tmp_path: Path,
    settings_env: dict[str, str],
) -> None:
    gw = gateway_factory()
    token = tokens.mint(user)
    path = tmp_path / "notes.md"
    path.write_text("# Notes\n\nStorage lost this upload once; the client recovered.\n")
    state_dir = tmp_path / "state"

    class NoParts(httpx.AsyncBaseTransport):  # the network fails before any part is sent
        def __init__(self) -> None:
            self.inner = httpx.AsyncHTTPTransport()

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            if request.method == "PUT":
                raise httpx.ConnectError("network is unreachable", request=request)
            return await self.inner.handle_async_request(request)

        async def aclose(self) -> None:
            await self.inner.aclose()

    async with (
        httpx.AsyncClient(transport=NoParts()) as http,
        UploadClient(
            gw.url, token, state_dir=state_dir, http=http, max_attempts=1, progress=False
        ) as client,
    ):
        with pytest.raises(Exception, match="network is unreachable"):
            await client.upload(path)
    [state_file] = state_dir.glob("*.json")
    upload_id = json.loads(state_file.read_text())["upload_id"]
    await _abort_behind_the_gateways_back(upload_services, upload_id)

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app",
        "upload",
        str(path),
        "--url",
        gw.url,
        "--token",
        token,
        "--state-dir",
        str(state_dir),
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
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["upload_id"] == upload_id and result["status"] == "queued"
    said = [line for line in err.decode().splitlines() if "restart" in line]
    assert len(said) == 1, err.decode()
    assert "run the same command again" not in err.decode()
    assert await s3_object(upload_services, result["document_id"]) == path.read_bytes()
    assert await JobRun(worker_ctx, result["job_id"]).run() == Outcome.COMPLETED
