"""Pick the passages of a too-large document that matter for a question (BM25, stdlib only).

Used when a document does not fit the context: the document is cut into passages that keep
their page marker, each passage is scored against the question, and the best ones are kept
in document order until the token budget is spent.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af]")
_PAGE = re.compile(r"^\[page (\d+)\]$", re.MULTILINE)


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


def split_passages(text: str, target_chars: int = 1500) -> list[Passage]:
    """Cut text at paragraph and page boundaries into passages of about `target_chars`.

    A passage that starts in the middle of a PDF page is prefixed with that page's marker, so
    the model can still cite pages.
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
        while len(para) > target_chars * 2:  # a huge paragraph: hard cut
            if current:
                flush()
            current_page = page
            current = [para[:target_chars]]
            flush()
            para = para[target_chars:]
        if current and current_len + len(para) > target_chars:
            flush()
        if not current:
            current_page = page
        current.append(para)
        current_len += len(para) + 2
    flush()
    return passages


def bm25_scores(query: str, passages: list[Passage], k1: float = 1.5, b: float = 0.75) -> list[float]:
    """Okapi BM25 of each passage for the query."""
    docs = [Counter(terms(p.text)) for p in passages]
    if not docs:
        return []
    avg_len = sum(sum(d.values()) for d in docs) / len(docs) or 1.0
    query_terms = set(terms(query))
    df = {t: sum(1 for d in docs if t in d) for t in query_terms}
    n = len(docs)
    scores = []
    for d in docs:
        length = sum(d.values())
        score = 0.0
        for t in query_terms:
            tf = d.get(t, 0)
            if not tf:
                continue
            idf = math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5))
            score += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * length / avg_len))
        scores.append(score)
    return scores


def select_passages(
    query: str, passages: list[Passage], sizes: list[int], budget: int
) -> list[Passage]:
    """Best-scoring passages whose sizes (tokens) fit the budget, returned in document order.

    Without any matching term (or an empty question) the document's beginning is kept.
    """
    scores = bm25_scores(query, passages)
    order = sorted(range(len(passages)), key=lambda i: (-scores[i], i))
    if not any(scores):
        order = list(range(len(passages)))
    chosen: list[int] = []
    used = 0
    for i in order:
        if used + sizes[i] <= budget:
            chosen.append(i)
            used += sizes[i]
    return [passages[i] for i in sorted(chosen)]
