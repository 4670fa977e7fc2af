"""OCR: the text of a page image, offline, one page at a time.

The engine is RapidOCR (``rapidocr-onnxruntime``): the PP-OCRv4 detection and
recognition models and the PP-OCR direction classifier, shipped inside the
wheel and run by onnxruntime on the CPU.  Nothing is ever downloaded: the
models are files of the installed package (:data:`MODEL_FILES`), checked when
the engine loads.  The bundled recognition model reads Latin script (English
and most Western European text without accents' fine detail) and Chinese; it
is the only one shipped, so there is no language setting.

How a page is read (:meth:`OcrEngine.read`):

1. the image is made grayscale, its contrast stretched (faint scans, yellowed
   paper), and passed as three equal channels;
2. text lines are *detected* on a copy scaled down to :data:`DETECT_SIDE`
   pixels on its long side (detection is the memory-hungry step and finds
   lines just as well there), and their boxes mapped back to the full image;
3. orientation: when most boxes are taller than wide the page is turned a
   quarter; when most lines then read upside down (the direction classifier,
   confirmed by recognising a few lines both ways) the page is turned half a
   turn.  A page scanned sideways or upside down
   reads in order;
4. each line is cut from the full-resolution image and *recognised*; spaces
   the model ran together are put back from where it placed each character
   (:func:`with_spaces`); fragments below ``OCR_MIN_CONFIDENCE`` are dropped;
5. reading order: fragments are grouped into lines (middles within
   :data:`SAME_LINE` box heights),
   left to right within a line, lines top to bottom; a line further below the
   previous one than :data:`PARAGRAPH_GAP` times the page's median line pitch
   starts a new paragraph (a blank line in the text).  Columns side by side are not separated.

Invariants: one page image is in memory at a time (the caller renders it,
capped at ``OCR_MAX_PIXELS``); onnxruntime uses at most ``OCR_THREADS`` threads
per model so a worker's other jobs are not starved; the engine is created on
the first page that needs it, so documents with a text layer never load it.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray
    from PIL import Image

DETECT_SIDE = 1024
"""Long side, in pixels, of the copy of a page that text detection runs on (a Letter
page at 200 dpi is detected at ~93 dpi: 10 pt text is still ~13 pixels tall there;
detection memory grows with these pixels, ~170 MB here)."""
SAME_LINE = 0.35
"""Fragments whose middles are closer than this many box heights share a line."""
PARAGRAPH_GAP = 1.4
"""A line this many times the page's median line pitch below the one before starts
a paragraph."""
MODEL_FILES = (
    "models/ch_PP-OCRv4_det_infer.onnx",
    "models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
    "models/ch_PP-OCRv4_rec_infer.onnx",
)
"""The engine's models, inside the ``rapidocr_onnxruntime`` package."""
SPACE_GAP = 1.55
"""A gap this many times a line's median gap between letters is a space (:func:`with_spaces`)."""
MIN_SPACE_COLUMNS = 4.5
WIDE = frozenset("mwMW")
ORIENTATION_SAMPLE = 3
"""Lines recognised both ways up to confirm that a page is upside down."""
UNCLIP_RATIO = 2.2
"""How far a detected line's box is grown before it is cut out (RapidOCR's default,
1.6, cuts Latin lines so tight that the recogniser runs words together: 83% word
accuracy on our fixtures against 100% at 2.2)."""
REC_BATCH = 2
"""Lines recognised per model call (each wide line costs tens of MB in the model)."""
_M_ARENA_MAX = -8


class OcrOptions(msgspec.Struct, frozen=True, kw_only=True):
    """The ``OCR_*`` settings, as the extract stage needs them."""

    enabled: bool = True
    max_pages: int = 100
    """Pages of one document that may be OCR'd; later pages without text are skipped."""
    min_confidence: float = 0.5
    """Recognised fragments scored below this (0..1) are dropped."""
    dpi: int = 200
    """Resolution pages are rendered (PDF) or scaled down to (images) for OCR."""
    max_pixels: int = 12_000_000
    """Cap on the pixels of one page image given to OCR (a huge page is scaled down)."""
    max_image_pixels: int = 60_000_000
    """Cap on the pixels of one uploaded image frame before decoding; above it the
    page is skipped with a warning (decoding alone would take that many bytes)."""
    threads: int = 2
    """onnxruntime intra-op threads per model."""
    page_seconds: float = 60.0
    """Time OCR of one page may take; a slower page is skipped with a warning."""


class OcrFailed(Exception):
    """The engine could not read a page image (the page is skipped with a warning)."""


@dataclass(frozen=True)
class OcrText:
    """What OCR read on one page."""

    text: str
    lines: int
    confidence: float
    """Mean score of the fragments kept (0 when none)."""
    rotated: int
    """Quarter turns (counter-clockwise) applied to read the page."""


@dataclass(frozen=True)
class _Fragment:
    left: float
    top: float
    right: float
    bottom: float
    text: str
    score: float

    @property
    def height(self) -> float:
        return self.bottom - self.top

    @property
    def middle(self) -> float:
        return (self.top + self.bottom) / 2


