"""Hostile documents, built byte by byte: PDFs whose cost hides behind a small file.

* :func:`shared_stream_pdf` -- every page's ``/Contents`` is the same
  FlateDecode stream object (text amplification: a few hundred KB that decode
  to gigabytes across the pages);
* :func:`text_stream` -- a content stream of long ``Tj`` strings, the shape that
  makes pypdf produce a lot of text from few operators;
* :func:`json_bomb` -- JSON nested ``depth`` deep.
"""

from __future__ import annotations

import zlib

_FONT = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"


def raw_pdf(objects: list[bytes]) -> bytes:
    """A PDF of numbered object bodies (object ``i + 1`` is ``objects[i]``, object 1
    the catalog) with a correct cross-reference table."""
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


def flate_stream(data: bytes) -> bytes:
    packed = zlib.compress(data, 9)
    head = b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(packed)
    return head + packed + b"\nendstream"


def text_stream(decoded_bytes: int, *, string_length: int = 10_000) -> bytes:
    """A content stream of about ``decoded_bytes`` bytes of ``(lorem ipsum...) Tj``."""
    words = (b"lorem ipsum dolor sit amet " * (string_length // 27 + 1))[:string_length]
    op = b"(" + words + b") Tj\n"
    return b"BT /F1 12 Tf 72 720 Td\n" + op * max(1, decoded_bytes // len(op)) + b"ET\n"


def shared_stream_pdf(pages: int, content: bytes) -> bytes:
    """``pages`` pages whose ``/Contents`` all reference one stream (object 3) and one
    resources dictionary (object 4)."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"",
        flate_stream(content),
        b"<< /Font << /F1 5 0 R >> >>",
        _FONT,
    ]
    kids = []
    for _ in range(pages):
        kids.append(b"%d 0 R" % (len(objects) + 1))
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            b"/Contents 3 0 R /Resources 4 0 R >>"
        )
    objects[1] = b"<< /Type /Pages /Kids [" + b" ".join(kids) + b"] /Count %d >>" % pages
    return raw_pdf(objects)


def json_bomb(depth: int) -> bytes:
    return b'{"a": ' * depth + b"1" + b"}" * depth
