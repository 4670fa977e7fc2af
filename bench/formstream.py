"""The gateway's streaming multipart/form-data reader against two libraries.

    python bench/formstream.py [--file-mb 64] [--chunk-kb 64,16,4] [--rounds 3]

No servers: each reader gets the same request body, three text fields and one
``--file-mb`` file field of random bytes, fed through an ASGI ``receive`` in
pieces of each ``--chunk-kb`` size.  64 KiB is the case that decides: uvicorn
hands the app everything that arrived since its last ``receive`` (and stops
reading from the socket past 64 KiB), so a gateway whose parsing is the
bottleneck is fed 64 KiB pieces; smaller pieces reach the app only when the
network is slower than the parser.
Every reader streams the file's bytes to a sink as they arrive; the sink either
discards them (the parser's own cost) or updates an MD5 (what the part routes
do while streaming).  In the same run:

* **hand-written** -- the gateway's reader before this change (a state machine
  over a ``bytearray``, copied here from commit e92ad87): the baseline;
* **python-multipart** -- :func:`app.gateway.formstream.iter_form` as it is now:
  python-multipart's ``MultipartParser`` behind the same event stream and limits;
* **streaming-form-data** -- its Cython ``StreamingFormDataParser`` with one
  async target for the file and a value target per known text field.

Printed: MB/s (median of ``--rounds``), ratio to the hand-written reader, the peak of memory
allocated while parsing (tracemalloc, a separate pass), and which of our
limits each can keep (field count, text field size, file size, part header
size) and whether it sees unknown fields.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from starlette.requests import Request  # noqa: E402
from streaming_form_data import StreamingFormDataParser  # type: ignore[import-untyped]  # noqa: E402
from streaming_form_data.targets import (  # type: ignore[import-untyped]  # noqa: E402
    BaseTarget,
    ValueTarget,
)

from app.gateway import formstream  # noqa: E402
from app.gateway.formstream import FormEvent, FormPart, boundary_of, iter_form  # noqa: E402
from app.gateway.requests import iter_body  # noqa: E402

MiB = 1024 * 1024
FIELDS = {"priority": "high", "document_type": "txt", "processing_options": '{"chunk_size": 256}'}


class Sink:
    """Where a file's bytes go: counted, and hashed when ``md5``."""

    def __init__(self, md5: bool) -> None:
        self.size = 0
        self.md5 = hashlib.md5(usedforsecurity=False) if md5 else None

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.md5 is not None:
            self.md5.update(data)


def make_body(file_mb: int) -> tuple[bytes, str]:
    request = httpx.Request(
        "POST",
        "http://x/",
        data=FIELDS,
        files={"file": ("big.txt", os.urandom(file_mb * MiB), "text/plain")},
    )
    return request.read(), request.headers["content-type"]


def make_request(chunks: list[bytes], content_type: str) -> Request:
    pending = iter(chunks)
    left = len(chunks)

    async def receive() -> dict[str, Any]:
        nonlocal left
        left -= 1
        return {"type": "http.request", "body": next(pending, b""), "more_body": left > 0}

    length = sum(map(len, chunks))
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(length).encode())]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers}, receive)


async def consume(events: AsyncIterator[FormEvent], sink: Sink) -> dict[str, bytes]:
    """Drive an event stream: text fields collected, the file part to ``sink``."""
    fields: dict[str, bytes] = {}
    current: FormPart | None = None
    async for event in events:
        if isinstance(event, FormPart):
            current = event
            if event.filename is None:
                fields.setdefault(event.name, b"")
        elif isinstance(event, bytes):
            assert current is not None
            if current.filename is not None:
                sink.write(event)
            else:
                fields[current.name] += event
        else:
            current = None
    return fields


# --- the readers, each: (request, limit, sink) -> text fields ------------------------------

Reader = Callable[[Request, int, Sink], Awaitable[dict[str, bytes]]]


async def gateway(request: Request, limit: int, sink: Sink) -> dict[str, bytes]:
    return await consume(iter_form(request, limit), sink)


async def handwritten_events(request: Request, limit: int) -> AsyncIterator[FormEvent]:
    """The gateway's reader before it moved onto python-multipart (commit e92ad87),
    kept here as the baseline: a state machine over a ``bytearray`` buffer."""
    delimiter = b"--" + boundary_of(request.headers.get("content-type", ""))
    body_end = b"\r\n" + delimiter
    buf = bytearray()
    state = "preamble"
    parts = 0
    async for chunk in iter_body(request, limit):
        buf += chunk
        while True:
            if state == "preamble":
                at = buf.find(delimiter)
                if at < 0:
                    del buf[: max(0, len(buf) - len(delimiter))]
                    break
                del buf[: at + len(delimiter)]
                state = "after_delimiter"
            elif state == "after_delimiter":
                if len(buf) < 2:
                    break
                if buf[:2] == b"--":
                    state = "done"
                    buf.clear()
                    break
                if buf[:2] != b"\r\n":
                    raise ValueError("malformed multipart delimiter")
                del buf[:2]
                state = "headers"
            elif state == "headers":
                at = buf.find(b"\r\n\r\n")
                if at < 0:
                    if len(buf) > formstream.MAX_HEADER_BYTES:
                        raise ValueError("part headers are too large")
                    break
                parts += 1
                if parts > formstream.MAX_FORM_FIELDS:
                    raise ValueError("too many parts")
                part = formstream._parse_headers(bytes(buf[:at]))
                del buf[: at + 4]
                state = "body"
                yield part
            elif state == "body":
                at = buf.find(body_end)
                if at < 0:
                    keep = len(body_end) - 1
                    if len(buf) > keep:
                        piece = bytes(buf[: len(buf) - keep])
                        del buf[: len(buf) - keep]
                        yield piece
                    break
                if at:
                    yield bytes(buf[:at])
                del buf[: at + len(body_end)]
                state = "after_delimiter"
                yield None
            else:
                buf.clear()
                break
    if state != "done":
        raise ValueError("multipart body ended early")