def quiet_native_threads() -> None:
    """Before numpy/OpenCV/onnxruntime load in this process: no OpenBLAS thread
    pools and at most two malloc arenas, so their threads do not each reserve
    address space (the parse child runs under ``RLIMIT_AS``)."""
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to bound
            ctypes.CDLL(None).mallopt(_M_ARENA_MAX, 2)


def package_dir() -> Path:
    """Where ``rapidocr_onnxruntime`` is installed (without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or spec.origin is None:
        raise OcrFailed("rapidocr-onnxruntime is not installed")
    return Path(spec.origin).parent


class OcrEngine:
    """RapidOCR, created on first use (see the module docstring)."""

    def __init__(self, options: OcrOptions) -> None:
        self.options = options
        self._engine: Any = None

    def _load(self) -> Any:
        if self._engine is None:
            missing = [f for f in MODEL_FILES if not (package_dir() / f).is_file()]
            if missing:  # the engine would otherwise try nothing else: fail clearly
                raise OcrFailed(f"OCR model files missing from the package: {missing}")
            quiet_native_threads()
            import cv2

            cv2.setNumThreads(1)
            from rapidocr_onnxruntime import RapidOCR  # type: ignore[import-untyped]

            engine = RapidOCR(
                intra_op_num_threads=1,  # its sessions are replaced below
                inter_op_num_threads=1,
                det_limit_type="min",
                det_limit_side_len=32,  # detection runs at the size it is given
                det_unclip_ratio=UNCLIP_RATIO,
                det_use_dilation=False,  # at DETECT_SIDE, dilation joins close lines
                rec_batch_num=REC_BATCH,
                print_verbose=False,
            )
            # Our own sessions: bounded threads, no per-shape memory plans kept.
            det, cls, rec = (self._session(path) for path in MODEL_FILES)
            engine.text_det.infer.session = det
            engine.text_cls.infer.session = cls
            engine.text_rec.session.session = rec
            self._engine = engine
        return self._engine

    def _session(self, model: str) -> Any:
        import onnxruntime  # type: ignore[import-untyped]

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = max(1, self.options.threads)
        options.inter_op_num_threads = 1
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
        options.log_severity_level = 4
        return onnxruntime.InferenceSession(
            str(package_dir() / model), sess_options=options, providers=["CPUExecutionProvider"]
        )

    def read(self, image: Image.Image) -> OcrText:
        """The text of ``image`` in reading order (raises :class:`OcrFailed`)."""
        engine = self._load()
        try:
            pixels = _prepare(image)
            turns, boxes, crops = _orient(engine, pixels)
            del pixels
            recognised, _ = engine.text_rec(crops, True) if crops else ([], 0.0)
        except MemoryError:
            raise
        except Exception as exc:  # an image the engine cannot process: skip the page
            raise OcrFailed(f"{type(exc).__name__}: {str(exc)[:200]}") from exc
        lines = [_line_text(result) for result in recognised]
        kept = [
            _fragment(box, text, score)
            for box, (text, score) in zip(boxes, lines, strict=True)
            if score >= self.options.min_confidence and text.strip()
        ]
        return OcrText(
            text=reading_order(kept),
            lines=len(kept),
            confidence=round(statistics.fmean(f.score for f in kept), 3) if kept else 0.0,
            rotated=turns,
        )


def _prepare(image: Image.Image) -> NDArray[np.uint8]:
    """Grayscale, contrast stretched, as an RGB array (the models' input)."""
    import numpy as np
    from PIL import Image, ImageOps

    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    gray = ImageOps.autocontrast(image.convert("L"), cutoff=1)
    array = np.asarray(gray, dtype=np.uint8)
    return np.repeat(array[:, :, None], 3, axis=2)


def _detect(engine: Any, pixels: NDArray[np.uint8]) -> list[NDArray[np.float32]]:
    """Text-line boxes (4 points each) in ``pixels``' coordinates, detected on a
    copy at most :data:`DETECT_SIDE` pixels long."""
    import cv2
    import numpy as np

    height, width = pixels.shape[:2]
    scale = min(1.0, DETECT_SIDE / max(height, width))
    small: Any = pixels
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        small = cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)
    boxes, _ = engine.text_det(small)
    if boxes is None or len(boxes) == 0:
        return []
    return [np.asarray(box, dtype=np.float32) / scale for box in engine.sorted_boxes(boxes)]


def _upright(boxes: list[NDArray[np.float32]]) -> bool:
    """Whether most boxes are wider than tall (lines run horizontally)."""
    tall = 0
    for box in boxes:
        width = float(abs(box[1][0] - box[0][0])) + 1.0
        height = float(abs(box[3][1] - box[0][1])) + 1.0
        tall += height > 1.5 * width
    return tall * 2 <= len(boxes)


