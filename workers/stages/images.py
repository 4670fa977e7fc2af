"""Page images for OCR, one at a time, at a bounded size.

Two sources:

* :class:`PdfRenderer` renders one PDF page with pypdfium2 (which decodes
  every image filter scanners use: CCITT G3/G4, JBIG2, DCT incl. CMYK, LZW,
  Flate) in grayscale at ``OCR_DPI``, scaled down further when the page would
  exceed ``OCR_MAX_PIXELS`` (a 200 x 200 inch page is rendered at a few dpi,
  never at 200);
* :func:`iter_image_pages` reads an uploaded PNG, JPEG or TIFF (every frame of
  a multi-page TIFF) with Pillow; a frame larger than ``OCR_MAX_IMAGE_PIXELS``
  is skipped with a warning before it is decoded (JPEGs are first decoded at
  1/2, 1/4 or 1/8 size where that brings them under), and a decoded frame is
  scaled to ``OCR_DPI`` (when its resolution is known) and ``OCR_MAX_PIXELS``.

Invariant: at most one page image (plus its grayscale copy) is alive at a
time; each is dropped before the next page is read.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workers.stages.ocr import OcrOptions

if TYPE_CHECKING:
    from PIL import Image

POINTS_PER_INCH = 72.0
IMAGE_TYPES = frozenset({"png", "jpeg", "tiff"})
"""Document types that are page images (OCR'd whole)."""


class PageImageError(Exception):
    """One page's image could not be produced; ``warning`` says why."""

    def __init__(self, warning: dict[str, Any]) -> None:
        super().__init__(warning["message"])
        self.warning = warning


def fit_scale(width: float, height: float, scale: float, max_pixels: int) -> float:
    """``scale`` lowered so that ``width x height`` scaled has at most ``max_pixels``."""
    if width <= 0 or height <= 0:
        return scale
    return min(scale, math.sqrt(max_pixels / (width * height)))


class PdfRenderer:
    """Renders pages of one PDF with pypdfium2; opened on first use, closed by
    :meth:`close` (the document is read from the file, not loaded whole)."""

    def __init__(self, path: Path, options: OcrOptions) -> None:
        self._path = path
        self._options = options
        self._pdf: Any = None

    def render(self, index: int) -> Image.Image:
        """Page ``index`` (0-based) as a grayscale image (raises :class:`PageImageError`)."""
        import pypdfium2  # type: ignore[import-untyped]

        number = index + 1
        try:
            if self._pdf is None:
                self._pdf = pypdfium2.PdfDocument(self._path, password="")
            page = self._pdf[index]
            try:
                width, height = page.get_size()
                scale = fit_scale(
                    width,
                    height,
                    self._options.dpi / POINTS_PER_INCH,
                    self._options.max_pixels,
                )
                bitmap = page.render(scale=scale, grayscale=True, draw_annots=False)
                try:
                    image: Image.Image = bitmap.to_pil().convert("L")
                    return image
                finally:
                    bitmap.close()
            finally:
                page.close()
        except MemoryError:
            raise
        except Exception as exc:
            raise PageImageError(
                {
                    "code": "page_render_failed",
                    "page": number,
                    "message": f"{type(exc).__name__}: {str(exc)[:200]}",
                }
            ) from exc

    def close(self) -> None:
        if self._pdf is not None:
            self._pdf.close()
            self._pdf = None


def open_image(path: Path) -> Image.Image:
    """The image at ``path``, lazily (headers read, pixels not decoded)."""
    from PIL import Image

    with warnings.catch_warnings():
        # We bound the pixels ourselves (OCR_MAX_IMAGE_PIXELS), frame by frame.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def frame_count(image: Image.Image) -> int:
    return int(getattr(image, "n_frames", 1) or 1)


def iter_image_pages(
    path: Path, options: OcrOptions
) -> Generator[tuple[int, Image.Image | None, dict[str, Any] | None], None, None]:
    """(frame count, frame ready for OCR or None, warning) for each frame in order."""
    image = open_image(path)
    try:
        count = frame_count(image)
        for index in range(count):
            try:
                image.seek(index)
                yield count, _frame(image, index + 1, options), None
            except PageImageError as exc:
                yield count, None, exc.warning
            except MemoryError:
                raise
            except Exception as exc:  # a frame Pillow cannot decode: that page only
                warning = {
                    "code": "page_decode_failed",
                    "page": index + 1,
                    "message": f"{type(exc).__name__}: {str(exc)[:200]}",
                }
                yield count, None, warning
    finally:
        image.close()


def _frame(image: Image.Image, number: int, options: OcrOptions) -> Image.Image:
    """The current frame decoded, grayscale, at the OCR resolution."""
    from PIL import Image

    width, height = image.size
    dpi = _dpi(image)
    scale = options.dpi / dpi if dpi and dpi > options.dpi * 1.25 else 1.0
    scale = fit_scale(width, height, scale, options.max_pixels)
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    if scale < 1.0 and image.format == "JPEG":
        image.draft("L", target)  # decode at 1/2, 1/4 or 1/8 size, no smaller than target
    if image.size[0] * image.size[1] > options.max_image_pixels:
        raise PageImageError(
            {
                "code": "page_too_large",
                "page": number,
                "message": f"image of {width}x{height} pixels skipped, above the "
                f"{options.max_image_pixels} pixel limit (OCR_MAX_IMAGE_PIXELS)",
            }
        )
    transparent = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    frame = image.convert("RGBA") if transparent else image.convert("L")
    if frame.size[0] > target[0]:
        frame = frame.resize(target, Image.Resampling.LANCZOS, reducing_gap=2.0)
    return frame


def _dpi(image: Image.Image) -> float | None:
    value = image.info.get("dpi")
    try:
        dpi = float(value[0]) if isinstance(value, tuple) else None
    except (TypeError, ValueError):
        return None
    return dpi if dpi and dpi >= 30 else None
