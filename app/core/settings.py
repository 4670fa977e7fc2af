"""Process configuration.

One frozen :class:`Settings` object is built from an environment mapping at
process start (``Settings.from_environ(os.environ)`` in each ``main()``) and then
passed explicitly to whatever needs it.  Nothing here reads ``os.environ`` on its
own, so tests build settings from plain dicts.

Every field maps to the upper-cased environment variable of the same name
(``max_concurrent_tasks`` <- ``MAX_CONCURRENT_TASKS``).  A missing required
variable or a value that does not parse raises :class:`ConfigError` whose message
is one line naming the variable.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, get_args, get_origin

import msgspec

from app.core.errors import ConfigError

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Everything a Sluice process can be configured with."""

    # --- object storage (MinIO / S3) -------------------------------------------------
    minio_endpoint: str
    """``host:port`` (or a full ``http(s)://`` URL) of the S3 API."""
    minio_access_key: str
    minio_secret_key: str
    minio_bucket_name: str = "sluice"
    minio_use_ssl: bool = False
    minio_region: str = "us-east-1"
    minio_public_endpoint: str = ""
    """Endpoint that clients use for presigned URLs; defaults to ``minio_endpoint``."""

    # --- Redis / Postgres --------------------------------------------------------------
    redis_url: str
    database_url: str
    database_pool_size: PositiveInt = 10

    # --- processing ---------------------------------------------------------------------
    max_concurrent_tasks: PositiveInt = 10
    task_retry_max_attempts: PositiveInt = 3
    max_processing_time_minutes: PositiveInt = 60
    max_pdf_pages: PositiveInt = 2000
    embedding_provider: Literal["local", "openai"] = "local"
    embedding_model: str = "all-MiniLM-L6-v2"
    embedding_batch_size: PositiveInt = 64
    embedding_api_url: str = ""
    """Base URL of an OpenAI-compatible API (``.../v1``) when ``embedding_provider=openai``."""
    embedding_api_key: str = ""
    worker_metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 9100
    """Port of the worker's Prometheus endpoint; 0 disables it."""
    worker_poll_interval_ms: Annotated[int, msgspec.Meta(ge=1, le=5000)] = 10
    """How often an idle worker polls the queue: the floor of enqueue-to-start latency.
    10 ms costs an idle worker ~11% of a core; raise it for large, mostly idle fleets."""
    job_lease_seconds: Annotated[int, msgspec.Meta(ge=3, le=600)] = 30
    """A running job's lease: renewed every third of it; once it lapses (worker
    killed, host lost) any worker re-queues the job, whatever the job timeout."""

    # --- hostile documents: what one document may cost ---------------------------------
    max_page_content_mb: PositiveInt = 32
    """Decoded content-stream bytes one PDF page may have (a book page has well under
    1 MiB); more fails the job ``too_large_extracted``."""
    max_document_content_mb: PositiveInt = 512
    """Decoded content-stream bytes a whole PDF may have, every page counted, also pages
    that share one stream (a 2,000-page book needs ~200 MiB at most)."""
    max_page_chars: PositiveInt = 200_000
    """Characters of text one PDF page may yield (a dense page has ~5,000)."""
    max_document_chars: PositiveInt = 20_000_000
    """Characters of text a whole document may yield (a 2,000-page book has ~10 million)."""
    page_time_budget_seconds: PositiveInt = 10
    """Seconds the text extraction of one PDF page may take; more fails the job
    ``too_large_extracted``."""
    parse_memory_limit_mb: Annotated[int, msgspec.Meta(ge=256)] = 1024
    """Address-space limit (RLIMIT_AS) of the child process that extracts and chunks
    one document; a document that needs more fails alone with ``resource_limit``."""
    parse_time_limit_seconds: PositiveInt = 600
    """Seconds the child process that extracts and chunks one document may run; then
    it is killed and the job fails with ``resource_limit``."""

    # --- uploads ------------------------------------------------------------------------
    multipart_upload_threshold_mb: PositiveInt = 100
    upload_chunk_size_mb: PositiveInt = 8
    max_upload_size_mb: PositiveInt = 5120
    upload_session_ttl_hours: PositiveInt = 24
    presign_expiry_seconds: PositiveInt = 900

    # --- HTTP gateway -------------------------------------------------------------------
    gateway_host: str = "127.0.0.1"
    gateway_port: Port = 8000
    rate_limit_uploads_per_minute: PositiveInt = 10
    rate_limit_requests_per_minute: PositiveInt = 100
    cors_origins: tuple[str, ...] = ()
    """Comma-separated list of origins allowed by CORS (``*`` for any)."""

    # --- WebSocket server ---------------------------------------------------------------
    websocket_host: str = "localhost"
    websocket_port: Port = 8765
    websocket_heartbeat_interval: PositiveInt = 30

    # --- auth and logs ------------------------------------------------------------------
    jwt_secret: Annotated[str, msgspec.Meta(min_length=32)]
    """HMAC key for HS256 tokens; at least 32 characters (RFC 7518 3.2)."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "console"] = "json"

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Settings:
        """Build settings from an environment mapping.

        Unknown variables are ignored (the environment holds much else); known
        ones are parsed strictly.  Raises :class:`ConfigError` naming the first
        variable that is missing or invalid.
        """
        raw: dict[str, Any] = {}
        for field in msgspec.structs.fields(cls):
            name = field.name.upper()
            value = environ.get(name)
            if value is None:
                if field.required:
                    raise ConfigError(f"{name} is required but not set")
                continue
            raw[field.name] = _parse(name, field.type, value)
        try:
            return msgspec.convert(raw, cls)
        except msgspec.ValidationError as exc:
            raise ConfigError(_explain(str(exc))) from None

    @property
    def s3_endpoint_url(self) -> str:
        return _endpoint_url(self.minio_endpoint, self.minio_use_ssl)

    @property
    def s3_public_endpoint_url(self) -> str:
        return _endpoint_url(self.minio_public_endpoint or self.minio_endpoint, self.minio_use_ssl)

    @property
    def upload_chunk_size_bytes(self) -> int:
        return self.upload_chunk_size_mb * 1024 * 1024

    @property
    def max_upload_size_bytes(self) -> int:
        return self.max_upload_size_mb * 1024 * 1024

    @property
    def multipart_upload_threshold_bytes(self) -> int:
        return self.multipart_upload_threshold_mb * 1024 * 1024


def known_env_vars() -> frozenset[str]:
    """Names of every environment variable :meth:`Settings.from_environ` reads."""
    return frozenset(f.name.upper() for f in msgspec.structs.fields(Settings))


def _endpoint_url(endpoint: str, use_ssl: bool) -> str:
    if endpoint.startswith(("http://", "https://")):
        return endpoint.rstrip("/")
    return f"{'https' if use_ssl else 'http'}://{endpoint}"


def _parse(name: str, annotation: Any, value: str) -> Any:
    """Turn one environment string into the JSON-ish value msgspec converts."""
    target = get_args(annotation)[0] if get_origin(annotation) is Annotated else annotation
    if target is bool:
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(f"{name} must be a boolean (true/false), got {value!r}")
    if target is int:
        try:
            return int(value.strip())
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if get_origin(target) is tuple:
        return [part.strip() for part in value.split(",") if part.strip()]
    if name in {"LOG_LEVEL"}:
        return value.strip().upper()
    return value


def _explain(message: str) -> str:
    """Rewrite msgspec's ``... - at `$.field` `` into ``FIELD: ...``."""
    text, _, where = message.partition(" - at `$.")
    field = where.split("`", 1)[0].split("[", 1)[0]
    return f"{field.upper()}: {text}" if field else text
