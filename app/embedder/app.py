"""The embedder's HTTP app: ``POST /v1/embeddings``, ``/health``, ``/health/ready``, ``/metrics``.

Invariants:

* the model loads in the background after start; ``/health`` answers at once,
  ``/health/ready`` and ``/v1/embeddings`` are 503 ``model_loading`` until it is in;
* a request body is read only up to ``EMBEDDER_MAX_BODY_KB`` (413
  ``request_too_large``, declared or counted), then validated whole (400
  ``invalid_request``, ``too_many_inputs``, ``input_too_long``, ``empty_input``;
  404 ``model_not_found``) before anything reaches the model;
* every encode runs on the model's one thread via the micro-batcher; tokenising
  a long request for ``usage`` and building a large answer run off the event loop
  too (a query's few tokens are counted in place: cheaper than a thread hop);
* ``EMBEDDER_BACKEND`` picks what runs the model (:func:`load_model`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from tokenizers import Tokenizer

from app.core.embedding import (
    MODEL_MAX_SEQ_LENGTH,
    Embedder,
    LocalEmbedder,
    Vectors,
    load_tokenizer,
)
from app.core.logging import get_logger
from app.core.settings import Settings
from app.embedder.batcher import MicroBatcher, Overloaded
from app.embedder.metrics import EmbedderMetrics
from app.embedder.protocol import (
    ApiError,
    Embedding,
    EmbeddingsRequest,
    EmbeddingsResponse,
    Usage,
)

log = get_logger("sluice.embedder")
JSON = "application/json"
LARGE_ANSWER = 16
"""Answers with more texts than this are serialised on a thread."""
INLINE_TOKENS_CHARS = 2000
"""Requests up to this many characters are tokenised for ``usage`` on the event loop
(~50 us); longer ones on a thread."""


@dataclass
class EmbedderState:
    """What the routes share: settings, metrics, and (once loaded) the batcher."""

    settings: Settings
    metrics: EmbedderMetrics = field(default_factory=lambda: EmbedderMetrics(CollectorRegistry()))
    batcher: MicroBatcher | None = None
    tokenizer: Tokenizer | None = None
    load_error: str | None = None

    def model_names(self) -> frozenset[str]:
        name = self.settings.embedding_model
        return frozenset({name, f"sentence-transformers/{name}"})


def _state(request: Request) -> EmbedderState:
    state = request.app.state.embedder
    assert isinstance(state, EmbedderState)
    return state


def _error(exc: ApiError) -> Response:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
    return Response(exc.body(), exc.status, media_type=JSON, headers=headers)


def _loading() -> ApiError:
    return ApiError(
        503, "the model is still loading", code="model_loading", type_="server_error", retry_after=1
    )


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    too_large = ApiError(413, f"request body larger than {limit} bytes", code="request_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def parse_request(body: bytes, state: EmbedderState) -> list[str]:
    """The texts of a valid request; :class:`ApiError` naming the fault otherwise."""
    settings = state.settings
    try:
        req = msgspec.json.decode(body, type=EmbeddingsRequest)
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"invalid request: {exc}", code="invalid_request") from None
    if req.model not in state.model_names():
        raise ApiError(
            404,
            f"the model {req.model!r} does not exist; this server serves "
            f"{settings.embedding_model!r}",
            code="model_not_found",
            param="model",
        )
    if req.dimensions is not None and req.dimensions != LocalEmbedder.dim:
        raise ApiError(
            400,
            f"dimensions must be {LocalEmbedder.dim}",
            code="invalid_dimensions",
            param="dimensions",
        )
    texts = [req.input] if isinstance(req.input, str) else req.input
    if not texts:
        raise ApiError(400, "input must not be empty", code="empty_input", param="input")
    if len(texts) > settings.embedder_max_inputs:
        raise ApiError(
            400,
            f"input has {len(texts)} texts; at most {settings.embedder_max_inputs} per request",
            code="too_many_inputs",
            param="input",
        )
    for i, text in enumerate(texts):
        if not text:
            raise ApiError(400, f"input[{i}] is empty", code="empty_input", param="input")
        if len(text) > settings.embedder_max_input_chars:
            raise ApiError(
                400,
                f"input[{i}] has {len(text)} characters; at most "
                f"{settings.embedder_max_input_chars}",
                code="input_too_long",
                param="input",
            )
    return texts


def _answer(vectors: Vectors, model: str, tokens: int) -> bytes:
    return msgspec.json.encode(
        EmbeddingsResponse(
            data=[Embedding(index=i, embedding=row.tolist()) for i, row in enumerate(vectors)],
            model=model,
            usage=Usage(prompt_tokens=tokens, total_tokens=tokens),
        )
    )


def _count_tokens(tokenizer: Tokenizer, texts: list[str]) -> int:
    return sum(min(len(tokenizer.encode(t).ids), MODEL_MAX_SEQ_LENGTH) for t in texts)


async def embeddings(request: Request) -> Response:
    state = _state(request)
    try:
        body = await _read_body(request, state.settings.embedder_max_body_kb * 1024)
        texts = parse_request(body, state)
        if state.batcher is None or state.tokenizer is None:
            raise _loading()
        try:
            vectors = await state.batcher.embed(texts)
        except Overloaded:
            raise ApiError(
                503,
                "too many texts waiting for the model",
                code="overloaded",
                type_="server_error",
                retry_after=1,
            ) from None
        if sum(map(len, texts)) <= INLINE_TOKENS_CHARS:  # a query: cheaper than a thread hop
            tokens = _count_tokens(state.tokenizer, texts)
        else:
            tokens = await asyncio.to_thread(_count_tokens, state.tokenizer, texts)
        model = state.settings.embedding_model
        if len(texts) > LARGE_ANSWER:
            payload = await asyncio.to_thread(_answer, vectors, model, tokens)
        else:
            payload = _answer(vectors, model, tokens)
    except ApiError as exc:
        state.metrics.requests.labels(status=str(exc.status)).inc()
        return _error(exc)
    state.metrics.requests.labels(status="200").inc()
    return Response(payload, 200, media_type=JSON)


async def health(_request: Request) -> Response:
    return Response(b'{"status":"ok"}', 200, media_type=JSON)


async def ready(request: Request) -> Response:
    state = _state(request)
    if state.batcher is not None:
        return Response(b'{"status":"ok","model":"loaded"}', 200, media_type=JSON)
    if state.load_error is not None:
        return _error(ApiError(503, state.load_error, code="model_failed", type_="server_error"))
    return _error(_loading())


async def metrics(request: Request) -> Response:
    body = generate_latest(_state(request).metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def _set_threads(threads: int) -> None:
    """Torch's intra-op pool size, process-wide (``EMBEDDER_THREADS``; 0 leaves it)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


