"""Per-process fan-out: one Redis pub/sub connection, many local subscribers.

:class:`ChannelBus` owns the process's single pub/sub connection.  Channels
are subscribed while some local connection needs them (``sluice:job:{id}``
for progress subscribers, ``sluice:user:{id}`` and ``sluice:system`` for
/notifications) and :meth:`ChannelBus.add` returns only once Redis has
confirmed the subscription, so nothing published afterwards can be missed.
If the connection drops it reconnects, re-subscribes and asks the hub to
resynchronise, because pub/sub is at-most-once.

:class:`Hub` implements the delivery guarantees on top of it:

* subscribe = SUBSCRIBE (confirmed) -> read the jobs table snapshot (also the
  ownership check) and, for ``since``, the job's capped history stream ->
  merge with whatever arrived live meanwhile (:class:`~app.ws.protocol.JobFeed`);
* live events are decoded once per process and encoded once per job, then
  pushed to each subscriber whose feed accepts them;
* a gap in ``seq`` (a lost pub/sub message) is repaired from the history;
* after its terminal event a job's subscription ends by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncpg
import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from app.core.errors import ServiceUnavailable
from app.core.logging import get_logger
from app.jobs.events import decode_event, job_channel, stream_key, user_channel
from app.jobs.model import ProgressEvent
from app.jobs.transitions import event_from_row
from app.ws.protocol import (
    SYSTEM_CHANNEL,
    JobFeed,
    JobProgress,
    Notification,
    Offer,
    covers,
    decode_system_notice,
    encode,
    merge_by_seq,
    progress_frame,
)

log = get_logger(__name__)

_JOB_PREFIX = "sluice:job:"
_USER_PREFIX = "sluice:user:"
HISTORY_PAGE = 100
SUBSCRIBE_TIMEOUT = 5.0


class Metrics:
    """The server's Prometheus series, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.connections = Gauge(
            "sluice_ws_connections",
            "Open WebSocket connections",
            ["endpoint"],
            registry=self.registry,
        )
        self.subscriptions = Gauge(
            "sluice_ws_subscriptions",
            "Job subscriptions held by local connections",
            registry=self.registry,
        )
        self.channels = Gauge(
            "sluice_ws_redis_channels",
            "Redis pub/sub channels this process listens to",
            registry=self.registry,
        )
        self.messages_sent = Counter(
            "sluice_ws_messages_sent", "Messages queued to clients", registry=self.registry
        )
        self.events_received = Counter(
            "sluice_ws_events_received",
            "Pub/sub messages received from Redis",
            registry=self.registry,
        )
        self.drops = Counter(
            "sluice_ws_drops",
            "Connections dropped by the server, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.recoveries = Counter(
            "sluice_ws_resumes",
            "Subscriptions with 'since', by outcome",
            ["recovered"],
            registry=self.registry,
        )
        self.gap_repairs = Counter(
            "sluice_ws_gap_repairs",
            "Live seq gaps repaired from the history stream",
            registry=self.registry,
        )
        self.redis_reconnects = Counter(
            "sluice_ws_redis_reconnects",
            "Pub/sub connection re-establishments",
            registry=self.registry,
        )
        for endpoint in ("progress", "notifications"):  # export zeros from the start
            self.connections.labels(endpoint=endpoint)
        self.drops.labels(reason="slow_consumer")


class Peer(Protocol):
    """What the hub needs from a connection."""

    feeds: dict[str, JobFeed]

    def push(self, frame: bytes, *, catch_up: bool = False) -> None:
        """Queue one text frame without waiting (slow peers are dropped, not awaited).

        ``catch_up`` frames (a subscription's snapshot or replayed history, bounded
        by the history's length) may exceed the peer's buffer limit once."""


# --- the pub/sub connection ---------------------------------------------------------------


