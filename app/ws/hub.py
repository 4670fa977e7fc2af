"""Per-process fan-out: which local connection follows which job, and the delivery guarantees.

:class:`Hub` keeps the registry of this process's progress subscribers (per
job) and owns the one :class:`~app.ws.bus.ChannelBus`, whose job channels it
keeps equal to what the registry needs; it routes every pub/sub message, the
/notifications ones to its :class:`~app.ws.notifications.Notifications`.
On top of the bus:

* subscribe = SUBSCRIBE (confirmed) -> read the jobs table snapshot (also the
  ownership check) and, for ``since``, the job's capped history stream ->
  merge with whatever arrived live meanwhile (:class:`~app.ws.feed.JobFeed`);
* live events are decoded once per process and encoded once per job, then
  pushed to each subscriber whose feed accepts them;
* a gap in ``seq`` (a lost pub/sub message) is repaired from the history;
* after a pub/sub reconnect every feed is replayed from the history, or from
  the snapshot where the history no longer reaches back;
* after its terminal event a job's subscription ends by itself.

Channel names come from :mod:`app.jobs.events`, which publishes on them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.core.logging import get_logger
from app.jobs.events import decode_event, job_channel, user_channel
from app.jobs.model import ProgressEvent
from app.ws.bus import ChannelBus
from app.ws.connection import text_frame
from app.ws.feed import JobFeed, Offer, can_resume, covers
from app.ws.history import History, HistoryReader
from app.ws.messages import (
    MAX_SUBSCRIPTIONS,
    SYSTEM_CHANNEL,
    JobProgress,
    encode,
    progress_frame,
)
from app.ws.metrics import WsMetrics
from app.ws.notifications import Notifications
from app.ws.snapshots import SnapshotLoader, valid_job_id

log = get_logger(__name__)

_JOB_PREFIX = job_channel("")
_USER_PREFIX = user_channel("")


class Peer(Protocol):
    """What the hub needs from a connection."""

    feeds: dict[str, JobFeed]

    def push(self, frame: bytes, *, catch_up: bool = False, wire: bytes | None = None) -> None:
        """Queue one text frame without waiting (slow peers are dropped, not awaited).

        ``catch_up`` frames (a subscription's snapshot or replayed history, bounded
        by the history's length) may exceed the peer's buffer limit once.  ``wire``
        is the frame already framed (:func:`~app.ws.connection.text_frame`), shared
        by every subscriber of a live event."""


@dataclass(slots=True)
class FollowResult:
    job_ids: list[str] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)
    recovered: dict[str, bool] = field(default_factory=dict)
    limit_exceeded: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class _CatchUp:
    """What one new subscription is sent once it is acknowledged."""

    job_id: str
    snapshot: ProgressEvent
    recovered: bool | None
    """None without ``since``; True: replay ``history`` after ``since``; False: the snapshot."""
    since: int = -1
    history: list[ProgressEvent] = field(default_factory=list)


class Hub:
    """Routes Redis events to this process's connections with the delivery guarantees."""

    def __init__(
        self,
        snapshots: SnapshotLoader,
        history: HistoryReader,
        redis_factory: Callable[[], Redis],
        *,
        metrics: WsMetrics,
        max_subscriptions: int = MAX_SUBSCRIPTIONS,
    ) -> None:
        self.snapshots = snapshots
        self.history = history
        self.metrics = metrics
        self._max_subscriptions = max_subscriptions
        self._jobs: dict[str, set[Peer]] = {}
        self.subscription_count = 0
        """Job subscriptions over all local connections (the gauge's value, as an int)."""
        self._repairs: set[asyncio.Task[None]] = set()
        self.bus = ChannelBus(redis_factory, self._on_message, self._resync, metrics=metrics)
        self.notifications = Notifications(self.bus, metrics=metrics)

    async def start(self) -> None:
        await self.bus.start()

    async def close(self) -> None:
        for task in list(self._repairs):
            task.cancel()
        await self.bus.close()

    @property
    def healthy(self) -> bool:
        return self.bus.connected

    @property
    def jobs_followed(self) -> int:
        """Distinct jobs with at least one local subscriber."""
        return len(self._jobs)

    # -- progress subscriptions --

    async def follow(
        self,
        peer: Peer,
        owner_id: str | None,
        job_ids: list[str],
        since: Mapping[str, int] | None,
        *,
        on_ready: Callable[[FollowResult], None] | None = None,
    ) -> FollowResult:
        """Subscribe ``peer`` to its owner's ``job_ids`` and send each job's catch-up.

        ``on_ready`` is called with the outcome (which jobs are followed, which
        are unknown, which resumes recovered) just before the catch-up events
        are pushed, so an acknowledgement can precede them.
        """
        result = FollowResult()
        since = since or {}
        new = self._claim(peer, job_ids, result)
        snapshots, histories = await self._read_state(peer, owner_id, new, since)
        # No await from here on: the feeds cannot change under us.
        plans = [
            self._plan(
                peer, job_id, snapshots.get(job_id), since=since, histories=histories, result=result
            )
            for job_id in new
        ]
        if on_ready is not None:
            on_ready(result)
        for plan in plans:
            if plan is not None:
                self._send_catch_up(peer, plan)
        return result

    def _claim(self, peer: Peer, job_ids: list[str], result: FollowResult) -> list[str]:
        """Give ``peer`` a syncing feed for each job it may newly follow; return those jobs."""
        new: list[str] = []
        for job_id in dict.fromkeys(job_ids):
            if job_id in peer.feeds:
                result.job_ids.append(job_id)  # already following: idempotent
            elif not valid_job_id(job_id):
                result.not_found.append(job_id)
            elif len(peer.feeds) >= self._max_subscriptions:
                result.limit_exceeded.append(job_id)
            else:
                new.append(job_id)
                peer.feeds[job_id] = JobFeed(job_id)
                self._jobs.setdefault(job_id, set()).add(peer)
        if new:
            self.subscription_count += len(new)
            self.metrics.subscriptions.inc(len(new))
        return new

    async def _read_state(
        self, peer: Peer, owner_id: str | None, new: list[str], since: Mapping[str, int]
    ) -> tuple[dict[str, ProgressEvent], dict[str, History]]:
        """Listen first, so that nothing published from here on is missed; then read
        the owner's snapshots (the ownership check) and the resumes' histories."""
        if not new:
            return {}, {}
        try:
            await self.bus.add([job_channel(j) for j in new])
            snapshots = await self.snapshots.owned(new, owner_id)
            resuming = {j: since[j] for j in new if j in since and j in snapshots}
            return snapshots, await self.history.after(resuming)
        except BaseException:
            self.unfollow(peer, new)
            raise

    def _plan(
        self,
        peer: Peer,
        job_id: str,
        snapshot: ProgressEvent | None,
        *,
        since: Mapping[str, int],
        histories: Mapping[str, History],
        result: FollowResult,
    ) -> _CatchUp | None:
        """Decide a new subscription's catch-up (None: the job is unknown or foreign)."""
        if snapshot is None:
            result.not_found.append(job_id)
            self.unfollow(peer, [job_id])
            return None
        result.job_ids.append(job_id)
        if job_id not in since:
            return _CatchUp(job_id, snapshot, None)
        history, reached_back = histories[job_id]
        feed = peer.feeds[job_id]
        recovered = can_resume(feed, snapshot, since[job_id], history, reached_back=reached_back)
        result.recovered[job_id] = recovered
        self.metrics.recoveries.labels(recovered=str(recovered).lower()).inc()
        return _CatchUp(job_id, snapshot, recovered, since[job_id], history)

    def _send_catch_up(self, peer: Peer, plan: _CatchUp) -> None:
        feed = peer.feeds[plan.job_id]
        if plan.recovered:
            self._deliver(peer, feed.catch_up(plan.history, floor=plan.since))
        else:
            self._deliver_snapshot(peer, feed, plan.snapshot, plan.recovered)
        self._finish_if_done(peer, plan.job_id)

    def unfollow(self, peer: Peer, job_ids: Iterable[str]) -> list[str]:
        removed: list[str] = []
        gone_channels: list[str] = []
        for job_id in job_ids:
            if peer.feeds.pop(job_id, None) is None:
                continue
            removed.append(job_id)
            peers = self._jobs.get(job_id)
            if peers is not None:
                peers.discard(peer)
                if not peers:
                    del self._jobs[job_id]
                    gone_channels.append(job_channel(job_id))
        if removed:
            self.subscription_count -= len(removed)
            self.metrics.subscriptions.dec(len(removed))
        if gone_channels:
            self.bus.remove(gone_channels)
        return removed

    def drop(self, peer: Peer) -> None:
        """Forget a closed connection."""
        self.unfollow(peer, list(peer.feeds))

    # -- dispatch --

    def _on_message(self, channel: str, payload: bytes) -> None:
        if channel.startswith(_JOB_PREFIX):
            self._on_job_event(channel[len(_JOB_PREFIX) :], payload)
        elif channel.startswith(_USER_PREFIX):
            self.notifications.on_user_event(channel[len(_USER_PREFIX) :], payload)
        elif channel == SYSTEM_CHANNEL:
            self.notifications.on_system(payload)

    def _on_job_event(self, job_id: str, payload: bytes) -> None:
        peers = self._jobs.get(job_id)
        if not peers:
            return
        try:
            event = decode_event(payload)
        except msgspec.MsgspecError:
            log.warning("undecodable_event", job_id=job_id)
            return
        frame: bytes | None = None
        wire = b""
        sent = 0
        for peer in list(peers):
            feed = peer.feeds.get(job_id)
            if feed is None:
                continue
            verdict = feed.offer(event)
            if verdict is Offer.SEND:
                if frame is None:  # encoded and framed once per event, not per subscriber
                    frame = progress_frame(job_id, payload)
                    wire = text_frame(frame)
                peer.push(frame, wire=wire)
                sent += 1
                self._finish_if_done(peer, job_id)
            elif verdict is Offer.GAP:
                self._spawn_repair(peer, feed)
        if sent:
            self.metrics.sent(sent)

    # -- catch-up --

    def _deliver(
        self,
        peer: Peer,
        events: list[ProgressEvent],
        snapshot: ProgressEvent | None = None,
        recovered: bool | None = None,
    ) -> None:
        for event in events:
            if event is snapshot:
                message = JobProgress(
                    job_id=event.job_id, data=event, snapshot=True, recovered=recovered
                )
            else:
                message = JobProgress(job_id=event.job_id, data=event)
            peer.push(encode(message), catch_up=True)
        self.metrics.sent(len(events))

    def _deliver_snapshot(
        self, peer: Peer, feed: JobFeed, snapshot: ProgressEvent, recovered: bool | None
    ) -> None:
        # Live events buffered meanwhile and not newer than the snapshot are dropped:
        # the snapshot already contains them.
        self._deliver(peer, feed.catch_up([snapshot], floor=snapshot.seq - 1), snapshot, recovered)

    def _finish_if_done(self, peer: Peer, job_id: str) -> None:
        feed = peer.feeds.get(job_id)
        if feed is not None and feed.done:
            self.unfollow(peer, [job_id])

    def _spawn_repair(self, peer: Peer, feed: JobFeed) -> None:
        self.metrics.gap_repairs.inc()
        task = asyncio.create_task(self._repair(peer, feed))
        self._repairs.add(task)
        task.add_done_callback(self._repairs.discard)

    async def _repair(self, peer: Peer, feed: JobFeed) -> None:
        history: list[ProgressEvent] = []
        try:
            history, _ = (await self.history.after({feed.job_id: feed.last_seq}))[feed.job_id]
        except (RedisError, OSError):
            log.warning("gap_repair_failed", job_id=feed.job_id, exc_info=True)
        if peer.feeds.get(feed.job_id) is not feed:
            return  # unsubscribed meanwhile
        self._deliver(peer, feed.catch_up(history))
        self._finish_if_done(peer, feed.job_id)

    async def _resync(self) -> None:
        """After a pub/sub reconnect: replay what every live feed may have missed."""
        by_job = self._hold_live_feeds()
        if not by_job:
            return
        floors = {j: min(f.last_seq for _, f in pairs) for j, pairs in by_job.items()}
        try:
            histories = await self.history.after(floors)
        except (RedisError, OSError):
            histories = {j: ([], False) for j in floors}
        stale = [
            j
            for j, (h, reached) in histories.items()
            if not covers(h, floors[j], reached_back=reached)
        ]
        snapshots: dict[str, ProgressEvent] = {}
        try:
            snapshots = await self.snapshots.load(stale) if stale else {}
        except Exception:  # release the feeds anyway; the next event carries the state
            log.warning("resync_snapshots_failed", jobs=len(stale), exc_info=True)
        for job_id, pairs in by_job.items():
            history, _ = histories[job_id]
            for peer, feed in pairs:
                if peer.feeds.get(job_id) is not feed:
                    continue
                snapshot = snapshots.get(job_id)
                if snapshot is not None and snapshot.seq > feed.last_seq:
                    self._deliver_snapshot(peer, feed, snapshot, recovered=False)
                else:
                    self._deliver(peer, feed.catch_up(history))
                self._finish_if_done(peer, job_id)
        log.info("resynced_after_reconnect", jobs=len(by_job))

    def _hold_live_feeds(self) -> dict[str, list[tuple[Peer, JobFeed]]]:
        """Put every feed that is not already catching up back to syncing, by job."""
        by_job: dict[str, list[tuple[Peer, JobFeed]]] = {}
        for job_id, peers in self._jobs.items():
            for peer in peers:
                feed = peer.feeds.get(job_id)
                if feed is not None and not feed.syncing:
                    feed.syncing = True
                    by_job.setdefault(job_id, []).append((peer, feed))
        return by_job
