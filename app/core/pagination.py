"""Keyset pagination: every listing pages newest first, by ``(created_at, id)``.

The client passes back the ``next_cursor`` of the previous page, an opaque
encoding of its last item's ``(created_at, id)``
(:func:`~app.core.schemas.encode_cursor`); the next page holds the rows
strictly after that item in ``created_at DESC, id DESC`` order.  Keyset rather
than offset: a page costs the same wherever it is, and rows inserted meanwhile
never shift, skip or repeat the rows after the cursor.  A cursor that was not
issued by us is 400 ``invalid_cursor`` before any query runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import asyncpg

from app.core.db import Queryable
from app.core.schemas import decode_cursor, encode_cursor


@dataclass(slots=True)
class Where:
    """SQL conditions joined by ``AND``, their arguments numbered ``$1``... in order.

    ``Where().add("j.owner_id = {}", owner).add("j.status = {}", status)`` is
    ``j.owner_id = $1 AND j.status = $2`` with ``args == [owner, status]``.
    """

    conditions: list[str] = field(default_factory=list)
    args: list[Any] = field(default_factory=list)

    def add(self, condition: str, *values: Any) -> Where:
        """Add ``condition``; each ``{}`` in it binds the next of ``values``.

        A condition given values is a format string (write a literal brace
        twice); one without values is added as it is.
        """
        if values:
            first = len(self.args) + 1
            condition = condition.format(*(f"${first + i}" for i in range(len(values))))
            self.args.extend(values)
        self.conditions.append(condition)
        return self

    @property
    def sql(self) -> str:
        return " AND ".join(self.conditions) or "true"

    def copy(self) -> Where:
        return Where(list(self.conditions), list(self.args))


@dataclass(frozen=True, slots=True)
class Keyset:
    """What a listing is ordered by, as SQL and as the fields of its rows."""

    created: str = "created_at"
    """SQL expression of the creation time (``j.created_at``)."""
    id: str = "id"
    """SQL expression of the id, the tie-breaker (``j.id``)."""
    created_field: str = "created_at"
    """The selected field holding the creation time."""
    id_field: str = "id"
    """The selected field holding the id (``job_id`` when selected under that name)."""


@dataclass(frozen=True, slots=True)
class KeysetPage:
    rows: list[asyncpg.Record]
    next_cursor: str | None
    """The cursor of the page after this one; None on the last page."""


async def fetch_page(
    db: Queryable,
    select: str,
    where: Where,
    *,
    keyset: Keyset,
    cursor: str | None,
    limit: int,
) -> KeysetPage:
    """One page of ``select`` (the query up to its ``WHERE``) filtered by ``where``.

    At most ``limit`` rows, newest first, after the item ``cursor`` names
    (from the first row without one).  ``where`` is left as it was.
    """
    where = where.copy()
    if cursor:
        created, item_id = decode_cursor(cursor)
        where.add(f"({keyset.created}, {keyset.id}) < ({{}}, {{}})", created, item_id)
    rows = await db.fetch(
        f"{select} WHERE {where.sql} "
        f"ORDER BY {keyset.created} DESC, {keyset.id} DESC LIMIT ${len(where.args) + 1}",
        *where.args,
        limit + 1,
    )
    page = list(rows[:limit])
    next_cursor = None
    if len(rows) > limit:
        last = page[-1]
        next_cursor = encode_cursor(last[keyset.created_field], str(last[keyset.id_field]))
    return KeysetPage(page, next_cursor)
