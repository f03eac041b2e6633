"""A small RGB raster with lines, rectangles and a 3x5 pixel font, saved as PNG with zlib.

The loss curve must be written even where matplotlib is not installed (it is optional), so this
draws a plain but readable chart with no dependency beyond the standard library.
"""

from __future__ import annotations

import struct
import unicodedata
import zlib
from pathlib import Path

from qlora_ext.checkpoint.atomic import atomic_write_bytes

Color = tuple[int, int, int]

# 3x5 glyphs: five rows, top to bottom, each a 3-bit number (4 = left column, 1 = right column).
_GLYPHS: dict[str, tuple[int, ...]] = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7),
    "4": (5, 5, 7, 1, 1), "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1),
    "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7), "A": (2, 5, 7, 5, 5), "B": (6, 5, 6, 5, 6),
    "C": (3, 4, 4, 4, 3), "D": (6, 5, 5, 5, 6), "E": (7, 4, 6, 4, 7), "F": (7, 4, 6, 4, 4),
    "G": (3, 4, 5, 5, 3), "H": (5, 5, 7, 5, 5), "I": (7, 2, 2, 2, 7), "J": (1, 1, 1, 5, 2),
    "K": (5, 5, 6, 5, 5), "L": (4, 4, 4, 4, 7), "M": (5, 7, 7, 5, 5), "N": (6, 5, 5, 5, 5),
    "O": (2, 5, 5, 5, 2), "P": (6, 5, 6, 4, 4), "Q": (2, 5, 5, 6, 3), "R": (6, 5, 6, 5, 5),
    "S": (3, 4, 2, 1, 6), "T": (7, 2, 2, 2, 2), "U": (5, 5, 5, 5, 7), "V": (5, 5, 5, 5, 2),
    "W": (5, 5, 7, 7, 5), "X": (5, 5, 2, 5, 5), "Y": (5, 5, 2, 2, 2), "Z": (7, 1, 2, 4, 7),
    ".": (0, 0, 0, 0, 2), "-": (0, 0, 7, 0, 0), "_": (0, 0, 0, 0, 7), "/": (1, 1, 2, 4, 4),
    ":": (0, 2, 0, 2, 0), " ": (0, 0, 0, 0, 0), "(": (1, 2, 2, 2, 1), ")": (4, 2, 2, 2, 4),
    "=": (0, 7, 0, 7, 0), "+": (0, 2, 7, 2, 0), ",": (0, 0, 0, 2, 4), "?": (7, 1, 2, 0, 2),
    "[": (3, 2, 2, 2, 3), "]": (6, 2, 2, 2, 6), "|": (2, 2, 2, 2, 2), "'": (2, 2, 0, 0, 0),
    "!": (2, 2, 2, 0, 2), "%": (5, 1, 2, 4, 5), "*": (0, 5, 2, 5, 0), "#": (5, 7, 5, 7, 5),
    "<": (1, 2, 4, 2, 1), ">": (4, 2, 1, 2, 4), "&": (2, 5, 2, 5, 3), "@": (7, 5, 7, 4, 7),
}


def _drawable(text: str) -> str:
    """``text`` in the font's characters: upper case, accents dropped (a non-ASCII run name in a
    legend, "café" -> "CAFE"), and "?" for what has no glyph even then."""
    out = []
    for ch in text.upper():
        if ch not in _GLYPHS:  # a letter with marks decomposes into its base letter and the marks
            ch = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c)).upper()
        out.extend(c if c in _GLYPHS else "?" for c in ch or "?")
    return "".join(out)


class Canvas:
    """A width x height RGB image, white to start; (0, 0) is the top-left pixel."""

    def __init__(self, width: int, height: int, background: Color = (255, 255, 255)):
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def set(self, x: int, y: int, color: Color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = 3 * (y * self.width + x)
            self.pixels[i : i + 3] = bytes(color)

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: Color, fill: bool = False) -> None:
        if fill:
            for y in range(min(y0, y1), max(y0, y1) + 1):
                for x in range(min(x0, x1), max(x0, x1) + 1):
                    self.set(x, y, color)
            return
        for x0_, y0_, x1_, y1_ in ((x0, y0, x1, y0), (x1, y0, x1, y1), (x1, y1, x0, y1), (x0, y1, x0, y0)):
            self.line(x0_, y0_, x1_, y1_, color)

    def line(self, x0: float, y0: float, x1: float, y1: float, color: Color, width: int = 1) -> None:
        """Bresenham's line; ``width`` 2 or more thickens it downward and rightward."""
        x0, y0, x1, y1 = round(x0), round(y0), round(x1), round(y1)
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            for o in range(width):
                self.set(x0 + o, y0, color)
                self.set(x0, y0 + o, color)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x: int, y: int, text: str, color: Color = (0, 0, 0), scale: int = 2, anchor: str = "left") -> None:
        """Draws ``text`` with its top at y; anchor "left", "right" or "center" at x."""
        text = _drawable(text)
        width = text_width(text, scale)
        if anchor == "right":
            x -= width
        elif anchor == "center":
            x -= width // 2
        for ch in text:
            rows = _GLYPHS.get(ch, _GLYPHS["?"])
            for r, bits in enumerate(rows):
                for c in range(3):
                    if bits & (4 >> c):
                        for dy in range(scale):
                            for dx in range(scale):
                                self.set(x + c * scale + dx, y + r * scale + dy, color)
            x += 4 * scale

    def save_png(self, path: str | Path) -> None:
        """Writes the image as an 8-bit RGB PNG (atomically: a temp file, then rename)."""
        raw = b"".join(b"\x00" + bytes(self.pixels[3 * y * self.width : 3 * (y + 1) * self.width]) for y in range(self.height))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        png = (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b"")
        )
        atomic_write_bytes(path, png)  # a failed write leaves no partial file behind


def text_width(text: str, scale: int = 2) -> int:
    return max(0, 4 * scale * len(_drawable(text)) - scale)
