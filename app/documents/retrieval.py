"""Pick the passages of a too-large document that matter for a question (BM25, stdlib only).

Used when a document does not fit the context: the document is cut into passages that keep
their page marker (on paragraph, then row, then sentence boundaries; a table's header is
repeated in every passage of the table), each passage is scored against the question, and the
best ones are kept in document order until the token budget is spent. `PassageIndex` keeps the
term counts, so a chat searches the same document for every question without re-reading it.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]")
_PAGE = re.compile(r"^\[page (\d+)\]$", re.MULTILINE)
# Ends of sentences: Latin punctuation before a space, CJK full stops anywhere.
_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|(?<=[。！？；])")
# A question about the document as a whole (answered from section summaries, not passages).
_WHOLE_DOCUMENT = re.compile(
    r"\b(summar\w*|overview|outline|gist|tl;?dr|synopsis|abstract|recap"
    r"|main (points?|ideas?|themes?|arguments?)|key (points?|takeaways?|findings?|ideas?)"
    r"|(what|who)('s| is) (this|the) (document|file|book|paper|report|text|article) about)\b"
    r"|总结|概括|摘要|概要|概述|大意|主要内容|要点|讲了什么|讲的是什么|说了什么",
    re.IGNORECASE,
)
# Words of a question that say nothing about where in a document the answer is.
_QUESTION_WORDS = frozenset(
    "a an the is are was were be been do does did what which who whom whose when where why how"
    " this that these those it its of in on at to for from by with about and or not no me my"
    " you your we our they their he she his her i can could would should will shall may might"
    " tell say says said give show explain describe please document file text book paper report"
    " there here any some all".split()
)


# Passages scoring below this share of the best passage's score are not retrieved.
RELATIVE_SCORE_FLOOR = 0.25


@dataclass
class Passage:
    index: int
    text: str
    page: int | None = None


def terms(text: str) -> list[str]:
    """Lower-cased words; CJK runs become character bigrams (no spaces between words there)."""
    out: list[str] = []
    for word in _WORD.findall(text.lower()):
        if _CJK.search(word):
            chars = [c for c in word if _CJK.match(c)]
            rest = _CJK.sub(" ", word).split()
            out.extend(rest)
            out.extend(chars if len(chars) < 2 else [a + b for a, b in zip(chars, chars[1:])])
        else:
            out.append(word)
    return out


def _is_table(lines: Sequence[str]) -> bool:
    """Rows of a Markdown table, or of CSV/TSV text (every row with the header's separators)."""
    if len(lines) < 3:
        return False
    if all(line.lstrip().startswith("|") for line in lines[:3]):
        return True
    for sep in (",", "\t", ";"):
        count = lines[0].count(sep)
        if count and all(line.count(sep) >= count for line in lines[1:20]):
            return True
    return False


def _hard_cut(text: str, size: int) -> list[str]:
    """Cut at the last space before `size` characters (anywhere in a run without spaces)."""
    parts = []
    while len(text) > size:
        cut = text.rfind(" ", size // 2, size)
        cut = cut if cut > 0 else size
        parts.append(text[:cut].rstrip())
        text = text[cut:].lstrip()
    if text:
        parts.append(text)
    return parts


def _split_long(para: str, size: int) -> list[str]:
    """A paragraph too long for one passage, cut on row boundaries (a table keeps its header,
    with its Markdown separator row, in every part), else sentence boundaries, else spaces."""
    lines = para.split("\n")
    header: list[str] = []
    if len(lines) > 1:
        if _is_table(lines):
            keep = 2 if len(lines) > 2 and set(lines[1].strip()) <= set("|-: ") else 1
            header, lines = lines[:keep], lines[keep:]
        units = lines
        joiner = "\n"
    else:
        units = [s for s in _SENTENCE_END.split(para) if s]
        joiner = " "
    head = "\n".join(header)
    room = max(size - len(head), size // 2)
    parts: list[str] = []
    current: list[str] = []
    length = 0
    for unit in units:
        for piece in _hard_cut(unit, room) if len(unit) > room else [unit]:
            if current and length + len(piece) > room:
                parts.append(joiner.join(current))
                current, length = [], 0
            current.append(piece)
            length += len(piece) + 1
    if current:
        parts.append(joiner.join(current))
    return [f"{head}\n{p}" if head else p for p in parts]


def split_passages(text: str, target_chars: int = 1500) -> list[Passage]:
    """Cut text at paragraph and page boundaries into passages of about `target_chars`.

    A paragraph longer than that is cut on rows, then sentences. A passage that starts in the
    middle of a PDF page is prefixed with that page's marker, so the model can still cite pages.
    """
    passages: list[Passage] = []
    page: int | None = None
    current: list[str] = []
    current_len = 0
    current_page: int | None = None

    def flush() -> None:
        nonlocal current, current_len
        body = "\n\n".join(current).strip()
        if body:
            if current_page is not None and not body.startswith("[page "):
                body = f"[page {current_page}]\n{body}"
            passages.append(Passage(len(passages), body, current_page))
        current, current_len = [], 0

    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        marker = _PAGE.match(para.split("\n", 1)[0])
        if marker:  # passages do not straddle pages: each cites one page
            page = int(marker.group(1))
            if current:
                flush()
        pieces = [para]
        if len(para) > target_chars:
            if marker:  # each part gets the page marker back when its passage is flushed
                pieces = _split_long(para[marker.end() :].strip(), target_chars)
            else:
                pieces = _split_long(para, target_chars)
        for piece in pieces:
            if current and current_len + len(piece) > target_chars:
                flush()
            if not current:
                current_page = page
            current.append(piece)
            current_len += len(piece) + 2
    flush()
    return passages


class PassageIndex:
    """BM25 (Okapi) over a document's passages; term counts are computed once."""

    def __init__(self, passages: Sequence[Passage], k1: float = 1.5, b: float = 0.75) -> None:
        self.passages = list(passages)
        self.counts = [Counter(terms(p.text)) for p in self.passages]
        self.lengths = [sum(c.values()) for c in self.counts]
        self.avg_len = (sum(self.lengths) / len(self.lengths) if self.lengths else 0.0) or 1.0
        self.k1, self.b = k1, b

    def document_frequency(self, term: str) -> int:
        return sum(1 for c in self.counts if term in c)

    def scores(self, query: str) -> list[float]:
        n = len(self.counts)
        out = [0.0] * n
        for term in set(terms(query)):
            df = self.document_frequency(term)
            if not df:
                continue
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            for i, counts in enumerate(self.counts):
                tf = counts.get(term, 0)
                if tf:
                    norm = self.k1 * (1 - self.b + self.b * self.lengths[i] / self.avg_len)
                    out[i] += idf * tf * (self.k1 + 1) / (tf + norm)
        return out

    def is_specific(self, query: str) -> bool:
        """Whether the question names something particular in the document: a term (not a
        question word) found in some passages but not in most of them."""
        n = len(self.counts)
        for term in set(terms(query)) - _QUESTION_WORDS:
            df = self.document_frequency(term)
            if 0 < df <= max(1, n // 2):
                return True
        return False

    def select(self, query: str, sizes: Sequence[int], budget: int) -> list[Passage]:
        """Best-scoring passages whose sizes (tokens) fit the budget, in document order; only
        those scoring at least a quarter of the best one.

        Without any matching term (or an empty question) the document's beginning is kept.
        """
        scores = self.scores(query)
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        if not any(scores):
            order = list(range(len(scores)))
        floor = RELATIVE_SCORE_FLOOR * max(scores, default=0.0)
        chosen: list[int] = []
        used = 0
        for i in order:
            if floor and scores[i] < floor:
                break  # weak matches (common words only) would only add noise and reading time
            if used + sizes[i] <= budget:
                chosen.append(i)
                used += sizes[i]
        return [self.passages[i] for i in sorted(chosen)]


def wants_whole_document(query: str, index: PassageIndex) -> bool:
    """A summary-like question, or one that names nothing particular in the document: it is
    answered from the whole document (section summaries), not from a few passages."""
    return bool(_WHOLE_DOCUMENT.search(query)) or not index.is_specific(query)


def bm25_scores(
    query: str, passages: list[Passage], k1: float = 1.5, b: float = 0.75
) -> list[float]:
    """Okapi BM25 of each passage for the query."""
    return PassageIndex(passages, k1, b).scores(query)


def select_passages(
    query: str, passages: list[Passage], sizes: list[int], budget: int
) -> list[Passage]:
    """Best-scoring passages whose sizes (tokens) fit the budget, returned in document order.

    Without any matching term (or an empty question) the document's beginning is kept.
    """
    return PassageIndex(passages).select(query, sizes, budget)


def page_ranges(pages: Sequence[int]) -> str:
    """[1, 2, 3, 7, 9, 10] -> "1-3, 7, 9-10"."""
    ordered = sorted(set(pages))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ", ".join(parts)
