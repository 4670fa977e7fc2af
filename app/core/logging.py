"""structlog configuration, done once per process from ``main()``.

JSON lines in production, a readable console in development.  Context bound
with :func:`structlog.contextvars.bind_contextvars` (``request_id`` per HTTP
request, ``job_id`` per job) is merged into every line.  Standard-library
loggers (uvicorn, arq, asyncpg...) are routed through the same processors.
Anything that looks like a bearer token is redacted before rendering.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, Literal

import structlog

_TOKEN_RE = re.compile(r"(?i)(bearer\s+|token=)[A-Za-z0-9._~+/=-]+")
_SECRET_KEYS = frozenset({"token", "authorization", "jwt", "password", "secret"})


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Drop secret-looking fields and mask tokens embedded in strings (e.g. URLs)."""
    for key, value in list(event_dict.items()):
        if key.lower() in _SECRET_KEYS:
            event_dict[key] = "[redacted]"
        elif isinstance(value, str) and ("token=" in value or "earer " in value):
            event_dict[key] = _TOKEN_RE.sub(r"\1[redacted]", value)
    return event_dict


def configure_logging(
    level: str = "INFO", fmt: Literal["json", "console"] = "json", *, stream: Any = None
) -> None:
    """Configure structlog and the stdlib root logger.  Call once, from ``main()``."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=stream is None and sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info if fmt == "json" else _passthrough,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn installs its own handlers; make its loggers propagate to ours instead.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "arq", "websockets"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    logging.getLogger("botocore").setLevel(max(logging.getLevelName(level), logging.WARNING))
    logging.getLogger("aiobotocore").setLevel(max(logging.getLevelName(level), logging.WARNING))


def _passthrough(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    return event_dict


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name)
