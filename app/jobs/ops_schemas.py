"""Wire schemas of the operations views: a job's event timeline, every user's jobs
(admin), the queue's statistics, the fleet and the WebSocket servers' totals.

Field names are fixed by the dashboard contract (issue 11); changes are additive.
Priorities and statuses are the StrEnums of :mod:`app.core.queue` and
:mod:`app.jobs.model`, so they encode as plain strings.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec

from app.core.fleet import WsInstanceReport
from app.core.queue import Priority
from app.core.schemas import Readiness
from app.core.schemas import Request as RequestBody
from app.core.schemas import Response as ResponseBody
from app.jobs.events import STREAM_MAXLEN
from app.jobs.model import ProgressEvent, Stage
from app.jobs.schemas import JobListQuery, JobView

MAX_SEQ = 2**63 - 1
"""``jobs.seq`` is a Postgres ``bigint``."""

# --- a job's events -----------------------------------------------------------------------


class JobEventsQuery(RequestBody):
    """``?since=&limit=``; a value out of range is 400 ``invalid_since`` / ``invalid_limit``."""

    since: Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ)] = 0
    """The last ``seq`` the caller has; events after it are returned."""
    limit: Annotated[int, msgspec.Meta(ge=1, le=STREAM_MAXLEN)] = STREAM_MAXLEN


class JobEvents(ResponseBody):
    job_id: str
    events: list[ProgressEvent]
    """Seq ascending, each with seq > ``since``, as the WebSocket sends them."""
    truncated: bool
    """The capped history no longer holds the events right after ``since`` (the
    WebSocket's ``recovered: false``); the first event is then the job's current
    snapshot."""
    next_since: int
    """Pass as ``since`` to get what follows."""
    has_more: bool = False
    """More events follow ``next_since`` already (the page was cut at ``limit``)."""
    oldest_retained_seq: int | None = None
    """The oldest ``seq`` the history still holds (``since=oldest_retained_seq - 1``
    reads all of it); None when it holds nothing."""


# --- every user's jobs (admin) -------------------------------------------------------------


class AdminJobListQuery(JobListQuery):
    owner_id: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None


class AdminJobView(JobView):
    owner_id: str


# --- the queue ------------------------------------------------------------------------------


class PriorityStats(ResponseBody):
    priority: Priority
    queued: int
    retrying: int
    running: int
    oldest_queued_seconds: float | None
    """Age of the longest-waiting ``queued`` job of this priority (since it was
    queued); None when none waits."""


class RateBucket(ResponseBody):
    start: datetime
    enqueued: int
    """Jobs queued in this bucket (first queued, or queued again by ``/retry``)."""
    completed: int
    failed: int
    """Jobs that ended ``failed`` (out of attempts or a permanent error)."""


class Rates(ResponseBody):
    bucket_seconds: int
    buckets: list[RateBucket]
    """Oldest first; the last one is the current, still filling, bucket."""


class QueueStats(ResponseBody):
    priorities: list[PriorityStats]
    """critical, high, normal, low."""
    ready_in_redis: int
    """Jobs ARQ holds whose ready time has come (waiting or running)."""
    rates: Rates
    aging_rule: str


# --- the fleet ------------------------------------------------------------------------------


class RunningJob(ResponseBody):
    job_id: str
    owner_id: str
    stage: Stage | None
    priority: Priority
    lease_expires_at: datetime | None


class WorkerView(ResponseBody):
    worker_id: str
    last_heartbeat_at: datetime
    heartbeat_age_seconds: float
    slots: int
    running: list[RunningJob]


class Fleet(ResponseBody):
    workers: list[WorkerView]
    """Workers whose heartbeat is recent (within two leases), most recent first."""
    ws_servers: list[WsInstanceReport]
    dependencies: Readiness
    """What ``GET /health/ready`` answers: per dependency its status and latency."""
    unassigned_running: list[RunningJob] = msgspec.field(default_factory=list)
    """Running jobs whose lease owner is not a live worker (the reaper will re-queue them)."""


class WsTotals(ResponseBody):
    instances: int
    connections: int
    authenticated: int
    subscriptions: int
    messages_per_second: float


class WsStats(ResponseBody):
    instances: list[WsInstanceReport]
    total: WsTotals
