"""The crowded-fleet soak: ``tests/test_fleet.py`` at a larger size, with and without kills.

    python bench/fleet.py [--tiny 6000] [--real 300] [--rounds 1] [--embedder local|shared]

Each round runs the fleet test twice on its own fresh embedded stack (6 workers,
2 gateways, 2 WS servers, every check of the test): first the baseline with no
worker killed, then the same workload with 2 workers SIGKILLed mid-run and
restarted.  It prints, per round, the time until every job was terminal in both
runs and the ratio killed / clean (how much two lost workers cost the fleet),
with the runs lost and the load average.  A failed check fails the benchmark.

Everything it starts is stopped at the end (the test's fixtures do it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_once(args: argparse.Namespace, kills: int, workdir: Path) -> dict[str, Any]:
    report = workdir / f"fleet-{kills}.json"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "SLUICE_FLEET_TINY_JOBS": str(args.tiny),
        "SLUICE_FLEET_REAL_DOCS": str(args.real),
        "SLUICE_FLEET_KILLS": str(kills),
        "SLUICE_FLEET_EMBEDDER": args.embedder,
        "SLUICE_FLEET_REPORT": str(report),
        "SLUICE_FLEET_TIMEOUT_S": "3600",
    }
    cmd = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
        f"--basetemp={workdir / f'pt-{kills}'}", "-m", "fleet", "tests/test_fleet.py",
    ]  # fmt: skip
    code = subprocess.call(cmd, cwd=ROOT, env=env)
    if code != 0:
        raise SystemExit(f"the fleet run with {kills} kills failed (pytest exit {code})")
    figures: dict[str, Any] = json.loads(report.read_text())
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", type=int, default=6000, help="no-op-sized jobs")
    parser.add_argument("--real", type=int, default=300, help="small real documents")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--embedder", choices=["local", "shared"], default="local")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sluice-bench-fleet-") as tmp:
        for n in range(1, args.rounds + 1):
            clean = run_once(args, 0, Path(tmp))
            killed = run_once(args, 2, Path(tmp))
            clean_s = clean["terminal_s"] - clean["ready_s"]
            killed_s = killed["terminal_s"] - killed["ready_s"]
            print(
                f"round {n}: {killed['jobs']} jobs; all terminal after start-up: clean "
                f"{clean_s:.1f} s, 2 workers SIGKILLed {killed_s:.1f} s, "
                f"ratio {killed_s / clean_s:.2f} ({killed['lost_runs']} runs lost); "
                f"start-up {clean['ready_s']:.1f} / {killed['ready_s']:.1f} s; "
                f"load {clean['load_before']:.2f} -> {killed['load_after']:.2f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
