"""OCR benchmark (issue 13): seconds per scanned page, parse-child memory, install size.

    python bench/ocr.py [--pages 20] [--text-pages 200] [--dpi 200] [--threads 2]
    sluice bench ocr --pages 5          (a quick look)

Makes a ``--pages`` scanned PDF the way a scanner does (one full Letter page
image per page at 200 dpi, about 25 lines of known text each, in several
fonts), and a ``--text-pages`` PDF with a text layer, then runs each through
the worker's real parse child (``workers.parse.parse_in_child``: extract + chunk
under ``PARSE_MEMORY_LIMIT_MB``, default settings but ``--threads``/``--dpi``):

1. **seconds per OCR'd page** (target <= 2 s at 200 dpi on 2 cores), next to
   the baseline measured in the same run: **pypdf text pages per second**
   through the same child, and the ratio between them;
2. **peak RSS of the parse child above an idle one** (target <= 400 MB): the
   child that parsed the text PDF is the idle baseline (same interpreter,
   imports and tokenizer, no OCR engine); the worker process itself never
   loads the engine;
3. **word accuracy** of the OCR'd text against the known text;
4. **install size** of the OCR dependencies: the files their distributions
   installed (rapidocr-onnxruntime, onnxruntime, opencv-python, pypdfium2,
   shapely, pyclipper, protobuf, flatbuffers).

Needs the DejaVu/Liberation fonts (``/usr/share/fonts/truetype``).  Starts no
server; each parse child ends with its parse.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from PIL import Image  # noqa: E402

from app.core.embedding import model_dir  # noqa: E402
from app.core.settings import Settings  # noqa: E402
from tests.fixtures_pipeline import make_pdf  # noqa: E402
from tests.fixtures_scans import (  # noqa: E402
    BAKERY,
    GLACIER,
    HARBOUR,
    LIBRARY,
    MONO,
    OBSERVATORY,
    ORCHARD,
    RAILWAY,
    SANS,
    SERIF,
    render,
    scanner_pdf,
    word_accuracy,
)
from workers.parse import ParseJob, ParseReporter, parse_in_child  # noqa: E402
from workers.stages.budget import ExtractLimits  # noqa: E402
from workers.stages.ocr import OcrOptions  # noqa: E402

MB = 1024 * 1024
LETTER = (1700, 2200)
OCR_DISTRIBUTIONS = (
    "rapidocr-onnxruntime",
    "onnxruntime",
    "opencv-python",
    "pypdfium2",
    "shapely",
    "pyclipper",
    "protobuf",
    "flatbuffers",
)
PARAGRAPHS = [HARBOUR, ORCHARD, LIBRARY, GLACIER, RAILWAY, BAKERY, OBSERVATORY]
FONTS = [(SERIF, 12), (SANS, 11), (MONO, 10), (SERIF, 11)]


def page_text(number: int) -> list[tuple[str, Path, float]]:
    """About 20 lines: three paragraphs, each twice its sentence, one font per page."""
    font, size = FONTS[number % len(FONTS)]
    return [(PARAGRAPHS[(number + k) % len(PARAGRAPHS)] * 2, font, size) for k in range(3)]


def text_page(number: int) -> str:
    return " ".join(
        f"Page {number} line {i} talks about topic {number * 100 + i}." for i in range(12)
    )


def scanned(pages: int) -> tuple[bytes, str]:
    """A scanner's PDF: each page a full Letter page image (1700 x 2200 at 200 dpi)."""
    images = []
    expected = []
    for number in range(pages):
        paragraphs = page_text(number)
        text = render(paragraphs)
        assert text.height <= LETTER[1], "page_text() must fit on a Letter page"
        page = Image.new("L", LETTER, 255)
        page.paste(text, (0, 0))
        images.append(page)
        expected.extend(paragraph for paragraph, _, _ in paragraphs)
    return scanner_pdf(images), " ".join(expected)


