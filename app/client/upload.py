"""The resumable upload client: ``sluice upload FILE`` and :class:`UploadClient`.

It initiates a session, sends the parts ``parallel`` at a time over the raw
``PUT .../parts/{n}`` route with ``Content-MD5``, retries each failed part with
exponential backoff and full jitter, and completes the upload.  The session is
remembered in a small JSON file in the state dir, keyed by the file's absolute
path, size and mtime (and the gateway URL), so running the same command again
after Ctrl-C, a dropped network or a gateway restart asks the status endpoint
and sends only the parts the gateway does not have.  Parts are read from disk
one at a time per stream (``os.pread``), never the whole file.  If storage lost
the upload (410 ``upload_lost``, or ``status`` says ``lost``), the client
restarts the session in place (``POST .../restart/{upload_id}``: same upload
and job ids), says so in one line and sends every part again, once per run.

``--follow`` then streams the job's progress from the WebSocket server
(``{"type": "auth"}``, ``{"type": "subscribe"}``, ``job_progress`` messages)
until the job ends.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_WS_PORT = 8765
API = "/api/v1/documents/upload"
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
TERMINAL = frozenset({"completed", "failed", "cancelled"})


class UploadError(Exception):
    """The gateway refused the upload (not worth retrying), or retries ran out."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.details = details or {}


@dataclass(frozen=True, slots=True)
class UploadResult:
    upload_id: str
    job_id: str
    document_id: str
    size: int
    status: str
    resumed: bool
    parts_sent: list[int]


@dataclass(slots=True)
class _State:
    upload_id: str
    job_id: str
    document_id: str
    chunk_size: int
    total_parts: int
    file_size: int
    url: str


