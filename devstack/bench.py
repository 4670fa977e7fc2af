"""``sluice bench NAME``: run ``bench/NAME.py`` from a source checkout, with the same Python."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from app.core.errors import ConfigError

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


def run_bench(name: str, argv: list[str]) -> int:
    """The script's exit status; ConfigError naming the benchmarks there are if none is ``name``."""
    script = BENCH_DIR / f"{name}.py"
    if not script.exists():
        available = sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_"))
        raise ConfigError(f"no benchmark {name!r}; available: {', '.join(available)}")
    return subprocess.call([sys.executable, str(script), *argv])
