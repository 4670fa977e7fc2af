"""Per-subscriber delivery of one job's events, without any I/O.

:class:`JobFeed` merges what a subscriber reads at subscribe time (the job's
table snapshot, or its history stream for a resume) with the live events that
arrive meanwhile, by ``seq``: no duplicate, no step backwards, exactly one
terminal event.  :func:`can_resume` decides whether a resume can replay every
missed event or must fall back to the snapshot.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum

from app.jobs.model import ProgressEvent


class Offer(Enum):
    SEND = "send"
    """Deliver the event now."""
    DROP = "drop"
    """Duplicate, stale, after the terminal event, or buffered while catching up."""
    GAP = "gap"
    """Events are missing before this one: the feed is catching up again and
    the caller must read the history after :attr:`JobFeed.last_seq` and call
    :meth:`JobFeed.catch_up`."""


class JobFeed:
    """One subscriber's delivery state for one job.

    Starts *syncing*: live events are buffered while the subscriber's history
    (or snapshot) is read.  :meth:`catch_up` merges that history with the
    buffer by ``seq``, drops duplicates and returns what to send; afterwards
    :meth:`offer` decides for each live event.  ``seq`` never goes backwards
    and at most one terminal event is let through, after which the feed is
    :attr:`done`.
    """

    __slots__ = ("done", "job_id", "last_seq", "pending", "syncing")

    def __init__(self, job_id: str, last_seq: int = -1) -> None:
        self.job_id = job_id
        self.last_seq = last_seq
        self.syncing = True
        self.pending: list[ProgressEvent] = []
        self.done = False

    def offer(self, event: ProgressEvent) -> Offer:
        if self.done:
            return Offer.DROP
        if self.syncing:
            self.pending.append(event)
            return Offer.DROP
        if event.seq <= self.last_seq:
            return Offer.DROP
        if event.seq > self.last_seq + 1 and self.last_seq >= 0:
            self.syncing = True
            self.pending.append(event)
            return Offer.GAP
        self._advance(event)
        return Offer.SEND

    def catch_up(
        self, history: Iterable[ProgressEvent], *, floor: int | None = None
    ) -> list[ProgressEvent]:
        """Merge ``history`` with the buffered live events; return them in order.

        Events at or below ``floor`` (default: the last delivered ``seq``) are
        dropped; so is anything after a terminal event.
        """
        if floor is not None:
            self.last_seq = max(self.last_seq, floor)
        merged = sorted([*history, *self.pending], key=lambda e: e.seq)
        self.pending = []
        self.syncing = False
        out: list[ProgressEvent] = []
        for event in merged:
            if self.done:
                break
            if event.seq > self.last_seq:
                self._advance(event)
                out.append(event)
        return out

    def _advance(self, event: ProgressEvent) -> None:
        self.last_seq = event.seq
        if event.terminal:
            self.done = True


def merge_by_seq(events: Iterable[ProgressEvent]) -> list[ProgressEvent]:
    """Events sorted by ``seq`` with duplicates removed."""
    by_seq = {e.seq: e for e in events}
    return [by_seq[s] for s in sorted(by_seq)]


def covers(events: list[ProgressEvent], since: int, *, reached_back: bool) -> bool:
    """Whether ``events`` (sorted, unique, all with seq > since) hold every event after ``since``.

    ``reached_back`` says the history they were read from also holds an event
    at or before ``since``, i.e. nothing was trimmed before the first of them.
    """
    expected = since + 1
    for event in events:
        if event.seq != expected:
            return False
        expected += 1
    return reached_back or (bool(events) and events[0].seq == since + 1)


def can_resume(
    feed: JobFeed,
    snapshot: ProgressEvent,
    since: int,
    history: list[ProgressEvent],
    *,
    reached_back: bool,
) -> bool:
    """Whether the history plus the feed's live buffer hold every event after ``since``."""
    merged = merge_by_seq([*history, *(e for e in feed.pending if e.seq > since)])
    if not merged and since == snapshot.seq:
        return True  # already up to date; an empty or lost history does not matter
    return covers(merged, since, reached_back=reached_back)
