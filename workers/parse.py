"""Extract and chunk one document in a child process with memory and time limits.

A poison document (one page that decodes to 70 MB, a stream shared by 2,000
pages) must fail alone: it must not take the worker, its loaded model and its
other jobs with it.  So :func:`parse_in_child` runs the parse stages (extract,
then chunk's tokenization) in a fresh ``python -m workers.parse`` process that
imports only what parsing needs (pypdf, the Rust tokenizer; never torch), and

* limits its address space (``RLIMIT_AS`` = ``PARSE_MEMORY_LIMIT_MB``) and its
  run time (``PARSE_TIME_LIMIT_SECONDS``; the parent kills it, ``RLIMIT_CPU``
  backs that up): running past either fails the job ``resource_limit``, as
  does a child that dies without answering;
* streams its results back over a pipe: progress, each page's chunks as soon
  as they are final (pages go through the chunker as they are extracted:
  ``StreamingChunker``), the end of extraction, the last chunks, then ``done``
  (length-prefixed msgpack frames);
* never outlives its job or the worker: the parent kills it on cancellation,
  timeout and error (``finally``), and the kernel kills it when the worker
  dies, even by SIGKILL (``PR_SET_PDEATHSIG``; it also exits if its parent is
  already gone when it starts).

One child per job's parse: one child's death never touches another job.
:class:`ParseChildren` keeps one child started ahead of need (imports done,
waiting for its job on stdin), so a job does not wait for an interpreter to
start.  The document's text lives only in the child, a page and a chunk's
worth at a time; the worker holds the chunks it embeds.  Budget errors
(``too_large_extracted``, ``corrupt_file``...) raised in the child come back
as the same :class:`~app.core.errors.PermanentError`.

One module on purpose (about 400 lines): both ends of the pipe (the parent's
:func:`parse_in_child` and the child's :func:`child_main`) and the frames they
exchange read best side by side, and the child must import nothing but this
module and the stages.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import msgspec

from app.core.errors import PermanentError, TransientError
from workers.stages.budget import ExtractLimits
from workers.stages.common import Chunk, PageText

if TYPE_CHECKING:
    from workers.stages.chunk import StreamingChunker

CHUNK_BATCH = 512
"""Chunks per frame sent back by the child."""
PROGRESS_SECONDS = 0.1
"""The child sends at most one progress frame per this interval."""
BOUNDARY_SECONDS = 0.5
"""How often the parent checks for cancellation while the child is busy."""
MAX_FRAME_BYTES = 256 * 1024 * 1024
RESOURCE_LIMIT = "resource_limit"
_HEADER = struct.Struct(">I")


class ParseJob(msgspec.Struct, frozen=True, kw_only=True):
    """What the child is asked to do (the one frame the parent sends)."""

    path: str
    document_type: str
    chunk_size: int
    chunk_overlap: int
    tokenizer_path: str
    limits: ExtractLimits
    memory_bytes: int
    time_seconds: float


class Progress(msgspec.Struct, tag="progress"):
    stage: str
    """``extract`` or ``chunk``."""
    fraction: float
    message: str


class ExtractDone(msgspec.Struct, tag="extracted"):
    """Extraction is over (the chunks of all but the last pages are sent)."""

    pages: int
    chars: int
    warnings: list[dict[str, Any]]
    chunk_seconds: float = 0.0
    """Of the time until now, what the child spent chunking (pages are chunked
    as they are extracted): the extract stage's timing leaves it out."""


class Chunks(msgspec.Struct, tag="chunks"):
    chunks: list[Chunk]


class Done(msgspec.Struct, tag="done"):
    pass


class Failed(msgspec.Struct, tag="failed"):
    code: str
    message: str
    details: dict[str, Any]
    permanent: bool


Frame = Progress | ExtractDone | Chunks | Done | Failed
_encode = msgspec.msgpack.Encoder().encode
_decode_frame = msgspec.msgpack.Decoder(Frame).decode
_decode_job = msgspec.msgpack.Decoder(ParseJob).decode


class Parsed(msgspec.Struct, kw_only=True):
    """What the parse stages produce (the chunk checkpoint of a job)."""

    chunks: list[Chunk]
    warnings: list[dict[str, Any]] = msgspec.field(default_factory=list)
    pages: int = 0
    chars: int = 0


class ParseReporter:
    """Where :func:`parse_in_child` reports, stage by stage."""

    def __init__(
        self,
        progress: Callable[[str, float, str], Awaitable[None]],
        boundary: Callable[[], Awaitable[None]],
        extracted: Callable[[float], Awaitable[None]],
    ) -> None:
        self.progress = progress
        """(stage, fraction, message)."""
        self.boundary = boundary
        """Raises once the job is cancelled or its lease lost."""
        self.extracted = extracted
        """Extraction ended after this many seconds (chunking starts)."""


