"""What the upload client remembers between runs, so that running it again resumes.

One small JSON file per upload under the state dir, named by a hash of the
file's absolute path, size and mtime and the gateway URL: a changed file or
another gateway never resumes a stale session.  Written atomically (a temp
file, then ``replace``); a file that does not parse is treated as absent.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(slots=True)
class ResumeState:
    """The gateway's session for one file: enough to send its parts and complete it."""

    upload_id: str
    job_id: str
    document_id: str
    chunk_size: int
    total_parts: int
    file_size: int
    url: str

    def part_offset(self, n: int) -> int:
        return (n - 1) * self.chunk_size

    def part_size(self, n: int) -> int:
        """Every part is ``chunk_size`` long but the last, which holds the rest."""
        if n < self.total_parts:
            return self.chunk_size
        return self.file_size - self.chunk_size * (self.total_parts - 1)


class ResumeFiles:
    """The state files under ``state_dir`` for uploads to ``base_url`` (None: remember nothing)."""

    def __init__(self, state_dir: Path | None, base_url: str) -> None:
        self.state_dir = state_dir
        self.base_url = base_url

    def path_for(self, path: Path) -> Path | None:
        if self.state_dir is None:
            return None
        st = path.stat()
        ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{self.base_url}"
        return self.state_dir / f"{hashlib.sha256(ident.encode()).hexdigest()[:32]}.json"

    def load(self, path: Path) -> ResumeState | None:
        where = self.path_for(path)
        if where is None or not where.exists():
            return None
        try:
            return ResumeState(**json.loads(where.read_text()))
        except (ValueError, TypeError):
            return None

    def save(self, path: Path, state: ResumeState) -> None:
        where = self.path_for(path)
        if where is None:
            return
        where.parent.mkdir(parents=True, exist_ok=True)
        tmp = where.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(state)))
        tmp.replace(where)

    def forget(self, path: Path) -> None:
        where = self.path_for(path)
        if where is not None:
            with contextlib.suppress(FileNotFoundError):
                where.unlink()