async def load_model(settings: Settings) -> Embedder:
    """The model ``EMBEDDER_BACKEND`` names, loaded (an ONNX graph exported first if needed)."""
    if settings.embedder_backend == "torch":
        model = await LocalEmbedder.load_async(batch_size=settings.embedder_max_batch_size)
        await asyncio.to_thread(_set_threads, settings.embedder_threads)
        return model
    from app.embedder.onnx import OnnxEmbedder, cache_dir

    return await OnnxEmbedder.load(
        cache_dir(settings.embedder_cache_dir),
        int8=settings.embedder_backend == "onnx_int8",
        threads=settings.embedder_threads,
        max_batch=settings.embedder_max_batch_size,
        max_call_tokens=settings.embedding_max_call_tokens,
    )


async def _load(state: EmbedderState) -> None:
    settings = state.settings
    try:
        model = await load_model(settings)
        state.tokenizer = await asyncio.to_thread(load_tokenizer)
        await model.embed(["warm up"])  # the first encode pays for lazy initialisation
    except Exception as exc:  # the process stays up, unready, and says why
        state.load_error = f"the model failed to load: {type(exc).__name__}"
        log.error("embedder_model_failed", error=type(exc).__name__)
        return
    batcher = MicroBatcher(
        model.embed,
        state.metrics,
        max_batch_size=settings.embedder_max_batch_size,
        max_wait_ms=settings.embedder_max_wait_ms,
        max_queue=settings.embedder_max_queue,
    )
    batcher.start()
    state.batcher = batcher
    state.metrics.ready.set(1)
    log.info("embedder_ready", model=settings.embedding_model, backend=settings.embedder_backend)


def create_app(settings: Settings) -> Starlette:
    """The embedder app; the model loads in its lifespan, in the background."""
    state = EmbedderState(settings)

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        loader = asyncio.create_task(_load(state), name="embedder-load")
        log.info("embedder_started")
        try:
            yield
        finally:
            loader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loader
            if state.batcher is not None:
                await state.batcher.aclose()
            log.info("embedder_stopped")

    app = Starlette(
        routes=[
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/health/ready", ready, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.embedder = state
    return app
