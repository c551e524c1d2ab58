"""Markdown tables: the one way tables from PDFs and DOCX files reach the model."""

from __future__ import annotations


def cell_text(value: str | None) -> str:
    """One line per cell; a `|` inside a cell escaped so it does not split the row."""
    return " ".join((value or "").split()).replace("|", "\\|")


def markdown_table(rows: list[list[str]]) -> str:
    """A GitHub-style Markdown table; the first row is the header, short rows are padded."""
    rows = [row for row in rows if any((cell or "").strip() for cell in row)]
    if not rows:
        return ""
    width = max(len(row) for row in rows)
    lines = []
    for n, row in enumerate(rows):
        cells = [cell_text(cell) for cell in row] + [""] * (width - len(row))
        lines.append("| " + " | ".join(cells) + " |")
        if n == 0:
            lines.append("|" + "---|" * width)
    return "\n".join(lines)
