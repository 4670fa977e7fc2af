"""``sluice upload --follow``: a job's progress from the WebSocket server, until it ends.

It speaks the server's protocol (``{"type": "auth"}``, then ``{"type":
"subscribe"}`` to the job's ``progress`` channel) and prints one line per
``job_progress`` message.  A dropped connection is reconnected with backoff,
resubscribing ``since`` the last sequence number seen, so no event is printed
twice; a rejection no reconnect can fix (a 4xx handshake, an auth close code)
fails at once.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import IO, Any
from urllib.parse import urlsplit

from app.client.errors import UploadError

DEFAULT_WS_PORT = 8765
WS_PATH = "/api/v1/ws/progress"
TERMINAL = frozenset({"completed", "failed", "cancelled"})
"""The job statuses after which nothing changes (the wire strings)."""


def ws_url_for(base_url: str, explicit: str | None = None) -> str:
    """The progress endpoint: ``explicit`` as given (its path added if it has none),
    else the gateway's host on the default WebSocket port."""
    if explicit:
        given = urlsplit(explicit)
        return explicit if given.path not in ("", "/") else f"{explicit.rstrip('/')}{WS_PATH}"
    parts = urlsplit(base_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return f"{scheme}://{parts.hostname or '127.0.0.1'}:{DEFAULT_WS_PORT}{WS_PATH}"


def progress_line(data: dict[str, Any]) -> str:
    """One ``job_progress`` message as a line: status, stage, percent, message."""
    pct = float(data.get("overall_progress") or 0) * 100
    return (
        f"{data.get('status', '?'):>10} {data.get('stage') or '-':>8} "
        f"{pct:5.1f}%  {data.get('message', '')}"
    )


async def follow_job(
    ws_url: str, token: str, job_id: str, *, out: IO[str] | None = None, reconnects: int = 5
) -> str:
    """Print the job's progress to ``out`` (stdout) until it ends; return its terminal status."""
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
                    data = _progress_of(json.loads(raw), job_id)
                    if data is None:
                        continue
                    seq = data.get("seq")
                    if isinstance(seq, int):
                        if last_seq is not None and seq <= last_seq:
                            continue
                        last_seq = seq
                    stream.write(progress_line(data) + "\n")
                    stream.flush()
                    if data.get("status") in TERMINAL:
                        return str(data["status"])
        except (OSError, websockets.exceptions.WebSocketException) as exc:
            if _refused_for_good(exc) or attempt >= reconnects:
                raise UploadError(f"cannot follow the job at {ws_url}: {exc}") from exc
            await asyncio.sleep(min(2.0**attempt, 10.0))
    raise UploadError("progress stream ended before the job did")


def _progress_of(msg: dict[str, Any], job_id: str) -> dict[str, Any] | None:
    """The progress data of a message about ``job_id``; None for anything else;
    UploadError for an ``error`` message."""
    kind = msg.get("type")
    if kind == "error":
        raise UploadError(f"progress stream: {msg.get('message')}", code=msg.get("code"))
    if kind != "job_progress" or msg.get("job_id") != job_id:
        return None
    data = msg.get("data") or {}
    return data if isinstance(data, dict) else {}


def _refused_for_good(exc: BaseException) -> bool:
    """A rejection that no reconnect can fix: a 4xx handshake (wrong URL, bad token)
    or a close for an auth/permission problem (4401, 4403, 4404)."""
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    if isinstance(exc, InvalidStatus):
        return 400 <= exc.response.status_code < 500
    if isinstance(exc, ConnectionClosed) and exc.rcvd is not None:
        return exc.rcvd.code in (4401, 4403, 4404)
    return False
