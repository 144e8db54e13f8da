"""A character canvas with 2x4 braille dots per cell: sharp lines in any terminal font, no images."""

from __future__ import annotations

from rich.style import Style
from rich.text import Text

# Bit of each dot in a braille cell, indexed [row][column] (Unicode's dot numbering).
DOT_BITS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))
BRAILLE_BASE = 0x2800


class BrailleCanvas:
    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height  # in cells
        self.bits = [[0] * width for _ in range(height)]
        self.styles: list[list[Style | None]] = [[None] * width for _ in range(height)]
        self.marks: dict[tuple[int, int], tuple[str, Style | None]] = {}  # whole-cell characters on top

    @property
    def dot_width(self) -> int:
        return self.width * 2

    @property
    def dot_height(self) -> int:
        return self.height * 4

    def dot(self, x: int, y: int, style: Style | None = None) -> None:
        """Set the dot at (x, y), y counted from the top; points off the canvas are ignored."""
        if 0 <= x < self.dot_width and 0 <= y < self.dot_height:
            row, col = y // 4, x // 2
            self.bits[row][col] |= DOT_BITS[y % 4][x % 2]
            self.styles[row][col] = style

    def line(self, x0: int, y0: int, x1: int, y1: int, style: Style | None = None) -> None:
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(steps + 1):
            self.dot(round(x0 + (x1 - x0) * i / steps), round(y0 + (y1 - y0) * i / steps), style)

    def polyline(self, points: list[tuple[int, int]], style: Style | None = None) -> None:
        if len(points) == 1:
            self.dot(*points[0], style)
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            self.line(x0, y0, x1, y1, style)

    def mark(self, x: int, y: int, char: str, style: Style | None = None) -> None:
        """Put a whole character over the cell holding dot (x, y)."""
        if 0 <= x < self.dot_width and 0 <= y < self.dot_height:
            self.marks[(y // 4, x // 2)] = (char, style)

    def mark_at(self, x: int, y: int) -> str | None:
        """The whole-cell character over the cell holding dot (x, y), if any."""
        found = self.marks.get((y // 4, x // 2))
        return found[0] if found else None

    def rows(self) -> list[Text]:
        out = []
        for r in range(self.height):
            cells: list[tuple[str, Style | None]] = []
            for c in range(self.width):
                if (r, c) in self.marks:
                    cells.append(self.marks[(r, c)])
                elif self.bits[r][c]:
                    cells.append((chr(BRAILLE_BASE + self.bits[r][c]), self.styles[r][c]))
                else:
                    cells.append((" ", None))
            out.append(_join_runs(cells))
        return out


def _join_runs(cells: list[tuple[str, Style | None]]) -> Text:
    """One Text span per run of equally styled cells (far fewer spans to render than one per cell)."""
    text = Text(no_wrap=True, overflow="crop")
    run, run_style = [], None
    for char, style in cells:
        if style != run_style and run:
            text.append("".join(run), run_style)
            run = []
        run.append(char)
        run_style = style
    if run:
        text.append("".join(run), run_style)
    return text