def _resource_limit(message: str, **details: Any) -> PermanentError:
    return PermanentError(message, code=RESOURCE_LIMIT, details=details)


Child = asyncio.subprocess.Process


async def spawn_child() -> Child:
    """A fresh parse child: it imports what parsing needs, then waits for a job."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "workers.parse",
        str(os.getpid()),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )


class ParseChildren:
    """Hands out parse children, keeping one spare started ahead of need.

    Each child serves one job and is never reused.  :meth:`aclose` kills the
    spare; a spare the worker never closes exits when its stdin reaches EOF or
    its parent dies."""

    def __init__(self, max_parses: int = 2) -> None:
        self._spare: asyncio.Task[Child] | None = None
        self._closed = False
        self.slots = asyncio.Semaphore(max_parses)
        """At most ``MAX_CONCURRENT_PARSES`` parses at once: the bound on the
        worker's parse memory (that many children of ``PARSE_MEMORY_LIMIT_MB``)."""

    async def take(self) -> Child:
        spare, self._spare = self._spare, None
        if not self._closed:
            self._spare = asyncio.create_task(spawn_child(), name="parse-spare")
        child: Child | None = None
        if spare is not None:
            with contextlib.suppress(Exception):
                child = await spare
        if child is None or child.returncode is not None:
            child = await spawn_child()
        return child

    async def aclose(self) -> None:
        self._closed = True
        spare, self._spare = self._spare, None
        if spare is None:
            return
        with contextlib.suppress(Exception):
            child = await spare
            if child.returncode is None:
                child.kill()
                await child.wait()


async def parse_in_child(
    job: ParseJob, report: ParseReporter, *, children: ParseChildren | None = None
) -> Parsed:
    """Run the parse of ``job`` in a limited child process; see the module docstring.

    With ``children``, the parse first waits for one of its slots (the wait does
    not count against ``job.time_seconds``)."""
    if children is None:
        return await _parse_in_child(job, report, None)
    async with children.slots:
        return await _parse_in_child(job, report, children)


async def _parse_in_child(
    job: ParseJob, report: ParseReporter, children: ParseChildren | None
) -> Parsed:
    started = time.perf_counter()
    proc = await (children.take() if children is not None else spawn_child())
    assert proc.stdin is not None and proc.stdout is not None
    try:
        payload = _encode(job)
        proc.stdin.write(_HEADER.pack(len(payload)) + payload)
        await proc.stdin.drain()
        proc.stdin.close()
        async with asyncio.timeout(job.time_seconds) as deadline:
            try:
                return await _receive(proc.stdout, report, started)
            except asyncio.IncompleteReadError:
                code = await proc.wait()
                raise _died(code, job) from None
    except TimeoutError:
        if not deadline.expired():
            raise
        raise _resource_limit(
            f"parsing took longer than {job.time_seconds:g} s (PARSE_TIME_LIMIT_SECONDS)",
            limit_seconds=job.time_seconds,
        ) from None
    except (BrokenPipeError, ConnectionResetError):
        code = await proc.wait()
        raise _died(code, job) from None
    finally:
        if proc.returncode is None:
            proc.kill()
            await asyncio.shield(proc.wait())


def _died(code: int, job: ParseJob) -> PermanentError:
    how = f"signal {-code}" if code < 0 else f"exit code {code}"
    return _resource_limit(
        f"the parser process died ({how}); the document needs more than the "
        f"{job.memory_bytes // (1024 * 1024)} MiB parse memory limit (PARSE_MEMORY_LIMIT_MB) "
        "or its time",
        exit=code,
        limit_mb=job.memory_bytes // (1024 * 1024),
    )


async def _receive(stdout: asyncio.StreamReader, report: ParseReporter, started: float) -> Parsed:
    chunks: list[Chunk] = []
    result: ExtractDone | None = None
    while True:
        frame = await _read_frame(stdout, report)
        if isinstance(frame, Progress):
            await report.progress(frame.stage, frame.fraction, frame.message)
            await report.boundary()  # (throttled by the caller) a busy child is checked too
        elif isinstance(frame, ExtractDone):
            result = frame
            await report.extracted(time.perf_counter() - started - frame.chunk_seconds)
        elif isinstance(frame, Chunks):
            chunks.extend(frame.chunks)
        elif isinstance(frame, Failed):
            if frame.permanent:
                raise PermanentError(frame.message, code=frame.code, details=frame.details)
            raise TransientError(frame.message, code=frame.code, details=frame.details)
        else:
            assert result is not None, "child sent done before extracted"
            return Parsed(
                chunks=chunks, warnings=result.warnings, pages=result.pages, chars=result.chars
            )


