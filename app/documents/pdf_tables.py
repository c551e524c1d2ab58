"""Ruled tables on a PDF page: PDFium's paths and characters, pdfplumber's cell geometry.

pdfplumber finds tables well but interprets every page in pure Python (about half a second
for a page of text). Here the ruling lines come from PDFium's path objects and the cell text
from PDFium's character boxes; only the geometry (merging edges, finding intersections, cells
and tables) is pdfplumber's, on a few dozen edges. A table becomes a Markdown table placed
where its first character was in the page's text, and its characters are not repeated as
loose text.
"""

from __future__ import annotations

from typing import Any

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c

from app.documents.markdown import markdown_table

Box = tuple[float, float, float, float]  # x0, top, x1, bottom: pdfplumber's page coordinates
THIN = 2.0  # a path this thin is a ruling line
MIN_EDGE = 5.0  # shorter paths are decoration (bullets, underlines of one letter)
TOLERANCE = 3  # pdfplumber's default snap / join / intersection tolerance, in points
MAX_EDGES = 2000  # a page drawing more paths than this is a drawing, not a table


def page_text_with_tables(
    page: pdfium.PdfPage, textpage: pdfium.PdfTextPage, paragraphs: set[int] | None = None
) -> str | None:
    """The page's text with each ruled table as Markdown, or None when it has no table.
    `paragraphs`: character indices that start a paragraph (a blank line goes before them)."""
    height = page.get_height()
    edges = _edges(page, height)
    if len(edges) < 4 or len(edges) > MAX_EDGES:
        return None
    tables = _tables(edges)
    if not tables:
        return None
    chars = _chars(textpage, height)
    found: list[tuple[Box, str]] = []
    for bbox, rows in tables:
        inside = [c for c in chars if _inside(c[1], c[2], bbox)]
        grid = [[_cell_text(inside, cell) if cell else "" for cell in row] for row in rows]
        if (
            len(grid) >= 2
            and max(len(r) for r in grid) >= 2
            and any(any(c for c in r) for r in grid)
        ):
            found.append((bbox, markdown_table(grid)))
    if not found:
        return None
    return _text_around(chars, found, paragraphs or set())


def _edges(page: pdfium.PdfPage, height: float) -> list[dict[str, Any]]:
    """Horizontal and vertical segments from the page's path objects (rectangles give four)."""
    edges: list[dict[str, Any]] = []
    for obj in page.get_objects(filter=(pdfium_c.FPDF_PAGEOBJ_PATH,), max_depth=2):
        left, bottom, right, top = obj.get_bounds()
        width, tall = right - left, top - bottom
        y0, y1 = height - top, height - bottom  # top-down, as pdfplumber counts
        if tall <= THIN and width >= MIN_EDGE:
            edges.append(_edge("h", left, right, (y0 + y1) / 2, (y0 + y1) / 2))
        elif width <= THIN and tall >= MIN_EDGE:
            edges.append(_edge("v", (left + right) / 2, (left + right) / 2, y0, y1))
        elif width >= MIN_EDGE and tall >= MIN_EDGE:
            edges += [
                _edge("h", left, right, y0, y0), _edge("h", left, right, y1, y1),
                _edge("v", left, left, y0, y1), _edge("v", right, right, y0, y1),
            ]  # fmt: skip
        if len(edges) > MAX_EDGES:
            break
    return edges


def _edge(orientation: str, x0: float, x1: float, top: float, bottom: float) -> dict[str, Any]:
    return {
        "orientation": orientation, "object_type": "line", "x0": x0, "x1": x1, "top": top,
        "bottom": bottom, "width": x1 - x0, "height": bottom - top,
    }  # fmt: skip


def _tables(edges: list[dict[str, Any]]) -> list[tuple[Box, list[list[Box | None]]]]:
    """(bbox, rows of cell boxes; None where a merged cell spans) of each table."""
    from pdfplumber.table import (
        Table,
        cells_to_tables,
        edges_to_intersections,
        intersections_to_cells,
        merge_edges,
    )

    merged = merge_edges(edges, TOLERANCE, TOLERANCE, TOLERANCE, TOLERANCE)
    cells = intersections_to_cells(edges_to_intersections(merged, TOLERANCE, TOLERANCE))
    out = []
    for group in cells_to_tables(cells):
        table = Table(None, group)  # type: ignore[arg-type]  # the page is only needed to extract text
        rows = [[tuple(c) if c else None for c in row.cells] for row in table.rows]
        out.append((tuple(table.bbox), rows))
    return out  # type: ignore[return-value]


def _chars(textpage: pdfium.PdfTextPage, height: float) -> list[tuple[str, float, float]]:
    """(character, x, y) of each character, its box centre in top-down coordinates; a
    character PDFium generated (a space or line break with no box) takes the previous one's."""
    count = textpage.count_chars()
    full = textpage.get_text_range()
    aligned = len(full) == count
    chars = []
    x = y = -1.0
    for i in range(count):
        char = full[i] if aligned else textpage.get_text_range(i, 1)
        left, bottom, right, top = textpage.get_charbox(i)
        if right > left or top > bottom:
            x, y = (left + right) / 2, height - (bottom + top) / 2
        chars.append((char, x, y))
    return chars


def _inside(x: float, y: float, box: Box) -> bool:
    x0, top, x1, bottom = box
    return x0 <= x <= x1 and top <= y <= bottom


def _cell_text(chars: list[tuple[str, float, float]], cell: Box) -> str:
    return " ".join("".join(c for c, x, y in chars if _inside(x, y, cell)).split())


def _text_around(
    chars: list[tuple[str, float, float]], tables: list[tuple[Box, str]], paragraphs: set[int]
) -> str:
    """The page's characters in content order, each table's replaced by its Markdown."""
    out: list[str] = []
    placed: set[int] = set()
    for index, (char, x, y) in enumerate(chars):
        hit = next((n for n, (box, _) in enumerate(tables) if _inside(x, y, box)), None)
        if hit is None:
            if index in paragraphs:
                out.append("\n")
            out.append(char)
        elif hit not in placed:
            placed.add(hit)
            out.append(f"\n\n{tables[hit][1]}\n\n")
    out.extend(f"\n\n{md}\n\n" for n, (_, md) in enumerate(tables) if n not in placed)
    return "".join(out)
