"""tus uploads through the gateway against aioboto3 multipart straight to the same S3.

    python bench/tus.py [--size-mb 1024] [--runs direct1,direct4,a,b,c,d] [--rounds 1]

Starts its own embedded stack (Postgres, Redis, S3 API server) and a real gateway
process (``python -m app gateway``, 8 MiB parts), writes one file of random bytes,
then in the same run measures:

* ``direct1`` / ``direct4``: aioboto3 multipart to the S3 endpoint, 8 MiB parts with
  their MD5, one stream / four streams (``bench/upload.py``'s baseline);
* ``a``: the tus endpoint, one PATCH per 8 MiB (one stream, as a tus client sends);
* ``b``: the tus endpoint, 1 MiB PATCHes (what browser clients often use): every
  PATCH but one in eight leaves an incomplete part in S3;
* ``c``: four partial uploads in parallel (8 MiB PATCHes), then the final upload
  that S3 builds from them with UploadPartCopy (tus-js-client's ``parallelUploads``);
* ``d``: four separate uploads at once (8 MiB PATCHes; ``--concurrent-mb`` each,
  the whole file by default): the RSS case;
* ``concat4``: what (c) asks of S3, with no gateway: aioboto3 uploads the four
  quarters as four objects in parallel, then builds the final object from them
  with one ``UploadPartCopy`` each and completes it.  (c) against it says how much
  of (c)'s time is the S3 server's own.

(a) and (b) are one stream, so their baseline is ``direct1``; (c) is four, against
``direct4``.  Targets: (a), (c) >= 0.8, (b) >= 0.6; gateway peak RSS < 250 MB in
every run (``VmHWM``, reset before each run through ``/proc/PID/clear_refs``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.core.auth import TokenService  # noqa: E402
from app.core.db import migrate_dsn  # noqa: E402
from app.core.settings import Settings  # noqa: E402
from app.core.storage import ensure_bucket, open_s3  # noqa: E402
from bench.upload import (  # noqa: E402
    cpu_seconds,
    delete,
    direct_upload,
    peak_rss_mb,
    start_gateway,
    write_file,
)
from devstack.process import free_port  # noqa: E402
from devstack.stack import EmbeddedStack  # noqa: E402

MiB = 1024 * 1024
SECRET = "bench-secret-" + "x" * 32
TUS = "/api/v1/tus/"
V = {"Tus-Resumable": "1.0.0"}
NAME = "filename cGF5bG9hZC50eHQ="  # payload.txt
TARGETS = {"a": ("direct1", 0.8), "b": ("direct1", 0.6), "c": ("direct4", 0.8)}
INFO = {"c": "concat4"}
"""Second baselines, printed beside the target's (no target of their own)."""


