"""A cheap guard against deeply nested JSON, run before client JSON is decoded.

Decoding ``[[[[...]]]]`` nested thousands deep into an untyped field recurses
once per level and ends in ``RecursionError`` (a 500, or a WebSocket close
1011 with a traceback).  :func:`too_deep` measures the nesting depth without
recursing and without decoding: string literals are removed with one regular
expression, every byte but ``[]{}`` is dropped with ``bytes.translate``, and
the running depth is a prefix sum over what is left, all in C loops.  A body
with fewer brackets than the limit (almost every real one) is cleared by two
``count`` calls.

Invariant: a document for which :func:`too_deep` returns ``False`` is nested
at most ``limit`` levels deep, so decoding it cannot exhaust the stack.  For
malformed JSON the answer may err on the side of "too deep"; the decoder
would refuse such a document anyway.
"""

from __future__ import annotations

import array
import itertools
import re

MAX_JSON_DEPTH = 64
"""Deepest nesting (arrays and objects) accepted in any client JSON document."""

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_OTHER_BYTES = bytes(b for b in range(256) if b not in b"[]{}")
_SIGNS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


def nesting_depth(data: bytes | bytearray | memoryview | str) -> int:
    """The deepest nesting of arrays/objects in a JSON text (0 for a scalar)."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if raw.count(b"[") + raw.count(b"{") == 0:
        return 0
    signs = _STRING.sub(b"", raw).translate(_SIGNS, _OTHER_BYTES)
    return max(itertools.chain((0,), itertools.accumulate(array.array("b", signs))))


def too_deep(data: bytes | bytearray | memoryview | str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether a JSON text nests arrays/objects more than ``limit`` levels deep."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False
    return nesting_depth(raw) > limit
