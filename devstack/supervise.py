"""The children of ``sluice dev`` (gateway, worker, WebSocket server), restarted when they crash.

A child that dies (a crash, an OOM kill) is logged and started again after a
backoff (:class:`RestartPolicy`: 0.5 s doubling up to 10 s); only a crash loop
(:data:`CRASH_LOOP_LIMIT` crashes of one child within
:data:`CRASH_LOOP_WINDOW_SECONDS`) raises, and ``sluice dev`` stops everything.
Every child runs in its own session and gets SIGTERM if ``sluice dev`` dies.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable, Mapping

from app.core.logging import get_logger
from devstack.process import EmbeddedServerError, die_with_parent

log = get_logger("sluice.dev")
CRASH_LOOP_LIMIT = 5
CRASH_LOOP_WINDOW_SECONDS = 60.0
RESTART_BACKOFF = (0.5, 10.0)
"""First and largest delay (seconds) before a crashed child is started again."""


class RestartPolicy:
    """When to start a crashed child again (no I/O: crashes in, delays out).

    Each crash of a child within the last ``window`` seconds doubles its
    delay (from ``backoff[0]`` up to ``backoff[1]``); the ``limit``-th such
    crash is a crash loop: :meth:`after_crash` returns None and the stack stops.
    """

    def __init__(
        self,
        *,
        limit: int = CRASH_LOOP_LIMIT,
        window: float = CRASH_LOOP_WINDOW_SECONDS,
        backoff: tuple[float, float] = RESTART_BACKOFF,
    ) -> None:
        self.limit = limit
        self.window = window
        self.backoff = backoff
        self._crashes: dict[str, deque[float]] = {}

    def after_crash(self, name: str, now: float) -> float | None:
        recent = self._crashes.setdefault(name, deque())
        recent.append(now)
        while recent and now - recent[0] > self.window:
            recent.popleft()
        if len(recent) >= self.limit:
            return None
        return float(min(self.backoff[0] * 2 ** (len(recent) - 1), self.backoff[1]))


class Children:
    """Named child processes, restarted by :meth:`supervise` when they crash."""

    def __init__(
        self,
        commands: Mapping[str, list[str]],
        env: Mapping[str, str],
        *,
        policy: RestartPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.commands = dict(commands)
        self.env = dict(env)
        self.policy = policy or RestartPolicy()
        self.clock = clock
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._restart_at: dict[str, float] = {}

    def _spawn(self, name: str) -> None:
        self.procs[name] = subprocess.Popen(
            self.commands[name],
            env=self.env,
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM),  # noqa: PLW1509
        )

    def start(self) -> None:
        for name in self.commands:
            self._spawn(name)

    def supervise(self) -> None:
        """Notice crashed children, start due ones again; raise on a crash loop."""
        now = self.clock()
        for name, proc in self.procs.items():
            if name in self._restart_at or proc.poll() is None:
                continue
            delay = self.policy.after_crash(name, now)
            if delay is None:
                raise EmbeddedServerError(
                    f"{name} keeps crashing ({self.policy.limit} times within "
                    f"{self.policy.window:.0f} s; last exit code {proc.returncode}); stopping"
                )
            log.error("child_crashed", child=name, code=proc.returncode, restart_in_s=delay)
            self._restart_at[name] = now + delay
        for name, when in list(self._restart_at.items()):
            if when <= now:
                del self._restart_at[name]
                self._spawn(name)
                log.warning("child_restarted", child=name, pid=self.procs[name].pid)

    def stop(self) -> None:
        """SIGTERM every live child, wait up to 15 s in all, SIGKILL what is left."""
        self._restart_at.clear()
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
