"""A job's event timeline over HTTP: the capped history stream replayed after ``since``.

``GET /api/v1/jobs/{job_id}/events`` answers what a WebSocket ``subscribe`` with
``since`` replays, so a page can draw a job's timeline (or catch up after a
reload) without a socket:

* the job is read from the table first: unknown, malformed and foreign ids are
  the same 404 as ``GET /api/v1/jobs/{id}`` (an admin reads any job);
* the events are the job's history stream (:func:`app.jobs.events.stream_key`)
  with ``seq > since``, ascending and unique, at most ``limit`` of them;
* when the stream no longer holds every event right after ``since`` (trimmed to
  :data:`~app.jobs.events.STREAM_MAXLEN`, expired, or a gap) the answer is
  ``truncated`` and starts with the job's current snapshot instead -- exactly
  when the WebSocket would answer ``recovered: false`` and send the snapshot.

Invariant: the stream is read in bounded pages and never past what it holds
(at most ``STREAM_MAXLEN`` plus Redis's approximate-trim slack).  The rule that
decides ``truncated`` is :func:`app.ws.feed.covers`' (the gateway may not
import the WebSocket server; ``tests/test_dashboard_api.py`` pins that both agree).
"""

from __future__ import annotations

import msgspec
from redis.asyncio import Redis

from app.core.auth import Identity
from app.core.db import Queryable, missing, parse_uuid
from app.jobs.events import decode_event, stream_key
from app.jobs.model import ProgressEvent
from app.jobs.ops_schemas import JobEvents
from app.jobs.transitions import job_snapshot

PAGE = 250
"""Stream entries read per round trip."""


async def job_events(
    db: Queryable, redis: Redis, job_id: str, caller: Identity, *, since: int, limit: int
) -> JobEvents:
    """The job's events after ``since`` (see the module docstring)."""
    key = str(parse_uuid(job_id, not_found="job"))
    snapshot = await job_snapshot(db, key)
    if snapshot is None or not (caller.admin or snapshot.owner_id == caller.user_id):
        raise missing("job")
    history, oldest = await read_history(redis, key)
    after = sorted({e.seq: e for e in history if e.seq > since}.values(), key=lambda e: e.seq)
    reached_back = oldest is not None and oldest <= since
    if covered(after, since, reached_back=reached_back, current=snapshot.seq):
        page = after[:limit]
        return JobEvents(
            job_id=key,
            events=page,
            truncated=False,
            next_since=page[-1].seq if page else since,
            has_more=len(after) > limit,
            oldest_retained_seq=oldest,
        )
    newer = [e for e in after if e.seq > snapshot.seq][: limit - 1]
    events = [snapshot, *newer]
    return JobEvents(
        job_id=key,
        events=events,
        truncated=True,
        next_since=events[-1].seq,
        has_more=len([e for e in after if e.seq > snapshot.seq]) > len(newer),
        oldest_retained_seq=oldest,
    )


def covered(events: list[ProgressEvent], since: int, *, reached_back: bool, current: int) -> bool:
    """Whether ``events`` (ascending, unique, seq > since) are every event after ``since``.

    The WebSocket's rule (:func:`app.ws.feed.can_resume` without live events):
    a caller already at the job's current ``seq`` (or past it) misses nothing;
    otherwise the events must run on from ``since + 1`` without a gap, and the
    stream must reach back to ``since`` or start right after it.
    """
    if not events and since >= current:
        return True
    expected = since + 1
    for event in events:
        if event.seq != expected:
            return False
        expected += 1
    return reached_back or (bool(events) and events[0].seq == since + 1)


async def read_history(redis: Redis, key: str) -> tuple[list[ProgressEvent], int | None]:
    """Every decodable event of the job's stream, oldest entry first, and the
    oldest ``seq`` it holds (None when empty)."""
    stream = stream_key(key)
    events: list[ProgressEvent] = []
    start = "-"
    while True:
        page: list[tuple[bytes, dict[bytes, bytes]]] = await redis.xrange(
            stream, start, "+", count=PAGE
        )
        for _entry_id, fields in page:
            try:
                events.append(decode_event(fields[b"e"]))
            except (KeyError, msgspec.MsgspecError):
                continue
        if len(page) < PAGE:
            break
        start = f"({page[-1][0].decode()}"
    oldest = min((e.seq for e in events), default=None)
    return events, oldest
