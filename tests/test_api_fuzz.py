"""The API as a fuzzer sees it: Schemathesis against ``/openapi.json`` of a real
gateway process on the embedded stack, every operation, every phase
(examples, coverage, fuzzing, stateful through the schema's OpenAPI links),
every check, zero failures.

The run is reproducible: a fixed seed, deterministic generation and no example
database.  A real gateway process (not the ASGI app in-process) because that is
what a fuzzer meets, including the HTTP server's own parsing; on localhost the
whole run costs about as much as in-process would (the checks and generation
dominate, not the sockets).

One check is adapted rather than taken as is: ``positive_data_acceptance``
expects every schema-valid request to succeed, but some rules depend on the
server's state or settings and no JSON Schema can state them (a part's exact
size and MD5, a part number within *this* upload, an opaque cursor's content,
the extension a document type must match, the deployment's size limit).  A
schema-valid request refused for one of exactly those reasons, named by its
error code in :data:`BEYOND_THE_SCHEMA`, is not a failure; any other refusal is.

The hostile requests of issue #8 are explicit cases below, each checked against
the schema like the generated ones and for its precise status and code.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis.core.failures import Failure
from schemathesis.engine import Status, events, from_schema
from schemathesis.openapi.checks import RejectedPositiveData
from schemathesis.specs.openapi.checks import positive_data_acceptance

from app.core.auth import TokenService
from app.core.settings import Settings
from app.gateway.app import api_routes
from app.gateway.openapi import build_openapi
from app.gateway.routing import ApiLink, ApiRoute
from devstack.embedder import EmbedderProcess
from tests.conftest import JWT_SECRET
from tests.fixtures_uploads import GatewayProcess, gateway_env

pytestmark = pytest.mark.slow

SEED = 20268
BEYOND_THE_SCHEMA = frozenset(
    {
        "invalid_cursor",  # opaque: only a next_cursor the server issued decodes
        "invalid_part_number",  # 1..total_parts of this upload
        "invalid_part_size",  # exactly the size this part must have
        "invalid_total_parts",  # must equal this upload's
        "invalid_is_final_chunk",  # must agree with part_number and total_parts
        "checksum_required",  # one of two headers (Content-MD5 or X-Chunk-Hash)
        "checksum_mismatch",  # the MD5 of the bytes actually sent
        "unsupported_file_type",  # document_type must match the file's extension
        "unsupported_content_type",  # content_type must fit the file's extension
        "file_too_large",  # the deployment's MAX_UPLOAD_SIZE
        "invalid_filename",  # 255 UTF-8 bytes; JSON Schema's maxLength counts characters
    }
)


REACHED_THROUGH_LINKS = {
    "an upload by id": {
        "GET /api/v1/documents/upload/status/{upload_id}",
        "DELETE /api/v1/documents/upload/cancel/{upload_id}",
        "POST /api/v1/documents/upload/{upload_id}/parts/{part_number}/presign",
        "POST /api/v1/documents/upload/complete/{upload_id}",
    },
    "a document by id": {
        "GET /api/v1/documents/{document_id}",
        "DELETE /api/v1/documents/{document_id}",
        "POST /api/v1/documents/{document_id}/reprocess",
        "GET /api/v1/documents/{document_id}/chunks",
        "GET /api/v1/documents/{document_id}/download",
    },
    "a job by id": {
        "GET /api/v1/jobs/{job_id}",
        "POST /api/v1/jobs/{job_id}/cancel",
        "POST /api/v1/jobs/{job_id}/retry",
    },
}
"""Operations only a real id gets a 2xx from: the stateful phase must reach some
of each group, which it can only do by following the schema's links."""


def _error_code(response: Any) -> str | None:
    try:
        body = json.loads(response.content)
    except (ValueError, TypeError):
        return None
    return body.get("error") if isinstance(body, dict) else None


@schemathesis.check
def positive_data_acceptance_within_schema(ctx: Any, response: Any, case: Any) -> bool | None:
    """``positive_data_acceptance``, except for the refusals in :data:`BEYOND_THE_SCHEMA`."""
    try:
        return positive_data_acceptance(ctx, response, case)
    except RejectedPositiveData:
        if 400 <= response.status_code < 500 and _error_code(response) in BEYOND_THE_SCHEMA:
            return None
        raise


def _config(token: str, examples: int, steps: int) -> schemathesis.Config:
    generation = {"database": "none", "deterministic": True, "max-examples": examples}
    return schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "headers": {"Authorization": f"Bearer {token}"},
            "workers": 1,
            "request-timeout": 30,
            "generation": generation,
            "phases": {
                "examples": {"enabled": True},
                "coverage": {"enabled": True},
                "fuzzing": {"enabled": True},
                "stateful": {"enabled": True, "max-steps": steps},
            },
            "checks": {"positive_data_acceptance": {"enabled": False}},
            "warnings": False,
        }
    )