async def handwritten(request: Request, limit: int, sink: Sink) -> dict[str, bytes]:
    return await consume(handwritten_events(request, limit), sink)


class _FileTarget(BaseTarget):  # type: ignore[misc]
    def __init__(self, sink: Sink) -> None:
        super().__init__()
        self.sink = sink

    async def on_data_received_async(self, chunk: bytes) -> None:
        self.sink.write(chunk)


async def streaming_form_data(request: Request, limit: int, sink: Sink) -> dict[str, bytes]:
    """Targets are registered by field name before parsing: an unregistered field
    is dropped unseen (or, ``strict``, fails the parse); no part count or header
    size limit to set."""
    parser = StreamingFormDataParser(headers={"Content-Type": request.headers["content-type"]})
    values = {name: ValueTarget() for name in FIELDS}
    for name, target in values.items():
        parser.register(name, target)
    parser.register("file", _FileTarget(sink))
    async for chunk in iter_body(request, limit):
        await parser.adata_received(chunk)
    return {name: target.value for name, target in values.items()}


BASELINE = "hand-written"
READERS: dict[str, Reader] = {
    BASELINE: handwritten,
    "python-multipart": gateway,
    "streaming-form-data": streaming_form_data,
}
LIMITS_KEPT = {
    BASELINE: "all four (the header limit only while the headers are incomplete in "
    "the buffer, so it depends on how the body is split); sees unknown fields",
    "python-multipart": "all four (header bytes and parts counted in the callbacks, "
    "whatever the split); sees unknown fields",
    "streaming-form-data": "file and field size (validators); no part count, no header "
    "size; unknown fields dropped unseen (or the parse fails, strict)",
}


async def once(reader: Reader, chunks: list[bytes], content_type: str, md5: bool) -> float:
    """Seconds to read the whole form; checks what came out."""
    sink = Sink(md5)
    request = make_request(chunks, content_type)
    started = time.perf_counter()
    fields = await reader(request, sum(map(len, chunks)), sink)
    elapsed = time.perf_counter() - started
    assert {k: v.decode() for k, v in fields.items()} == FIELDS, fields
    assert sink.size > 0
    return elapsed


async def peak_memory(reader: Reader, chunks: list[bytes], content_type: str) -> float:
    """MiB allocated at the peak while parsing (the body's chunks are not counted)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    await once(reader, chunks, content_type, md5=True)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return (peak - base) / MiB


async def compare(body: bytes, content_type: str, chunk_kb: int, rounds: int) -> None:
    piece = chunk_kb * 1024
    chunks = [body[i : i + piece] for i in range(0, len(body), piece)]
    mb = len(body) / 1e6
    print(f"\n{chunk_kb} KiB pieces ({len(chunks)} receive() messages); median of {rounds}")
    results: dict[str, dict[str, list[float]]] = {
        name: {"parse": [], "md5": []} for name in READERS
    }
    for _ in range(rounds):  # readers take turns each round: load hits them alike
        for name, reader in READERS.items():
            results[name]["parse"].append(await once(reader, chunks, content_type, md5=False))
            results[name]["md5"].append(await once(reader, chunks, content_type, md5=True))
    base = {kind: statistics.median(results[BASELINE][kind]) for kind in ("parse", "md5")}
    columns = ("MB/s", "x before", "+MD5 MB/s", "x before", "peak MiB")
    widths = (8, 10, 11, 10, 10)
    print(f"{'':<21}" + "".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True)))
    for name, reader in READERS.items():
        parse = statistics.median(results[name]["parse"])
        md5 = statistics.median(results[name]["md5"])
        peak = await peak_memory(reader, chunks, content_type)
        print(
            f"{name:<21}{mb / parse:>8.0f}{base['parse'] / parse:>10.2f}"
            f"{mb / md5:>11.0f}{base['md5'] / md5:>10.2f}{peak:>10.2f}"
        )


async def main(args: argparse.Namespace) -> None:
    body, content_type = make_body(args.file_mb)
    print(f"{args.file_mb} MiB file field + {len(FIELDS)} text fields: {len(body)} bytes")
    for chunk_kb in (int(kb) for kb in args.chunk_kb.split(",")):
        await compare(body, content_type, chunk_kb, args.rounds)
    print("\nlimits kept (field count, text field size, file size, part header size):")
    for name, kept in LIMITS_KEPT.items():
        print(f"  {name:<21}{kept}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file-mb", type=int, default=64)
    parser.add_argument("--chunk-kb", default="64,16,4")
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
