"""Admission control that refuses before a body is read.

:class:`PartSlots` bounds the part uploads one user has in progress in this
gateway process (``MAX_PARTS_IN_FLIGHT_PER_USER``): a sibling of the rate
limiter, which bounds requests per minute across the fleet.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from starlette.requests import Request

from app.core.errors import RateLimited

PART_SLOT_RETRY_AFTER_SECONDS = 1


class PartSlots:
    """Part uploads in progress per user, in this gateway process.

    Invariant: a user holds at most ``limit`` slots; :meth:`hold` refuses the
    next one with 429 ``too_many_parts_in_flight`` (with ``Retry-After``) before
    anything is read, and releases its slot on every path (``finally``), so a
    failed, refused or abandoned part never leaks one.  Other users are unaffected.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: dict[str, int] = {}

    def in_flight(self, user_id: str) -> int:
        return self._held.get(user_id, 0)

    @contextlib.contextmanager
    def hold(self, user_id: str) -> Iterator[None]:
        held = self._held.get(user_id, 0)
        if held >= self.limit:
            raise RateLimited(
                f"at most {self.limit} parts may be uploaded at once; retry when one finishes",
                code="too_many_parts_in_flight",
                details={"limit": self.limit, "retry_after": PART_SLOT_RETRY_AFTER_SECONDS},
                headers={"Retry-After": str(PART_SLOT_RETRY_AFTER_SECONDS)},
            )
        self._held[user_id] = held + 1
        try:
            yield
        finally:
            left = self._held[user_id] - 1
            if left:
                self._held[user_id] = left
            else:
                del self._held[user_id]


def part_slots(request: Request) -> PartSlots:
    slots = request.app.state.part_slots
    assert isinstance(slots, PartSlots)
    return slots