class ChannelBus:
    """The process's one Redis pub/sub connection, with confirmed subscriptions."""

    def __init__(
        self,
        redis_factory: Callable[[], Redis],
        on_message: Callable[[str, bytes], None],
        on_resubscribed: Callable[[], Awaitable[None]],
        *,
        metrics: Metrics,
        keepalive: float = 10.0,
    ) -> None:
        self._factory = redis_factory
        self._on_message = on_message
        self._on_resubscribed = on_resubscribed
        self._metrics = metrics
        self._keepalive = keepalive
        self._wanted: set[str] = set()
        self._confirmed: set[str] = set()
        self._outstanding: dict[str, int] = {}
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._redis: Redis | None = None
        self._pubsub: PubSub | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        self._delay = 0.1
        self.connected = False

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ws-pubsub")
        try:
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
                await self._ready.wait()
        except TimeoutError:
            raise ServiceUnavailable(
                "redis pub/sub is unreachable", code="redis_unavailable"
            ) from None

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._background):
            task.cancel()
        await self._disconnect()

    async def add(self, channels: Iterable[str]) -> None:
        """Subscribe (if not already) and wait until Redis confirms every channel."""
        channels = list(channels)
        new = [c for c in dict.fromkeys(channels) if c not in self._wanted]
        self._wanted.update(new)
        self._metrics.channels.set(len(self._wanted))
        waits = [
            self._waiter(c) for c in self._wanted.intersection(channels) if c not in self._confirmed
        ]
        if new and self.connected:
            await self._send("SUBSCRIBE", new)
        if waits:
            try:
                async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
                    await asyncio.gather(*waits)
            except TimeoutError:
                raise ServiceUnavailable(
                    "subscription was not confirmed by redis", code="redis_unavailable"
                ) from None

    def remove(self, channels: Iterable[str]) -> None:
        gone = [c for c in channels if c in self._wanted]
        if not gone:
            return
        self._wanted.difference_update(gone)
        self._confirmed.difference_update(gone)
        self._metrics.channels.set(len(self._wanted))
        if self.connected:
            self._spawn(self._send("UNSUBSCRIBE", gone))

    def _waiter(self, channel: str) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(channel, []).append(fut)
        return fut

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send(self, command: str, channels: list[str]) -> None:
        pubsub = self._pubsub
        if pubsub is None:
            return
        if command == "SUBSCRIBE":
            for c in channels:
                self._outstanding[c] = self._outstanding.get(c, 0) + 1
        try:
            await pubsub.execute_command(command, *channels)
        except (RedisError, OSError):
            log.warning("pubsub_command_failed", command=command, exc_info=True)

    async def _disconnect(self) -> None:
        pubsub, redis = self._pubsub, self._redis
        self._pubsub = self._redis = None
        self.connected = False
        with contextlib.suppress(Exception):
            if pubsub is not None:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
        with contextlib.suppress(Exception):
            if redis is not None:
                await redis.aclose()

    async def _run(self) -> None:
        first = True
        while True:
            try:
                await self._session(first)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("pubsub_disconnected", error=repr(exc), retry_in=self._delay)
            await self._disconnect()
            first = False
            await asyncio.sleep(self._delay)
            self._delay = min(self._delay * 2, 5.0)

    async def _session(self, first: bool) -> None:
        self._redis = self._factory()
        self._pubsub = self._redis.pubsub()
        await self._pubsub.connect()  # type: ignore[no-untyped-call]
        self._outstanding.clear()
        self._confirmed.clear()
        self.connected = True
        self._delay = 0.1
        if self._wanted:
            await self._send("SUBSCRIBE", sorted(self._wanted))
        if not first:
            self._metrics.redis_reconnects.inc()
            self._spawn(self._resubscribed(list(self._wanted)))
        self._ready.set()
        log.info("pubsub_connected", channels=len(self._wanted))
        last_seen = time.monotonic()
        pubsub = self._pubsub
        while True:
            response = await pubsub.parse_response(block=False, timeout=self._keepalive)
            now = time.monotonic()
            if response is None:
                if now - last_seen > 3 * self._keepalive:
                    raise ConnectionError("redis pub/sub keepalive timed out")
                await pubsub.execute_command("PING")
                continue
            last_seen = now
            self._handle(response)

    def _handle(self, response: Any) -> None:
        if isinstance(response, bytes):  # PONG outside subscribed mode
            return
        kind = response[0]
        if kind == b"message":
            self._metrics.events_received.inc()
            try:
                self._on_message(response[1].decode(), response[2])
            except Exception:
                log.exception("pubsub_dispatch_failed")
        elif kind == b"subscribe":
            channel = response[1].decode()
            left = self._outstanding.get(channel, 1) - 1
            if left > 0:
                self._outstanding[channel] = left
                return
            self._outstanding.pop(channel, None)
            if channel in self._wanted:
                self._confirmed.add(channel)
            for fut in self._waiters.pop(channel, []):
                if not fut.done():
                    fut.set_result(None)

    async def _resubscribed(self, channels: list[str]) -> None:
        try:
            await self.add(channels)
        except ServiceUnavailable:
            return  # the next reconnect will try again
        await self._on_resubscribed()


# --- the hub ------------------------------------------------------------------------------


