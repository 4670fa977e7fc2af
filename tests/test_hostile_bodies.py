"""Hostile and careless clients against a real gateway process (issue 8, items 1-4).

Every test talks to ``python -m app gateway`` over real sockets (``http.client``
or a raw socket where the client must misbehave on purpose) and, where memory is
the point, reads the gateway's resident set from ``/proc/PID/status``.

* bodies are bounded per route before and while they are read (413, no growth);
* a refusal reaches a client that sends its whole body before reading (drain,
  then answer), also with ``Connection: close``, and ``Expect: 100-continue``
  clients are refused before they send it;
* a client that vanishes mid-part is one ``client_disconnected`` info line;
* part buffers grow with the data, parts in flight are capped per user, and a
  stalled body gets 408.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.core.auth import TokenService
from app.core.settings import Settings
from app.uploads.parts import PartBuffer
from tests.fixtures_uploads import GatewayProcess, gateway_env

MiB = 1024 * 1024
PART = 8 * MiB
BASE = "/api/v1/documents/upload"
SLOTS = 4
_BLOCK = b"x" * MiB


@pytest.fixture(scope="module")
def gateway(
    settings_env: dict[str, str],
    migrated: Settings,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayProcess]:
    """One gateway for the module: 8 MiB parts, INFO logs, ``SLOTS`` parts per user."""
    env = gateway_env(
        settings_env,
        UPLOAD_CHUNK_SIZE_MB="8",
        LOG_LEVEL="INFO",
        MAX_PARTS_IN_FLIGHT_PER_USER=str(SLOTS),
        RATE_LIMIT_UPLOADS_PER_MINUTE="100000",
    )
    gw = GatewayProcess(env, tmp_path_factory.mktemp("hostile") / "gateway.log")
    try:
        gw.start()
        yield gw
    finally:
        gw.stop()


# --- helpers ---------------------------------------------------------------------------


def rss_mb(gw: GatewayProcess) -> float:
    assert gw.proc is not None
    for line in Path(f"/proc/{gw.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def bearer(tokens: TokenService, user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens.mint(user)}"}


def new_upload(gw: GatewayProcess, headers: dict[str, str], parts: int = 3) -> str:
    r = httpx.post(
        f"{gw.url}{BASE}/initiate",
        json={"filename": "r.txt", "file_size": parts * PART - 100, "content_type": "text/plain"},
        headers=headers,
        timeout=30,
    )
    assert r.status_code == 201, r.text
    upload_id: str = r.json()["upload_id"]
    return upload_id


def blocks(n: int) -> Iterator[bytes]:
    for _ in range(n):
        yield _BLOCK


def send(
    gw: GatewayProcess,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes | Iterator[bytes],
    *,
    length: int | None,
    conn: http.client.HTTPConnection | None = None,
) -> tuple[int, dict[str, Any], Message]:
    """Send the whole body first, then read the answer (as urllib/requests do).

    ``length=None`` sends the body chunked.  A connection made here is closed.
    """
    c = conn or http.client.HTTPConnection("127.0.0.1", gw.port, timeout=120)
    try:
        hdrs = dict(headers)
        if length is not None:
            hdrs["Content-Length"] = str(length)
        c.request(method, path, body=body, headers=hdrs, encode_chunked=length is None)
        resp = c.getresponse()
        return resp.status, json.loads(resp.read()), resp.headers
    finally:
        if conn is None:
            c.close()


def raw_connect(
    gw: GatewayProcess, method: str, path: str, headers: dict[str, str]
) -> socket.socket:
    """Open a connection and send only the request head."""
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=30)
    head = f"{method} {path} HTTP/1.1\r\nHost: gateway\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall((head + "\r\n").encode())
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, Any], Message]:
    resp = http.client.HTTPResponse(sock)
    try:
        resp.begin()
        return resp.status, json.loads(resp.read()), resp.headers
    finally:
        resp.close()


def part_headers(headers: dict[str, str]) -> dict[str, str]:
    md5 = base64.b64encode(hashlib.md5(b"any").digest()).decode()
    return {**headers, "Content-MD5": md5}


def new_log(gw: GatewayProcess, offset: int) -> str:
    return gw.log_path.read_bytes()[offset:].decode("utf-8", "replace")


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


# --- 1. bounded bodies -----------------------------------------------------------------


def test_huge_bodies_to_json_routes_are_refused_without_buffering(
    gateway: GatewayProcess, tokens: TokenService
) -> None:
    headers = {**bearer(tokens, f"u-{uuid.uuid4().hex[:8]}"), "Content-Type": "application/json"}
    unknown = uuid.uuid4()
    routes = [
        (f"{BASE}/initiate", 413),
        (f"{BASE}/{unknown}/parts/1/presign", 413),
        (f"/api/v1/documents/{unknown}/reprocess", 413),
        ("/api/v1/search", 413),
        (f"{BASE}/complete/{unknown}", 404),  # takes no body: never reads one
    ]
    before = rss_mb(gateway)
    for path, expected in routes:
        for length in (512 * MiB, None):
            status, body, _ = send(gateway, "POST", path, headers, blocks(512), length=length)
            assert rss_mb(gateway) - before < 50, (path, length)
            assert status == expected, (path, length, body)
            if expected == 413:
                assert body["error"] == "payload_too_large"
                assert body["details"]["limit"] == 64 * 1024


# --- 2. refusals reach clients that send everything first ------------------------------


@pytest.mark.parametrize("close", [False, True], ids=["keep-alive", "connection-close"])
def test_refused_parts_are_answered_not_reset(
    gateway: GatewayProcess, tokens: TokenService, close: bool
) -> None:
    headers = part_headers(bearer(tokens, f"u-{uuid.uuid4().hex[:8]}"))
    if close:
        headers["Connection"] = "close"  # what urllib sends: no lingering by the server
    upload_id = new_upload(gateway, headers)
    cancelled = new_upload(gateway, headers)
    r = httpx.delete(f"{gateway.url}{BASE}/cancel/{cancelled}", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    bad_token = {**headers, "Authorization": "Bearer not.a.token"}
    cases = [
        (f"{BASE}/{upload_id}/parts/1", bad_token, PART, 401, "invalid_token"),
        (f"{BASE}/{uuid.uuid4()}/parts/1", headers, PART, 404, "upload_not_found"),
        (f"{BASE}/{cancelled}/parts/1", headers, PART, 409, "upload_cancelled"),
        (f"{BASE}/{upload_id}/parts/1", headers, PART + 1, 413, "part_too_large"),
        (f"{BASE}/{upload_id}/parts/1", headers, None, 413, "part_too_large"),  # chunked, 9 MiB
    ]
    conn = None if close else http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=120)
    for path, hdrs, length, status, code in cases:
        data = blocks(9) if length is None else b"x" * length
        got, body, resp = send(gateway, "PUT", path, hdrs, data, length=length, conn=conn)
        assert got == status, (path, body)
        assert body["error"] == code
        assert body["request_id"]
        if conn is not None:  # the body was drained: the same connection carries on
            assert resp.get("connection") != "close"
    if conn is not None:
        conn.request("GET", "/health")
        assert conn.getresponse().status == 200
        conn.close()


def test_expect_100_continue_is_refused_before_the_body_is_sent(
    gateway: GatewayProcess, tokens: TokenService
) -> None:
    headers = part_headers(bearer(tokens, f"u-{uuid.uuid4().hex[:8]}"))
    for path, hdrs, status in [
        (f"{BASE}/{uuid.uuid4()}/parts/1", {**headers, "Authorization": "Bearer x"}, 401),
        (f"{BASE}/{uuid.uuid4()}/parts/1", headers, 404),
    ]:
        sock = raw_connect(
            gateway,
            "PUT",
            path,
            {**hdrs, "Content-Length": str(PART), "Expect": "100-continue"},
        )
        with sock:
            got, body, resp = read_response(sock)  # no 100 Continue comes first
            assert got == status, body
            assert resp.get("connection") == "close"
            assert sock.recv(1) == b""  # and the server does not wait for the body


# --- 3. clients that vanish mid-part ---------------------------------------------------


def test_clients_dropping_mid_part_are_one_info_line_each(
    gateway: GatewayProcess, tokens: TokenService
) -> None:
    drops = 10
    users = [f"u-{uuid.uuid4().hex[:8]}" for _ in range(drops // SLOTS + 1)]
    uploads = {u: new_upload(gateway, bearer(tokens, u), parts=SLOTS) for u in users}
    offset = gateway.log_path.stat().st_size
    socks = []
    for i in range(drops):
        user = users[i // SLOTS]
        sock = raw_connect(
            gateway,
            "PUT",
            f"{BASE}/{uploads[user]}/parts/{i % SLOTS + 1}",
            {**part_headers(bearer(tokens, user)), "Content-Length": str(PART)},
        )
        sock.sendall(_BLOCK)
        socks.append(sock)
    time.sleep(0.5)
    for sock in socks:
        sock.close()
    started = time.monotonic()
    assert httpx.get(f"{gateway.url}/health", timeout=10).status_code == 200
    assert time.monotonic() - started < 3

    wait_until(lambda: new_log(gateway, offset).count("client_disconnected") >= drops)
    time.sleep(0.3)
    log = new_log(gateway, offset)
    lines = [line for line in log.splitlines() if "client_disconnected" in line]
    assert len(lines) == drops, log
    assert all("status=499" in line and "bytes_received=" in line for line in lines), lines
    for marker in ("Traceback", "unhandled_error", "Exception in ASGI", "status=500"):
        assert marker not in log, log
    metrics = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    part_route = 'route="/api/v1/documents/upload/{upload_id}/parts/{part_number}"'
    counted = [m for m in metrics.splitlines() if part_route in m and 'method="PUT"' in m]
    assert any('status="499"' in m for m in counted), counted
    assert not any('status="500"' in m for m in counted), counted
    # every slot was given back: each user can send parts again
    for user in users:
        assert_slots_free(gateway, tokens, user, uploads[user])


def assert_slots_free(gw: GatewayProcess, tokens: TokenService, user: str, upload_id: str) -> None:
    """A new part of ``user`` gets past the slot check (no slot was leaked)."""
    hdrs = {
        **part_headers(bearer(tokens, user)),
        "Content-Length": str(PART),
        "Expect": "100-continue",
    }
    with raw_connect(gw, "PUT", f"{BASE}/{upload_id}/parts/99", hdrs) as sock:
        status, body, _ = read_response(sock)
    assert (status, body["error"]) == (400, "invalid_part_number"), body


# --- 4. part buffers, parts in flight, stalled bodies ----------------------------------


@contextlib.contextmanager
def slow_parts(
    gw: GatewayProcess, tokens: TokenService, user: str, upload_id: str, count: int
) -> Iterator[list[socket.socket]]:
    """``count`` part requests of ``user`` that have sent a few bytes, then wait."""
    hdrs = {**part_headers(bearer(tokens, user)), "Content-Length": str(PART)}
    socks = []
    try:
        for i in range(count):
            sock = raw_connect(gw, "PUT", f"{BASE}/{upload_id}/parts/{i % 2 + 1}", hdrs)
            sock.sendall(b"abc")
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def refused_with_429(gw: GatewayProcess, tokens: TokenService, user: str, upload_id: str) -> bool:
    hdrs = {**part_headers(bearer(tokens, user)), "Content-Length": str(PART)}
    with raw_connect(gw, "PUT", f"{BASE}/{upload_id}/parts/1", hdrs) as sock:
        sock.sendall(b"x" * PART)
        status, body, resp = read_response(sock)
    if status != 429:
        return False
    assert body["error"] == "too_many_parts_in_flight"
    assert body["details"]["limit"] == SLOTS
    assert int(resp.get("retry-after") or "0") >= 1
    return True


def test_parts_in_flight_are_capped_per_user_and_released(
    gateway: GatewayProcess, tokens: TokenService
) -> None:
    alice, bob = (f"u-{uuid.uuid4().hex[:8]}" for _ in range(2))
    alice_upload, bob_upload = (
        new_upload(gateway, bearer(tokens, alice)),
        new_upload(gateway, bearer(tokens, bob)),
    )
    with slow_parts(gateway, tokens, alice, alice_upload, SLOTS):
        wait_until(lambda: refused_with_429(gateway, tokens, alice, alice_upload))
        # bob is not affected: his part goes through while alice is at her limit
        data = b"b" * PART
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
        r = httpx.put(
            f"{gateway.url}{BASE}/{bob_upload}/parts/1",
            content=data,
            headers={**bearer(tokens, bob), "Content-MD5": md5},
            timeout=60,
        )
        assert r.status_code == 200, r.text
    # the slow clients went away: alice's slots are released
    wait_until(lambda: not refused_with_429(gateway, tokens, alice, alice_upload))


def test_slow_parts_do_not_reserve_their_size(
    gateway: GatewayProcess, tokens: TokenService
) -> None:
    users = [f"u-{uuid.uuid4().hex[:8]}" for _ in range(6)]
    uploads = {u: new_upload(gateway, bearer(tokens, u)) for u in users}
    before = rss_mb(gateway)
    with contextlib.ExitStack() as stack:
        for user in users:
            stack.enter_context(slow_parts(gateway, tokens, user, uploads[user], SLOTS))
        for user in users:  # every slow part is in its handler, reading its body
            wait_until(lambda user=user: refused_with_429(gateway, tokens, user, uploads[user]))
        time.sleep(0.5)
        grown = rss_mb(gateway) - before
    # reserving each part up front would be 24 x 8 MiB = 192 MiB
    assert grown < len(users) * SLOTS * PART / MiB / 4, grown


def test_stalled_body_gets_408(
    gateway_factory: Callable[..., GatewayProcess], tokens: TokenService
) -> None:
    gw = gateway_factory(UPLOAD_CHUNK_SIZE_MB="8", UPLOAD_BODY_TIMEOUT_SECONDS="1")
    user = f"u-{uuid.uuid4().hex[:8]}"
    upload_id = new_upload(gw, {**bearer(tokens, user)})
    hdrs = {**part_headers(bearer(tokens, user)), "Content-Length": str(PART)}
    started = time.monotonic()
    with raw_connect(gw, "PUT", f"{BASE}/{upload_id}/parts/1", hdrs) as sock:
        sock.sendall(b"x" * 1000)
        status, body, resp = read_response(sock)
    assert (status, body["error"]) == (408, "body_timeout")
    assert resp.get("connection") == "close"
    assert time.monotonic() - started < 20
    # the part's buffer and slot are gone: the same part can be sent now
    data = b"y" * PART
    md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
    r = httpx.put(
        f"{gw.url}{BASE}/{upload_id}/parts/1",
        content=data,
        headers={**bearer(tokens, user), "Content-MD5": md5},
        timeout=60,
    )
    assert r.status_code == 200, r.text


def test_part_buffer_reserves_as_bytes_arrive() -> None:
    part = PartBuffer(PART)
    part.add(b"abc")
    assert part.body.getbuffer().nbytes <= PartBuffer.MIN_RESERVE  # not the part's size
    data = bytes(range(256)) * (PART // 256)
    part = PartBuffer(PART)
    reserved = []
    for i in range(0, PART, 64 * 1024):
        part.add(data[i : i + 64 * 1024])
        reserved.append(part.body.getbuffer().nbytes)
        assert reserved[-1] <= max(8 * part.size, PartBuffer.MIN_RESERVE)
    assert len(set(reserved)) <= 6  # a few regrowths, not one per piece
    body = part.finish()
    assert body.read() == data and part.md5.digest() == hashlib.md5(data).digest()
