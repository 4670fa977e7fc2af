"""Upload throughput through the gateway against the same S3 endpoint directly.

    python bench/upload.py [--size-mb 1024] [--part-mb 8] [--parallel 4] [--report FILE]

Starts its own embedded stack (Postgres, Redis, S3 API server) and a real
gateway process (``python -m app gateway``), writes one file of random bytes,
then in the same run:

1. uploads it through the gateway with :class:`app.client.upload.UploadClient`
   (``parallel`` streams over ``PUT .../parts/{n}`` with Content-MD5), and
2. uploads it straight to the S3 endpoint with aioboto3 multipart, the same
   part size, the same parallelism, the same per-part MD5.

Prints both MB/s, their ratio (target >= 0.8) and the gateway's peak RSS
(``VmHWM``; target < 250 MB).  Everything it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.client.upload import UploadClient  # noqa: E402
from app.core.auth import TokenService  # noqa: E402
from app.core.db import migrate_dsn  # noqa: E402
from app.core.settings import Settings  # noqa: E402
from app.core.storage import ensure_bucket, open_s3  # noqa: E402
from devstack.process import free_port  # noqa: E402
from devstack.stack import EmbeddedStack  # noqa: E402

MiB = 1024 * 1024
SECRET = "bench-secret-" + "x" * 32


def write_file(path: Path, size: int) -> None:
    block = os.urandom(8 * MiB)
    with path.open("wb") as f:
        left = size
        while left > 0:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
            block = block[1:] + block[:1]  # parts differ from each other


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_gateway(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app", "gateway", "--port", str(port)],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("gateway did not start")


async def direct_upload(
    settings: Settings, path: Path, size: int, part_size: int, parallel: int
) -> str:
    key = "bench/direct"
    total = -(-size // part_size)
    async with open_s3(settings, max_pool_connections=parallel + 2) as s3:
        created = await s3.create_multipart_upload(Bucket=settings.minio_bucket_name, Key=key)
        upload_id = created["UploadId"]
        etags: dict[int, str] = {}
        todo = list(range(total, 0, -1))
        fd = os.open(path, os.O_RDONLY)

        def read(n: int) -> tuple[bytes, str]:
            data = os.pread(fd, min(part_size, size - (n - 1) * part_size), (n - 1) * part_size)
            return data, base64.b64encode(hashlib.md5(data).digest()).decode()

        async def worker() -> None:
            while todo:
                n = todo.pop()
                data, md5 = await asyncio.to_thread(read, n)
                resp = await s3.upload_part(
                    Bucket=settings.minio_bucket_name,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=n,
                    Body=io.BytesIO(data),
                    ContentMD5=md5,
                )
                etags[n] = resp["ETag"]

        try:
            await asyncio.gather(*[worker() for _ in range(parallel)])
        finally:
            os.close(fd)
        await s3.complete_multipart_upload(
            Bucket=settings.minio_bucket_name,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": [{"ETag": etags[n], "PartNumber": n} for n in sorted(etags)]},
        )
        return key


async def delete(settings: Settings, key: str) -> None:
    async with open_s3(settings) as s3:
        await s3.delete_object(Bucket=settings.minio_bucket_name, Key=key)


async def run(args: argparse.Namespace) -> dict[str, float]:
    size = args.size_mb * MiB
    with tempfile.TemporaryDirectory(prefix="sluice-bench-upload-") as tmp:
        tmpdir = Path(tmp)
        data_file = tmpdir / "payload.txt"
        write_file(data_file, size)
        with EmbeddedStack.in_dir(tmpdir / "stack", durable=False) as stack:
            env = {
                **stack.environ(bucket="bench"),
                "JWT_SECRET": SECRET,
                "LOG_LEVEL": "WARNING",
                "LOG_FORMAT": "console",
                "UPLOAD_CHUNK_SIZE_MB": str(args.part_mb),
                "MAX_UPLOAD_SIZE_MB": str(max(args.size_mb * 2, 5120)),
                "RATE_LIMIT_REQUESTS_PER_MINUTE": "1000000",
                "PATH": os.environ.get("PATH", ""),
                "PYTHONPATH": str(ROOT),
            }
            settings = Settings.from_environ(env)
            await migrate_dsn(settings.database_url.reveal())
            async with open_s3(settings) as s3:
                await ensure_bucket(s3, settings.minio_bucket_name)
            port = free_port()
            gateway = start_gateway(env, port, tmpdir / "gateway.log")
            try:
                token = TokenService(SECRET).mint("bench")
                rates: dict[str, list[float]] = {"gateway": [], "direct": []}
                order = args.order.split(",")
                for round_no in range(args.rounds):
                    # alternate the order so neither run always gets the warmer machine
                    for label in order if round_no % 2 == 0 else order[::-1]:
                        started = time.perf_counter()
                        if label == "gateway":
                            cpu_before = cpu_seconds(gateway.pid)
                            async with UploadClient(
                                f"http://127.0.0.1:{port}",
                                token,
                                parallel=args.parallel,
                                progress=False,
                            ) as c:
                                done = await c.upload(data_file)
                            elapsed = time.perf_counter() - started
                            cpu = cpu_seconds(gateway.pid) - cpu_before
                            print(
                                f"gateway CPU: {cpu:.1f} s ({cpu / (size / MiB) * 1000:.1f} ms/MiB)"
                            )
                            await delete(settings, f"documents/{done.document_id}/original")
                        else:
                            key = await direct_upload(
                                settings, data_file, size, args.part_mb * MiB, args.parallel
                            )
                            elapsed = time.perf_counter() - started
                            await delete(settings, key)
                        rates[label].append(size / MiB / elapsed)
                        print(
                            f"round {round_no + 1} {label:>8}: {size / MiB:.0f} MiB in "
                            f"{elapsed:.2f} s = {rates[label][-1]:.1f} MiB/s",
                            flush=True,
                        )
                results = {k: statistics.median(v) for k, v in rates.items() if v}
                results["rss_mb"] = peak_rss_mb(gateway.pid)
            finally:
                gateway.terminate()
                try:
                    gateway.wait(15)
                except subprocess.TimeoutExpired:
                    gateway.kill()
                    gateway.wait()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--part-mb", type=int, default=8)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument(
        "--order", default="direct,gateway", help="comma-separated runs: direct, gateway"
    )
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds (median)")
    parser.add_argument("--report", type=Path, help="append a Markdown summary here")
    args = parser.parse_args()
    r = asyncio.run(run(args))
    print(f"gateway peak RSS (VmHWM): {r['rss_mb']:.0f} MB (target < 250 MB)")
    if "gateway" not in r or "direct" not in r:
        return 0
    ratio = r["gateway"] / r["direct"]
    print(f"median: direct {r['direct']:.1f} MiB/s, gateway {r['gateway']:.1f} MiB/s")
    print(f"ratio: {ratio:.2f} (gateway / direct; target >= 0.8)")
    if args.report:
        command = "python bench/upload.py " + " ".join(sys.argv[1:])
        with args.report.open("a") as f:
            f.write(
                f"\n## Uploads: gateway vs direct S3 multipart\n\n`{command}`\n\n"
                f"| size | part | streams | rounds | direct MiB/s | gateway MiB/s | ratio | "
                f"gateway peak RSS |\n|---|---|---|---|---|---|---|---|\n"
                f"| {args.size_mb} MiB | {args.part_mb} MiB | {args.parallel} | {args.rounds} | "
                f"{r['direct']:.1f} | {r['gateway']:.1f} | {ratio:.2f} | "
                f"{r['rss_mb']:.0f} MB |\n"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
