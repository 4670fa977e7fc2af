"""Settings: built once from an environment mapping; bad values stop the process
with one line naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from app.core.errors import ConfigError
from app.core.settings import Settings, known_env_vars

BASE = {
    "MINIO_ENDPOINT": "localhost:9000",
    "MINIO_ACCESS_KEY": "key",
    "MINIO_SECRET_KEY": "secret",
    "REDIS_URL": "redis://localhost:6379/0",
    "DATABASE_URL": "postgresql://sluice@localhost/sluice",
    "JWT_SECRET": "j" * 32,
}


def test_defaults_follow_the_spec() -> None:
    s = Settings.from_environ(BASE)
    assert s.multipart_upload_threshold_mb == 100
    assert s.upload_chunk_size_mb == 8
    assert s.websocket_port == 8765
    assert s.websocket_heartbeat_interval == 30
    assert s.max_processing_time_minutes == 60
    assert s.rate_limit_uploads_per_minute == 10
    assert s.rate_limit_requests_per_minute == 100
    assert s.log_format == "json"
    assert s.s3_endpoint_url == "http://localhost:9000"


def test_values_are_parsed_from_strings() -> None:
    s = Settings.from_environ(
        {
            **BASE,
            "MINIO_USE_SSL": "true",
            "MAX_CONCURRENT_TASKS": " 4 ",
            "CORS_ORIGINS": "https://a.example, https://b.example",
            "LOG_LEVEL": "debug",
        }
    )
    assert s.minio_use_ssl is True
    assert s.s3_endpoint_url == "https://localhost:9000"
    assert s.max_concurrent_tasks == 4
    assert s.cors_origins == ("https://a.example", "https://b.example")
    assert s.log_level == "DEBUG"


def test_unrelated_environment_is_ignored() -> None:
    assert Settings.from_environ({**BASE, "HOME": "/root", "PATH": "/bin"}).minio_bucket_name


@pytest.mark.parametrize(
    ("override", "variable"),
    [
        ({"MAX_CONCURRENT_TASKS": "many"}, "MAX_CONCURRENT_TASKS"),
        ({"MAX_CONCURRENT_TASKS": "0"}, "MAX_CONCURRENT_TASKS"),
        ({"WEBSOCKET_PORT": "70000"}, "WEBSOCKET_PORT"),
        ({"MINIO_USE_SSL": "perhaps"}, "MINIO_USE_SSL"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"JWT_SECRET": "short"}, "JWT_SECRET"),
        ({"EMBEDDING_PROVIDER": "magic"}, "EMBEDDING_PROVIDER"),
    ],
)
def test_invalid_values_name_the_variable(override: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_environ({**BASE, **override})
    assert variable in info.value.message
    assert "\n" not in info.value.message


@pytest.mark.parametrize("missing", ["DATABASE_URL", "REDIS_URL", "JWT_SECRET", "MINIO_ENDPOINT"])
def test_missing_required_variable_is_named(missing: str) -> None:
    env = {k: v for k, v in BASE.items() if k != missing}
    with pytest.raises(ConfigError, match=f"^{missing} is required"):
        Settings.from_environ(env)


def test_spec_variable_names_are_all_known() -> None:
    spec_names = {
        "MINIO_ENDPOINT",
        "MINIO_ACCESS_KEY",
        "MINIO_SECRET_KEY",
        "MINIO_BUCKET_NAME",
        "MINIO_USE_SSL",
        "REDIS_URL",
        "DATABASE_URL",
        "MAX_CONCURRENT_TASKS",
        "TASK_RETRY_MAX_ATTEMPTS",
        "MULTIPART_UPLOAD_THRESHOLD_MB",
        "UPLOAD_CHUNK_SIZE_MB",
        "WEBSOCKET_HOST",
        "WEBSOCKET_PORT",
        "WEBSOCKET_HEARTBEAT_INTERVAL",
        "MAX_PROCESSING_TIME_MINUTES",
        "RATE_LIMIT_UPLOADS_PER_MINUTE",
        "RATE_LIMIT_REQUESTS_PER_MINUTE",
        "JWT_SECRET",
        "CORS_ORIGINS",
        "LOG_LEVEL",
        "LOG_FORMAT",
    }
    assert spec_names <= known_env_vars()


def test_process_stops_with_one_clear_line() -> None:
    env = {**BASE, "MAX_CONCURRENT_TASKS": "lots", "PATH": os.environ["PATH"]}
    result = subprocess.run(
        [sys.executable, "-m", "app", "migrate"],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "sluice: configuration error: MAX_CONCURRENT_TASKS must be an integer, got 'lots'"
    ]
