"""``sluice upload FILE``: upload with a progress bar, then one summary line.

Output contract (scripts rely on it):

* stderr: the progress bar (:mod:`app.client.progress`), notices, errors;
* stdout, by default: one human summary line once the upload completed --
  file, size, time, MB/s of this run, upload id, job id and status (with
  ``--follow``: the job's progress lines first, then the summary with the
  job's final status);
* stdout with ``--json``: exactly one JSON object (upload_id, job_id,
  document_id, status, size, resumed, parts_sent), printed as soon as the
  upload completed, and nothing else: ``--follow``'s lines go to stderr.

Exit status: 0 done; 1 the upload failed (run it again to resume) or the
followed job did not complete; 2 a usage problem (no token, not a file).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from rich.filesize import decimal

from app.client.errors import UploadError
from app.client.follow import follow_job, ws_url_for
from app.client.upload import UploadClient, UploadResult
from app.core.logging import configure_logging

DEFAULT_URL = "http://127.0.0.1:8000"


@dataclass(frozen=True, slots=True)
class UploadOptions:
    """What the command line asked for (url, ws_url and token: None means the environment's)."""

    file: Path
    priority: str = "normal"
    parallel: int = 4
    follow: bool = False
    json: bool = False
    url: str | None = None
    ws_url: str | None = None
    token: str | None = None
    state_dir: Path | None = None
    document_type: str | None = None


def run(options: UploadOptions, environ: Mapping[str, str]) -> int:
    """Entry point of ``sluice upload``: the exit status."""
    configure_logging("WARNING", "console")
    return asyncio.run(upload_command(options, environ))


async def upload_command(options: UploadOptions, environ: Mapping[str, str]) -> int:
    url = options.url or environ.get("SLUICE_URL") or DEFAULT_URL
    token = options.token or environ.get("SLUICE_TOKEN")
    if not token:
        print(
            "sluice upload: no token (pass --token or set SLUICE_TOKEN; "
            "'sluice token --user NAME' mints one)",
            file=sys.stderr,
        )
        return 2
    if not await asyncio.to_thread(options.file.is_file):
        print(f"sluice upload: {options.file} is not a file", file=sys.stderr)
        return 2
    started = time.monotonic()
    result = await _upload(options, url, token)
    if result is None:
        return 1
    seconds = time.monotonic() - started
    if options.json:
        print(json.dumps(result_json(result)), flush=True)
    status = result.status
    try:
        if options.follow:
            ws_url = ws_url_for(url, options.ws_url or environ.get("SLUICE_WS_URL"))
            out = sys.stderr if options.json else sys.stdout
            try:
                status = await follow_job(ws_url, token, result.job_id, out=out)
            except UploadError as exc:
                print(f"sluice upload: {exc}", file=sys.stderr)
                return 1
    finally:  # interrupted or failed while following: the ids are still worth having
        if not options.json:
            print(summary_line(options.file, result, seconds, status), flush=True)
    return 0 if not options.follow or status == "completed" else 1


async def _upload(options: UploadOptions, url: str, token: str) -> UploadResult | None:
    """The upload's result; None once a failure has been reported on stderr."""
    finished = False
    try:
        async with UploadClient(
            url, token, parallel=options.parallel, state_dir=options.state_dir
        ) as client:
            result = await client.upload(
                options.file, priority=options.priority, document_type=options.document_type
            )
        finished = True
        return result
    except UploadError as exc:
        where = f" ({exc.code})" if exc.code else ""
        print(f"sluice upload: {exc}{where}", file=sys.stderr)
        if exc.status is None or exc.status >= 500:
            print("sluice upload: run the same command again to resume", file=sys.stderr)
        return None
    finally:
        if not finished and sys.exc_info()[0] in (asyncio.CancelledError, KeyboardInterrupt):
            print(
                "\nsluice upload: interrupted; run the same command again to resume",
                file=sys.stderr,
            )


def result_json(result: UploadResult) -> dict[str, object]:
    """``--json``'s object (its fields and their meaning are a stable interface)."""
    return {
        "upload_id": result.upload_id,
        "job_id": result.job_id,
        "document_id": result.document_id,
        "status": result.status,
        "size": result.size,
        "resumed": result.resumed,
        "parts_sent": len(result.parts_sent),
    }


def summary_line(file: Path, result: UploadResult, seconds: float, status: str) -> str:
    """``notes.md: 1.2 MB in 0.4 s (3.0 MB/s); upload <id>, job <id>: queued``.

    The rate is this run's: the bytes it sent (a resumed upload sends fewer than
    the file's size, and says so) over the command's time.
    """
    rate = result.bytes_sent / max(seconds, 1e-6)
    resumed = f", resumed: {len(result.parts_sent)} part(s) sent" if result.resumed else ""
    return (
        f"{file.name}: {decimal(result.size)} in {seconds:.1f} s ({rate / 1e6:.1f} MB/s{resumed}); "
        f"upload {result.upload_id}, job {result.job_id}: {status}"
    )
