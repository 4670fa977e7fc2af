"""The WebSocket protocol without sockets: parsing, the session state machine,
and the per-subscriber merge that gives "no gap, no duplicate, one terminal"."""

from __future__ import annotations

import time

import msgspec
import pytest

from app.core.auth import TokenService
from app.core.errors import RateLimited, Unauthorized
from app.jobs.model import ProgressEvent
from app.ws.feed import JobFeed, Offer, can_resume, covers, merge_by_seq
from app.ws.messages import (
    CLOSE_INVALID_DATA,
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_SLOW_CONSUMER,
    CLOSE_UNAUTHORIZED,
    Auth,
    CancelJob,
    Connected,
    Error,
    GetJobStatus,
    Ping,
    Pong,
    Subscribe,
    Unsubscribe,
    encode,
    parse,
    progress_frame,
)
from app.ws.session import Authenticated, Close, ProtocolSession, Reply, Run
from tests.conftest import JWT_SECRET

NOW = time.time()


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def event(seq: int, status: str = "running", job_id: str = "j1") -> ProgressEvent:
    return ProgressEvent(
        job_id=job_id,
        seq=seq,
        status=status,
        stage="extract",
        stage_progress=0.5,
        overall_progress=0.3,
        message=f"e{seq}",
        ts=NOW,
    )


def session(
    clock: Clock, *, authenticated_as: str | None = None
) -> tuple[ProtocolSession, TokenService]:
    tokens = TokenService(JWT_SECRET, clock=clock)
    identity = tokens.verify(tokens.mint(authenticated_as)) if authenticated_as else None
    s = ProtocolSession(
        tokens,
        endpoint="progress",
        connection_id="c1",
        heartbeat_interval=30,
        identity=identity,
        clock=clock,
        max_message_bytes=1024,
    )
    return s, tokens


# --- parsing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"type":"auth","token":"t"}', Auth(token="t")),
        (
            b'{"type":"subscribe","job_ids":["a"],"user_id":"someone-else"}',
            Subscribe(job_ids=["a"], user_id="someone-else"),
        ),
        (
            b'{"type":"subscribe","job_ids":["a"],"channels":["progress"],"since":{"a":3}}',
            Subscribe(job_ids=["a"], since={"a": 3}),
        ),
        (
            b'{"type":"unsubscribe","job_ids":["a","b"],"id":7}',
            Unsubscribe(job_ids=["a", "b"], id=7),
        ),
        (b'{"type":"get_job_status","job_id":"a"}', GetJobStatus(job_id="a")),
        (b'{"type":"cancel_job","job_id":"a","id":"x"}', CancelJob(job_id="a", id="x")),
        (b'{"type":"ping"}', Ping()),
    ],
)
def test_every_client_message_parses(raw: bytes, expected: object) -> None:
    assert parse(raw) == expected


@pytest.mark.parametrize(
    ("raw", "code", "field"),
    [
        (b"not json", "invalid_json", None),
        (b"[1,2]", "invalid_message", None),
        (b'{"job_ids":["a"]}', "missing_type", "type"),
        (b'{"type":"shout"}', "unknown_type", "type"),
        (b'{"type":7}', "unknown_type", "type"),
        (b'{"type":"subscribe"}', "invalid_message", "job_ids"),
        (b'{"type":"subscribe","job_ids":[]}', "invalid_message", "job_ids"),
        (b'{"type":"subscribe","job_ids":["a"],"since":{"a":-1}}', "invalid_message", "since"),
        (b'{"type":"get_job_status"}', "invalid_message", "job_id"),
        (b'{"type":"cancel_job","job_id":5}', "invalid_message", "job_id"),
        (b'{"type":"ping","bogus":1}', "invalid_message", "bogus"),
    ],
)
def test_bad_messages_are_explained(raw: bytes, code: str, field: str | None) -> None:
    error = parse(raw)
    assert isinstance(error, Error)
    assert error.code == code
    assert error.message
    if field is not None:
        assert error.details is not None and error.details["field"] == field


def test_error_echoes_request_id() -> None:
    error = parse(b'{"type":"get_job_status","id":42}')
    assert isinstance(error, Error) and error.id == 42


def test_server_messages_encode_compactly() -> None:
    pong = msgspec.json.decode(encode(Pong(server_time=1.5)))
    assert pong == {"type": "pong", "server_time": 1.5}
    frame = msgspec.json.decode(progress_frame("j1", msgspec.json.encode(event(3))))
    assert frame["type"] == "job_progress" and frame["job_id"] == "j1"
    assert frame["data"]["seq"] == 3 and "snapshot" not in frame


# --- the session ---------------------------------------------------------------------------