def _orient(
    engine: Any, pixels: NDArray[np.uint8]
) -> tuple[int, list[NDArray[np.float32]], list[NDArray[np.uint8]]]:
    """(quarter turns applied, boxes, crops ready for recognition) for the page.

    The direction classifier decides for the page by majority, never line by
    line (it misreads single lines of Latin text as upside down)."""
    import numpy as np

    turns = 0
    boxes = _detect(engine, pixels)
    if boxes and not _upright(boxes):
        pixels = np.ascontiguousarray(np.rot90(pixels))
        turns = 1
        boxes = _detect(engine, pixels)
    if not boxes:
        return turns, [], []
    crops = engine.get_crop_img_list(pixels, boxes)
    if _upside_down(engine, crops):  # turn the page, and the boxes with it
        height, width = pixels.shape[:2]
        pixels = np.ascontiguousarray(np.rot90(pixels, 2))
        turned = [[[width - x, height - y] for x, y in box[[2, 3, 0, 1]]] for box in boxes]
        sorted_boxes = engine.sorted_boxes(np.asarray(turned, dtype=np.float32))
        boxes = [np.asarray(b, dtype=np.float32) for b in sorted_boxes]
        crops = engine.get_crop_img_list(pixels, boxes)
        turns += 2
    return turns, boxes, crops


def _upside_down(engine: Any, crops: list[NDArray[np.uint8]]) -> bool:
    """Whether the page reads upside down: the direction classifier's majority,
    confirmed by the recogniser scoring a few of the longest lines better turned
    (the classifier alone misjudges many upright Latin lines)."""
    import numpy as np

    _, labels, _ = engine.text_cls(crops)
    flipped = sum(1 for label in labels if str(label[0]) == "180")
    if flipped * 2 <= len(labels):
        return False
    sample = sorted(crops, key=lambda c: -c.shape[1])[:ORIENTATION_SAMPLE]
    upright, _ = engine.text_rec(sample)
    turned, _ = engine.text_rec([np.ascontiguousarray(np.rot90(c, 2)) for c in sample])
    score = statistics.fmean(float(r[1]) for r in upright)
    return statistics.fmean(float(r[1]) for r in turned) > score


def with_spaces(chars: str, columns: list[int]) -> str:
    """``chars`` with the spaces the recogniser left out put back.

    The model sometimes runs words together; where it placed each character
    (its CTC column) still shows the gap.  A gap between two letters of at
    least :data:`SPACE_GAP` times the line's median gap (and at least
    :data:`MIN_SPACE_COLUMNS`; a wide letter's gaps count one column less)
    becomes a space.  Spaces are only added, never removed."""
    if len(chars) != len(columns) or len(chars) < 3:
        return chars
    pairs = list(itertools.pairwise(zip(columns, chars, strict=True)))
    gaps = [b - a for (a, x), (b, y) in pairs if x != " " and y != " "]
    if len(gaps) < 2:
        return chars
    threshold = max(MIN_SPACE_COLUMNS, SPACE_GAP * statistics.median(gaps))
    out = [chars[0]]
    for (a, x), (b, y) in pairs:
        wide = 1 if x in WIDE else 0
        if x != " " and y != " " and b - a - wide >= threshold:
            out.append(" ")
        out.append(y)
    return "".join(out)


def _line_text(result: Any) -> tuple[str, float]:
    """(text, score) of one recognised line, spaces restored (:func:`with_spaces`)."""
    text, score = str(result[0]), float(result[1])
    try:
        words, columns = result[2][1], result[2][2]
        chars = "".join("".join(word) for word in words)
        flat = [int(c) for word in columns for c in word]
    except (IndexError, TypeError, ValueError):
        return text, score
    if chars.replace(" ", "") != text.replace(" ", ""):
        return text, score
    return with_spaces(chars, flat), score


def _fragment(box: NDArray[np.float32], text: str, score: float) -> _Fragment:
    xs = [float(p[0]) for p in box]
    ys = [float(p[1]) for p in box]
    return _Fragment(min(xs), min(ys), max(xs), max(ys), str(text).strip(), score)


def reading_order(fragments: list[_Fragment]) -> str:
    """Fragments as text: lines top to bottom, left to right within a line,
    paragraphs separated by a blank line (see the module docstring)."""
    if not fragments:
        return ""
    reach = SAME_LINE * statistics.median(f.height for f in fragments)
    lines: list[list[_Fragment]] = []
    for frag in sorted(fragments, key=lambda f: f.middle):
        if lines and abs(frag.middle - statistics.fmean(f.middle for f in lines[-1])) < reach:
            lines[-1].append(frag)
        else:
            lines.append([frag])
    tops = [min(f.top for f in line) for line in lines]
    pitches = [b - a for a, b in itertools.pairwise(tops)]
    pitch = statistics.median(pitches) if pitches else 0.0
    parts = [_join(lines[0])]
    for index, line in enumerate(lines[1:]):
        gap = pitches[index]
        parts.append("\n\n" if len(pitches) >= 2 and gap > PARAGRAPH_GAP * pitch else "\n")
        parts.append(_join(line))
    return "".join(parts)


def _join(line: list[_Fragment]) -> str:
    return " ".join(f.text for f in sorted(line, key=lambda f: f.left))
