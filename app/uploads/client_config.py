"""What a browser needs to know before it uploads and follows jobs: the dashboard's
configuration (``GET /api/v1/dashboard/config``).

Derived from :class:`~app.core.settings.Settings` and the upload rules
(:mod:`app.uploads.rules`), never configured twice: ``default_part_size`` is
the part size a new upload gets, ``max_part_size`` the largest the server picks
(for a file of ``max_file_size``), ``accepted_types`` every content type an
upload may declare.
"""

from __future__ import annotations

from app.core.queue import Priority, aging_rule
from app.core.schemas import Response as ResponseBody
from app.core.settings import Settings
from app.uploads.rules import CONTENT_TYPES, EXTENSIONS, MAX_PARTS, MIN_PART_SIZE, decide_chunk_size

PARALLEL_PARTS = 4
"""Parts a browser sends at once (the upload client's default too)."""


class UploadLimits(ResponseBody):
    min_part_size: int
    max_part_size: int
    default_part_size: int
    max_parts: int
    max_file_size: int
    parallel_parts: int
    accepted_types: list[str]
    accepted_extensions: list[str]
    """``.pdf``, ``.txt``...: for a file picker's ``accept``."""
    multipart_threshold: int
    """Files up to this size may use the one-request ``upload/simple`` route."""


class DashboardConfig(ResponseBody):
    ws_url: str
    """Open ``{ws_url}/api/v1/ws/progress`` and authenticate with the first message."""
    upload: UploadLimits
    priorities: list[Priority]
    aging_rule: str


def public_ws_url(settings: Settings, *, host: str, secure: bool) -> str:
    """``PUBLIC_WS_URL`` when set, else the request's host name on ``WEBSOCKET_PORT``."""
    if settings.public_ws_url:
        return settings.public_ws_url.rstrip("/")
    name = f"[{host}]" if ":" in host else host  # an IPv6 literal
    return f"{'wss' if secure else 'ws'}://{name}:{settings.websocket_port}"


def dashboard_config(settings: Settings, ws_url: str) -> DashboardConfig:
    max_file = settings.max_upload_size_bytes
    default_part = decide_chunk_size(1, settings.upload_chunk_size_bytes)[0]
    accepted = sorted({t for _, declared in CONTENT_TYPES.values() for t in declared})
    return DashboardConfig(
        ws_url=ws_url,
        upload=UploadLimits(
            min_part_size=MIN_PART_SIZE,
            max_part_size=max(default_part, decide_chunk_size(max_file, default_part)[0]),
            default_part_size=default_part,
            max_parts=MAX_PARTS,
            max_file_size=max_file,
            parallel_parts=PARALLEL_PARTS,
            accepted_types=accepted,
            accepted_extensions=sorted(f".{ext}" for ext in EXTENSIONS),
            multipart_threshold=settings.multipart_upload_threshold_bytes,
        ),
        priorities=[Priority.LOW, Priority.NORMAL, Priority.HIGH, Priority.CRITICAL],
        aging_rule=aging_rule(),
    )