async def parse(
    path: Path, kind: str, settings: Settings, limits: ExtractLimits
) -> tuple[float, str]:
    async def progress(stage: str, fraction: float, message: str) -> None:
        return None

    async def nothing(*_: object) -> None:
        return None

    job = ParseJob(
        path=str(path),
        document_type=kind,
        chunk_size=256,
        chunk_overlap=0,
        tokenizer_path=str(model_dir() / "tokenizer.json"),
        limits=limits,
        memory_bytes=settings.parse_memory_limit_mb * MB,
        time_seconds=float(settings.parse_time_limit_seconds),
    )
    started = time.perf_counter()
    parsed = await parse_in_child(job, ParseReporter(progress, nothing, nothing))
    seconds = time.perf_counter() - started
    return seconds, " ".join(c.text for c in parsed.chunks)


def children_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def installed_mb() -> float:
    total = 0
    for name in OCR_DISTRIBUTIONS:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        for file in dist.files or []:
            located = Path(str(dist.locate_file(file)))
            if located.is_file():
                total += located.stat().st_size
    return total / MB


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=20)
    ap.add_argument("--text-pages", type=int, default=200)
    ap.add_argument("--dpi", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    settings = Settings.from_environ(
        {  # the defaults; these are required but unused here
            "MINIO_ENDPOINT": "unused:9000",
            "MINIO_ACCESS_KEY": "unused",
            "MINIO_SECRET_KEY": "unused",
            "REDIS_URL": "redis://unused",
            "DATABASE_URL": "postgresql://unused/unused",
            "JWT_SECRET": "unused-" + "x" * 32,
        }
    )
    limits = ExtractLimits(
        page_seconds=float(settings.page_time_budget_seconds),
        ocr=OcrOptions(
            dpi=args.dpi,
            threads=args.threads,
            max_pages=max(args.pages, settings.ocr_max_pages),
            page_seconds=float(settings.ocr_page_time_seconds),
        ),
    )
    with tempfile.TemporaryDirectory(prefix="sluice-bench-ocr-") as tmp:
        text_pdf = Path(tmp) / "text.pdf"
        text_pdf.write_bytes(make_pdf([[text_page(p)] for p in range(1, args.text_pages + 1)]))
        scan_pdf = Path(tmp) / "scan.pdf"
        data, expected = scanned(args.pages)
        scan_pdf.write_bytes(data)

        text_seconds, _ = await parse(text_pdf, "pdf", settings, limits)
        idle_peak = children_peak_mb()
        cpu_before = children_cpu()
        scan_seconds, text = await parse(scan_pdf, "pdf", settings, limits)
        ocr_peak = children_peak_mb()
        cpu_per_page = (children_cpu() - cpu_before) / args.pages

    per_page = scan_seconds / args.pages
    text_rate = args.text_pages / text_seconds
    load = os.getloadavg()
    print(f"OCR benchmark ({os.cpu_count()} CPUs, load {load[0]:.1f} {load[1]:.1f} {load[2]:.1f})")
    print(
        f"  scanned PDF: {args.pages} pages at {args.dpi} dpi, onnxruntime threads {args.threads}"
    )
    print(f"    {scan_seconds:.1f} s -> {per_page:.2f} s per OCR'd page (target <= 2 s)")
    print(f"    {cpu_per_page:.2f} CPU s per page (less sensitive to other load than wall time)")
    print(f"    word accuracy {word_accuracy(expected, text):.3f}")
    print(
        f"  baseline, pypdf text layer: {args.text_pages} pages in {text_seconds:.2f} s "
        f"-> {text_rate:.0f} pages/s"
    )
    print(f"    an OCR'd page costs {per_page * text_rate:.0f}x a text page")
    print(
        f"  parse child peak RSS: idle (text PDF) {idle_peak:.0f} MiB, OCR {ocr_peak:.0f} MiB "
        f"-> {ocr_peak - idle_peak:.0f} MiB above idle (target <= 400), "
        f"limit PARSE_MEMORY_LIMIT_MB={settings.parse_memory_limit_mb} (address space)"
    )
    print(f"  OCR dependencies installed: {installed_mb():.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
