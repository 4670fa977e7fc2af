"""The upload progress bar: ``rich`` against ``tqdm``, as ``sluice upload`` would use them.

    python bench/client_progress.py [--rate 120] [--seconds 2] [--runs 5]

Three measurements, each in fresh child processes (no network, no servers):

1. **import time** a library adds to ``sluice upload``'s start: the time to
   import it after what the client imports anyway (httpx, asyncio, argparse),
   best of ``--runs``;
2. **CPU per update** on a terminal (stderr on a pseudo-terminal, drained by
   this process): ``--rate`` updates a second for ``--seconds`` -- the client
   advances the bar once per part, and 8 MiB parts at ~1 GB/s are ~120 a second
   -- minus the same loop without a bar, per update and as % of one core (any
   refresh thread included: the child's whole CPU time is counted);
3. **not a terminal** (stderr a pipe, as in CI logs): bytes and lines written,
   and how many control characters (``\\r``, ESC) among them.

Prints one table and the ratios rich/tqdm.  "rich" is the client's own bar
(:class:`app.client.progress.UploadProgress`); "tqdm" is configured the way the
client would use it (decimal MB, MB/s averaged over the run, 0.1 s between
redraws).  Note that ``import httpx`` already imports rich (for httpx's command
line) whenever rich, click and pygments are installed, as they are with
Sluice's dependencies: the table says so.
"""

from __future__ import annotations

import argparse
import os
import pty
import resource
import select
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LIBS = ("none", "rich", "tqdm")
TOTAL = 10_000_000_000  # bytes: never reached, the bar stays live the whole run
BASELINE_IMPORTS = "import argparse, asyncio, json, httpx"


def _rich_bar(total: int) -> tuple[Callable[[int], None], Callable[[], None]]:
    """The client's own bar (app/client/progress.py), built on rich."""
    sys.path.insert(0, str(ROOT))
    from app.client.progress import UploadProgress

    bar = UploadProgress(total)
    return bar.advance, bar.close


def _tqdm_bar(total: int) -> tuple[Callable[[int], None], Callable[[], None]]:
    from tqdm import tqdm

    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        file=sys.stderr,
        mininterval=0.1,
        smoothing=0,
    )
    return bar.update, bar.close


def child(lib: str, rate: float, seconds: float) -> None:
    """Drive one bar at ``rate`` updates a second; print CPU seconds and updates."""
    exec(BASELINE_IMPORTS)
    advance: Callable[[int], Any]
    close: Callable[[], Any]
    if lib == "none":
        advance, close = (lambda _n: None), (lambda: None)
    else:
        advance, close = (_rich_bar if lib == "rich" else _tqdm_bar)(TOTAL)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.monotonic()
    updates = int(rate * seconds)
    for i in range(updates):
        advance(8_388_608)
        delay = start + (i + 1) / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    close()
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(f"{cpu} {updates}", flush=True)


def import_seconds(lib: str) -> float:
    module = "rich.progress, rich.console" if lib == "rich" else lib
    code = (
        f"{BASELINE_IMPORTS}; import time; t = time.perf_counter(); "
        f"import {module}; print(time.perf_counter() - t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout)


def _command_import_seconds() -> float:
    code = (
        "import time; t = time.perf_counter(); import app.client.command; "
        "print(time.perf_counter() - t)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    return float(out.stdout)


def _argv(lib: str, args: argparse.Namespace) -> list[str]:
    return [sys.executable, __file__, "--child", lib, "--rate", str(args.rate),
            "--seconds", str(args.seconds)]  # fmt: skip


def run_on_tty(lib: str, args: argparse.Namespace) -> tuple[float, int]:
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "100", "TERM": "xterm-256color"}
    proc = subprocess.Popen(
        _argv(lib, args), stdout=subprocess.PIPE, stderr=slave, env=env, text=True
    )
    os.close(slave)
    drained = threading.Event()

    def drain() -> None:
        while True:
            ready, _, _ = select.select([master], [], [], 0.5)
            try:
                if ready and not os.read(master, 65536):
                    break
            except OSError:  # the child closed its end
                break
        drained.set()

    threading.Thread(target=drain, daemon=True).start()
    out, _ = proc.communicate(timeout=120)
    drained.wait(5)
    os.close(master)
    cpu, updates = out.split()
    return float(cpu), int(updates)


def run_on_pipe(lib: str, args: argparse.Namespace) -> tuple[int, int, int]:
    result = subprocess.run(_argv(lib, args), capture_output=True, timeout=120, check=True)
    err = result.stderr
    control = sum(err.count(c) for c in (b"\r", b"\x1b"))
    return len(err), err.count(b"\n"), control


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=120.0)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--child", choices=LIBS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.rate, args.seconds)
        return
    rows: dict[str, dict[str, float]] = {}
    for lib in LIBS:
        row: dict[str, float] = {}
        if lib != "none":
            row["import_ms"] = min(import_seconds(lib) for _ in range(args.runs)) * 1000
        cpu = [run_on_tty(lib, args) for _ in range(max(1, args.runs // 2))]
        row["cpu_s"] = statistics.median(c for c, _ in cpu)
        row["updates"] = cpu[0][1]
        row["bytes"], row["lines"], row["control"] = run_on_pipe(lib, args)
        rows[lib] = row
    preloaded = subprocess.run(
        [sys.executable, "-c", f"{BASELINE_IMPORTS}; import sys; print('rich' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    command_ms = min(_command_import_seconds() for _ in range(args.runs)) * 1000
    print(f"import app.client.command (all of 'sluice upload'): {command_ms:.0f} ms")
    print(f"rich already imported by the client's baseline ({BASELINE_IMPORTS}): {preloaded}")
    base = rows["none"]["cpu_s"]
    wall = args.seconds
    print(f"{args.rate:g} updates/s for {wall:g} s; CPU minus the same loop without a bar")
    print(f"{'':6} {'import ms':>10} {'CPU us/update':>14} {'CPU % core':>11} "
          f"{'pipe bytes':>11} {'pipe lines':>11} {'ctrl chars':>11}")  # fmt: skip
    for lib in ("rich", "tqdm"):
        r = rows[lib]
        extra = max(r["cpu_s"] - base, 0.0)
        r["us_per_update"] = extra / r["updates"] * 1e6
        r["core_pct"] = extra / wall * 100
        print(f"{lib:6} {r['import_ms']:10.1f} {r['us_per_update']:14.1f} {r['core_pct']:11.2f} "
              f"{r['bytes']:11.0f} {r['lines']:11.0f} {r['control']:11.0f}")  # fmt: skip
    rich, tqdm = rows["rich"], rows["tqdm"]
    print(
        f"rich/tqdm: import {rich['import_ms'] / tqdm['import_ms']:.2f}x, "
        f"CPU per update {rich['us_per_update'] / max(tqdm['us_per_update'], 1e-9):.2f}x"
    )


if __name__ == "__main__":
    main()
