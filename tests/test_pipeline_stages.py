"""Each pipeline stage on its own: plain async functions, real S3/Postgres, no queue."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from app.core.embedding import LocalEmbedder, load_tokenizer
from app.core.errors import PermanentError
from app.gateway.services import Services
from app.jobs.documents import create_document
from tests.fixtures_pipeline import (
    encrypt_pdf,
    make_pdf,
    page_sentence,
    sha256_of,
)
from workers.stages.chunk import chunk_pages, resolve_options
from workers.stages.common import Chunk, DocumentInfo, NullReporter, PageText
from workers.stages.extract import extract_document
from workers.stages.formats import normalize_text
from workers.stages.index import write_chunks
from workers.stages.pdf import PdfPages, extract_pdf_page, open_pdf
from workers.stages.validate import validate_document

REPORT = NullReporter()


async def _validate(
    services: Services,
    tmp_path: Path,
    data: bytes,
    doc_type: str = "pdf",
    *,
    checksum: str | None = None,
    max_pages: int = 50,
    max_bytes: int = 10_000_000,
    store: bool = True,
) -> object:
    key = f"tests/{uuid.uuid4()}"
    if store:
        await services.s3.put_object(Bucket=services.settings.minio_bucket_name, Key=key, Body=data)
    doc = DocumentInfo(
        id=str(uuid.uuid4()),
        owner_id="u",
        filename="f",
        document_type=doc_type,
        content_type="x",
        size_bytes=len(data),
        object_key=key,
        checksum_sha256=checksum,
    )
    return await validate_document(
        services.s3,
        services.settings.minio_bucket_name,
        doc,
        tmp_path / "file",
        max_bytes=max_bytes,
        max_pdf_pages=max_pages,
        report=REPORT,
    )


async def _code_of(
    services: Services, tmp_path: Path, data: bytes, doc_type: str = "pdf", **kw: object
) -> str:
    with pytest.raises(PermanentError) as err:
        await _validate(services, tmp_path, data, doc_type, **kw)  # type: ignore[arg-type]
    return err.value.code


PDF3 = make_pdf([[page_sentence(p, 1)] for p in range(1, 4)])


async def test_validate_accepts_a_pdf_and_reports_sha_and_pages(
    services: Services, tmp_path: Path
) -> None:
    result = await _validate(services, tmp_path, PDF3, checksum=sha256_of(PDF3))
    assert result.sha256 == sha256_of(PDF3)  # type: ignore[attr-defined]
    assert result.page_count == 3  # type: ignore[attr-defined]
    assert (tmp_path / "file").read_bytes() == PDF3


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("empty", "empty_file"),
        ("text_declared_pdf", "type_mismatch"),
        ("pdf_declared_txt", "type_mismatch"),
        ("png_declared_md", "type_mismatch"),
        ("corrupt_pdf", "corrupt_file"),
        ("corrupt_json", "corrupt_file"),
        ("password_pdf", "encrypted_pdf"),
        ("too_many_pages", "too_many_pages"),
        ("checksum", "checksum_mismatch"),
        ("missing_object", "object_missing"),
        ("too_large", "file_too_large"),
    ],
)
async def test_validate_error_codes(
    services: Services, tmp_path: Path, case: str, code: str
) -> None:
    cases: dict[str, tuple[bytes, str, dict[str, object]]] = {
        "empty": (b"", "txt", {}),
        "text_declared_pdf": (b"just some words", "pdf", {}),
        "pdf_declared_txt": (PDF3, "txt", {}),
        "png_declared_md": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 50, "md", {}),
        "corrupt_pdf": (b"%PDF-1.7\n" + bytes(range(256)) * 20, "pdf", {}),
        "corrupt_json": (b'{"a": [1, 2', "json", {}),
        "password_pdf": (encrypt_pdf(PDF3, user_password="secret"), "pdf", {}),
        "too_many_pages": (PDF3, "pdf", {"max_pages": 2}),
        "checksum": (PDF3, "pdf", {"checksum": "0" * 64}),
        "missing_object": (PDF3, "pdf", {"store": False}),
        "too_large": (PDF3, "pdf", {"max_bytes": 100}),
    }
    data, doc_type, kw = cases[case]
    assert await _code_of(services, tmp_path, data, doc_type, **kw) == code


@pytest.mark.parametrize("algorithm", ["AES-128", "AES-256", "RC4-128"])
async def test_empty_user_password_pdf_is_decrypted_and_extracted(
    services: Services, tmp_path: Path, algorithm: str
) -> None:
    secured = encrypt_pdf(PDF3, user_password="", algorithm=algorithm)
    result = await _validate(services, tmp_path, secured)
    assert result.encrypted and result.page_count == 3  # type: ignore[attr-defined]
    extracted = await extract_document(tmp_path / "file", "pdf", report=REPORT)
    assert [p.number for p in extracted.pages] == [1, 2, 3]
    assert "Page 2 line 1" in extracted.pages[1].text


async def test_extract_keeps_page_numbers(tmp_path: Path) -> None:
    path = tmp_path / "doc.pdf"
    path.write_bytes(make_pdf([[page_sentence(p, 1), page_sentence(p, 2)] for p in (1, 2, 3)]))
    extracted = await extract_document(path, "pdf", report=REPORT)
    assert [p.number for p in extracted.pages] == [1, 2, 3]
    for page in extracted.pages:
        assert page_sentence(page.number, 2) in page.text
    assert extracted.warnings == []


async def test_oversized_page_is_skipped_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "doc.pdf"
    noise = " ".join(uuid.uuid4().hex for _ in range(300))  # incompressible
    path.write_bytes(make_pdf([["small page"], [noise]]))
    reader = open_pdf(path)
    text, warning = extract_pdf_page(reader, 1, max_stream_bytes=500)
    assert text == "" and warning is not None
    assert warning["code"] == "page_too_large" and warning["page"] == 2
    text, warning = extract_pdf_page(reader, 0, max_stream_bytes=500)
    assert text == "small page" and warning is None


async def test_extract_text_formats(tmp_path: Path) -> None:
    cases = {
        "html": (
            b"<html><head><title>T</title><style>p{color:red}</style></head><body>"
            b"<p>Hello <b>there</b></p><script>alert('x')</script><p>Bye</p></body></html>",
            ["Hello there", "Bye"],
            ["alert", "color"],
        ),
        "csv": (b"name,city\nAda,London\nAlan,Wilmslow\n", ["name: Ada; city: London."], []),
        "json": (
            b'{"title": "Report", "items": [{"k": "alpha"}]}',
            ["title: Report", "items[0].k: alpha"],
            [],
        ),
        "md": (b"# Title\n\nSome hyphen-\nated words\x00 here.", ["hyphenated words here"], []),
        "txt": (b"\xef\xbb\xbfplain   text\r\nline", ["plain text\nline"], []),
    }
    for doc_type, (raw, present, absent) in cases.items():
        path = tmp_path / f"f.{doc_type}"
        path.write_bytes(raw)
        extracted = await extract_document(path, doc_type, report=REPORT)
        text = extracted.pages[0].text
        for piece in present:
            assert piece in text, (doc_type, text)
        for piece in absent:
            assert piece not in text, (doc_type, text)


def test_normalize_text() -> None:
    assert normalize_text("a\x00b  c\t d\n\n\n\nnew-\nline ") == "ab c d\n\nnewline"


def _pages(n: int, lines: int = 12) -> list[PageText]:
    return [
        PageText(p, "\n\n".join(page_sentence(p, i) for i in range(lines))) for p in range(1, n + 1)
    ]


def test_chunks_respect_token_budget_pages_and_offsets() -> None:
    tok = load_tokenizer()
    pages = _pages(5)
    chunks = chunk_pages(pages, tok, chunk_size=64, chunk_overlap=8)
    text = "\n\n".join(p.text for p in pages)
    assert len(chunks) > 5
    for c in chunks:
        assert c.token_count <= 62
        assert len(tok.encode(c.text, add_special_tokens=False).ids) <= 62
        assert text[c.char_start : c.char_end] == c.text
        assert 1 <= c.page_start <= c.page_end <= 5
        mentioned = {int(m) for m in re.findall(r"Page (\d+) ", c.text)}
        assert mentioned and min(mentioned) >= c.page_start and max(mentioned) <= c.page_end
    # Consecutive chunks overlap, and everything is covered.
    for a, b in itertools.pairwise(chunks):
        assert b.char_start < a.char_end
    assert chunks[0].char_start == 0 and chunks[-1].char_end == len(text)


def test_chunks_end_at_sentence_boundaries() -> None:
    chunks = chunk_pages(_pages(3), load_tokenizer(), chunk_size=64, chunk_overlap=0)
    for c in chunks:
        assert c.text.rstrip().endswith("."), c.text


def test_chunk_options_are_capped_and_validated() -> None:
    assert resolve_options({}, 256) == (256, 32)
    assert resolve_options({"chunk_size": 1000, "chunk_overlap": 500}, 256) == (256, 127)
    for bad in ({"chunk_size": 3}, {"chunk_size": "big"}, {"chunk_overlap": -1}):
        with pytest.raises(PermanentError) as err:
            resolve_options(bad, 256)
        assert err.value.code == "invalid_processing_options"


async def test_embed_is_normalised_and_semantic(embedder: LocalEmbedder) -> None:
    vecs = await embedder.embed(
        ["The cat sat on the mat.", "A kitten rested on a rug.", "Quarterly tax filing deadlines"]
    )
    assert vecs.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2]


async def test_index_copies_chunks_and_vectors_idempotently(services: Services, user: str) -> None:
    doc_id = await create_document(
        services.db,
        owner_id=user,
        filename="a.txt",
        content_type="text/plain",
        document_type="txt",
        size_bytes=1,
    )
    chunks = [
        Chunk(
            seq=i,
            text=f"chunk {i}",
            token_count=2,
            page_start=1,
            page_end=1,
            char_start=i * 10,
            char_end=i * 10 + 7,
            sha256="0" * 64,
        )
        for i in range(3)
    ]
    vectors = np.random.default_rng(1).random((3, 384), dtype=np.float32)
    for _ in range(2):  # a retried index replaces, never duplicates
        async with services.db.acquire() as conn, conn.transaction():
            assert await write_chunks(conn, doc_id, user, chunks, vectors) == 3
    rows = await services.db.fetch(
        "SELECT seq, text, embedding::text AS e FROM chunks WHERE document_id = $1::uuid "
        "ORDER BY seq",
        doc_id,
    )
    assert [r["seq"] for r in rows] == [0, 1, 2]
    stored = np.array([[float(x) for x in r["e"].strip("[]").split(",")] for r in rows])
    assert np.allclose(stored, vectors, atol=1e-6)


async def test_embedding_runs_off_the_event_loop_one_call_at_a_time(
    embedder: LocalEmbedder,
) -> None:
    texts = [f"Sentence number {i} about rivers, engines and gardens." for i in range(200)]
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    results = await asyncio.gather(*(embedder.embed(texts[i::3]) for i in range(3)))
    stop.set()
    await tick
    assert len(gaps) > 5 and max(gaps) < 0.25  # the loop kept turning while encoding
    alone = await embedder.embed(texts[1::3])
    assert np.allclose(results[1], alone, atol=1e-5)


def test_pdf_pages_reopen_keeps_reading_the_right_pages(tmp_path: Path) -> None:
    data = make_pdf([[page_sentence(p, 1)] for p in range(1, 6)])
    for name, blob in (("plain", data), ("secured", encrypt_pdf(data, user_password=""))):
        path = tmp_path / f"{name}.pdf"
        path.write_bytes(blob)
        pdf = PdfPages(path, reopen_every=2)  # re-created every 2 pages
        try:
            texts = [pdf.extract(i)[0] for i in range(pdf.count)]
        finally:
            pdf.close()
        assert texts == [page_sentence(p, 1) for p in range(1, 6)], name
