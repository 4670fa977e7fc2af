"""structlog configuration, done once per process from ``main()``.

JSON lines in production, a readable console in development.  Context bound
with :func:`structlog.contextvars.bind_contextvars` (``request_id`` per HTTP
request, ``job_id`` per job) is merged into every line.  Standard-library
loggers (uvicorn, arq, websockets, asyncpg, asyncio...) and uncaught exceptions
are routed through the same path.

Invariants, in every format:

* **No traceback shows a local variable.**  Exceptions are rendered by the
  standard library's plain formatter (structlog's ``format_exc_info``), never by
  rich's ``show_locals`` or ``dict_tracebacks``.
* **No secret reaches the output.**  Fields whose name says secret
  (``authorization``, ``cookie``, ``password``, ``*_token``...) are replaced, in
  nested dicts, lists and header pairs too.  Then the *rendered line* (event,
  every field, reprs, the exception text) is scrubbed of bearer/basic
  credentials, ``token=``-style parameters, URL passwords
  (``scheme://user:***@host``), JWT-looking strings, and the literal values of
  the secrets passed to :func:`configure_logging` (the process's settings);
  the rules live in :mod:`app.core.redaction`.
* **Logging never blocks the caller for long.**  The caller runs only the cheap
  processors (context, level, timestamp, capturing ``exc_info``) and puts the
  record on a bounded queue; one writer thread renders it (tracebacks
  included), scrubs it and writes it.  A full queue drops the line (counted and
  reported by the writer) rather than blocking an event loop.
  :func:`flush_logs` waits until every queued line is written; it runs at exit,
  so a process that exits normally loses no line.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import queue
import sys
import threading
from collections.abc import Iterable, MutableMapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal

import structlog

from app.core.redaction import redact_secrets, scrub_line, secret_literals
from app.core.secret import Secret

QUEUE_MAX_RECORDS = 10_000
"""Lines waiting for the writer thread; beyond it lines are dropped, not waited for."""

# --- processors that run in the caller ---------------------------------------------


def _capture_exc_info(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Resolve ``exc_info=True`` here: the writer thread has no current exception."""
    exc_info = event_dict.get("exc_info")
    if not exc_info or isinstance(exc_info, tuple):
        return event_dict
    if isinstance(exc_info, BaseException):
        event_dict["exc_info"] = (type(exc_info), exc_info, exc_info.__traceback__)
    else:
        current = sys.exc_info()
        if current[0] is None:
            del event_dict["exc_info"]
        else:
            event_dict["exc_info"] = current
    return event_dict