@pytest.fixture(scope="module")
def fuzz_gateway(
    settings_env: dict[str, str],
    migrated: Settings,
    tmp_path_factory: pytest.TempPathFactory,
    embedder_service: EmbedderProcess,
) -> Iterator[GatewayProcess]:
    # Searches embed their query through a real `sluice embedder`.
    env = gateway_env(
        settings_env,
        RATE_LIMIT_UPLOADS_PER_MINUTE="1000000",
        SEARCH_EMBEDDING_URL=embedder_service.api_url,
    )
    gw = GatewayProcess(env, tmp_path_factory.mktemp("fuzz") / "gateway.log")
    try:
        gw.start()
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def fuzz_token() -> str:
    return TokenService(JWT_SECRET).mint(f"fuzzer-{uuid.uuid4().hex[:12]}")


def _describe(label: str, name: str, failure: Failure, code: str) -> str:
    return f"{label}: {name}: {failure.title}\n{failure.message}\n{code}"


@pytest.mark.timeout(300)  # every operation, four phases: ~130 s on 2 loaded cores
def test_schemathesis_finds_nothing(fuzz_gateway: GatewayProcess, fuzz_token: str) -> None:
    """Every operation, all four phases, every check: no failure and no error."""
    config = _config(fuzz_token, examples=12, steps=25)
    schema = schemathesis.openapi.from_url(f"{fuzz_gateway.url}/openapi.json", config=config)
    problems: list[str] = []
    tested: set[str] = set()
    stateful_ok: set[str] = set()
    phases: dict[str, Status] = {}
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished | events.FuzzScenarioFinished):
            recorder = event.recorder
            tested |= {case.value.operation.label for case in recorder.cases.values()}
            if event.phase.value == "stateful":
                for case_id, interaction in recorder.interactions.items():
                    if interaction.response is not None and interaction.response.status_code < 300:
                        stateful_ok.add(recorder.cases[case_id].value.operation.label)
            for checks in recorder.checks.values():
                for check in checks:
                    if check.status == Status.FAILURE and check.failure_info is not None:
                        info = check.failure_info
                        problems.append(
                            _describe(recorder.label, check.name, info.failure, info.code_sample)
                        )
        elif isinstance(event, events.NonFatalError):
            problems.append(f"{event.label}: error: {event.info.format()}")
        elif isinstance(event, events.FatalError):
            raise event.exception
        elif isinstance(event, events.PhaseFinished):
            phases[event.phase.name.value] = event.status
    assert not problems, "\n\n".join(dict.fromkeys(problems))
    operations = {
        f"{method.upper()} {path}"
        for path, ops in schema.raw_schema["paths"].items()
        for method in ops
    }
    assert operations <= tested, f"never tested: {sorted(operations - tested)}"
    for phase in ("examples", "coverage", "fuzzing", "stateful"):
        assert phases.get(phase) == Status.SUCCESS, (phase, phases)
    # The links carry the stateful phase to operations that need a real id.
    unreached = [what for what, ops in REACHED_THROUGH_LINKS.items() if not ops & stateful_ok]
    assert not unreached, (unreached, sorted(stateful_ok))


# --- the hostile requests of issue #8, as explicit cases ----------------------------------

UPLOAD = "/api/v1/documents/upload"


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def _cursor(stamp: str) -> str:
    raw = f"{stamp}|{uuid.uuid4()}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.fixture(scope="module")
def api_schema(fuzz_gateway: GatewayProcess, fuzz_token: str) -> Any:
    config = _config(fuzz_token, examples=1, steps=2)
    return schemathesis.openapi.from_url(f"{fuzz_gateway.url}/openapi.json", config=config)


@pytest.fixture(scope="module")
def api(fuzz_gateway: GatewayProcess, fuzz_token: str) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {fuzz_token}"}
    with httpx.Client(base_url=fuzz_gateway.url, headers=headers, timeout=60) as c:
        yield c


def _conforms(api_schema: Any, template: str, method: str, response: httpx.Response) -> None:
    """The response's status is documented for the operation and its body matches."""
    operation = api_schema[template][method]
    documented = operation.definition.raw["responses"]
    assert str(response.status_code) in documented, (response.status_code, response.text)
    response.request.read()  # multipart bodies are streamed; schemathesis reads them back
    operation.validate_response(response)


