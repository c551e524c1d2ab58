"""DOCX to Markdown by walking the document body with python-docx.

Kept: headings (`#` by level), bulleted and numbered lists (with nesting, numbers counted per
list), tables as Markdown tables in body order. A cell merged across columns is written once
(the columns it spans stay empty); a cell merged down rows is repeated in each row, so every
row reads on its own. A table nested in a cell is written inside that cell, its rows separated
by `;` and its cells by `/`. The file is first unpacked under the size limit
(app.documents.zip_guard), so the parser never inflates anything itself.
"""

from __future__ import annotations

import io
import re
from typing import Any

from app.documents.document import DocumentError
from app.documents.markdown import markdown_table
from app.documents.zip_guard import unpack_office

_HEADING = re.compile(r"^heading (\d)$", re.IGNORECASE)
_W = "{http://schemas.openxmlformats.org/wordprocessingml/2006/main}"


def docx_markdown(name: str, data: bytes, max_unpacked: int) -> str:
    """The text of a DOCX as Markdown; raises DocumentError for damaged files and limits."""
    packed = unpack_office(name, data, max_unpacked)
    try:
        import docx

        document = docx.Document(io.BytesIO(packed))
    except Exception as exc:  # python-docx raises many types for a damaged package
        raise DocumentError(
            "corrupt", f"{name}: this file is damaged or is not a real DOCX", name=name, kind="DOCX"
        ) from exc
    return _Walker(document).markdown()


class _Walker:
    def __init__(self, document: Any) -> None:
        self.document = document
        self.formats = _numbering_formats(document)
        self.counters: dict[tuple[str, int], int] = {}

    def markdown(self) -> str:
        from docx.table import Table

        blocks: list[str] = []
        for block in self.document.iter_inner_content():
            if isinstance(block, Table):
                self.counters.clear()
                blocks.append(markdown_table(self._rows(block)))
            else:
                line = self._paragraph(block)
                if line is not None:
                    blocks.append(line)
        # List items stay together; everything else is its own paragraph.
        out: list[str] = []
        for block in blocks:
            if out and _is_item(block) and _is_item(out[-1]):
                out[-1] += "\n" + block
            else:
                out.append(block)
        return "\n\n".join(b for b in out if b.strip())

    def _paragraph(self, paragraph: Any) -> str | None:
        text = paragraph.text.strip()
        if not text:
            return None
        style = (paragraph.style.name if paragraph.style is not None else "") or ""
        heading = _HEADING.match(style)
        if heading:
            self.counters.clear()
            return "#" * min(6, int(heading.group(1))) + " " + text
        if style.lower() == "title":
            return "# " + text
        numbering = _num_pr(paragraph)
        if numbering is None:
            self.counters.clear()
            return text
        num_id, level = numbering
        indent = "  " * level
        if self.formats.get((num_id, level), "bullet") == "bullet":
            return f"{indent}- {text}"
        for key in [k for k in self.counters if k[0] == num_id and k[1] > level]:
            del self.counters[key]  # a deeper list restarts after its parent item
        self.counters[(num_id, level)] = self.counters.get((num_id, level), 0) + 1
        return f"{indent}{self.counters[(num_id, level)]}. {text}"

    def _rows(self, table: Any) -> list[list[str]]:
        rows = []
        for row in table.rows:
            cells: list[str] = []
            previous = None
            for cell in row.cells:
                # row.cells repeats a cell once per grid column it spans.
                cells.append("" if cell._tc is previous else self._cell(cell))
                previous = cell._tc
            rows.append(cells)
        return rows

    def _cell(self, cell: Any) -> str:
        from docx.table import Table

        parts = []
        for block in cell.iter_inner_content():
            if isinstance(block, Table):
                inner = [" / ".join(c for c in row if c) for row in self._rows(block)]
                parts.append("; ".join(r for r in inner if r))
            elif block.text.strip():
                parts.append(block.text.strip())
        return " ".join(parts)


def _is_item(block: str) -> bool:
    return bool(re.match(r"^\s*(- |\d+\. )", block))


def _num_pr(paragraph: Any) -> tuple[str, int] | None:
    """(numId, level) of a list paragraph, from the paragraph or its style chain."""
    p_pr = paragraph._p.pPr
    num_pr = p_pr.numPr if p_pr is not None else None
    level = None
    if num_pr is not None and num_pr.ilvl is not None:
        level = int(num_pr.ilvl.val)
    style = paragraph.style
    while (num_pr is None or num_pr.numId is None) and style is not None:
        style_ppr = style.element.pPr
        num_pr = style_ppr.numPr if style_ppr is not None else None
        style = style.base_style
    if num_pr is None or num_pr.numId is None or num_pr.numId.val == 0:
        return None
    if level is None:
        level = int(num_pr.ilvl.val) if num_pr.ilvl is not None else 0
    return str(num_pr.numId.val), level


def _numbering_formats(document: Any) -> dict[tuple[str, int], str]:
    """(numId, level) -> numFmt ("bullet", "decimal", ...) from the numbering part."""
    try:
        root = document.part.numbering_part.element
    except (KeyError, NotImplementedError, AttributeError):
        return {}
    abstract: dict[str, dict[int, str]] = {}
    for node in root.iter(f"{_W}abstractNum"):
        levels = {}
        for lvl in node.iter(f"{_W}lvl"):
            fmt = lvl.find(f"{_W}numFmt")
            levels[int(lvl.get(f"{_W}ilvl", "0"))] = (
                fmt.get(f"{_W}val") if fmt is not None else "bullet"
            )
        abstract[node.get(f"{_W}abstractNumId", "")] = levels
    formats: dict[tuple[str, int], str] = {}
    for num in root.iter(f"{_W}num"):
        ref = num.find(f"{_W}abstractNumId")
        if ref is None:
            continue
        for level, fmt in abstract.get(ref.get(f"{_W}val", ""), {}).items():
            formats[(num.get(f"{_W}numId", ""), level)] = fmt or "bullet"
    return formats
