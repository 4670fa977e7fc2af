"""``sluice embedder``: its OpenAI-compatible HTTP contract, its batching, its
limits, and the gateway searching through it without ever importing torch.

The embedder is a real subprocess (``embedder_service``, limits from
``EMBEDDER_LIMITS``: 8 inputs, 5,000 characters, 64 KiB bodies).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from app.core.embedclient import EmbeddingClient
from app.core.embedding import OpenAIEmbedder
from app.core.errors import PermanentError
from app.core.settings import Settings
from app.embedder.batcher import MicroBatcher, Overloaded
from app.embedder.metrics import EmbedderMetrics
from app.gateway.services import Services, query_embedder_of
from devstack.embedder import ROOT, EmbedderProcess
from devstack.process import free_port
from tests.fixtures_pipeline import TOPIC_PAGES, MakeJob, make_pdf
from workers.run import JobRun, Outcome
from workers.runtime import open_worker_context

MODEL = "all-MiniLM-L6-v2"


def _metric(text: str, name: str) -> float:
    """The sum of every sample of ``name`` (all label sets) in Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _post(client: httpx.AsyncClient, body: Any) -> httpx.Response:
    return await client.post("/v1/embeddings", json=body)


@pytest.fixture
async def eclient(embedder_service: EmbedderProcess) -> Any:
    async with httpx.AsyncClient(base_url=embedder_service.url, timeout=60) as c:
        yield c


async def test_health_answers_at_once_and_ready_waits_for_the_model(
    embedder_service: EmbedderProcess, eclient: httpx.AsyncClient
) -> None:
    # While the model loaded, /health/ready said 503; then 200.
    assert 503 in embedder_service.ready_statuses
    assert embedder_service.ready_statuses[-1] == 200
    assert (await eclient.get("/health")).status_code == 200
    r = await eclient.get("/health/ready")
    assert r.status_code == 200 and r.json()["model"] == "loaded"


