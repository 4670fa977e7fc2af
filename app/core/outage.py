"""Telling an infrastructure outage apart from a bug.

Postgres or Redis going away (restart, failover, network cut) surfaces as a
handful of exception types from asyncpg, redis-py and the socket layer.  They
are not errors of the request or of the job that hit them:

* the gateway answers them 503 ``database_unavailable`` / ``redis_unavailable``
  with ``Retry-After`` (:func:`as_unavailable`), in one place, the
  error-rendering middleware;
* a worker waits them out without spending one of the job's attempts
  (:func:`is_database_outage`, :func:`is_storage_outage`, ``workers/run.py``)
  and keeps polling the queue once Redis is back (:func:`is_redis_outage`,
  ``workers/runtime.py``).

Invariant: a bare ``OSError``/``TimeoutError`` counts as a database outage only
when it was raised from inside asyncpg (refused connect, acquire timeout), so an
S3 or file error is never mistaken for one.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

import asyncpg
import botocore.exceptions
import redis.exceptions

from app.core.errors import ServiceUnavailable
from app.core.logging import get_logger

T = TypeVar("T")
_log = get_logger("sluice.outage")

RETRY_AFTER_SECONDS = 5
"""``Retry-After`` sent with a 503 for an unreachable Postgres or Redis."""

_PG_LOST: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,  # ConnectionDoesNotExistError, ConnectionFailureError...
    asyncpg.CannotConnectNowError,  # starting up or shutting down
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
)
_REDIS_LOST: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,  # BusyLoadingError too
    redis.exceptions.TimeoutError,
)

OUTAGE_TYPES: tuple[type[BaseException], ...] = (
    *_PG_LOST,
    *_REDIS_LOST,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)
"""Every exception type that *may* mean an outage (the gateway's handlers key on them)."""


def _raised_in(exc: BaseException, package: str) -> bool:
    tb: TracebackType | None = exc.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_globals.get("__name__", "")
        if isinstance(name, str) and (name == package or name.startswith(package + ".")):
            return True
        tb = tb.tb_next
    return False


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from (bounded: no cycles)."""
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(seen) < 8 and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _is_pg(exc: BaseException) -> bool:
    if isinstance(exc, _PG_LOST):
        return True
    if isinstance(exc, asyncpg.InterfaceError):
        return "closed" in str(exc)  # "connection is closed"; not a misuse of the API
    if isinstance(exc, OSError | TimeoutError) and not isinstance(exc, _REDIS_LOST):
        return _raised_in(exc, "asyncpg")
    return False


def is_database_outage(exc: BaseException) -> bool:
    """True if ``exc`` (or what it was raised from) means Postgres is unreachable."""
    return any(_is_pg(e) for e in _chain(exc))


_CONFUSED = ("cannot switch to state", "another operation is in progress")


def is_confused_connection(exc: BaseException) -> bool:
    """True if ``exc`` (or what it was raised from) is asyncpg losing track of a
    connection's protocol state (``InternalClientError: cannot switch to state``,
    ``InterfaceError: another operation is in progress``).

    A reply that crossed a Postgres restart leaves pooled connections like this,
    but the same errors also mean misuse of a connection (a bug).  So unlike
    :func:`is_database_outage` this is no licence to wait forever: callers ride it
    a bounded number of times (``workers.outages.CONFUSED_CONNECTION_RIDES``).
    """
    return any(
        isinstance(e, asyncpg.InternalClientError | asyncpg.InterfaceError)
        and any(text in str(e) for text in _CONFUSED)
        for e in _chain(exc)
    )


def is_redis_outage(exc: BaseException) -> bool:
    """True if ``exc`` (or what it was raised from) means Redis is unreachable."""
    return any(isinstance(e, _REDIS_LOST) for e in _chain(exc))


_S3_BUSY = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout"})


def _is_s3_down(exc: BaseException) -> bool:
    if isinstance(exc, botocore.exceptions.ClientError):
        response: Any = exc.response
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return status >= 500 or response.get("Error", {}).get("Code") in _S3_BUSY
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        # EndpointConnectionError, ConnectionClosedError, Read/ConnectTimeoutError...
        return isinstance(
            exc, botocore.exceptions.HTTPClientError | botocore.exceptions.ConnectionError
        )
    if isinstance(exc, OSError | TimeoutError) and not isinstance(exc, _REDIS_LOST):
        return _raised_in(exc, "aiobotocore") or _raised_in(exc, "aiohttp")
    return False


def is_storage_outage(exc: BaseException) -> bool:
    """True if ``exc`` (or what it was raised from) means S3 is unreachable or
    answering 5xx/SlowDown; a 4xx answer (missing object, denied) is not one."""
    return any(_is_s3_down(e) for e in _chain(exc))


def as_unavailable(exc: BaseException) -> ServiceUnavailable | None:
    """The 503 a client gets for an outage behind ``exc``; None if it is no outage."""
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
    if is_database_outage(exc):
        return ServiceUnavailable(
            "the database is unreachable; try again shortly",
            code="database_unavailable",
            headers=headers,
        )
    if is_redis_outage(exc):
        return ServiceUnavailable(
            "the queue (Redis) is unreachable; try again shortly",
            code="redis_unavailable",
            headers=headers,
        )
    return None


START_WAIT_LOG_EVERY_SECONDS = 30.0
"""While a process waits at start-up for a dependency, it says so this often."""


async def wait_until_reachable(
    connect: Callable[[], Awaitable[T]],
    *,
    dependency: str,
    is_outage: Callable[[BaseException], bool],
    max_delay: float = 5.0,
) -> T:
    """``await connect()`` until it succeeds, waiting out an outage at start-up.

    A long-running process (gateway, worker, WebSocket server) that starts while
    Postgres or Redis is down waits for it, with exponential backoff and jitter
    (0.2 s doubling to ``max_delay``), instead of exiting: a dependency that
    starts after its clients, or restarts while they do, is an outage like any
    other.  One line is logged when the wait starts, one every
    :data:`START_WAIT_LOG_EVERY_SECONDS`, one when it ends.  Any error that is not
    an outage (``is_outage`` false: bad credentials, a missing database) is
    raised at once.
    """
    delay = 0.2
    started: float | None = None
    said = 0.0
    while True:
        try:
            result = await connect()
        except Exception as exc:
            if not is_outage(exc):
                raise
            now = time.monotonic()
            if started is None:
                started = now
            if now - said >= START_WAIT_LOG_EVERY_SECONDS:
                said = now
                _log.warning(
                    "waiting_for_dependency",
                    dependency=dependency,
                    error=type(exc).__name__,
                    waited_s=round(now - started, 1),
                )
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 (jitter)
            delay = min(delay * 2, max_delay)
        else:
            if started is not None:
                _log.info(
                    "dependency_reachable",
                    dependency=dependency,
                    waited_s=round(time.monotonic() - started, 1),
                )
            return result
