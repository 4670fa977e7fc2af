"""Process configuration.

One frozen :class:`Settings` object is built from an environment mapping at
process start (``Settings.from_environ(os.environ)`` in each ``main()``) and then
passed explicitly to whatever needs it.  Nothing here reads ``os.environ`` on its
own, so tests build settings from plain dicts.

Every field maps to the upper-cased environment variable of the same name
(``max_concurrent_tasks`` <- ``MAX_CONCURRENT_TASKS``).  A missing required
variable or a value that does not parse raises :class:`ConfigError` whose message
is one line naming the variable.

Secret values (``MINIO_SECRET_KEY``, ``JWT_SECRET``, ``EMBEDDING_API_KEY``) are
held in :class:`~app.core.secret.Secret`, the URLs that may carry a password
(``DATABASE_URL``, ``REDIS_URL``) in :class:`~app.core.secret.SecretUrl`: the
repr of a ``Settings`` (in a traceback, a log line, a test failure) shows none
of them, and code reads one only through ``.reveal()``.  Those fields always
hold that type, even after ``msgspec.structs.replace(settings, redis_url="...")``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, get_args, get_origin

import msgspec

from app.core.errors import ConfigError
from app.core.secret import Secret, SecretUrl

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
    minio_secret_key: Secret
    minio_bucket_name: str = "sluice"
    minio_use_ssl: bool = False
    minio_region: str = "us-east-1"
    minio_public_endpoint: str = ""
    """Endpoint that clients use for presigned URLs; defaults to ``minio_endpoint``."""

    # --- Redis / Postgres --------------------------------------------------------------
    redis_url: SecretUrl
    database_url: SecretUrl
    database_pool_size: PositiveInt = 10

    # --- processing ---------------------------------------------------------------------
    max_concurrent_tasks: PositiveInt = 10
    task_retry_max_attempts: PositiveInt = 3
    max_processing_time_minutes: PositiveInt = 60
    max_pdf_pages: PositiveInt = 2000
    embedding_provider: Literal["local", "openai"] = "local"
    embedding_model: str = "all-MiniLM-L6-v2"
    embedding_batch_size: PositiveInt = 64
    embedding_max_call_tokens: Annotated[int, msgspec.Meta(ge=256)] = 8192
    """Padded tokens (texts times the longest) one embedding call gets; a batch of
    long chunks is split into calls under it.  Bounds a worker's embedding memory
    (local model): ~225 MB above idle at 8192 (32 chunks of 256 tokens), ~475 MB
    at 16384 (64)."""
    embedding_threads: Annotated[int, msgspec.Meta(ge=0, le=256)] = 0
    """Intra-op threads of a worker's in-process model (``embedding_provider=local``;
    0: torch's default, one per core).  Keep the default for one worker per host; set
    it to cores / workers when several workers share a host: on 2 cores, 256 chunks
    took 7.9 s of CPU with 1 thread against 9.6-10.6 s with 2, so a full host embeds
    ~25% more per core with 1 (a lone worker on idle cores finishes 1.6x sooner
    with 2)."""
    embedding_api_url: str = ""
    """Base URL of an OpenAI-compatible API (``.../v1``) when ``embedding_provider=openai``."""
    embedding_api_key: Secret = Secret("")
    worker_metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 9100
    """Port of the worker's Prometheus endpoint; 0 disables it."""
    worker_metrics_host: str = "127.0.0.1"
    """Interface of the worker's ``/health`` and ``/metrics`` endpoint: loopback by
    default (and under ``sluice dev``); ``0.0.0.0`` in containers where Prometheus
    and the kubelet's probes reach the pod from outside."""
    worker_wake: bool = True
    """Idle workers block on the queue's wake list (``workers/wake.py``) and start a
    job within a few ms of its enqueue; ``WORKER_POLL_INTERVAL_MS`` is then only the
    fallback poll.  Off: ARQ's own loop polls every ``WORKER_POLL_INTERVAL_MS``."""
    worker_poll_interval_ms: Annotated[int, msgspec.Meta(ge=1, le=5000)] = 1000
    """With ``WORKER_WAKE`` on, the fallback poll of an idle worker: the longest a job
    waits when its wake-up was lost (correctness never depends on a wake-up).  With it
    off, ARQ's poll interval: the floor of enqueue-to-start latency (10 ms costs an
    idle worker ~11% of a core and 100 Redis round trips a second)."""
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
    max_concurrent_parses: PositiveInt = 2
    """Documents one worker parses at once, each in its own child process; other jobs
    wait for a slot.  The worker's parse memory is bounded by this times
    ``PARSE_MEMORY_LIMIT_MB`` (size it to the worker's memory limit)."""

    # --- OCR of scanned pages and images (workers/stages/ocr.py, scan.py) --------------
    ocr_enabled: bool = True
    """OCR PDF pages without a usable text layer, and PNG/JPEG/TIFF uploads."""
    ocr_max_pages: PositiveInt = 100
    """Pages of one document that may be OCR'd; later pages without text are skipped
    with one ``ocr_page_limit`` warning on the job (not a failure)."""
    ocr_min_confidence: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 0.5
    """Recognised fragments scored below this (0..1) are dropped."""
    ocr_dpi: Annotated[int, msgspec.Meta(ge=72, le=600)] = 200
    """Resolution PDF pages are rendered at for OCR (images are scaled down to it)."""
    ocr_max_pixels: Annotated[int, msgspec.Meta(ge=1_000_000)] = 12_000_000
    """Most pixels of one page image given to OCR; a larger page is scaled down."""
    ocr_max_image_pixels: Annotated[int, msgspec.Meta(ge=1_000_000)] = 60_000_000
    """Most pixels of one uploaded image frame; a larger frame is skipped with a
    warning before it is decoded (JPEGs are first decoded at a reduced size)."""
    ocr_threads: PositiveInt = 2
    """onnxruntime intra-op threads per OCR model, in each parse child."""
    ocr_page_time_seconds: PositiveInt = 60
    """Seconds OCR of one page may take; a slower page is skipped with a warning."""

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
    max_json_body_kb: PositiveInt = 64
    """Largest body of a JSON control route (initiate, presign, reprocess, search...);
    a larger one is refused with 413 before it is read (declared) or as soon as the
    count passes it (chunked)."""
    max_parts_in_flight_per_user: PositiveInt = 8
    """Part uploads one user may have in progress at once, per gateway process;
    the next one is refused with 429 ``too_many_parts_in_flight``."""
    upload_body_timeout_seconds: PositiveInt = 30
    """A request body that sends nothing for this long is refused with 408
    ``body_timeout`` and its buffer freed."""
    refused_body_drain_mb: Annotated[int, msgspec.Meta(ge=0)] = 1024
    """At most this many MiB of a refused request's unread body are read and
    discarded before the refusal is sent, so that clients that send their whole
    body before reading (urllib, requests, fetch) get the answer rather than a
    connection reset.  Discarding holds no memory; a body declared larger than
    this is not drained and its connection is closed."""
    refused_body_drain_seconds: Annotated[int, msgspec.Meta(ge=0)] = 30
    """At most this long is spent draining a refused request's body."""
    http_keepalive_seconds: PositiveInt = 75
    """How long the gateway and the embedder hold an idle keep-alive connection open
    (see ``app/core/keepalive.py``).
    It must outlast the clients' own pool expiry (httpx 5 s, browsers and proxies
    60 s and more): a server that closes first races the client's next request on
    that connection, which then meets a reset instead of an answer."""

    # --- embedding service (``sluice embedder``) and search ---------------------------
    embedder_host: str = "127.0.0.1"
    embedder_port: Port = 8090
    embedder_max_batch_size: PositiveInt = 64
    """Texts one ``encode`` call takes at most: concurrent requests are coalesced up to it."""
    embedder_max_wait_ms: Annotated[int, msgspec.Meta(ge=0, le=1000)] = 3
    """How long the first request of a batch waits for others to join it."""
    embedder_max_queue: PositiveInt = 2048
    """Texts waiting for the model at most; past it a request is refused with 503
    ``overloaded`` (and ``Retry-After``) instead of queueing without bound."""
    embedder_max_inputs: PositiveInt = 256
    """Texts one ``POST /v1/embeddings`` may carry (400 ``too_many_inputs`` past it)."""
    embedder_max_input_chars: PositiveInt = 20_000
    """Characters one text may have (400 ``input_too_long``); the model reads its
    first 256 tokens anyway.  Keep it above the search query limit (4,000), or long
    queries fail with 503 ``embedding_unavailable``."""
    embedder_max_body_kb: PositiveInt = 8192
    """Largest request body of the embedder (413 ``request_too_large``)."""
    embedder_threads: Annotated[int, msgspec.Meta(ge=0, le=256)] = 1
    """Intra-op threads of the embedder's model, torch or ONNX Runtime (0: the
    library's default, one per core).  1 keeps a batch of short queries at tens of ms
    even on a busy host, where several OpenMP threads spin against each other and
    take ~20x longer."""
    embedder_backend: Literal["onnx", "onnx_int8", "torch"] = "onnx"
    """What runs the embedder's model.  ``onnx`` (default): ONNX Runtime on a graph
    exported once from the bundled weights (~2x less CPU per query than torch,
    cosine >= 0.999 to torch's vectors, so it matches what the workers stored);
    ``onnx_int8``: the same graph with int8 dynamic quantization (~2x less again,
    but cosine ~0.99 to the stored vectors: see BENCHMARKS.md before choosing it);
    ``torch``: sentence-transformers, as the workers run it."""
    embedder_cache_dir: str = ""
    """Where the exported ONNX graphs are kept (empty: ``$XDG_CACHE_HOME/sluice`` or
    ``~/.cache/sluice``).  Exported at the first start, from the local weights only."""
    search_embedding_url: str = "http://127.0.0.1:8090/v1"
    """Base URL of the OpenAI-compatible endpoint the gateway embeds search queries
    with (``sluice embedder``); the gateway never loads the model itself."""
    search_max_concurrent_queries: PositiveInt = 4
    """Nearest-neighbour queries one gateway process runs in PostgreSQL at once; more
    searches wait for a slot (after their query is embedded).  An HNSW scan is CPU work:
    past the database's cores, more at once only contend.  On 2 shared cores, 3 instead
    of 20 at once gave p99 98 ms instead of 537 at 100 searches/s and 11% more
    throughput at saturation (``bench/search.py``, BENCHMARKS.md).  Size it to about the
    database's cores divided by the gateway processes."""
    search_ef_search: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100
    """HNSW ``ef_search`` of a search (raised to ``2 * top_k`` when that is larger): the
    recall/latency dial of the ANN search.  On 100,000 real chunks, with the index of
    migration 0008, 100 gives recall@10 0.98 against an exact scan and 64 gives 0.96, for
    ~20% less PostgreSQL CPU per search (``bench/search.py``, BENCHMARKS.md)."""

    # --- WebSocket server ---------------------------------------------------------------
    websocket_host: str = "localhost"
    websocket_port: Port = 8765
    websocket_heartbeat_interval: PositiveInt = 30
    public_ws_url: str = ""
    """Base URL browsers open the WebSocket server at (``wss://ws.example.com``), told to
    the dashboard by ``GET /api/v1/dashboard/config``; empty: ``ws://`` (``wss://`` when
    the request came over https) + the request's host name + ``:WEBSOCKET_PORT``."""

    # --- auth and logs ------------------------------------------------------------------
    jwt_secret: Secret
    """HMAC key for HS256 tokens; at least 32 characters (RFC 7518 3.2)."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "console"] = "json"

    def __post_init__(self) -> None:
        # Keep the secret fields in their hiding type whatever built the struct
        # (``from_environ``, ``msgspec.structs.replace`` with a plain str...).
        for name, kind in _SECRET_FIELDS.items():
            value = getattr(self, name)
            if not isinstance(value, kind):
                msgspec.structs.force_setattr(self, name, kind(value))
        if len(self.jwt_secret.reveal()) < JWT_SECRET_MIN_LENGTH:
            raise ValueError(f"JWT_SECRET must be at least {JWT_SECRET_MIN_LENGTH} characters")

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
            return msgspec.convert(raw, cls, dec_hook=_decode_secret)
        except msgspec.ValidationError as exc:
            raise ConfigError(_explain(str(exc))) from None

    @property
    def secrets(self) -> tuple[Secret, ...]:
        """Every secret setting, for the logging scrubber (``configure_logging``)."""
        return tuple(getattr(self, name) for name in _SECRET_FIELDS)

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

    @property
    def max_json_body_bytes(self) -> int:
        return self.max_json_body_kb * 1024

    @property
    def refused_body_drain_bytes(self) -> int:
        return self.refused_body_drain_mb * 1024 * 1024


JWT_SECRET_MIN_LENGTH = 32
_SECRET_FIELDS: dict[str, type[Secret]] = {
    "minio_secret_key": Secret,
    "embedding_api_key": Secret,
    "jwt_secret": Secret,
    "redis_url": SecretUrl,
    "database_url": SecretUrl,
}


def known_env_vars() -> frozenset[str]:
    """Names of every environment variable :meth:`Settings.from_environ` reads."""
    return frozenset(f.name.upper() for f in msgspec.structs.fields(Settings))


def _decode_secret(kind: type, value: Any) -> Any:
    if isinstance(kind, type) and issubclass(kind, Secret) and isinstance(value, str):
        return kind(value)
    raise NotImplementedError(f"cannot decode {kind!r}")


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
    if target is float:
        try:
            return float(value.strip())
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
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