HOSTILE: list[Any] = [
    pytest.param(
        "POST",
        f"{UPLOAD}/initiate",
        f"{UPLOAD}/initiate",
        {
            "content": b'{"filename": "a.pdf", "file_size": 1, "processing_options": '
            b'{"chunk_size": ' + _deep(20_000).encode() + b"}}"
        },
        {400: "invalid_json", 422: "validation_error"},
        id="initiate-deeply-nested-processing_options",
    ),
    pytest.param(
        "POST",
        "/api/v1/search",
        "/api/v1/search",
        {"content": b'{"query": "q", "top_k": 1.0, "document_ids": %s}' % _deep(20_000).encode()},
        {400: "invalid_json", 422: "validation_error"},
        id="search-deeply-nested-after-a-whole-float",
    ),
    pytest.param(
        "POST",
        f"{UPLOAD}/simple",
        f"{UPLOAD}/simple",
        {
            "files": {"file": ("a.txt", b"hello", "text/plain")},
            "data": {"processing_options": _deep(20_000)},
        },
        {400: "invalid_json", 422: "validation_error"},
        id="simple-deeply-nested-processing_options",
    ),
    pytest.param(
        "POST",
        f"{UPLOAD}/initiate",
        f"{UPLOAD}/initiate",
        {"json": {"filename": "report\r\nX-Injected: 1.pdf", "file_size": 10}},
        {400: "invalid_filename"},
        id="initiate-crlf-filename",
    ),
    pytest.param(
        "POST",
        f"{UPLOAD}/initiate",
        f"{UPLOAD}/initiate",
        {"json": {"filename": "bell\x07tab\x1b.pdf", "file_size": 10}},
        {400: "invalid_filename"},
        id="initiate-control-character-filename",
    ),
    pytest.param(
        "POST",
        f"{UPLOAD}/simple",
        f"{UPLOAD}/simple",
        {"files": {"file": ("evil\x1b[2J.txt", b"hello", "text/plain")}},
        {400: "invalid_filename"},
        id="simple-control-character-filename",
    ),
    *[
        pytest.param(
            "GET",
            path,
            path,
            {"params": {"cursor": _cursor(stamp)}},
            {400: "invalid_cursor"},
            id=f"{path.rsplit('/', 1)[-1]}-cursor-{label}",
        )
        for path in ("/api/v1/jobs", "/api/v1/documents", f"{UPLOAD}/active")
        for label, stamp in (
            ("before-year-1-in-utc", "0001-01-01T00:00:00+14:00"),
            ("after-year-9999-in-utc", "9999-12-31T23:59:59-14:00"),
        )
    ],
    *[
        pytest.param(
            "GET",
            path,
            path,
            {"params": {"cursor": cursor}},
            {400: "invalid_cursor"},
            id=f"{path.rsplit('/', 1)[-1]}-cursor-{label}",
        )
        for path in ("/api/v1/jobs", "/api/v1/documents", f"{UPLOAD}/active")
        for label, cursor in (("not-base64", "%%%"), ("no-separator", "bm9wZQ"))
    ],
    pytest.param(
        "POST",
        f"{UPLOAD}/initiate",
        f"{UPLOAD}/initiate",
        {"json": {"filename": "big.pdf", "file_size": 1, "content_type": "x" * (2 << 20)}},
        {413: "payload_too_large"},
        id="initiate-oversized-body",
    ),
    pytest.param(
        "POST",
        f"/api/v1/documents/{uuid.uuid4()}/reprocess",
        "/api/v1/documents/{document_id}/reprocess",
        {"json": {"priority": "x" * (2 << 20)}},
        {413: "payload_too_large"},
        id="reprocess-oversized-body",
    ),
    pytest.param(
        "POST",
        f"{UPLOAD}/{uuid.uuid4()}/parts/1/presign",
        "/api/v1/documents/upload/{upload_id}/parts/{part_number}/presign",
        {"json": {"content_md5": "0" * (2 << 20)}},
        {413: "payload_too_large"},
        id="presign-oversized-body",
    ),
    pytest.param(
        "GET",
        "/api/v1/jobs",
        "/api/v1/jobs",
        {"params": [("status", "queued"), ("status", "failed")]},
        {422: "validation_error"},
        id="jobs-repeated-parameter",
    ),
    pytest.param(
        "GET",
        "/api/v1/jobs",
        "/api/v1/jobs",
        {"params": {"document_id": "not-a-uuid"}},
        {422: "validation_error"},
        id="jobs-malformed-document-filter",
    ),
]


