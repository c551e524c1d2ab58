"""Page text clean-up shared by the PDF extractor: repeated headers and footers, line joins.

A PDF's text layer has no paragraphs, only lines. Lines of Chinese or Japanese text are joined
without a break (a line end inside 鹦鹉 is not a word boundary there); other lines keep their
break. Lines that repeat at the top or bottom of most pages (running titles, "page 3 of 40")
are dropped: they cost tokens on every page and mislead retrieval.
"""

from __future__ import annotations

import re
from collections import Counter

# CJK ideographs, kana, Hangul, and the full-width punctuation that ends or continues them.
_CJK = re.compile(
    r"[\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]"
)
_DIGITS = re.compile(r"\d+")
EDGE_LINES = 3  # lines at each end of a page that may be a header or footer
MIN_PAGES = 3  # fewer pages: nothing can be told to repeat
REPEAT_SHARE = 0.5  # a line on at least this share of pages is a header or footer


def is_cjk(char: str) -> bool:
    return bool(_CJK.match(char))


def join_lines(text: str) -> str:
    """Join lines whose break falls between two CJK characters; keep every other break."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    out: list[str] = []
    for line in lines:
        line = line.rstrip()
        if out and out[-1] and line and is_cjk(out[-1][-1]) and is_cjk(line.lstrip()[0]):
            out[-1] += line.lstrip()
        else:
            out.append(line)
    return "\n".join(out)


def _key(line: str) -> str:
    """Page numbers differ from page to page: compare lines with their digits masked."""
    return _DIGITS.sub("#", " ".join(line.split()))


def _edges(lines: list[str]) -> list[int]:
    """Indices of the first and last EDGE_LINES non-empty lines of a page."""
    filled = [i for i, line in enumerate(lines) if line.strip()]
    return sorted(set(filled[:EDGE_LINES] + filled[-EDGE_LINES:]))


def drop_repeated_lines(pages: list[str]) -> tuple[list[str], int]:
    """Pages without their repeated header and footer lines, and how many lines were dropped.

    A line counts when its digit-masked form sits among the first or last EDGE_LINES lines of
    at least REPEAT_SHARE of the pages (and of at least MIN_PAGES pages).
    """
    if len(pages) < MIN_PAGES:
        return pages, 0
    split = [page.split("\n") for page in pages]
    seen: Counter[str] = Counter()
    for lines in split:
        seen.update({_key(lines[i]) for i in _edges(lines)})
    threshold = max(MIN_PAGES, REPEAT_SHARE * len(pages))
    repeated = {key for key, count in seen.items() if count >= threshold and key}
    if not repeated:
        return pages, 0
    dropped = 0
    out = []
    for lines in split:
        edges = set(_edges(lines))
        kept = []
        for i, line in enumerate(lines):
            if i in edges and _key(line) in repeated:
                dropped += 1
            else:
                kept.append(line)
        out.append("\n".join(kept).strip())
    return out, dropped
