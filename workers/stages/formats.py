"""Text formats: plain text, Markdown, CSV, JSON and HTML to text, and the
normalisation every extracted text gets (PDF pages too).

Normalised text has no NUL bytes, words hyphenated across line ends joined,
runs of spaces collapsed and at most one blank line in a row.  HTML keeps its
text only (no scripts or styles); CSV rows become ``header: value`` lines; JSON
becomes ``path: value`` lines, walked without recursion.
"""

from __future__ import annotations

import csv
import io
import re
from html.parser import HTMLParser
from typing import Any

import msgspec

from app.core.errors import PermanentError

_HYPHEN_RE = re.compile(r"(\w)-\n[ \t]*(\w)")
_SPACES_RE = re.compile(r"[ \t\f\v\u00a0]+")
_TRAILING_RE = re.compile(r"[ \t]+\n")
_BLANKS_RE = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    text = text.replace("\x00", "").replace("\r\n", "\n").replace("\r", "\n")
    text = _HYPHEN_RE.sub(r"\1\2", text)
    text = _SPACES_RE.sub(" ", text)
    text = _TRAILING_RE.sub("\n", text)
    text = _BLANKS_RE.sub("\n\n", text)
    return text.strip()


class _HtmlText(HTMLParser):
    SKIP = frozenset({"script", "style", "noscript", "template", "svg", "head"})
    BLOCK = frozenset(
        {
            "p",
            "div",
            "br",
            "li",
            "tr",
            "h1",
            "h2",
            "h3",
            "h4",
            "h5",
            "h6",
            "section",
            "article",
            "header",
            "footer",
            "blockquote",
            "pre",
            "table",
            "ul",
            "ol",
            "title",
            "hr",
            "dd",
            "dt",
        }
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0
        self._title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._title = True
        elif tag in self.SKIP:
            self._skip += 1
        if tag in self.BLOCK:
            self.parts.append("\n\n" if tag != "br" else "\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._title = False
        elif tag in self.SKIP and self._skip:
            self._skip -= 1
        if tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if self._skip == 0 or self._title:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    parser = _HtmlText()
    parser.feed(html)
    parser.close()
    return "".join(parser.parts)


def _flatten_json(value: Any, out: list[str]) -> None:
    """``path: value`` lines of a decoded JSON document, depth first, in order.

    Iterative (an explicit stack), so no nesting depth can exhaust the stack."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, dict):
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(item))))
        elif item is not None:
            out.append(f"{path}: {item}" if path else str(item))


def decode_json(raw: bytes) -> Any:
    """Decode a JSON document; malformed or nested too deeply is ``corrupt_file``."""
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise PermanentError(f"JSON does not parse: {exc}", code="corrupt_file") from exc
    except RecursionError:
        raise PermanentError(
            "JSON is nested too deeply to process", code="corrupt_file", details={"nesting": True}
        ) from None


def json_to_text(raw: bytes) -> str:
    lines: list[str] = []
    _flatten_json(decode_json(raw), lines)
    return "\n".join(lines)


def csv_to_text(text: str) -> str:
    rows = csv.reader(io.StringIO(text))
    header = next(rows, None)
    if header is None:
        return ""
    lines = []
    for row in rows:
        cells = [f"{h}: {v}" for h, v in zip(header, row, strict=False) if v.strip()]
        if cells:
            lines.append("; ".join(cells) + ".")
    return "\n".join(lines) if lines else ", ".join(header)


def decode_text(raw: bytes) -> tuple[str, dict[str, Any] | None]:
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16"), None
    try:
        return raw.decode("utf-8-sig"), None
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="replace"), {
            "code": "invalid_utf8",
            "page": 1,
            "message": "text is not valid UTF-8; undecodable bytes replaced",
        }