async def test_embeddings_answer_in_openai_shape(eclient: httpx.AsyncClient) -> None:
    r = await _post(eclient, {"model": MODEL, "input": "how do volcanoes erupt"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == MODEL
    assert [d["index"] for d in body["data"]] == [0]
    assert body["data"][0]["object"] == "embedding"
    vec = np.asarray(body["data"][0]["embedding"])
    assert vec.shape == (384,) and abs(float(np.linalg.norm(vec)) - 1) < 1e-4
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 2

    texts = ["magma rises through the crust", "lava flows from the crater", "a sourdough loaf"]
    r = await _post(eclient, {"model": f"sentence-transformers/{MODEL}", "input": texts})
    vecs = np.asarray([d["embedding"] for d in r.json()["data"]])
    assert vecs.shape == (3, 384)
    # Related texts are closer than unrelated ones: these are the model's vectors.
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2] + 0.2


async def test_openai_client_of_the_core_reads_it(embedder_service: EmbedderProcess) -> None:
    client = OpenAIEmbedder(embedder_service.api_url, model=MODEL)
    try:
        vecs = await client.embed(["one", "two"])
    finally:
        await client.aclose()
    assert vecs.shape == (2, 384) and vecs.dtype == np.float32


async def test_the_gateway_client_reads_it_as_the_core_client_does(
    embedder_service: EmbedderProcess,
) -> None:
    texts = ["magma rises through the crust", "a sourdough loaf"]
    lean = EmbeddingClient(embedder_service.api_url, model=MODEL)
    core = OpenAIEmbedder(embedder_service.api_url, model=MODEL)
    wrong = EmbeddingClient(embedder_service.api_url, model="no-such-model")
    try:
        got, want = await lean.embed(texts), await core.embed(texts)
        with pytest.raises(PermanentError) as refused:
            await wrong.embed(texts)
    finally:
        await lean.aclose()
        await core.aclose()
        await wrong.aclose()
    assert got.shape == (2, 384) and got.dtype == np.float32
    assert np.allclose(got, want, atol=1e-6)
    assert refused.value.code == "embedding_rejected" and "404" in refused.value.message


async def test_concurrent_requests_are_coalesced_into_fewer_encode_calls(
    eclient: httpx.AsyncClient,
) -> None:
    texts = [f"question number {i} about rivers and lakes" for i in range(40)]
    solo = np.asarray(
        (await _post(eclient, {"model": MODEL, "input": texts[7]})).json()["data"][0]["embedding"]
    )
    before = (await eclient.get("/metrics")).text
    # Three requests of long texts keep the model busy while the 40 short ones
    # arrive, however slowly a loaded machine lets this client send them: those
    # that wait together must be answered together.
    long_texts = [" ".join(f"delta{i}-{j} silt" for j in range(600))[:4500] for i in range(8)]
    busy = [
        asyncio.create_task(_post(eclient, {"model": MODEL, "input": long_texts})) for _ in range(3)
    ]
    await asyncio.sleep(0.05)
    answers = await asyncio.gather(*(_post(eclient, {"model": MODEL, "input": t}) for t in texts))
    assert all(b.status_code == 200 for b in await asyncio.gather(*busy))
    after = (await eclient.get("/metrics")).text
    assert all(a.status_code == 200 for a in answers)
    calls = _metric(after, "sluice_embedder_encode_calls_total") - _metric(
        before, "sluice_embedder_encode_calls_total"
    )
    served = _metric(after, "sluice_embedder_texts_total") - _metric(
        before, "sluice_embedder_texts_total"
    )
    assert served == len(texts) + 3 * len(long_texts)
    requests = len(texts) + len(busy)
    assert 1 <= calls < requests / 2, f"{requests} requests took {calls} encode calls"
    # Each caller got its own text's vector out of the shared batch.
    mine = np.asarray(answers[7].json()["data"][0]["embedding"])
    assert float(mine @ solo) > 0.9999
    other = np.asarray(answers[8].json()["data"][0]["embedding"])
    assert float(other @ solo) < 0.999


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_request"),
        ({"input": "x"}, 400, "invalid_request"),  # model is required
        ({"model": MODEL}, 400, "invalid_request"),  # input is required
        ({"model": MODEL, "input": [[101, 2054]]}, 400, "invalid_request"),  # token arrays
        ({"model": MODEL, "input": 5}, 400, "invalid_request"),
        ({"model": MODEL, "input": "x", "encoding_format": "base64"}, 400, "invalid_request"),
        ({"model": MODEL, "input": "x", "dimensions": 128}, 400, "invalid_dimensions"),
        ({"model": MODEL, "input": []}, 400, "empty_input"),
        ({"model": MODEL, "input": ""}, 400, "empty_input"),
        ({"model": MODEL, "input": ["a", ""]}, 400, "empty_input"),
        ({"model": MODEL, "input": ["a"] * 9}, 400, "too_many_inputs"),
        ({"model": MODEL, "input": "y" * 5001}, 400, "input_too_long"),
        ({"model": "text-embedding-3-large", "input": "x"}, 404, "model_not_found"),
        ({"model": MODEL, "input": "z" * 70_000}, 413, "request_too_large"),
    ],
)
async def test_bad_requests_get_precise_openai_errors(
    eclient: httpx.AsyncClient, body: Any, status: int, code: str
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = await eclient.post(
        "/v1/embeddings", content=content, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code
    assert set(error) == {"message", "type", "param", "code"}
    assert "Traceback" not in error["message"]


async def test_a_body_sent_in_chunks_is_bounded_too(eclient: httpx.AsyncClient) -> None:
    async def chunks() -> Any:
        yield b'{"model": "' + MODEL.encode() + b'", "input": "'
        for _ in range(100):
            yield b"w" * 1024  # 100 KiB, no Content-Length
        yield b'"}'

    r = await eclient.post("/v1/embeddings", content=chunks())
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


async def test_refusals_are_counted_by_status(eclient: httpx.AsyncClient) -> None:
    before = _metric((await eclient.get("/metrics")).text, "sluice_embedder_requests_total")
    await _post(eclient, {"model": "nope", "input": "x"})
    text = (await eclient.get("/metrics")).text
    assert 'sluice_embedder_requests_total{status="404"}' in text
    assert _metric(text, "sluice_embedder_requests_total") == before + 1


async def test_search_when_the_embedder_is_down_is_503(
    services: Services, client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    previous = services.query_embedder
    down = msgspec.structs.replace(
        services.settings, search_embedding_url=f"http://127.0.0.1:{free_port()}/v1"
    )
    services.query_embedder = query_embedder_of(down)  # what the gateway uses
    try:
        r = await client.post("/api/v1/search", headers=auth_headers, json={"query": "anything"})
    finally:
        await services.query_embedder.aclose()
        services.query_embedder = previous
    assert r.status_code == 503, r.text
    assert r.json()["error"] == "embedding_unavailable"


GATEWAY_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, resource, sys
    import httpx
    from app.core.auth import TokenService
    from app.core.settings import Settings
    from app.gateway.app import create_app

    HEAVY = ("torch", "sentence_transformers", "transformers")

    def heavy():
        return sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)

    async def main():
        after_import = heavy()
        settings = Settings.from_environ(os.environ)
        app = create_app(settings)
        token = TokenService(settings.jwt_secret.reveal()).mint("torchless")
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=transport, base_url="http://gateway"
        ) as c:
            r = await c.post(
                "/api/v1/search",
                headers={"Authorization": "Bearer " + token},
                json={"query": "volcanoes and lava"},
            )
        print(json.dumps({
            "status": r.status_code,
            "after_import": after_import,
            "after_search": heavy(),
            # VmHWM, this process's own peak: ru_maxrss would carry the forking
            # pytest process's size across exec.
            "maxrss_kb": int(
                next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:"))
            ),
        }))

    asyncio.run(main())
    """
)


def test_the_gateway_serves_a_search_without_importing_torch(
    settings_env: dict[str, str], migrated: Settings, embedder_service: EmbedderProcess
) -> None:
    env = {
        **settings_env,
        "SEARCH_EMBEDDING_URL": embedder_service.api_url,
        "PYTHONPATH": str(ROOT),
    }
    out = subprocess.run(
        [sys.executable, "-c", GATEWAY_SCRIPT],
        env=env,
        cwd=ROOT,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr.decode()[-3000:]
    report = json.loads(out.stdout.decode().strip().splitlines()[-1])
    assert report["status"] == 200
    assert report["after_import"] == [] and report["after_search"] == []
    # A guard, not the target (bench/search.py measures a real gateway's RSS):
    # torch alone would add several hundred MiB.
    assert report["maxrss_kb"] < 250 * 1024, report


async def test_a_worker_can_embed_through_the_service(
    migrated: Settings,
    search_embedder: EmbedderProcess,
    make_job: MakeJob,
    client: httpx.AsyncClient,
    auth_headers: dict[str, str],
) -> None:
    """``EMBEDDING_PROVIDER=openai`` + ``EMBEDDING_API_URL`` = the embedder: a worker
    indexes without a model of its own, and the gateway finds what it indexed."""
    settings = msgspec.structs.replace(
        migrated, embedding_provider="openai", embedding_api_url=search_embedder.api_url
    )
    async with open_worker_context(settings) as ctx:
        assert isinstance(ctx.embedder, OpenAIEmbedder)
        job = await make_job(
            make_pdf([TOPIC_PAGES[0], TOPIC_PAGES[3]]),
            options={"chunk_size": 32, "chunk_overlap": 0},
        )
        assert await JobRun(ctx, job.job_id).run() == Outcome.COMPLETED
    r = await client.post(
        "/api/v1/search",
        headers=auth_headers,
        json={"query": "baking bread with wild yeast", "top_k": 1},
    )
    assert r.status_code == 200, r.text
    assert "Sourdough" in r.json()["results"][0]["text"]


async def test_the_queue_is_bounded_and_one_encode_runs_at_a_time() -> None:
    """The batcher itself, with a slow encoder passed in: past ``max_queue`` waiting
    texts a request is refused at once; encodes never overlap; each caller gets its rows."""
    running = 0
    overlapped = False
    gate = asyncio.Event()
    sizes: list[int] = []

    async def encode(texts: list[str]) -> Any:
        nonlocal running, overlapped
        running += 1
        overlapped |= running > 1
        sizes.append(len(texts))
        await gate.wait()
        running -= 1
        return np.asarray([[float(t)] * 3 for t in texts], dtype=np.float32)

    batcher = MicroBatcher(
        encode, EmbedderMetrics(CollectorRegistry()), max_batch_size=4, max_wait_ms=1, max_queue=4
    )
    batcher.start()
    try:
        first = asyncio.create_task(batcher.embed(["1"]))
        while not sizes:  # the first encode has started and is held at the gate
            await asyncio.sleep(0.001)
        waiting = [asyncio.create_task(batcher.embed([str(n), str(n + 10)])) for n in (2, 3)]
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded):
            await batcher.embed(["5"])  # 4 texts already wait
        gate.set()
        rows = await asyncio.gather(first, *waiting)
    finally:
        await batcher.aclose()
    assert not overlapped
    assert sizes == [1, 4]  # the two waiting requests went into one encode
    assert [r[:, 0].tolist() for r in rows] == [[1.0], [2.0, 12.0], [3.0, 13.0]]


THREADS_SCRIPT = textwrap.dedent(
    """
    import asyncio, os
    import torch
    from app.core.embedding import create_embedder
    from app.core.settings import Settings

    async def main():
        embedder = await create_embedder(Settings.from_environ(os.environ))
        vectors = await embedder.embed(["a query"])
        print(torch.get_num_threads(), vectors.shape[1])

    asyncio.run(main())
    """
)


def test_embedding_threads_sets_a_workers_model_threads(settings_env: dict[str, str]) -> None:
    """``EMBEDDING_THREADS`` is what a worker's in-process model runs on; 0 leaves
    torch's default (one per core), which is what a lone worker wants."""
    base = {**settings_env, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    seen = {}
    for threads in ("1", "0"):
        out = subprocess.run(
            [sys.executable, "-c", THREADS_SCRIPT],
            env={**base, "EMBEDDING_PROVIDER": "local", "EMBEDDING_THREADS": threads},
            cwd=ROOT,
            capture_output=True,
            timeout=180,
            check=False,
        )
        assert out.returncode == 0, out.stderr.decode()[-3000:]
        seen[threads] = out.stdout.decode().split()
    assert seen["1"] == ["1", "384"]
    assert seen["0"] == [str(torch_default_threads()), "384"]


def torch_default_threads() -> int:
    """torch's own default in a fresh process (its cores, as it counts them)."""
    out = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        capture_output=True,
        timeout=120,
        check=True,
    )
    return int(out.stdout)