@dataclass(slots=True)
class FollowResult:
    job_ids: list[str] = field(default_factory=list)
    not_found: list[str] = field(default_factory=list)
    recovered: dict[str, bool] = field(default_factory=dict)
    limit_exceeded: list[str] = field(default_factory=list)


_SNAPSHOTS_SQL = """
    SELECT id::text AS job_id, seq, status, stage, stage_progress, overall_progress, message,
           extract(epoch FROM updated_at)::float8 AS ts, owner_id, document_id::text AS document_id,
           error_code, error_message
    FROM jobs WHERE id = ANY($1::uuid[])
"""


class SnapshotLoader:
    """Reads job snapshots, coalescing concurrent requests into few queries.

    When thousands of clients (re)subscribe at once -- after a deploy, say --
    each would cost a round trip; instead requests that arrive while
    ``max_inflight`` queries are running wait and go out together in the next
    one.  A request only ever joins a query that has not started yet, so a
    snapshot is always read after the caller's pub/sub subscription.
    """

    def __init__(self, db: asyncpg.Pool, *, max_inflight: int = 2, max_batch: int = 2000) -> None:
        self._db = db
        self._max_inflight = max_inflight
        self._max_batch = max_batch
        self._pending: dict[str, asyncio.Future[ProgressEvent | None]] = {}
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.queries = 0

    async def load(self, job_ids: Iterable[str]) -> dict[str, ProgressEvent]:
        """Current snapshots of the existing ``job_ids`` (any owner)."""
        loop = asyncio.get_running_loop()
        wanted: dict[str, asyncio.Future[ProgressEvent | None]] = {}
        for job_id in job_ids:
            fut = self._pending.get(job_id)
            if fut is None:
                fut = self._pending[job_id] = loop.create_future()
            wanted[job_id] = fut
        self._kick()
        if not wanted:
            return {}
        await asyncio.wait(wanted.values())
        out: dict[str, ProgressEvent] = {}
        for job_id, fut in wanted.items():
            snapshot = fut.result()
            if snapshot is not None:
                out[job_id] = snapshot
        return out

    def _kick(self) -> None:
        while self._pending and self._inflight < self._max_inflight:
            ids = list(self._pending)[: self._max_batch]
            batch = {job_id: self._pending.pop(job_id) for job_id in ids}
            self._inflight += 1
            task = asyncio.create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: dict[str, asyncio.Future[ProgressEvent | None]]) -> None:
        self.queries += 1
        try:
            rows = await self._db.fetch(_SNAPSHOTS_SQL, list(batch))
        except Exception as exc:
            for fut in batch.values():
                if not fut.done():
                    fut.set_exception(exc)
        except BaseException:
            for fut in batch.values():
                fut.cancel()
            raise
        else:
            found = {row["job_id"]: event_from_row(row) for row in rows}
            for job_id, fut in batch.items():
                if not fut.done():
                    fut.set_result(found.get(job_id))
        finally:
            self._inflight -= 1
            self._kick()


def _valid_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