class TusBench:
    """A minimal tus client (httpx): create, then PATCH the file's bytes in order."""

    def __init__(self, url: str, token: str, path: Path) -> None:
        self.http = httpx.AsyncClient(
            base_url=url,
            headers={"Authorization": f"Bearer {token}", **V},
            timeout=300,
            limits=httpx.Limits(max_connections=16),
        )
        self.fd = os.open(path, os.O_RDONLY)

    async def close(self) -> None:
        await self.http.aclose()
        os.close(self.fd)

    async def create(self, length: int, **headers: str) -> str:
        r = await self.http.post(
            TUS, headers={"Upload-Length": str(length), "Upload-Metadata": NAME, **headers}
        )
        assert r.status_code == 201, r.text
        return str(r.headers["location"])

    async def send(self, url: str, start: int, end: int, patch: int) -> httpx.Response:
        """PATCH bytes ``[start, end)`` of the file, ``patch`` bytes at a time."""
        offset, r = start, None
        while offset < end:
            n = min(patch, end - offset)
            data = await asyncio.to_thread(os.pread, self.fd, n, offset)
            r = await self.http.patch(
                url,
                content=data,
                headers={
                    "Upload-Offset": str(offset - start),
                    "Content-Type": "application/offset+octet-stream",
                },
            )
            assert r.status_code == 204, r.text
            offset += n
        assert r is not None
        return r

    async def upload(self, size: int, patch: int) -> str:
        r = await self.send(await self.create(size), 0, size, patch)
        return str(r.headers["sluice-document-id"])

    async def parallel(self, size: int, streams: int, patch: int) -> str:
        bounds = [size * i // streams for i in range(streams + 1)]

        async def partial(i: int) -> str:
            url = await self.create(bounds[i + 1] - bounds[i], **{"Upload-Concat": "partial"})
            await self.send(url, bounds[i], bounds[i + 1], patch)
            return url

        started = time.perf_counter()
        urls = await asyncio.gather(*[partial(i) for i in range(streams)])
        joined = time.perf_counter()
        r = await self.http.post(
            TUS, headers={"Upload-Concat": "final;" + " ".join(urls), "Upload-Metadata": NAME}
        )
        assert r.status_code == 201, r.text
        print(
            f"   (c) partials: {joined - started:.2f} s ({size / MiB / (joined - started):.1f} "
            f"MiB/s); final upload built by S3 and completed: {time.perf_counter() - joined:.2f} s"
        )
        return str(r.headers["sluice-document-id"])


def reset_peak_rss(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def gateway_env(stack: EmbeddedStack, size_mb: int) -> dict[str, str]:
    return {
        **stack.environ(bucket="bench"),
        "JWT_SECRET": SECRET,
        "LOG_LEVEL": "WARNING",
        "LOG_FORMAT": "console",
        "UPLOAD_CHUNK_SIZE_MB": "8",
        "MAX_UPLOAD_SIZE_MB": str(max(size_mb * 2, 5120)),
        "RATE_LIMIT_REQUESTS_PER_MINUTE": "1000000",
        "RATE_LIMIT_UPLOADS_PER_MINUTE": "1000000",
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(ROOT),
    }


class Measured:
    """Per run: MiB/s, the gateway's peak RSS, gateway and S3-server CPU per MiB."""

    def __init__(self, gateway_pid: int, s3_pid: int) -> None:
        self.pids = (gateway_pid, s3_pid)
        self.results: dict[str, dict[str, list[float]]] = {}

    async def run(self, label: str, go: Awaitable[None], mib: float) -> None:
        gateway, s3 = self.pids
        reset_peak_rss(gateway)
        cpu, s3_cpu = cpu_seconds(gateway), cpu_seconds(s3)
        started = time.perf_counter()
        await go
        elapsed = time.perf_counter() - started
        got = self.results.setdefault(label, {"rate": [], "rss": [], "cpu": [], "s3cpu": []})
        got["rate"].append(mib / elapsed)
        got["rss"].append(peak_rss_mb(gateway))
        got["cpu"].append((cpu_seconds(gateway) - cpu) / mib * 1000)
        got["s3cpu"].append((cpu_seconds(s3) - s3_cpu) / mib * 1000)
        print(
            f"{label:>8}: {mib:.0f} MiB in {elapsed:.2f} s = {got['rate'][-1]:.1f} MiB/s, "
            f"gateway peak RSS {got['rss'][-1]:.0f} MB, CPU {got['cpu'][-1]:.1f} ms/MiB "
            f"(S3 server {got['s3cpu'][-1]:.1f})",
            flush=True,
        )

    def medians(self) -> dict[str, dict[str, float]]:
        return {
            k: {m: statistics.median(v) for m, v in got.items()} for k, got in self.results.items()
        }


async def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    size, each, part = args.size_mb * MiB, min(args.size_mb, args.concurrent_mb) * MiB, 8 * MiB
    with tempfile.TemporaryDirectory(prefix="sluice-bench-tus-") as tmp:
        data_file = Path(tmp) / "payload.txt"
        write_file(data_file, size)
        with EmbeddedStack.in_dir(Path(tmp) / "stack", durable=False) as stack:
            env = gateway_env(stack, args.size_mb)
            settings = Settings.from_environ(env)
            await migrate_dsn(settings.database_url.reveal())
            async with open_s3(settings) as s3:
                await ensure_bucket(s3, settings.minio_bucket_name)
            port = free_port()
            gateway = start_gateway(env, port, Path(tmp) / "gateway.log")
            client = TusBench(f"http://127.0.0.1:{port}", TokenService(SECRET).mint("b"), data_file)
            measured = Measured(gateway.pid, stack.s3._proc.pid)

            async def tus(*uploads: Awaitable[str]) -> None:
                for document_id in await asyncio.gather(*uploads):
                    await delete(settings, f"documents/{document_id}/original")

            runs: dict[str, Callable[[], Awaitable[None]]] = {
                "direct1": lambda: _direct(settings, data_file, size, part, 1),
                "direct4": lambda: _direct(settings, data_file, size, part, 4),
                "concat4": lambda: _direct_concat(settings, data_file, size, part, 4),
                "a": lambda: tus(client.upload(size, part)),
                "b": lambda: tus(client.upload(size, MiB)),
                "c": lambda: tus(client.parallel(size, 4, part)),
                "d": lambda: tus(*[client.upload(each, part) for _ in range(4)]),
            }
            try:
                order = args.runs.split(",")
                for round_no in range(args.rounds):
                    for label in order if round_no % 2 == 0 else order[::-1]:
                        mib = (4 * each if label == "d" else size) / MiB
                        await measured.run(label, runs[label](), mib)
            finally:
                await client.close()
                gateway.terminate()
                gateway.wait(15)
    return measured.medians()


async def _direct(settings: Settings, path: Path, size: int, part: int, parallel: int) -> None:
    key = await direct_upload(settings, path, size, part, parallel)
    await delete(settings, key)


async def _direct_concat(
    settings: Settings, path: Path, size: int, part: int, streams: int
) -> None:
    """Four objects uploaded in parallel, joined by S3 with ``UploadPartCopy``."""
    bucket, bounds = settings.minio_bucket_name, [size * i // streams for i in range(streams + 1)]
    keys = [f"bench/partial-{i}" for i in range(streams)]
    fd = os.open(path, os.O_RDONLY)
    try:
        async with open_s3(settings, max_pool_connections=streams + 2) as s3:
            started = time.perf_counter()
            await asyncio.gather(
                *[
                    _multipart(s3, bucket, keys[i], fd, (bounds[i], bounds[i + 1]), part)
                    for i in range(streams)
                ]
            )
            joined = time.perf_counter()
            upload_id = (await s3.create_multipart_upload(Bucket=bucket, Key="bench/final"))[
                "UploadId"
            ]

            async def copy(i: int) -> dict[str, object]:
                r = await s3.upload_part_copy(
                    Bucket=bucket,
                    Key="bench/final",
                    UploadId=upload_id,
                    PartNumber=i + 1,
                    CopySource={"Bucket": bucket, "Key": keys[i]},
                )
                return {"ETag": r["CopyPartResult"]["ETag"], "PartNumber": i + 1}

            parts = await asyncio.gather(*[copy(i) for i in range(streams)])
            await s3.complete_multipart_upload(
                Bucket=bucket,
                Key="bench/final",
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
            print(
                f"   concat4 objects: {joined - started:.2f} s; final built by S3 and "
                f"completed: {time.perf_counter() - joined:.2f} s"
            )
            for key in [*keys, "bench/final"]:
                await s3.delete_object(Bucket=bucket, Key=key)
    finally:
        os.close(fd)


async def _multipart(
    s3: Any, bucket: str, key: str, fd: int, span: tuple[int, int], part: int
) -> None:
    upload_id = (await s3.create_multipart_upload(Bucket=bucket, Key=key))["UploadId"]
    parts = []
    for number, start in enumerate(range(span[0], span[1], part), start=1):
        data = await asyncio.to_thread(os.pread, fd, min(part, span[1] - start), start)
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
        r = await s3.upload_part(
            Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data, ContentMD5=md5
        )
        parts.append({"ETag": r["ETag"], "PartNumber": number})
    await s3.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--runs", default="direct1,a,b,direct4,c,concat4,d")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds (median)")
    parser.add_argument(
        "--concurrent-mb", type=int, default=1024, help="size of each of run d's four uploads"
    )
    args = parser.parse_args()
    r = asyncio.run(run(args))
    print(f"\nmedians, {args.size_mb} MiB file, 8 MiB parts:")
    for label, got in r.items():
        line = f"{label:>8}: {got['rate']:.1f} MiB/s, peak RSS {got['rss']:.0f} MB"
        base, target = TARGETS.get(label, ("", 0.0))
        if base in r:
            line += f", ratio {got['rate'] / r[base]['rate']:.2f} vs {base} (target >= {target})"
        if INFO.get(label) in r:
            line += f", {got['rate'] / r[INFO[label]]['rate']:.2f} vs {INFO[label]}"
        print(line + f", CPU ms/MiB: gateway {got['cpu']:.1f}, S3 server {got['s3cpu']:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
