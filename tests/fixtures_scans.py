"""Scanned documents made in the suite: known paragraphs rendered with Pillow.

Pages are rendered at 200 dpi (12 pt text is ~33 pixels tall) in several fonts
and sizes, then degraded the ways real scans are (turned a quarter, faint gray
on gray with noise, 1-bit fax) and wrapped the way scanners wrap them: one
full-page image per PDF page (Pillow writes 1-bit images as CCITT G4, gray,
RGB and CMYK ones as JPEG), or saved as PNG, JPEG and multi-page TIFF.

:func:`word_accuracy` compares normalised word sequences: the share of the
expected words found in order in the recognised text.
"""

from __future__ import annotations

import difflib
import io
import re
import textwrap
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont
from pypdf import PdfReader, PdfWriter

DPI = 200
FONTS = Path("/usr/share/fonts/truetype")
SERIF = FONTS / "liberation/LiberationSerif-Regular.ttf"
SANS = FONTS / "dejavu/DejaVuSans.ttf"
MONO = FONTS / "liberation/LiberationMono-Regular.ttf"
SANS_BOLD = FONTS / "liberation/LiberationSans-Bold.ttf"

HARBOUR = (
    "The harbour master counted forty ships waiting outside the breakwater on Monday "
    "morning, and the pilots worked through the night to bring them in before the storm."
)
ORCHARD = (
    "Apple growers in the valley reported an early harvest this year because the spring "
    "was warm and dry, although late frost damaged some of the pear trees near the river."
)
LIBRARY = (
    "The old library reopened after two years of repairs with a new reading room, a "
    "children's corner and shelves for more than eighty thousand books."
)
GLACIER = (
    "Scientists measured the glacier again in August and found that its front had "
    "retreated by nearly sixty metres since the previous survey."
)
RAILWAY = (
    "The railway company will replace the wooden sleepers on the coastal line next "
    "winter, so passengers should expect buses between the two stations in January."
)
BAKERY = (
    "Every morning the small bakery on the corner sells fresh rolls, rye loaves and "
    "cinnamon buns to the workers walking down to the factory gates."
)
OBSERVATORY = (
    "Astronomers at the mountain observatory photographed a faint comet moving slowly "
    "across the constellation of the swan during the first week of October."
)


def font_path_ok() -> bool:
    return all(p.is_file() for p in (SERIF, SANS, MONO, SANS_BOLD))


def render(
    paragraphs: list[tuple[str, Path, float]],
    *,
    width_in: float = 8.5,
    ink: int = 0,
    paper: int = 255,
    margin_in: float = 0.75,
    leading: float = 1.45,
) -> Image.Image:
    """A grayscale page at :data:`DPI`: each (text, font file, size in points) a
    paragraph, wrapped to the page width, separated by a blank line."""
    width = round(width_in * DPI)
    margin = round(margin_in * DPI)
    lines: list[tuple[str, ImageFont.FreeTypeFont, int] | None] = []
    for text, font_file, points in paragraphs:
        px = round(points * DPI / 72)
        font = ImageFont.truetype(str(font_file), px)
        per_line = max(10, int((width - 2 * margin) * len(text) / font.getlength(text)))
        while per_line > 10:
            wrapped = textwrap.wrap(text, per_line)
            if all(font.getlength(w) <= width - 2 * margin for w in wrapped):
                break
            per_line -= 2
        lines.extend((w, font, px) for w in wrapped)
        lines.append(None)
    height = 2 * margin + sum(round(item[2] * leading) if item else 40 for item in lines)
    page = Image.new("L", (width, height), paper)
    draw = ImageDraw.Draw(page)
    y = margin
    for item in lines:
        if item is None:
            y += 40
            continue
        text, font, px = item
        draw.text((margin, y), text, font=font, fill=ink)
        y += round(px * leading)
    return page


def faint(page: Image.Image) -> Image.Image:
    """Low contrast (ink 110 on paper 180) with sensor noise and a slight blur."""
    low = page.point(lambda v: 110 + v * 70 // 255)
    noise = Image.effect_noise(page.size, 10)  # centred on 128
    return ImageChops.add(low, noise, offset=-128).filter(ImageFilter.GaussianBlur(0.6))


def fax(page: Image.Image) -> Image.Image:
    """1-bit, thresholded (no dithering), as a fax machine sends it."""
    return page.point(lambda v: 255 if v > 140 else 0).convert("1", dither=Image.Dither.NONE)


def scanner_pdf(pages: list[Image.Image]) -> bytes:
    """One full-page image per page, at :data:`DPI`."""
    out = io.BytesIO()
    pages[0].save(out, "PDF", save_all=True, append_images=pages[1:], resolution=DPI)
    return out.getvalue()


def merge_pdfs(parts: list[bytes]) -> bytes:
    writer = PdfWriter()
    for part in parts:
        for page in PdfReader(io.BytesIO(part)).pages:
            writer.add_page(page)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def image_bytes(pages: list[Image.Image], fmt: str, *, dpi: int = DPI, **params: object) -> bytes:
    out = io.BytesIO()
    if len(pages) > 1:
        params = {**params, "save_all": True, "append_images": pages[1:]}
    pages[0].save(out, fmt, dpi=(dpi, dpi), **params)
    return out.getvalue()


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower().replace("'", ""))


def word_accuracy(expected: str, got: str) -> float:
    """Share of ``expected``'s words found, in order, in ``got``."""
    want = words(expected)
    matcher = difflib.SequenceMatcher(None, want, words(got), autojunk=False)
    return sum(block.size for block in matcher.get_matching_blocks()) / len(want)
