"""Pooled connections carry no session state, so the pools need no reset query.

Sluice's pools release a connection without asyncpg's reset query (``RESET ALL``,
``UNLISTEN *``, ``pg_advisory_unlock_all()``, ``CLOSE ALL``; one more round trip per
release): :func:`app.core.db.create_pool`.  That is safe only while no code leaves
session state behind, which the scan below checks over every SQL string in ``app/``
and ``workers/``; the database tests check what asyncpg still does on release.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from app.core.db import create_pool
from app.core.settings import Settings

ROOT = Path(__file__).resolve().parents[1]

# Statements that outlive their transaction on a connection.
_SESSION_STATE = [
    (re.compile(r"^\s*SET\s+(?!LOCAL\b)(SESSION\s+)?[a-z_.]+\s*(=|TO)\s", re.I), "session SET"),
    (re.compile(r"^\s*RESET\s", re.I), "RESET (undoes the pool's startup settings)"),
    (re.compile(r"^\s*LISTEN\s", re.I), "LISTEN"),
    (re.compile(r"set_config\s*\([^)]*,\s*false\s*\)", re.I), "set_config(..., false)"),
    (re.compile(r"pg_(try_)?advisory_lock(_shared)?\s*\(", re.I), "session advisory lock"),
    (re.compile(r"\bWITH\s+HOLD\b", re.I), "cursor WITH HOLD"),
]
# Session advisory locks that are released where they are taken: the migration runner's
# spans one transaction per migration, on a connection of its own (``migrate_dsn``),
# unlocked in ``finally``; a tus PATCH's lives as long as the request, on a pooled
# connection that is unlocked on exit or else terminated (``TusRuntime.lock``).
_ALLOWED = {
    ("app/core/db.py", "session advisory lock"),
    ("app/uploads/tus_patch.py", "session advisory lock"),
}


class _Strings(ast.NodeVisitor):
    """Every string literal of a module but its docstrings (f-strings with ``{}`` holes)."""

    def __init__(self) -> None:
        self.found: list[str] = []

    def visit_Expr(self, node: ast.Expr) -> None:
        if not isinstance(node.value, ast.Constant | ast.JoinedStr):  # a docstring
            self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        if isinstance(node.value, str):
            self.found.append(node.value)

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        self.found.append(
            "".join(str(v.value) if isinstance(v, ast.Constant) else "{}" for v in node.values)
        )


def session_state_in(source: str) -> list[str]:
    """What in ``source``'s string literals would leave state on a connection."""
    strings = _Strings()
    strings.visit(ast.parse(source))
    return [
        what
        for text in strings.found
        for statement in text.split(";")
        for pattern, what in _SESSION_STATE
        if pattern.search(statement)
    ]


def test_the_scan_finds_session_state_and_passes_transaction_scoped_sql() -> None:
    leaky = [
        'await conn.execute("SET statement_timeout = 0")',
        'await conn.execute(f"SET hnsw.ef_search = {ef}")',
        "await conn.execute(\"SET SESSION work_mem TO '1GB'\")",
        'await conn.execute("LISTEN jobs")',
        "await conn.fetch(\"SELECT set_config('x.y', '1', false)\")",
        'await conn.execute("SELECT pg_advisory_lock($1)", 1)',
        'await conn.execute("BEGIN; RESET ALL")',
        'await conn.execute("DECLARE c CURSOR WITH HOLD FOR SELECT 1")',
    ]
    for line in leaky:
        assert session_state_in(line), line
    clean = [
        'await conn.execute("SET LOCAL hnsw.ef_search = 40")',
        'await conn.execute("UPDATE jobs SET attempts = 0 WHERE id = $1")',
        '"""\n    UPDATE documents\n    SET status = $2\n"""',
        "await conn.fetch(\"SELECT set_config('x.y', '1', true)\")",
        'await conn.execute("SELECT pg_advisory_xact_lock($1)", 1)',
        "# SET statement_timeout = 0 in a comment is not SQL",
        'def f() -> None:\n    """A docstring may say RESET ALL, LISTEN or SET x = 1."""\n',
    ]
    for line in clean:
        assert not session_state_in(line), line


def test_no_code_leaves_session_state_on_a_pooled_connection() -> None:
    offenders = []
    for path in sorted([*(ROOT / "app").rglob("*.py"), *(ROOT / "workers").rglob("*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        for what in session_state_in(path.read_text()):
            if (rel, what) not in _ALLOWED:
                offenders.append(f"{rel}: {what}")
    assert not offenders, (
        "pooled connections are released without a reset query (app.core.db.create_pool);"
        f" scope these to a transaction instead: {offenders}"
    )


@pytest.mark.asyncio
async def test_release_rolls_back_an_open_transaction_and_keeps_startup_settings(
    migrated: Settings,
) -> None:
    pool = await create_pool(
        migrated.database_url.reveal(), max_size=1, server_settings={"hnsw.ef_search": "77"}
    )
    try:
        async with pool.acquire() as conn:
            await conn.execute("BEGIN")  # left open: an unmanaged transaction
            await conn.execute("SET LOCAL hnsw.ef_search = 5")
            await conn.execute("CREATE TEMP TABLE left_behind (x int) ON COMMIT DROP")
        async with pool.acquire() as conn:  # the same, only connection
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SHOW hnsw.ef_search") == "77"
            assert await conn.fetchval("SELECT to_regclass('pg_temp.left_behind')") is None
            async with conn.transaction():
                await conn.execute("SET LOCAL hnsw.ef_search = 9")
            assert await conn.fetchval("SHOW hnsw.ef_search") == "77"
    finally:
        await pool.close()