class ProgressBar:
    """One line on stderr: bar, percent, MB, MB/s (this run) and ETA."""

    def __init__(
        self,
        total: int,
        *,
        done: int = 0,
        stream: IO[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        interval: float = 0.1,
    ) -> None:
        self.total = max(total, 1)
        self.done = done
        self._start_done = done
        self._stream = stream if stream is not None else sys.stderr
        self._clock = clock
        self._started = clock()
        self._last = 0.0
        self._rendered: int | None = None
        self._interval = interval if self._stream.isatty() else 2.0

    def advance(self, n: int) -> None:
        self.done += n
        now = self._clock()
        if now - self._last >= self._interval or self.done >= self.total:
            self._last = now
            self.render(now)

    def rate(self, now: float | None = None) -> float:
        elapsed = max((now or self._clock()) - self._started, 1e-6)
        return (self.done - self._start_done) / elapsed

    def render(self, now: float | None = None) -> None:
        rate = self.rate(now)
        frac = min(self.done / self.total, 1.0)
        filled = int(frac * 30)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta_text = "--:--" if eta == float("inf") else f"{int(eta) // 60:02d}:{int(eta) % 60:02d}"
        line = (
            f"[{'#' * filled}{'.' * (30 - filled)}] {frac * 100:5.1f}% "
            f"{self.done / 1e6:,.1f}/{self.total / 1e6:,.1f} MB "
            f"{rate / 1e6:6.1f} MB/s ETA {eta_text}"
        )
        end = "\r" if self._stream.isatty() else "\n"
        self._stream.write(line + end)
        self._stream.flush()
        self._rendered = self.done

    def close(self) -> None:
        if self._rendered != self.done:
            self.render()
        if self._stream.isatty():
            self._stream.write("\n")
            self._stream.flush()


def _read_part(fd: int, offset: int, size: int) -> tuple[bytes, str]:
    """Read one part (bounded: exactly ``size`` bytes) and its base64 MD5."""
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise UploadError(f"file changed while uploading: short read at offset {offset}")
    return data, base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()


class UploadClient:
    """Resumable, parallel uploads to a Sluice gateway.

    ``async with UploadClient(url, token) as c: await c.upload(path)``.  Pass
    ``http`` to reuse an ``httpx.AsyncClient`` (its ``base_url`` is ignored:
    URLs are absolute).
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
                max_connections=self.parallel + 2, max_keepalive_connections=self.parallel + 2
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

    # --- state file ----------------------------------------------------------------

    def state_path(self, path: Path) -> Path | None:
        if self.state_dir is None:
            return None
        st = path.stat()
        ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{self.base_url}"
        return self.state_dir / f"{hashlib.sha256(ident.encode()).hexdigest()[:32]}.json"

    def _load(self, path: Path) -> _State | None:
        where = self.state_path(path)
        if where is None or not where.exists():
            return None
        try:
            return _State(**json.loads(where.read_text()))
        except (ValueError, TypeError):
            return None

    def _save(self, path: Path, state: _State) -> None:
        where = self.state_path(path)
        if where is None:
            return
        where.parent.mkdir(parents=True, exist_ok=True)
        tmp = where.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(state)))
        tmp.replace(where)

    def _forget(self, path: Path) -> None:
        where = self.state_path(path)
        if where is not None:
            with contextlib.suppress(FileNotFoundError):
                where.unlink()

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
        path = Path(path)
        size = path.stat().st_size
        self._restarted = False
        state, missing, resumed = await self._resume(path)
        if state is None:
            body: dict[str, Any] = {
                "filename": path.name,
                "file_size": size,
                "content_type": content_type,
                "priority": priority,
            }
            if document_type:
                body["document_type"] = document_type
            if processing_options:
                body["processing_options"] = processing_options
            init = (await self._request("POST", f"{API}/initiate", json=body)).json()
            state = _State(
                upload_id=init["upload_id"],
                job_id=init["job_id"],
                document_id=init["document_id"],
                chunk_size=init["chunk_size"],
                total_parts=init["total_parts"],
                file_size=size,
                url=self.base_url,
            )
            self._save(path, state)
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
                if exc.code in {"upload_cancelled", "upload_expired", "upload_not_found"}:
                    self._forget(path)
                raise
            self._forget(path)
            return UploadResult(
                upload_id=state.upload_id,
                job_id=done["job_id"],
                document_id=done["document_id"],
                size=done["size"],
                status=done["status"],
                resumed=resumed,
                parts_sent=sent,
            )
        raise UploadError("the gateway kept reporting missing parts", code="missing_parts")

    async def _resume(self, path: Path) -> tuple[_State | None, list[int], bool]:
        state = self._load(path)
        if state is None:
            return None, [], False
        try:
            st = (await self._request("GET", f"{API}/status/{state.upload_id}")).json()
        except UploadError as exc:
            if exc.status != 404:  # gateway down or token bad: keep the state, try later
                raise
            self._forget(path)  # unknown, expired or foreign: start over
            return None, [], False
        if st["status"] == "lost":
            return state, await self._restart(state), True
        if st["status"] in ("initiated", "uploading", "completed"):
            return state, list(st["missing_parts"]), True
        self._forget(path)
        return None, [], False

    async def _restart(self, state: _State) -> list[int]:
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

    async def _send_parts(self, path: Path, state: _State, missing: list[int]) -> list[int]:
        todo: asyncio.Queue[int] = asyncio.Queue()
        for n in sorted(missing):
            todo.put_nowait(n)
        already = state.file_size - sum(self._part_size(state, n) for n in missing)
        bar = (
            ProgressBar(state.file_size, done=already, stream=self._progress_stream)
            if self._progress
            else None
        )
        sent: list[int] = []
        fd = os.open(path, os.O_RDONLY)
        try:

            async def worker() -> None:
                while True:
                    try:
                        n = todo.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    size = self._part_size(state, n)
                    data, md5 = await asyncio.to_thread(
                        _read_part, fd, (n - 1) * state.chunk_size, size
                    )
                    await self._request(
                        "PUT",
                        f"{API}/{state.upload_id}/parts/{n}",
                        content=data,
                        headers={"Content-MD5": md5},
                    )
                    sent.append(n)
                    if bar is not None:
                        bar.advance(size)

            workers = [
                asyncio.create_task(worker()) for _ in range(min(self.parallel, len(missing)))
            ]
            try:
                await asyncio.gather(*workers)
            finally:
                for w in workers:
                    w.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
        finally:
            os.close(fd)
            if bar is not None:
                bar.close()
        return sorted(sent)

    @staticmethod
    def _part_size(state: _State, n: int) -> int:
        if n < state.total_parts:
            return state.chunk_size
        return state.file_size - state.chunk_size * (state.total_parts - 1)


def _json(resp: httpx.Response) -> dict[str, Any]:
    try:
        body = resp.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


# --- following a job over the WebSocket ------------------------------------------------

WS_PATH = "/api/v1/ws/progress"


def ws_url_for(base_url: str, explicit: str | None = None) -> str:
    """The progress endpoint: ``explicit`` as given (its path added if it has none),
    else the gateway's host on the default WebSocket port."""
    if explicit:
        given = urlsplit(explicit)
        return explicit if given.path not in ("", "/") else f"{explicit.rstrip('/')}{WS_PATH}"
    parts = urlsplit(base_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return f"{scheme}://{parts.hostname or '127.0.0.1'}:{DEFAULT_WS_PORT}{WS_PATH}"


async def follow_job(
    ws_url: str, token: str, job_id: str, *, out: IO[str] | None = None, reconnects: int = 5
) -> str:
    """Print the job's progress until it ends; return its terminal status."""
    import websockets

    stream = out if out is not None else sys.stdout
    last_seq: int | None = None
    for attempt in range(reconnects + 1):
        try:
            async with websockets.connect(ws_url, open_timeout=10, max_size=2**20) as ws:
                await ws.send(json.dumps({"type": "auth", "token": token}))
                sub: dict[str, Any] = {
                    "type": "subscribe",
                    "job_ids": [job_id],
                    "channels": ["progress"],
                }
                if last_seq is not None:
                    sub["since"] = {job_id: last_seq}
                await ws.send(json.dumps(sub))
                async for raw in ws:
                    msg = json.loads(raw)
                    kind = msg.get("type")
                    if kind == "error":
                        raise UploadError(
                            f"progress stream: {msg.get('message')}", code=msg.get("code")
                        )
                    if kind != "job_progress" or msg.get("job_id") != job_id:
                        continue
                    data = msg.get("data") or {}
                    seq = data.get("seq")
                    if isinstance(seq, int):
                        if last_seq is not None and seq <= last_seq:
                            continue
                        last_seq = seq
                    pct = float(data.get("overall_progress") or 0) * 100
                    stream.write(
                        f"{data.get('status', '?'):>10} {data.get('stage') or '-':>8} "
                        f"{pct:5.1f}%  {data.get('message', '')}\n"
                    )
                    stream.flush()
                    if data.get("status") in TERMINAL:
                        return str(data["status"])
        except (OSError, websockets.exceptions.WebSocketException) as exc:
            if _refused_for_good(exc) or attempt >= reconnects:
                raise UploadError(f"cannot follow the job at {ws_url}: {exc}") from exc
            await asyncio.sleep(min(2.0**attempt, 10.0))
    raise UploadError("progress stream ended before the job did")


def _refused_for_good(exc: BaseException) -> bool:
    """A rejection that no reconnect can fix: a 4xx handshake (wrong URL, bad token)
    or a close for an auth/permission problem (4401, 4403, 4404)."""
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    if isinstance(exc, InvalidStatus):
        return 400 <= exc.response.status_code < 500
    if isinstance(exc, ConnectionClosed) and exc.rcvd is not None:
        return exc.rcvd.code in (4401, 4403, 4404)
    return False


# --- the CLI -------------------------------------------------------------------------------


async def run_upload_cli(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    """``sluice upload FILE [--priority] [--parallel] [--follow] [--url] [--token]``."""
    url = args.url or environ.get("SLUICE_URL") or DEFAULT_URL
    token = args.token or environ.get("SLUICE_TOKEN")
    if not token:
        print(
            "sluice upload: no token (pass --token or set SLUICE_TOKEN; "
            "'sluice token --user NAME' mints one)",
            file=sys.stderr,
        )
        return 2
    path = Path(args.file)
    if not await asyncio.to_thread(path.is_file):
        print(f"sluice upload: {path} is not a file", file=sys.stderr)
        return 2
    state_dir = Path(args.state_dir) if args.state_dir else None
    finished = False
    try:
        async with UploadClient(url, token, parallel=args.parallel, state_dir=state_dir) as c:
            result = await c.upload(path, priority=args.priority, document_type=args.document_type)
        finished = True
    except UploadError as exc:
        where = f" ({exc.code})" if exc.code else ""
        print(f"sluice upload: {exc}{where}", file=sys.stderr)
        if exc.status is None or exc.status >= 500:
            print("sluice upload: run the same command again to resume", file=sys.stderr)
        return 1
    finally:
        if not finished and sys.exc_info()[0] in (asyncio.CancelledError, KeyboardInterrupt):
            print(
                "\nsluice upload: interrupted; run the same command again to resume",
                file=sys.stderr,
            )
    print(
        json.dumps(
            {
                "upload_id": result.upload_id,
                "job_id": result.job_id,
                "document_id": result.document_id,
                "status": result.status,
                "size": result.size,
                "resumed": result.resumed,
                "parts_sent": len(result.parts_sent),
            }
        )
    )
    if not args.follow:
        return 0
    ws_url = ws_url_for(url, getattr(args, "ws_url", None) or environ.get("SLUICE_WS_URL"))
    try:
        final = await follow_job(ws_url, token, result.job_id)
    except UploadError as exc:
        print(f"sluice upload: {exc}", file=sys.stderr)
        return 1
    return 0 if final == "completed" else 1
