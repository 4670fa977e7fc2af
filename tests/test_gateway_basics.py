"""Foundation behaviour of the gateway: auth, the error shape, health, OpenAPI."""

from __future__ import annotations

import re

import httpx
from starlette.requests import Request
from starlette.responses import Response

from app.core.auth import TokenService
from app.gateway.app import create_app
from app.gateway.services import Services
from tests.conftest import JWT_SECRET


async def test_health_is_live_without_auth(client: httpx.AsyncClient) -> None:
    r = await client.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


async def test_ready_reports_each_dependency(client: httpx.AsyncClient) -> None:
    r = await client.get("/health/ready")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ok"
    assert set(body["checks"]) == {"postgres", "redis", "s3"}
    for check in body["checks"].values():
        assert check["status"] == "ok"
        assert check["latency_ms"] >= 0


async def test_api_requires_a_token(client: httpx.AsyncClient) -> None:
    r = await client.get("/api/v1/me")
    assert r.status_code == 401
    body = r.json()
    assert body["error"] == "missing_token"
    assert body["request_id"] == r.headers["x-request-id"]
    assert r.headers["www-authenticate"].startswith("Bearer")


async def test_valid_token_identifies_the_caller(
    client: httpx.AsyncClient, auth_headers: dict[str, str], user: str
) -> None:
    r = await client.get("/api/v1/me", headers=auth_headers)
    assert r.status_code == 200
    assert r.json()["user_id"] == user


async def test_bad_tokens_are_401_with_a_reason(client: httpx.AsyncClient) -> None:
    expired = TokenService(JWT_SECRET, clock=lambda: 1_000_000).mint("u", ttl_seconds=60)
    forged = TokenService("another-secret-that-is-32-chars-long!").mint("u")
    cases = {
        "Bearer " + expired: "token_expired",
        "Bearer " + forged: "invalid_token",
        "Bearer not.a.jwt": "invalid_token",
        "Basic dXNlcjpwYXNz": "invalid_token",
    }
    for header, code in cases.items():
        r = await client.get("/api/v1/me", headers={"Authorization": header})
        assert r.status_code == 401, header
        assert r.json()["error"] == code, header


async def test_unknown_route_uses_the_error_shape(
    client: httpx.AsyncClient, auth_headers: dict[str, str]
) -> None:
    r = await client.get("/api/v1/nope", headers=auth_headers)
    assert r.status_code == 404
    assert set(r.json()) == {"error", "message", "details", "request_id"}
    assert r.json()["error"] == "not_found"


async def test_client_request_id_is_echoed(client: httpx.AsyncClient) -> None:
    r = await client.get("/health", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = await client.get("/health", headers={"X-Request-ID": "bad id\nwith newline"})
    assert r.headers["x-request-id"] != "bad id\nwith newline"


async def test_openapi_describes_routes_from_schemas(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.")
    me = spec["paths"]["/api/v1/me"]["get"]
    assert me["security"] == [{"bearer": []}]
    assert "401" in me["responses"]
    ref = me["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert spec["components"]["schemas"][ref.rsplit("/", 1)[-1]]["required"] == [
        "user_id",
        "token_expires_at",
    ]
    assert "ErrorBody" in spec["components"]["schemas"]
    docs = await client.get("/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text


async def test_metrics_are_prometheus_text(client: httpx.AsyncClient) -> None:
    await client.get("/health")
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert "sluice_http_requests_total" in r.text


async def test_unexpected_errors_are_500_without_internals(services: Services) -> None:
    async def boom(_request: Request) -> Response:
        raise RuntimeError("secret internal detail")

    app = create_app(services.settings, services=services)
    app.add_route("/api/v1/boom", boom, methods=["GET"])
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    token = TokenService(JWT_SECRET).mint("someone")
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        r = await c.get("/api/v1/boom", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 500
    body = r.json()
    assert body["error"] == "internal_error"
    assert body["request_id"] and body["request_id"] in body["message"]
    assert "secret internal detail" not in r.text and "Traceback" not in r.text


async def test_docs_load_nothing_from_another_host(client: httpx.AsyncClient) -> None:
    r = await client.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "://" not in r.text  # no absolute URL at all, so no CDN
    refs = re.findall(r'(?:src|href)="([^"]*)"', r.text)
    assert len(refs) >= 3, r.text
    # The browser may load only what the gateway serves.
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self';" in csp and "http" not in csp
    for ref in refs:
        assert ref.startswith("/") and not ref.startswith("//"), ref
        asset = await client.get(ref)
        assert asset.status_code == 200, ref
        assert asset.content
    bundle = await client.get("/docs/assets/swagger-ui-bundle.js")
    assert "SwaggerUIBundle" in bundle.text[:5000]
    assert bundle.headers["content-type"].startswith("text/javascript")
    init = await client.get("/docs/assets/init.js")
    assert "SwaggerUIBundle" in init.text and "://" not in init.text
    # Only the allowlisted assets are served.
    for name in ("swagger-editor.js", "LICENSE", "..%2Fcore.py"):
        assert (await client.get(f"/docs/assets/{name}")).status_code == 404


async def test_apps_sharing_services_record_into_their_metrics(services: Services) -> None:
    """The metrics are built once and held by the services: two apps on one
    :class:`Services` (two replicas in a test) count into the same series."""
    labels = {"method": "GET", "route": "/health", "status": "200"}
    sample = "sluice_http_requests_total"
    before = services.metrics.registry.get_sample_value(sample, labels) or 0.0
    for _ in range(2):
        app = create_app(services.settings, services=services)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            assert (await c.get("/health")).status_code == 200
    assert services.metrics.registry.get_sample_value(sample, labels) == before + 2