class Hub:
    """Routes Redis events to this process's connections with the delivery guarantees."""

    def __init__(
        self,
        db: asyncpg.Pool,
        redis: Redis,
        redis_factory: Callable[[], Redis],
        *,
        metrics: Metrics | None = None,
        max_subscriptions: int = 1000,
    ) -> None:
        self._redis = redis
        self.metrics = metrics or Metrics()
        self._max_subscriptions = max_subscriptions
        self._jobs: dict[str, set[Peer]] = {}
        self._users: dict[str, set[Peer]] = {}
        self._system: set[Peer] = set()
        self._repairs: set[asyncio.Task[None]] = set()
        self.snapshots = SnapshotLoader(db)
        self.bus = ChannelBus(redis_factory, self._on_message, self._resync, metrics=self.metrics)

    async def start(self) -> None:
        await self.bus.start()

    async def close(self) -> None:
        for task in list(self._repairs):
            task.cancel()
        await self.bus.close()

    @property
    def healthy(self) -> bool:
        return self.bus.connected

    # -- progress subscriptions --

    async def follow(
        self,
        peer: Peer,
        owner_id: str,
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
        new: list[str] = []
        for job_id in dict.fromkeys(job_ids):
            if job_id in peer.feeds:
                result.job_ids.append(job_id)  # already following: idempotent
            elif not _valid_uuid(job_id):
                result.not_found.append(job_id)
            elif len(peer.feeds) >= self._max_subscriptions:
                result.limit_exceeded.append(job_id)
            else:
                new.append(job_id)
                peer.feeds[job_id] = JobFeed(job_id)
                self._jobs.setdefault(job_id, set()).add(peer)
        snapshots: dict[str, ProgressEvent] = {}
        histories: dict[str, tuple[list[ProgressEvent], bool]] = {}
        if new:
            self.metrics.subscriptions.inc(len(new))
            try:
                # 1. listen first, so that nothing published from here on is missed...
                await self.bus.add([job_channel(j) for j in new])
                # 2. ...then read the state (the ownership check too) and the history.
                snapshots = await self._snapshots(new, owner_id)
                resuming = [j for j in new if j in since and j in snapshots]
                histories = await self._histories({j: since[j] for j in resuming})
            except BaseException:
                self.unfollow(peer, new)
                raise
        # No await from here on: the feeds cannot change under us.
        plans: list[tuple[str, ProgressEvent, bool | None]] = []
        for job_id in new:
            snapshot = snapshots.get(job_id)
            if snapshot is None:
                result.not_found.append(job_id)
                self.unfollow(peer, [job_id])
                continue
            result.job_ids.append(job_id)
            recovered: bool | None = None
            if job_id in since:
                history, reached_back = histories[job_id]
                recovered = self._can_resume(
                    peer.feeds[job_id], snapshot, since[job_id], history, reached_back
                )
                result.recovered[job_id] = recovered
                self.metrics.recoveries.labels(recovered=str(recovered).lower()).inc()
            plans.append((job_id, snapshot, recovered))
        if on_ready is not None:
            on_ready(result)
        for job_id, snapshot, recovered in plans:
            feed = peer.feeds[job_id]
            if recovered:
                history, _ = histories[job_id]
                self._deliver(peer, feed.catch_up(history, floor=since[job_id]))
            else:
                self._deliver_snapshot(peer, feed, snapshot, recovered)
            self._finish_if_done(peer, job_id)
        return result

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
            self.metrics.subscriptions.dec(len(removed))
        if gone_channels:
            self.bus.remove(gone_channels)
        return removed

    def drop(self, peer: Peer) -> None:
        """Forget a closed connection."""
        self.unfollow(peer, list(peer.feeds))

    # -- notifications --

    async def listen_notifications(self, peer: Peer, user_id: str) -> None:
        self._users.setdefault(user_id, set()).add(peer)
        self._system.add(peer)
        await self.bus.add([user_channel(user_id), SYSTEM_CHANNEL])

    def stop_notifications(self, peer: Peer, user_id: str) -> None:
        self._system.discard(peer)
        peers = self._users.get(user_id)
        if peers is not None:
            peers.discard(peer)
            if not peers:
                del self._users[user_id]
                self.bus.remove([user_channel(user_id)])
        if not self._system:
            self.bus.remove([SYSTEM_CHANNEL])

    # -- dispatch --

    def _on_message(self, channel: str, payload: bytes) -> None:
        if channel.startswith(_JOB_PREFIX):
            self._on_job_event(channel[len(_JOB_PREFIX) :], payload)
        elif channel.startswith(_USER_PREFIX):
            self._on_user_event(channel[len(_USER_PREFIX) :], payload)
        elif channel == SYSTEM_CHANNEL:
            self._on_system(payload)

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
        sent = 0
        for peer in list(peers):
            feed = peer.feeds.get(job_id)
            if feed is None:
                continue
            verdict = feed.offer(event)
            if verdict is Offer.SEND:
                if frame is None:
                    frame = progress_frame(job_id, payload)
                peer.push(frame)
                sent += 1
                self._finish_if_done(peer, job_id)
            elif verdict is Offer.GAP:
                self._spawn_repair(peer, feed)
        if sent:
            self.metrics.messages_sent.inc(sent)

    def _on_user_event(self, user_id: str, payload: bytes) -> None:
        peers = self._users.get(user_id)
        if not peers:
            return
        try:
            event = decode_event(payload)
        except msgspec.MsgspecError:
            return
        frame = encode(
            Notification(kind=f"job_{event.status}", job_id=event.job_id, data=msgspec.Raw(payload))
        )
        for peer in list(peers):
            peer.push(frame)
        self.metrics.messages_sent.inc(len(peers))

    def _on_system(self, payload: bytes) -> None:
        try:
            notice = decode_system_notice(payload)
        except msgspec.MsgspecError:
            log.warning("undecodable_system_notice")
            return
        frame = encode(Notification(kind="system", message=notice.message, level=notice.level))
        for peer in list(self._system):
            peer.push(frame)
        self.metrics.messages_sent.inc(len(self._system))

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
        self.metrics.messages_sent.inc(len(events))

    def _deliver_snapshot(
        self, peer: Peer, feed: JobFeed, snapshot: ProgressEvent, recovered: bool | None
    ) -> None:
        # Live events buffered meanwhile and not newer than the snapshot are dropped:
        # the snapshot already contains them.
        self._deliver(peer, feed.catch_up([snapshot], floor=snapshot.seq - 1), snapshot, recovered)

    @staticmethod
    def _can_resume(
        feed: JobFeed,
        snapshot: ProgressEvent,
        since: int,
        history: list[ProgressEvent],
        reached_back: bool,
    ) -> bool:
        """Whether the history plus the live buffer hold every event after ``since``."""
        merged = merge_by_seq([*history, *(e for e in feed.pending if e.seq > since)])
        if not merged and since == snapshot.seq:
            return True  # already up to date; an empty or lost history does not matter
        return covers(merged, since, reached_back=reached_back)

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
            history, _ = (await self._histories({feed.job_id: feed.last_seq}))[feed.job_id]
        except (RedisError, OSError):
            log.warning("gap_repair_failed", job_id=feed.job_id, exc_info=True)
        if peer.feeds.get(feed.job_id) is not feed:
            return  # unsubscribed meanwhile
        self._deliver(peer, feed.catch_up(history))
        self._finish_if_done(peer, feed.job_id)

    async def _resync(self) -> None:
        """After a pub/sub reconnect: replay what every live feed may have missed."""
        by_job: dict[str, list[tuple[Peer, JobFeed]]] = {}
        for job_id, peers in self._jobs.items():
            for peer in peers:
                feed = peer.feeds.get(job_id)
                if feed is not None and not feed.syncing:
                    feed.syncing = True
                    by_job.setdefault(job_id, []).append((peer, feed))
        if not by_job:
            return
        floors = {j: min(f.last_seq for _, f in pairs) for j, pairs in by_job.items()}
        try:
            histories = await self._histories(floors)
        except (RedisError, OSError):
            histories = {j: ([], False) for j in floors}
        stale = [
            j
            for j, (h, reached) in histories.items()
            if not covers(h, floors[j], reached_back=reached)
        ]
        snapshots: dict[str, ProgressEvent] = {}
        try:
            snapshots = await self._snapshots_any_owner(stale) if stale else {}
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

    async def _snapshots(self, job_ids: list[str], owner_id: str) -> dict[str, ProgressEvent]:
        """The owner's jobs among ``job_ids``; foreign and unknown ones are left out alike."""
        found = await self.snapshots.load(job_ids)
        return {j: e for j, e in found.items() if e.owner_id == owner_id}

    async def _snapshots_any_owner(self, job_ids: list[str]) -> dict[str, ProgressEvent]:
        return await self.snapshots.load(job_ids)

    async def snapshot(self, job_id: str, owner_id: str) -> ProgressEvent | None:
        """The owner's job state, or None for unknown and foreign jobs alike."""
        if not _valid_uuid(job_id):
            return None
        return (await self._snapshots([job_id], owner_id)).get(job_id)

    async def _histories(
        self, floors: Mapping[str, int]
    ) -> dict[str, tuple[list[ProgressEvent], bool]]:
        """Per job, the stream's events with seq > floor (ascending) and whether
        the stream reaches back to the floor (holds an event at or before it)."""
        out: dict[str, tuple[list[ProgressEvent], bool]] = {}
        if not floors:
            return out
        jobs = list(floors)
        pipe = self._redis.pipeline(transaction=False)
        for job_id in jobs:
            pipe.xrevrange(stream_key(job_id), "+", "-", count=HISTORY_PAGE)
        pages = await pipe.execute()
        for job_id, page in zip(jobs, pages, strict=True):
            out[job_id] = await self._read_back(job_id, floors[job_id], page)
        return out

    async def _read_back(
        self, job_id: str, floor: int, page: list[tuple[bytes, dict[bytes, bytes]]]
    ) -> tuple[list[ProgressEvent], bool]:
        events: list[ProgressEvent] = []
        while page:
            for _entry_id, fields in page:
                try:
                    event = decode_event(fields[b"e"])
                except (KeyError, msgspec.MsgspecError):
                    continue
                if event.seq <= floor:
                    return merge_by_seq(events), True
                events.append(event)
            if len(page) < HISTORY_PAGE:
                break
            page = await self._redis.xrevrange(
                stream_key(job_id), f"({page[-1][0].decode()}", "-", count=HISTORY_PAGE
            )
        return merge_by_seq(events), False