def _record_context(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """For standard-library records: the structlog context captured by the caller."""
    record = event_dict.get("_record")
    context = getattr(record, "sluice_context", None)
    if context:
        for key, value in context.items():
            event_dict.setdefault(key, value)
    return event_dict


def _record_time(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """For standard-library records: when the caller logged, not when it was written."""
    record = event_dict.get("_record")
    created = record.created if record is not None else datetime.now(UTC).timestamp()
    stamp = datetime.fromtimestamp(created, UTC).isoformat().replace("+00:00", "Z")
    event_dict.setdefault("timestamp", stamp)
    return event_dict


# --- the writer thread -----------------------------------------------------------------


class _Flush:
    """A marker put on the queue; the writer sets ``done`` when it reaches it."""

    def __init__(self) -> None:
        self.done = threading.Event()


_STOP = object()


class _Writer:
    """One thread that renders and writes queued records, in order.

    Invariants: the caller never waits (a full queue drops the record and
    counts it); a failure while rendering one record never stops the thread.
    """

    def __init__(self, handler: logging.Handler, maxsize: int = QUEUE_MAX_RECORDS) -> None:
        self.handler = handler
        self.maxsize = maxsize
        self._start()

    def _start(self) -> None:
        self._pid = os.getpid()
        self.queue: queue.Queue[Any] = queue.Queue(self.maxsize)
        self._dropped = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="sluice-log-writer", daemon=True)
        self._thread.start()

    def _check_fork(self) -> None:
        # In a forked child the thread is gone and the queue may be locked: start
        # anew, lazily (never between fork and exec, where a thread is a hazard).
        if self._pid != os.getpid():
            self._start()

    def put(self, record: logging.LogRecord) -> None:
        self._check_fork()
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            with self._lock:
                self._dropped += 1

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is _STOP:
                return
            if isinstance(item, _Flush):
                with contextlib.suppress(Exception):
                    self.handler.flush()
                item.done.set()
                continue
            with self._lock:
                dropped, self._dropped = self._dropped, 0
            if dropped:
                self.handler.handle(
                    logging.LogRecord(
                        "sluice.logging",
                        logging.WARNING,
                        __file__,
                        0,
                        "log_lines_dropped count=%d (the log writer fell behind)",
                        (dropped,),
                        None,
                    )
                )
            self.handler.handle(item)  # Handler.handle reports its own errors

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every record queued so far is written (False on timeout)."""
        self._check_fork()
        if not self._thread.is_alive():
            return False
        marker = _Flush()
        try:
            self.queue.put(marker, timeout=timeout)
        except queue.Full:
            return False
        return marker.done.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        if self._pid == os.getpid() and self._thread.is_alive():
            with contextlib.suppress(Exception):
                self.queue.put(_STOP, timeout=timeout)
                self._thread.join(timeout)
        with contextlib.suppress(Exception):
            self.handler.flush()


class _EnqueueHandler(logging.Handler):
    """The root handler: captures what must be read in the caller, then enqueues.

    Unlike :class:`logging.handlers.QueueHandler` it formats nothing here: the
    expensive part (rendering, tracebacks) happens in the writer thread.
    """

    def __init__(self, writer: _Writer) -> None:
        super().__init__()
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if not hasattr(record, "_logger"):  # a standard-library record
                record.__dict__["sluice_context"] = structlog.contextvars.get_contextvars()
            self.writer.put(record)
        except Exception:
            self.handleError(record)


class _Current:
    """The writer of the current configuration (one per process)."""

    writer: _Writer | None = None


def flush_logs(timeout: float = 5.0) -> bool:
    """Wait until every line logged so far has been written."""
    writer = _Current.writer
    return writer.flush(timeout) if writer is not None else True


def _stop_writer() -> None:
    writer, _Current.writer = _Current.writer, None
    if writer is not None:
        writer.stop()


atexit.register(_stop_writer)


def _log_uncaught(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)
        return
    logging.getLogger("sluice").critical("uncaught_exception", exc_info=(exc_type, exc, tb))
    flush_logs()


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None:
        return
    logging.getLogger("sluice").critical(
        "uncaught_exception_in_thread",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


# --- configuration ---------------------------------------------------------------------


def _line_formatter(renderer: Any, literals: tuple[str, ...]) -> logging.Formatter:
    """What the writer thread runs per line: redact fields, render, scrub the line."""
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            _record_context,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            _record_time,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            redact_secrets,
            structlog.processors.format_exc_info,  # plain traceback, never locals
            renderer,
            scrub_line(literals),
        ],
    )


def configure_logging(
    level: str = "INFO",
    fmt: Literal["json", "console"] = "json",
    *,
    stream: Any = None,
    secrets: Iterable[Secret | str] = (),
) -> None:
    """Configure structlog and the stdlib root logger.  Call once, from ``main()``.

    ``secrets`` (e.g. ``settings.secrets``) are masked wherever they would
    appear in a line, whatever the pattern rules miss.  Calling it again
    flushes and replaces the previous configuration.
    """
    _stop_writer()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(
            colors=stream is None and sys.stderr.isatty(),
            exception_formatter=structlog.dev.plain_traceback,
        )
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            _capture_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        cache_logger_on_first_use=True,
    )
    formatter = _line_formatter(renderer, secret_literals(secrets))
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    writer = _Current.writer = _Writer(handler)
    root = logging.getLogger()
    root.handlers[:] = [_EnqueueHandler(writer)]
    root.setLevel(level)
    # uvicorn installs its own handlers; make its loggers propagate to ours instead.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "arq", "websockets"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    logging.getLogger("botocore").setLevel(max(logging.getLevelName(level), logging.WARNING))
    logging.getLogger("aiobotocore").setLevel(max(logging.getLevelName(level), logging.WARNING))
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name)