@pytest.mark.parametrize(("method", "url", "template", "request_kwargs", "expected"), HOSTILE)
def test_hostile_request_gets_a_documented_clear_error(
    api: httpx.Client,
    api_schema: Any,
    method: str,
    url: str,
    template: str,
    request_kwargs: dict[str, Any],
    expected: dict[int, str],
) -> None:
    response = api.request(method, url, **request_kwargs)
    assert response.status_code in expected, (response.status_code, response.text[:500])
    assert response.json()["error"] == expected[response.status_code], response.text[:500]
    _conforms(api_schema, template, method, response)


def test_bidi_override_never_reaches_a_stored_filename(api: httpx.Client, api_schema: Any) -> None:
    """U+202E is refused, or stripped from the name that is stored and shown."""
    name = "invoice\u202etxt.pdf"
    response = api.post(f"{UPLOAD}/initiate", json={"filename": name, "file_size": 10})
    _conforms(api_schema, f"{UPLOAD}/initiate", "POST", response)
    if response.status_code == 400:
        assert response.json()["error"] == "invalid_filename"
    else:
        assert response.status_code == 201, response.text
        assert "\u202e" not in response.json()["filename"]


# --- what the schema promises, pinned one case at a time ----------------------------------


def test_a_whole_float_is_an_integer(api: httpx.Client, api_schema: Any) -> None:
    """JSON Schema reads ``10.0`` as the integer 10, so the API must too."""
    response = api.post(f"{UPLOAD}/initiate", json={"filename": "f.txt", "file_size": 10.0})
    assert response.status_code == 201, response.text
    assert response.json()["file_size"] == 10
    _conforms(api_schema, f"{UPLOAD}/initiate", "POST", response)
    half = api.post(f"{UPLOAD}/initiate", json={"filename": "f.txt", "file_size": 10.5})
    assert (half.status_code, half.json()["details"]["field"]) == (422, "file_size")


def test_content_md5_without_padding_is_accepted(api: httpx.Client, api_schema: Any) -> None:
    data = b"sluice" * 100
    init = api.post(f"{UPLOAD}/initiate", json={"filename": "p.txt", "file_size": len(data)})
    assert init.status_code == 201, init.text
    digest = base64.b64encode(hashlib.md5(data).digest()).decode()
    url = f"{UPLOAD}/{init.json()['upload_id']}/parts/1"
    response = api.put(url, content=data, headers={"Content-MD5": digest.rstrip("=")})
    assert response.status_code == 200, response.text
    _conforms(api_schema, f"{UPLOAD}/{{upload_id}}/parts/{{part_number}}", "PUT", response)


def test_405_names_every_method_of_the_path(api: httpx.Client) -> None:
    response = api.put(f"/api/v1/documents/{uuid.uuid4()}")
    assert response.status_code == 405
    assert response.headers["allow"] == "DELETE, GET, HEAD"
    assert response.json()["error"] == "method_not_allowed"


def test_links_and_default_errors_are_generated_from_the_routes() -> None:
    spec = build_openapi(api_routes(), title="t", version="1")
    ops = {op["operationId"]: op for path in spec["paths"].values() for op in path.values()}
    links = ops["post_initiate"]["responses"]["201"]["links"]
    assert {link["operationId"] for link in links.values()} >= {
        "get_status",
        "post_complete",
        "delete_cancel",
        "post_presign",
        "put_put_part",
        "post_chunk_form",
    }
    document_targets = {
        link["operationId"]
        for link in ops["get_list_documents"]["responses"]["200"]["links"].values()
    }
    assert document_targets == {
        "get_get_document",
        "get_list_chunks",
        "get_download",
        "post_reprocess",
        "delete_delete_document",
    }
    for op_id, op in ops.items():
        statuses = set(op["responses"])
        if "security" in op:
            assert {"401", "429", "503"} <= statuses, op_id
        if "requestBody" in op:
            assert {"400", "408", "413"} <= statuses, op_id
    # The part PUT documents its raw body and its checksum headers.
    put = ops["put_put_part"]
    assert put["requestBody"]["content"] == {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
    }
    assert {p["name"] for p in put["parameters"] if p["in"] == "header"} == {
        "Content-MD5",
        "X-Chunk-Hash",
    }
    form = ops["post_chunk_form"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(form["required"]) == {"upload_id", "part_number", "chunk_hash", "chunk_file"}


def test_a_link_to_no_operation_is_refused() -> None:
    route = ApiRoute(
        "/api/v1/x",
        _never_called,
        methods=["GET"],
        summary="x",
        links=[ApiLink(name="Nowhere", operation="get_nothing", parameters={"id": "$.id"})],
    )
    with pytest.raises(ValueError, match="get_nothing"):
        build_openapi([route], title="t", version="1")


async def _never_called(_request: Any) -> Any:
    raise AssertionError("not a real route")
