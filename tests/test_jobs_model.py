"""The job vocabulary without a stack: enums on the wire, Redis names, the pager's SQL."""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
import pytest

from app.core.db import missing, parse_uuid
from app.core.errors import NotFound
from app.core.pagination import Where
from app.jobs.events import (
    JOB_CHANNEL_PREFIX,
    USER_CHANNEL_PREFIX,
    decode_event,
    encode_event,
    job_channel,
    stream_key,
    user_channel,
)
from app.jobs.model import (
    RETRYABLE_STATUSES,
    TERMINAL_STATUSES,
    UNFINISHED_STATUSES,
    JobStatus,
    ProgressEvent,
    Stage,
)


class StringEvent(msgspec.Struct, kw_only=True, omit_defaults=False):
    """``ProgressEvent`` as it was before its status and stage were enums."""

    job_id: str
    seq: int
    status: str
    stage: str | None
    stage_progress: float
    overall_progress: float
    message: str
    ts: float
    owner_id: str = ""
    document_id: str = ""
    error_code: str | None = None
    error_message: str | None = None
    details: dict[str, Any] = msgspec.field(default_factory=dict)


@pytest.mark.parametrize("status", list(JobStatus))
@pytest.mark.parametrize("stage", [*Stage, None])
def test_an_event_encodes_to_the_bytes_of_its_string_form(
    status: JobStatus, stage: Stage | None
) -> None:
    fields: dict[str, Any] = {
        "job_id": str(uuid.uuid4()),
        "seq": 7,
        "stage_progress": 0.5,
        "overall_progress": 0.25,
        "message": "m",
        "ts": 1700000000.5,
        "owner_id": "u",
        "document_id": "d",
        "details": {"k": 1},
    }
    typed = ProgressEvent(status=status, stage=stage, **fields)
    plain = StringEvent(status=str(status), stage=None if stage is None else str(stage), **fields)
    wire = encode_event(typed)
    assert wire == msgspec.json.encode(plain)
    decoded = decode_event(wire)
    assert decoded == typed
    assert type(decoded.status) is JobStatus
    assert decoded.stage is None or type(decoded.stage) is Stage
    assert decoded.terminal == (status in TERMINAL_STATUSES)


def test_status_sets_partition_the_statuses() -> None:
    assert set(JobStatus) == UNFINISHED_STATUSES | TERMINAL_STATUSES
    assert not UNFINISHED_STATUSES & TERMINAL_STATUSES
    assert RETRYABLE_STATUSES < TERMINAL_STATUSES
    assert {str(s) for s in UNFINISHED_STATUSES} == {
        "awaiting_upload",
        "queued",
        "running",
        "retrying",
    }


def test_redis_names_are_built_from_the_prefixes() -> None:
    assert job_channel("j1") == "sluice:job:j1" == JOB_CHANNEL_PREFIX + "j1"
    assert user_channel("u1") == "sluice:user:u1" == USER_CHANNEL_PREFIX + "u1"
    assert stream_key("j1") == "sluice:job:j1:events"


def test_where_numbers_its_arguments_in_order() -> None:
    where = Where().add("a = {}", 1).add("b IS NULL").add("(c, d) < ({}, {})", 2, 3)
    assert where.sql == "a = $1 AND b IS NULL AND (c, d) < ($2, $3)"
    assert where.args == [1, 2, 3]
    copy = where.copy().add("e = {}", 4)
    assert copy.sql.endswith("e = $4") and where.args == [1, 2, 3]
    assert Where().sql == "true"
    assert Where().add("x = '{}'::jsonb").sql == "x = '{}'::jsonb"  # no values: as written


@pytest.mark.parametrize("value", ["not-a-uuid", "", "123", "../etc"])
def test_a_malformed_id_is_the_404_of_a_missing_row(value: str) -> None:
    with pytest.raises(NotFound) as info:
        parse_uuid(value, not_found="job")
    expected = missing("job")
    assert (info.value.code, info.value.message) == (expected.code, expected.message)
    assert expected.code == "job_not_found"
    some = uuid.uuid4()
    assert parse_uuid(str(some), not_found="job") == some
