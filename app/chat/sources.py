"""What the user is told about over-context documents: the note before an answer (which
passages of which pages, or which parts were summarized) and the sources under it.

Sources are Chainlit text elements shown in the side panel: the answer ends with a "Sources:"
line whose labels (`p. 12`, `§4`, `part 3`) are links the browser makes from the elements'
names; clicking one shows the passage text. Chainlit stores the elements with the message, so
a reopened chat (after a restart too) shows them again.
"""

from __future__ import annotations

from collections.abc import Sequence

import chainlit as cl

from app.chat.history import Excerpt
from app.chat.i18n import t
from app.chat.long_documents import Source
from app.documents import retrieval


def excerpt_note(excerpt: Excerpt, language: str) -> str:
    """One note, with its numbers, about what this question reads of an over-context document."""
    params = {
        "name": excerpt.name,
        "full_tokens": excerpt.full_tokens,
        "kept": excerpt.passages_kept,
        "total": excerpt.passages_total,
        "kept_tokens": excerpt.kept_tokens,
    }
    if excerpt.summarized:
        covered = ""
        if excerpt.pages:
            covered = t("doc_pages_covered", language, pages=retrieval.page_ranges(excerpt.pages))
        return t(
            "doc_summarized",
            language,
            parts=excerpt.parts_total,
            parts_kept=excerpt.parts_kept,
            covered=covered,
            **params,
        )
    where = ""
    if excerpt.pages:
        where = t("doc_from_pages", language, pages=retrieval.page_ranges(excerpt.pages))
    if not excerpt.passages_kept:
        return t("doc_searched_nothing", language, **params)
    if not excerpt.matched:
        return t("doc_searched_unmatched", language, where=where, **params)
    return t("doc_searched", language, where=where, **params)


def _name(source: Source, several: bool) -> str:
    label = source.label if source.kind == "passage" else f"part {source.index + 1}"
    return f"{source.document} {label}" if several else label


def source_texts(sources: Sequence[Source], language: str) -> tuple[str, dict[str, str]]:
    """The "Sources:" line and the text behind each of its labels (the passages of one page
    together); empty when nothing was retrieved."""
    if not sources:
        return "", {}
    several = len({s.document for s in sources}) > 1
    grouped: dict[str, list[Source]] = {}
    for source in sources:
        grouped.setdefault(_name(source, several), []).append(source)
    texts = {name: "\n\n---\n\n".join(_text(s) for s in group) for name, group in grouped.items()}
    return t("sources", language) + " " + " · ".join(grouped), texts


def source_elements(sources: Sequence[Source], language: str) -> tuple[str, list[cl.Text]]:
    """The "Sources:" line and one side element per label (in a Chainlit context)."""
    line, texts = source_texts(sources, language)
    return line, [cl.Text(name=name, content=text, display="side") for name, text in texts.items()]


def _text(source: Source) -> str:
    if source.kind == "section":
        pages = f" (pp. {retrieval.page_ranges(source.pages)})" if source.pages else ""
        return f"**{source.document}**, part {source.index + 1}{pages}\n\n{source.text}"
    return source.text