def test_query_token_session_greets_at_once() -> None:
    s, _ = session(Clock(), authenticated_as="alice")
    actions = s.opened()
    assert isinstance(actions[0], Authenticated) and actions[0].first
    reply = actions[1]
    assert isinstance(reply, Reply) and isinstance(reply.message, Connected)
    assert reply.message.user_id == "alice"


def test_first_message_auth_then_commands() -> None:
    clock = Clock()
    s, tokens = session(clock)
    assert s.opened() == []
    [before] = s.receive(b'{"type":"get_job_status","job_id":"x"}')
    assert isinstance(before, Reply) and isinstance(before.message, Error)
    assert before.message.code == "auth_required"
    [pong] = s.receive(b'{"type":"ping"}')  # ping works before auth
    assert isinstance(pong, Reply) and isinstance(pong.message, Pong)
    token = tokens.mint("bob")
    auth, greeting = s.receive(msgspec.json.encode({"type": "auth", "token": token}))
    assert isinstance(auth, Authenticated) and auth.identity.user_id == "bob"
    assert isinstance(greeting, Reply) and isinstance(greeting.message, Connected)
    [run] = s.receive(b'{"type":"subscribe","job_ids":["j"],"user_id":"mallory"}')
    assert isinstance(run, Run) and isinstance(run.command, Subscribe)
    assert s.identity is not None and s.identity.user_id == "bob"  # user_id ignored


def test_bad_first_auth_closes_4401() -> None:
    s, _ = session(Clock())
    error, close = s.receive(b'{"type":"auth","token":"garbage"}')
    assert isinstance(error, Reply) and isinstance(error.message, Error)
    assert error.message.code == "invalid_token"
    assert close == Close(CLOSE_UNAUTHORIZED, "invalid_token")
    assert s.receive(b'{"type":"ping"}') == []


def test_auth_deadline_closes_only_unauthenticated_sessions() -> None:
    s, _ = session(Clock())
    assert s.auth_deadline_passed() == [Close(CLOSE_UNAUTHORIZED, "authentication timeout")]
    s2, _ = session(Clock(), authenticated_as="alice")
    assert s2.auth_deadline_passed() == []


def test_expiry_closes_4401_unless_refreshed() -> None:
    clock = Clock()
    tokens = TokenService(JWT_SECRET, clock=clock)
    s = ProtocolSession(
        tokens,
        endpoint="progress",
        connection_id="c",
        heartbeat_interval=30,
        identity=tokens.verify(tokens.mint("alice", ttl_seconds=60)),
        clock=clock,
    )
    fresh = tokens.mint("alice", ttl_seconds=600)
    clock.now += 30
    actions = s.receive(msgspec.json.encode({"type": "auth", "token": fresh}))
    assert isinstance(actions[0], Authenticated) and not actions[0].first
    clock.now += 60  # the first token has expired, the refreshed one has not
    assert s.expiry_reached() == []
    clock.now += 600
    assert s.expiry_reached() == [Close(CLOSE_UNAUTHORIZED, "token expired")]


def test_refresh_cannot_switch_user() -> None:
    clock = Clock()
    s, tokens = session(clock, authenticated_as="alice")
    [reply] = s.receive(msgspec.json.encode({"type": "auth", "token": tokens.mint("eve")}))
    assert isinstance(reply, Reply) and isinstance(reply.message, Error)
    assert reply.message.code == "identity_mismatch"
    assert s.identity is not None and s.identity.user_id == "alice"


def test_oversized_message_errors_then_closes_1009() -> None:
    s, _ = session(Clock(), authenticated_as="alice")
    error, close = s.receive(b'{"type":"ping","pad":"' + b"x" * 2000 + b'"}')
    assert isinstance(error, Reply) and isinstance(error.message, Error)
    assert error.message.code == "message_too_large"
    assert close == Close(CLOSE_MESSAGE_TOO_BIG, "message too large")


def test_rejected_query_token_errors_then_closes_4401() -> None:
    tokens = TokenService(JWT_SECRET)
    s = ProtocolSession(
        tokens,
        endpoint="progress",
        connection_id="c",
        heartbeat_interval=30,
        rejected=Unauthorized("token has expired", code="token_expired"),
    )
    error, close = s.opened()
    assert isinstance(error, Reply) and isinstance(error.message, Error)
    assert error.message.code == "token_expired"
    assert close == Close(CLOSE_UNAUTHORIZED, "token_expired")
    assert s.closed and s.receive(b'{"type":"ping"}') == []


