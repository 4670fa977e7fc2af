"""The resumable upload client, :class:`UploadClient` (the library behind ``sluice upload``).

It initiates a session, sends the parts ``parallel`` at a time over the raw
``PUT .../parts/{n}`` route with ``Content-MD5``, retries each failed part with
exponential backoff and full jitter, and completes the upload.  The session is
remembered in a small JSON file in the state dir (:mod:`app.client.resume`),
so running the same upload again after Ctrl-C, a dropped network or a gateway
restart asks the status endpoint and sends only the parts the gateway does not
have.  Parts are read from disk one at a time per stream (``os.pread``), never
the whole file.  If storage lost the upload (410 ``upload_lost``, or
``status`` says ``lost``), the client restarts the session in place
(``POST .../restart/{upload_id}``: same upload and job ids), says so in one
line and sends every part again, once per run.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import random
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

from app.client.errors import UploadError
from app.client.progress import UploadProgress
from app.client.resume import ResumeFiles, ResumeState
from app.core.keepalive import CLIENT_KEEPALIVE_EXPIRY

API = "/api/v1/documents/upload"
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
RESUMABLE = frozenset({"initiated", "uploading", "completed"})
"""Upload statuses (the status endpoint's strings) whose session a new run continues;
``"lost"`` is restarted in place; any other starts over."""
FORGET_ON = frozenset({"upload_cancelled", "upload_expired", "upload_not_found"})
"""Refusals after which the remembered session is useless: the next run starts over."""


@dataclass(frozen=True, slots=True)
class UploadResult:
    upload_id: str
    job_id: str
    document_id: str
    size: int
    status: str
    resumed: bool
    parts_sent: list[int]
    bytes_sent: int = 0
    """The bytes of ``parts_sent``: what this run sent (less than ``size`` when resumed)."""


class UploadClient:
    """Resumable, parallel uploads to a Sluice gateway.

    ``async with UploadClient(url, token) as c: await c.upload(path)``.  Pass
    ``http`` to reuse an ``httpx.AsyncClient`` (its ``base_url`` is ignored:
    URLs are absolute).  ``progress`` shows a bar on ``progress_stream``
    (default stderr) while parts are sent; notices go there too.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        parallel: int = 4,
        state_dir: Path | None = None,
        http: httpx.AsyncClient | None = None,
        max_attempts: int = 8,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        progress: bool = True,
        progress_stream: IO[str] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        self.parallel = max(1, parallel)
        self.state_dir = state_dir
        self._resume_files = ResumeFiles(state_dir, self.base_url)
        self._http = http
        self._own_http = http is None
        self.max_attempts = max(1, max_attempts)
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self._progress = progress
        self._progress_stream = progress_stream
        self._sleep = sleep
        self._restarted = False

    async def __aenter__(self) -> UploadClient:
        if self._http is None:
            limits = httpx.Limits(
                max_connections=self.parallel + 2,
                max_keepalive_connections=self.parallel + 2,
                keepalive_expiry=CLIENT_KEEPALIVE_EXPIRY,
            )
            self._http = httpx.AsyncClient(timeout=httpx.Timeout(120, connect=10), limits=limits)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._own_http and self._http is not None:
            await self._http.aclose()
            self._http = None

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            raise RuntimeError("use 'async with UploadClient(...)'")
        return self._http

    # --- HTTP with retries -----------------------------------------------------------

    async def _request(
        self, method: str, url: str, *, retry: bool = True, **kwargs: Any
    ) -> httpx.Response:
        headers = {**self._headers, **kwargs.pop("headers", {})}
        attempt = 0
        while True:
            attempt += 1
            try:
                resp = await self.http.request(
                    method, self.base_url + url, headers=headers, **kwargs
                )
            except httpx.TransportError as exc:
                if not retry or attempt >= self.max_attempts:
                    raise UploadError(f"{method} {url} failed: {exc!r}") from exc
                await self._sleep(self._backoff(attempt))
                continue
            if resp.is_success:
                return resp
            body = _json(resp)
            code = body.get("error")
            transient = resp.status_code in RETRYABLE_STATUS or code == "checksum_mismatch"
            if not retry or not transient or attempt >= self.max_attempts:
                raise UploadError(
                    str(body.get("message") or resp.text[:200]),
                    status=resp.status_code,
                    code=code,
                    details=body.get("details") or {},
                )
            delay = self._backoff(attempt)
            retry_after = resp.headers.get("retry-after", "")
            if retry_after.isdigit():
                delay = max(delay, float(retry_after))
            await self._sleep(delay)

    def _backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**attempt))."""
        return random.uniform(0, min(self.backoff_cap, self.backoff_base * 2**attempt))  # noqa: S311

    # --- the upload --------------------------------------------------------------------

    async def upload(
        self,
        path: Path,
        *,
        priority: str = "normal",
        document_type: str | None = None,
        processing_options: dict[str, Any] | None = None,
        content_type: str = "",
    ) -> UploadResult:
        """Upload ``path`` (resuming a remembered session) and complete it; up to three
        rounds of sending what the gateway says is missing."""
        path = Path(path)
        self._restarted = False
        state, missing, resumed = await self._resume(path)
        if state is None:
            body: dict[str, Any] = {
                "filename": path.name,
                "file_size": path.stat().st_size,
                "content_type": content_type,
                "priority": priority,
            }
            if document_type:
                body["document_type"] = document_type
            if processing_options:
                body["processing_options"] = processing_options
            state = await self._initiate(path, body)
            missing = list(range(1, state.total_parts + 1))
        sent: list[int] = []
        for _round in range(3):
            try:
                if missing:
                    sent += await self._send_parts(path, state, missing)
                done = (await self._request("POST", f"{API}/complete/{state.upload_id}")).json()
            except UploadError as exc:
                if exc.code == "upload_lost" and not self._restarted:
                    missing = await self._restart(state)
                    continue
                if exc.code == "missing_parts":  # e.g. S3 lost one: send them again
                    missing = list(exc.details.get("missing_parts", []))
                    continue
                if exc.code in FORGET_ON:
                    self._resume_files.forget(path)
                raise
            self._resume_files.forget(path)
            return UploadResult(
                upload_id=state.upload_id,
                job_id=done["job_id"],
                document_id=done["document_id"],
                size=done["size"],
                status=done["status"],
                resumed=resumed,
                parts_sent=sent,
                bytes_sent=sum(state.part_size(n) for n in sent),
            )
        raise UploadError("the gateway kept reporting missing parts", code="missing_parts")

    async def _initiate(self, path: Path, body: dict[str, Any]) -> ResumeState:
        init = (await self._request("POST", f"{API}/initiate", json=body)).json()
        state = ResumeState(
            upload_id=init["upload_id"],
            job_id=init["job_id"],
            document_id=init["document_id"],
            chunk_size=init["chunk_size"],
            total_parts=init["total_parts"],
            file_size=body["file_size"],
            url=self.base_url,
        )
        self._resume_files.save(path, state)
        return state

    async def _resume(self, path: Path) -> tuple[ResumeState | None, list[int], bool]:
        state = self._resume_files.load(path)
        if state is None:
            return None, [], False
        try:
            st = (await self._request("GET", f"{API}/status/{state.upload_id}")).json()
        except UploadError as exc:
            if exc.status != 404:  # gateway down or token bad: keep the state, try later
                raise
            self._resume_files.forget(path)  # unknown, expired or foreign: start over
            return None, [], False
        if st["status"] == "lost":
            return state, await self._restart(state), True
        if st["status"] in RESUMABLE:
            return state, list(st["missing_parts"]), True
        self._resume_files.forget(path)
        return None, [], False

    async def _restart(self, state: ResumeState) -> list[int]:
        """Storage lost the upload: start it again in place; the parts to send."""
        st = (await self._request("POST", f"{API}/restart/{state.upload_id}")).json()
        self._restarted = True
        print(
            "sluice upload: storage lost this upload's parts; restarted it (same upload "
            f"and job), sending all {state.total_parts} part(s) again",
            file=self._progress_stream or sys.stderr,
            flush=True,
        )
        return list(st["missing_parts"])

    async def _send_parts(self, path: Path, state: ResumeState, missing: list[int]) -> list[int]:
        """Send ``missing`` over ``parallel`` streams; the part numbers sent, sorted."""
        fd = os.open(path, os.O_RDONLY)
        try:
            with self._progress_bar(state, missing) as bar:
                return await self._stream_parts(fd, state, missing, bar)
        finally:
            os.close(fd)

    def _progress_bar(
        self, state: ResumeState, missing: list[int]
    ) -> contextlib.AbstractContextManager[UploadProgress | None]:
        if not self._progress:
            return contextlib.nullcontext()
        already = state.file_size - sum(state.part_size(n) for n in missing)
        return UploadProgress(state.file_size, done=already, stream=self._progress_stream)

    async def _stream_parts(
        self, fd: int, state: ResumeState, missing: list[int], bar: UploadProgress | None
    ) -> list[int]:
        todo: asyncio.Queue[int] = asyncio.Queue()
        for n in sorted(missing):
            todo.put_nowait(n)
        sent: list[int] = []

        async def stream() -> None:
            while True:
                try:
                    n = todo.get_nowait()
                except asyncio.QueueEmpty:
                    return
                size = state.part_size(n)
                data, md5 = await asyncio.to_thread(_read_part, fd, state.part_offset(n), size)
                await self._request(
                    "PUT",
                    f"{API}/{state.upload_id}/parts/{n}",
                    content=data,
                    headers={"Content-MD5": md5},
                )
                sent.append(n)
                if bar is not None:
                    bar.advance(size)

        streams = [asyncio.create_task(stream()) for _ in range(min(self.parallel, len(missing)))]
        try:
            await asyncio.gather(*streams)
        finally:
            for s in streams:
                s.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
        return sorted(sent)


def _read_part(fd: int, offset: int, size: int) -> tuple[bytes, str]:
    """Read one part (bounded: exactly ``size`` bytes) and its base64 MD5."""
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise UploadError(f"file changed while uploading: short read at offset {offset}")
    return data, base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


def _json(resp: httpx.Response) -> dict[str, Any]:
    try:
        body = resp.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
