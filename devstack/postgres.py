"""PostgreSQL 16 with pgvector, from the binaries the ``pgserver`` wheel ships.

The cluster lives in ``data_dir/pgdata`` (created by ``initdb`` on first
start, trust auth, listening on 127.0.0.1 only) and the database is created if
missing.  Postgres refuses to run as root: as root, the server runs as an
unprivileged system user (:data:`SYSTEM_USER`), made able to reach its files.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import stat
import subprocess
from pathlib import Path

from devstack.process import EmbeddedServerError, ServerProcess, free_port, package_dir, wait_until

SYSTEM_USER = "sluicepg"
_FAST_UNSAFE = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")
"""Test databases trade crash safety for speed."""


class EmbeddedPostgres(ServerProcess):
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
        self.bin = package_dir("pgserver") / "pginstall" / "bin"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def start(self) -> str:
        user = prepare_system_user([self.data_dir.parent, self.bin.parent])
        for d in (self.data_dir, self.socket_dir):
            d.mkdir(parents=True, exist_ok=True)
            if user:
                shutil.chown(d, user, user)
            d.chmod(0o700)
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(self._initdb_argv(), user)
        proc = self._spawn(self._server_argv(), user=user)
        wait_until(self._ready, proc, "postgres", 60, self.log_path)
        if not self._database_exists():
            self._run([*self._client_argv("createdb"), self.database], None)
        return self.dsn

    def _initdb_argv(self) -> list[str]:
        return [
            str(self.bin / "initdb"),
            *("-D", str(self.data_dir), "-U", "postgres"),
            *("--auth=trust", "--encoding=UTF8", "--no-instructions"),
        ]

    def _server_argv(self) -> list[str]:
        argv = [
            str(self.bin / "postgres"),
            *("-D", str(self.data_dir), "-p", str(self.port)),
            *("-h", "127.0.0.1", "-k", str(self.socket_dir)),
            *("-c", "max_connections=200", "-c", "shared_buffers=128MB"),
        ]
        if not self.durable:
            for setting in _FAST_UNSAFE:
                argv += ["-c", setting]
        return argv

    def _client_argv(self, program: str) -> list[str]:
        return [str(self.bin / program), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"]

    def _database_exists(self) -> bool:
        query = f"SELECT 1 FROM pg_database WHERE datname = '{self.database}'"
        argv = [*self._client_argv("psql"), "-d", "postgres", "-tAc", query]
        return bool(subprocess.run(argv, capture_output=True, check=True).stdout.strip())

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

    def _ready(self) -> bool:
        argv = [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"]
        return subprocess.run(argv, check=False).returncode == 0


def prepare_system_user(paths: list[Path]) -> str | None:
    """As root, make an unprivileged system user able to reach ``paths``; else None."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", SYSTEM_USER],
            check=True,
            capture_output=True,
        )
    for path in paths:
        path.mkdir(parents=True, exist_ok=True)
        for p in [path, *path.parents]:  # every prefix must be traversable
            mode = p.stat().st_mode
            if not mode & stat.S_IXOTH:
                p.chmod(mode | stat.S_IXOTH | stat.S_IROTH)
    return SYSTEM_USER