def test_private_close_codes_are_the_errors_ws_close_codes() -> None:
    """Every close caused by an error uses ``SluiceError.ws_close_code`` (4000 + status)."""
    assert Unauthorized("x").ws_close_code == CLOSE_UNAUTHORIZED == 4401
    assert RateLimited("x").ws_close_code == CLOSE_SLOW_CONSUMER == 4429
    expired = Unauthorized("token has expired", code="token_expired")
    assert Close.on_error(expired) == Close(4401, "token_expired")
    tokens = TokenService(JWT_SECRET)
    s = ProtocolSession(
        tokens, endpoint="progress", connection_id="c", heartbeat_interval=30, rejected=expired
    )
    assert s.opened()[-1] == Close.on_error(expired)
    s2, _ = session(Clock())
    [_, close] = s2.receive(b'{"type":"auth","token":"garbage"}')
    assert isinstance(close, Close) and close.code == Unauthorized("x").ws_close_code


@pytest.mark.parametrize("authenticated_as", ["alice", None])
def test_deeply_nested_message_errors_then_closes_1007(authenticated_as: str | None) -> None:
    s, _ = session(Clock(), authenticated_as=authenticated_as)
    deep = b'{"type":"ping","user_id":' + b"[" * 400 + b"]" * 400 + b"}"
    error, close = s.receive(deep)
    assert isinstance(error, Reply) and isinstance(error.message, Error)
    assert error.message.code == "invalid_json"
    assert close == Close(CLOSE_INVALID_DATA, "message nested too deeply")
    s2, _ = session(Clock(), authenticated_as=authenticated_as)  # 64 levels are fine
    nested = b'{"type":"ping","user_id":' + b"[" * 63 + b"]" * 63 + b"}"
    [pong] = s2.receive(nested)
    assert isinstance(pong, Reply) and isinstance(pong.message, Pong)


def test_unknown_channel_is_refused() -> None:
    s, _ = session(Clock(), authenticated_as="alice")
    [reply] = s.receive(b'{"type":"subscribe","job_ids":["a"],"channels":["gossip"]}')
    assert isinstance(reply, Reply) and isinstance(reply.message, Error)
    assert reply.message.code == "unsupported_channel"


# --- the per-subscriber feed ---------------------------------------------------------------


def test_feed_buffers_while_syncing_and_merges_without_duplicates() -> None:
    feed = JobFeed("j1")
    for seq in (6, 5, 7):  # live events racing the snapshot read
        assert feed.offer(event(seq)) is Offer.DROP
    out = feed.catch_up([event(5)])  # the snapshot says seq 5
    assert [e.seq for e in out] == [5, 6, 7]
    assert feed.offer(event(7)) is Offer.DROP  # duplicate
    assert feed.offer(event(4)) is Offer.DROP  # backwards
    assert feed.offer(event(8)) is Offer.SEND


def test_feed_resume_from_history_uses_floor() -> None:
    feed = JobFeed("j1")
    feed.offer(event(9))
    out = feed.catch_up([event(7), event(8)], floor=6)
    assert [e.seq for e in out] == [7, 8, 9]


def test_feed_lets_exactly_one_terminal_through() -> None:
    feed = JobFeed("j1")
    feed.offer(event(3, "completed"))
    out = feed.catch_up([event(2), event(3, "completed")])
    assert [(e.seq, e.status) for e in out] == [(2, "running"), (3, "completed")]
    assert feed.done
    assert feed.offer(event(3, "completed")) is Offer.DROP
    assert feed.offer(event(4, "failed")) is Offer.DROP


def test_feed_reports_gaps_and_repairs() -> None:
    feed = JobFeed("j1")
    feed.catch_up([event(1)])
    assert feed.offer(event(4)) is Offer.GAP
    assert feed.offer(event(5)) is Offer.DROP  # buffered during the repair
    out = feed.catch_up([event(2), event(3), event(4)])
    assert [e.seq for e in out] == [2, 3, 4, 5]


def test_covers_requires_contiguous_history_from_since() -> None:
    evs = merge_by_seq([event(5), event(4), event(6), event(5)])
    assert [e.seq for e in evs] == [4, 5, 6]
    assert covers(evs, 3, reached_back=False)
    assert not covers(evs, 2, reached_back=False)  # seq 3 aged out
    assert not covers([event(4), event(6)], 3, reached_back=True)  # hole
    assert covers([], 3, reached_back=True)
    assert not covers([], 3, reached_back=False)


def test_can_resume_needs_every_missed_event_or_an_up_to_date_client() -> None:
    snapshot = event(6)
    feed = JobFeed("j1")
    feed.offer(event(6))  # live, while the history was read
    assert can_resume(feed, snapshot, 3, [event(4), event(5)], reached_back=True)
    assert not can_resume(feed, snapshot, 3, [event(5)], reached_back=True)  # 4 is missing
    assert not can_resume(JobFeed("j1"), snapshot, 2, [event(4)], reached_back=False)
    # Already at the snapshot's seq: nothing to replay, even with the history gone.
    assert can_resume(JobFeed("j1"), snapshot, 6, [], reached_back=False)
