"""Where paragraphs start on a PDF page, from PDFium's baselines.

PDFium gives lines, not paragraphs, and passages are cut on paragraphs. A line starts a
paragraph when its baseline is more than PARAGRAPH_GAP line spacings below the previous
line's, or above it (the next column or frame). Baselines come from the first character of
each line: one PDFium call per line, not per character.
"""

from __future__ import annotations

import ctypes

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c

PARAGRAPH_GAP = 1.3


def paragraph_starts(textpage: pdfium.PdfTextPage, text: str) -> set[int]:
    """Character indices of the lines that start a paragraph (not the page's first line).

    `text` is the page's whole text; when it does not line up with PDFium's character
    indices (one character each), nothing is known and the set is empty."""
    if len(text) != textpage.count_chars() or "\n" not in text:
        return set()
    newline = "\r\n" if "\r\n" in text else "\n"
    lines = text.split(newline)
    x, y = ctypes.c_double(), ctypes.c_double()
    starts: list[int] = []
    baselines: list[float | None] = []
    index = 0
    for line in lines:
        ok = bool(line) and pdfium_c.FPDFText_GetCharOrigin(textpage.raw, index, x, y)
        starts.append(index)
        baselines.append(y.value if ok else None)
        index += len(line) + len(newline)
    gaps = [
        (above - below) if above is not None and below is not None else None
        for above, below in zip(baselines, baselines[1:], strict=False)
    ]
    downs = sorted(g for g in gaps if g is not None and g > 0)
    if not downs:
        return set()
    spacing = downs[len(downs) // 2]
    return {
        start
        for start, gap in zip(starts[1:], gaps, strict=True)
        if gap is not None and (gap <= 0 or gap > PARAGRAPH_GAP * spacing)
    }


def with_paragraphs(text: str, starts: set[int]) -> str:
    """`text` with a blank line before each paragraph start."""
    if not starts:
        return text
    out = []
    last = 0
    for start in sorted(starts):
        out.append(text[last:start])
        out.append("\n")
        last = start
    out.append(text[last:])
    return "".join(out)
