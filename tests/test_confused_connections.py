"""A confused asyncpg connection is ridden a bounded number of times, never forever.

After a Postgres restart a pooled connection can be left mid-protocol, and the
next use raises ``InternalClientError: cannot switch to state`` or
``InterfaceError: another operation is in progress`` -- which cost a job one of
its attempts in the three-outage test under load.  The same errors also mean a
bug (two queries at once on one connection), so a worker waits them out like an
outage at most ``CONFUSED_CONNECTION_RIDES`` times per attempt; a bug that
repeats then fails the attempt instead of looping until the processing timeout.
The errors below come from a real connection misused on purpose.
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from app.core.outage import is_confused_connection, is_database_outage
from app.core.settings import Settings
from workers.outages import CONFUSED_CONNECTION_RIDES, DatabaseRides


async def _confusion(dsn: str) -> BaseException:
    """The error asyncpg raises for a second query while one is in flight."""
    conn = await asyncpg.connect(dsn)
    try:
        slow = asyncio.create_task(conn.fetchval("SELECT pg_sleep(0.3)"))
        await asyncio.sleep(0.05)
        with pytest.raises(asyncpg.InterfaceError) as caught:
            await conn.fetchval("SELECT 1")
        await slow
        return caught.value
    finally:
        await conn.close()


async def test_a_confused_connection_is_ridden_a_bounded_number_of_times(
    migrated: Settings,
) -> None:
    exc = await _confusion(migrated.database_url.reveal())
    assert "another operation is in progress" in str(exc)
    assert is_confused_connection(exc)
    assert not is_database_outage(exc)  # no licence to wait forever

    rides = DatabaseRides()
    assert [rides.rides(exc) for _ in range(CONFUSED_CONNECTION_RIDES + 2)] == [True] * (
        CONFUSED_CONNECTION_RIDES
    ) + [False, False]


async def test_a_wrapped_confusion_counts_and_other_errors_do_not(migrated: Settings) -> None:
    confused = await _confusion(migrated.database_url.reveal())
    try:
        raise RuntimeError("the stage failed") from confused
    except RuntimeError as wrapped:
        assert is_confused_connection(wrapped)

    conn = await asyncpg.connect(migrated.database_url.reveal())
    try:
        with pytest.raises(asyncpg.PostgresError) as syntax:
            await conn.fetchval("SELEC 1")
    finally:
        await conn.close()
    assert not is_confused_connection(syntax.value)
    assert not DatabaseRides().rides(syntax.value)
    assert not DatabaseRides().rides(ValueError("cannot switch to state"))
