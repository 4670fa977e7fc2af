"""The migration runner: ordered, transactional, recorded, idempotent, and safe
when several processes start at once."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from enum import StrEnum
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from app.core.db import Migration, load_migrations, migrate
from app.core.errors import ConfigError
from app.core.queue import Priority
from app.gateway.services import Services
from app.jobs.model import DocumentStatus, JobStatus, RunOutcome, Stage
from devstack.stack import EmbeddedStack


@pytest_asyncio.fixture
async def fresh_db(stack: EmbeddedStack) -> AsyncIterator[str]:
    """An empty database of its own on the shared server."""
    name = f"m_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(stack.postgres.dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield stack.postgres.dsn.rsplit("/", 1)[0] + f"/{name}"
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


async def test_applies_all_then_nothing(fresh_db: str) -> None:
    conn = await asyncpg.connect(fresh_db)
    try:
        first = await migrate(conn)
        assert [m.version for m in first] == [m.version for m in load_migrations()]
        assert await migrate(conn) == []
        tables = {
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        }
        assert {"documents", "jobs", "upload_sessions", "upload_parts", "chunks"} <= tables
        ext = await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
        assert ext is not None
    finally:
        await conn.close()


async def test_concurrent_runners_apply_each_migration_once(fresh_db: str) -> None:
    conns = [await asyncpg.connect(fresh_db) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(c) for c in conns))
        applied = sorted(m.version for batch in results for m in batch)
        assert applied == [m.version for m in load_migrations()]
        rows = await conns[0].fetchval("SELECT count(*) FROM schema_migrations")
        assert rows == len(load_migrations())
    finally:
        for c in conns:
            await c.close()


async def test_failed_migration_leaves_nothing_behind(fresh_db: str) -> None:
    good = Migration(1, "good", "CREATE TABLE a (x int);")
    bad = Migration(2, "bad", "CREATE TABLE b (x int); SELECT no_such_function();")
    conn = await asyncpg.connect(fresh_db)
    try:
        with pytest.raises(asyncpg.UndefinedFunctionError):
            await migrate(conn, [good, bad])
        assert await conn.fetchval("SELECT to_regclass('a') IS NOT NULL")
        assert await conn.fetchval("SELECT to_regclass('b') IS NULL")
        assert await conn.fetchval("SELECT max(version) FROM schema_migrations") == 1
    finally:
        await conn.close()


async def test_edited_migration_is_refused(fresh_db: str) -> None:
    conn = await asyncpg.connect(fresh_db)
    try:
        await migrate(conn, [Migration(1, "one", "CREATE TABLE t (x int);")])
        with pytest.raises(ConfigError, match="changed after it was applied"):
            await migrate(conn, [Migration(1, "one", "CREATE TABLE t (y int);")])
    finally:
        await conn.close()


def test_misnamed_file_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "0001_ok.sql").write_text("SELECT 1;")
    (tmp_path / "two.sql").write_text("SELECT 1;")
    with pytest.raises(ConfigError, match=r"two\.sql"):
        load_migrations(tmp_path)


_CHECKED_COLUMN = re.compile(r"^CHECK \(\(\(?(\w+)\)?(?:::text)? = ANY")


async def test_every_state_enum_matches_its_check_constraint(services: Services) -> None:
    """The StrEnums are the values the schema allows: no more, no fewer."""
    rows = await services.db.fetch(
        "SELECT conrelid::regclass::text AS tbl, pg_get_constraintdef(oid) AS def "
        "FROM pg_constraint "
        "WHERE contype = 'c' AND conrelid::regclass::text IN ('jobs', 'documents', 'job_runs')"
    )
    allowed: dict[tuple[str, str], set[str]] = {}
    for row in rows:
        column = _CHECKED_COLUMN.match(row["def"])
        if column:
            allowed[(row["tbl"], column[1])] = set(re.findall(r"'([^']*)'::text", row["def"]))
    enums: dict[tuple[str, str], type[StrEnum]] = {
        ("jobs", "status"): JobStatus,
        ("jobs", "stage"): Stage,
        ("jobs", "priority"): Priority,
        ("documents", "status"): DocumentStatus,
        ("job_runs", "outcome"): RunOutcome,
    }
    for key, enum in enums.items():
        assert allowed.get(key) == {str(member) for member in enum}, (key, allowed.get(key))