async def _read_frame(stdout: asyncio.StreamReader, report: ParseReporter) -> Frame:
    while True:
        try:
            # Cancelling readexactly while it waits consumes nothing: safe to retry.
            header = await asyncio.wait_for(stdout.readexactly(_HEADER.size), BOUNDARY_SECONDS)
            break
        except TimeoutError:
            await report.boundary()
    (size,) = _HEADER.unpack(header)
    if size > MAX_FRAME_BYTES:
        raise TransientError(f"parser sent a {size} byte frame", code="internal_error")
    return _decode_frame(await stdout.readexactly(size))


# --- the child ------------------------------------------------------------------------


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (Linux); exit if it already has."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(3)


def _set_limits(job: ParseJob) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (job.memory_bytes, job.memory_bytes))
    cpu = int(job.time_seconds) + 5
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


class _Sender:
    def __init__(self, out: IO[bytes]) -> None:
        self._out = out
        self._last = 0.0

    def send(self, frame: Frame) -> None:
        data = _encode(frame)
        self._out.write(_HEADER.pack(len(data)) + data)
        self._out.flush()

    def progress(self, stage: str, fraction: float, message: str) -> None:
        now = time.monotonic()
        if fraction < 1.0 and now - self._last < PROGRESS_SECONDS:
            return
        self._last = now
        self.send(Progress(stage, fraction, message))


def _parse(job: ParseJob, out: _Sender) -> None:
    """Extract page by page, feeding each page to the chunker and sending its
    chunks as soon as they are final: no page's text outlives the chunks it
    makes, so the child's memory does not grow with the page count."""
    warnings: list[dict[str, Any]] = []
    chars = total = 0
    chunker: StreamingChunker | None = None
    chunking = 0.0
    count = 0
    for total, page, warning in _pages(job):
        if warning is not None:
            warnings.append(warning)
        if page.text:
            chars += len(page.text)
            started = time.perf_counter()
            chunker = chunker or _chunker(job)
            chunks = chunker.feed(page)
            chunking += time.perf_counter() - started
            count += _send_chunks(out, chunks)
        out.progress("extract", page.number / total, f"page {page.number}/{total}")
    out.send(ExtractDone(pages=total, chars=chars, warnings=warnings, chunk_seconds=chunking))
    if chunker is not None:
        count += _send_chunks(out, chunker.finish())
        out.progress("chunk", 1.0, f"{count} chunks")
    out.send(Done())


def _pages(job: ParseJob) -> Iterator[tuple[int, PageText, dict[str, Any] | None]]:
    from workers.stages.extract import iter_pages

    return iter_pages(Path(job.path), job.document_type, job.limits)


def _chunker(job: ParseJob) -> StreamingChunker:
    from tokenizers import Tokenizer

    from workers.stages.chunk import StreamingChunker

    tokenizer = Tokenizer.from_file(job.tokenizer_path)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return StreamingChunker(tokenizer, chunk_size=job.chunk_size, chunk_overlap=job.chunk_overlap)


def _send_chunks(out: _Sender, chunks: list[Chunk]) -> int:
    for first in range(0, len(chunks), CHUNK_BATCH):
        out.send(Chunks(chunks[first : first + CHUNK_BATCH]))
    return len(chunks)


def child_main() -> int:
    """``python -m workers.parse PARENT_PID``: one :class:`ParseJob` on stdin, frames
    on stdout."""
    _die_with_parent(int(sys.argv[1]))
    # The worker alone decides when a parse ends (it kills this process on cancel,
    # timeout or shutdown); a Ctrl-C sent to the terminal's whole process group
    # must not end it first and fail the job as if the document had killed it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stdin = sys.stdin.buffer
    # Frames go to a private copy of stdout; anything printed goes to stderr.
    out = _Sender(os.fdopen(os.dup(1), "wb"))
    os.dup2(2, 1)
    import tokenizers  # noqa: F401  (imported while waiting: the job starts warm)

    import workers.stages.chunk  # noqa: F401

    header = stdin.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return 0  # a spare the worker did not need
    (size,) = _HEADER.unpack(header)
    job = _decode_job(stdin.read(size))
    _set_limits(job)
    try:
        _parse(job, out)
    except PermanentError as exc:
        out.send(Failed(exc.code, exc.message, exc.details, True))
    except MemoryError:
        limit = job.memory_bytes // (1024 * 1024)
        out.send(
            Failed(
                RESOURCE_LIMIT,
                f"the document needs more than the {limit} MiB parse memory limit "
                "(PARSE_MEMORY_LIMIT_MB)",
                {"limit_mb": limit},
                True,
            )
        )
    except RecursionError:
        out.send(Failed("corrupt_file", "the document is nested too deeply to parse", {}, True))
    except BrokenPipeError:
        return 1  # the parent is gone
    except Exception as exc:  # a bug: the worker retries the job
        out.send(Failed("internal_error", f"{type(exc).__name__}: {str(exc)[:300]}", {}, False))
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
