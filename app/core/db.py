"""PostgreSQL access: one asyncpg pool per process, owner-scoped lookups, and
the migration runner.

Every row a client names by id belongs to an owner.  :func:`parse_uuid` and
:func:`fetch_owned` make a malformed id, a missing row and another owner's row
the same 404 (:func:`missing`: ``{what}_not_found``), so an id never tells a
caller whether someone else's row exists.

Migrations are numbered plain-SQL files (``0001_init.sql``) applied in order.
Each runs in its own transaction and is recorded in ``schema_migrations`` with
its checksum; a Postgres advisory lock serialises concurrent runners, so two
processes starting at once apply each file exactly once.  Editing a migration
that was already applied is refused.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
from asyncpg.pool import PoolConnectionProxy

from app.core.errors import ConfigError, NotFound
from app.core.outage import is_database_outage, wait_until_reachable

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
_MIGRATION_LOCK_ID = 0x5_1_0_1_C_E  # any constant shared by every runner
_NAME_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

Queryable = asyncpg.Pool | asyncpg.Connection | PoolConnectionProxy
"""Anything with fetch/fetchrow/execute: a pool, a connection, or a pooled one."""

_json_encode = msgspec.json.Encoder().encode
_json_decode = msgspec.json.Decoder().decode


def missing(what: str) -> NotFound:
    """The one 404 for a ``what`` (``job``, ``document``, ``upload``...) the caller cannot see."""
    return NotFound(f"{what} not found", code=f"{what}_not_found")


def parse_uuid(value: str, *, not_found: str) -> uuid.UUID:
    """``value`` as a UUID; a malformed one is :func:`missing` (404).

    A malformed id cannot name a row, so it gets the answer a missing row gets.
    """
    try:
        return uuid.UUID(value)
    except ValueError:
        raise missing(not_found) from None


async def fetch_owned(
    db: Queryable,
    select: str,
    item_id: str,
    owner_id: str,
    *,
    not_found: str,
    for_update: bool = False,
    of: str | None = None,
) -> asyncpg.Record:
    """The row ``select`` finds for ``item_id`` owned by ``owner_id``, or a 404.

    ``select`` is a whole query but its locking clause; its WHERE binds the
    item's id as ``$1`` (a ``uuid``) and the owner as ``$2``.  With
    ``for_update`` the row stays locked until ``db``'s transaction ends
    (``FOR UPDATE``, or ``FOR UPDATE OF {of}`` to lock one table of a join).
    Malformed, unknown and foreign ids are the same 404.
    """
    key = parse_uuid(item_id, not_found=not_found)
    lock = "" if not for_update else " FOR UPDATE" if of is None else f" FOR UPDATE OF {of}"
    row = await db.fetchrow(select + lock, key, owner_id)
    if row is None:
        raise missing(not_found)
    return row


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typename in ("json", "jsonb"):
        await conn.set_type_codec(
            typename,
            encoder=lambda v: _json_encode(v).decode(),
            decoder=_json_decode,
            schema="pg_catalog",
        )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """The pools' reset on release: nothing beyond what asyncpg always does first
    (an open transaction rolled back, listeners dropped).

    Invariant: no code leaves session state on a pooled connection: no session-level
    ``SET`` (``SET LOCAL`` inside a transaction instead), ``LISTEN``, session advisory
    lock or ``WITH HOLD`` cursor (``tests/test_db_pool.py`` scans ``app/`` and
    ``workers/`` for them).  So asyncpg's default reset query (``SELECT
    pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``), one more round trip
    and statement per release, is not paid: ~0.2 ms of the gateway's CPU and a round
    trip per search (``bench/search.py``).
    """


async def create_pool(
    dsn: str,
    *,
    max_size: int = 10,
    min_size: int = 1,
    wait: bool = False,
    server_settings: dict[str, str] | None = None,
) -> asyncpg.Pool:
    """Create the process's pool; JSON/JSONB columns map to Python objects.

    ``wait=True`` (long-running processes) waits for an unreachable Postgres
    instead of failing (:func:`~app.core.outage.wait_until_reachable`).
    ``server_settings`` are session defaults every connection starts with and keeps:
    releasing a connection rolls back an open transaction but runs no reset query
    (:func:`_keep_session` states the invariant that makes that safe).
    """

    async def connect() -> asyncpg.Pool:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=min(min_size, max_size),
            max_size=max_size,
            init=_init_connection,
            reset=_keep_session,
            command_timeout=60,
            server_settings=server_settings,
        )
        assert pool is not None
        return pool

    if not wait:
        return await connect()
    return await wait_until_reachable(connect, dependency="postgres", is_outage=is_database_outage)


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Read ``NNNN_name.sql`` files in version order; reject duplicate versions."""
    if not directory.is_dir():
        raise ConfigError(f"migrations directory {directory} does not exist")
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME_RE.match(path.name)
        if not match:
            raise ConfigError(f"migration file {path.name!r} is not named NNNN_name.sql")
        found.append(Migration(int(match[1]), match[2], path.read_text(encoding="utf-8")))
    versions = [m.version for m in found]
    if not found:
        raise ConfigError(f"no migrations found in {directory}")
    if len(set(versions)) != len(versions):
        raise ConfigError(f"two migration files share a version: {versions}")
    return found


async def migrate(
    conn: asyncpg.Connection, migrations: Sequence[Migration] | None = None
) -> list[Migration]:
    """Apply pending migrations on ``conn``; return those applied by this call."""
    migrations = load_migrations() if migrations is None else migrations
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK_ID)
    try:
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                checksum   text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        applied: dict[int, Any] = {
            r["version"]: r["checksum"]
            for r in await conn.fetch("SELECT version, checksum FROM schema_migrations")
        }
        done: list[Migration] = []
        for m in migrations:
            if m.version in applied:
                if applied[m.version] != m.checksum:
                    raise ConfigError(
                        f"migration {m.version:04d}_{m.name} changed after it was applied"
                    )
                continue
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    m.version,
                    m.name,
                    m.checksum,
                )
            done.append(m)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK_ID)


async def migrate_dsn(dsn: str) -> list[Migration]:
    conn = await asyncpg.connect(dsn)
    try:
        return await migrate(conn)
    finally:
        await conn.close()
