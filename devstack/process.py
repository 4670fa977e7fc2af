"""One server child process of the development stack, and what every server shares.

A :class:`ServerProcess` owns exactly one child: ``stop()`` stops it (its stop
signal, then SIGKILL to its process group after a timeout) and closes its log;
the child also dies with us where the OS allows (``PR_SET_PDEATHSIG`` on
Linux, see :func:`die_with_parent`).  Each child runs in its own session, so a
Ctrl-C in a terminal reaches the parent, which then stops the children in order.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from app.core.errors import SluiceError


class EmbeddedServerError(SluiceError):
    default_code = "embedded_server_error"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def package_dir(name: str) -> Path:
    """Where the installed package ``name`` lives (its bundled server binaries)."""
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


def wait_until(
    check: Callable[[], bool], proc: subprocess.Popen[bytes], what: str, timeout: float, log: Path
) -> None:
    """Poll ``check`` until it holds; fail early, with the log's tail, if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise EmbeddedServerError(f"{what} exited with {proc.returncode}:\n{tail}")
        if check():
            return
        time.sleep(0.05)
    raise EmbeddedServerError(f"{what} did not become ready within {timeout:.0f}s (log: {log})")


class ServerProcess:
    """Start/stop plumbing for one server child process, its output in ``log_path``."""

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
