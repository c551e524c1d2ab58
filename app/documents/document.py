"""The extracted document: its text plus the structure the chat and retrieval need.

`Document.text` is what enters the conversation (Markdown-ish: `# headings`, `- lists`,
`| tables |`, PDF pages introduced by `[page N]` lines). The other fields expose structure so
passages can be cut on page and row boundaries (`page_texts`, `header` + `rows`) and notes can
tell the user what happened (`notes`: OCR'd or empty pages, headers and footers left out).
Failures are `DocumentError`s with a message code and its numbers, so the chat explains them
in the user's language (`doc_error_<code>` in .chainlit/translations).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class DocumentError(ValueError):
    """A document that cannot be read. `code` names the message, `params` fill it in."""

    def __init__(self, code: str, message: str, **params: Any) -> None:
        super().__init__(message)
        self.code = code
        self.params = params

    def __reduce__(self) -> tuple[Any, ...]:  # crosses the worker process's pipe intact
        return (_rebuild_error, (self.code, str(self), self.params))


def _rebuild_error(code: str, message: str, params: dict[str, Any]) -> DocumentError:
    return DocumentError(code, message, **params)


@dataclass(frozen=True)
class DocumentNote:
    """Something the user should know about an extraction; `doc_note_<code>` is its text.

    Codes: `ocr_pages` (params: name, pages, count), `empty_pages` (name, pages, count),
    `repeated_lines` (name, count: header/footer lines dropped), `ocr_unavailable` (name,
    pages, count: pages without text that could not be OCR'd), `ocr_skipped` (name, pages,
    count: scanned pages left unread when OCR ran out of time), `html_full_text` (name: no main
    content found, the whole page's text kept).
    """

    code: str
    params: dict[str, Any]


@dataclass
class Document:
    """Extracted text of one file.

    `pages` (PDF): page count; `page_texts[i]` is page i+1's text without its marker.
    `header` and `rows` (CSV/TSV): the header line and every data row as one line of CSV
    (`text` is the header and the rows, one per line), so a passage can repeat the header and
    never cut a row. `ocr_pages` and `empty_pages` are 1-based page numbers.
    """

    name: str
    kind: str  # pdf | docx | html | text | csv
    text: str
    pages: int | None = None
    size_bytes: int = 0
    page_texts: list[str] | None = None
    ocr_pages: list[int] = field(default_factory=list)
    empty_pages: list[int] = field(default_factory=list)
    header: str | None = None
    rows: list[str] | None = None
    encoding: str | None = None
    notes: list[DocumentNote] = field(default_factory=list)


@dataclass(frozen=True)
class ExtractionProgress:
    """One step of reading a document: `stage` is `pages` (text layer) or `ocr` (scanned
    pages); `done` of `total` are finished; `page` is the page just finished."""

    name: str
    stage: str
    done: int
    total: int
    elapsed_s: float
    page: int | None = None

    @property
    def percent(self) -> int:
        return int(100 * self.done / self.total) if self.total else 100

    @property
    def seconds_left(self) -> float | None:
        """Estimated from the pace so far (None until one page is done)."""
        if not self.done or self.done >= self.total:
            return None if not self.done else 0.0
        return self.elapsed_s / self.done * (self.total - self.done)


def page_ranges(pages: list[int]) -> str:
    """[2, 7, 8, 9] -> "2, 7-9": page lists as people write them."""
    out: list[str] = []
    start = prev = None
    for page in sorted(pages):
        if start is None:
            start = prev = page
        elif prev is not None and page == prev + 1:
            prev = page
        else:
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = prev = page
    if start is not None:
        out.append(str(start) if start == prev else f"{start}-{prev}")
    return ", ".join(out)


def progress_message(step: ExtractionProgress) -> tuple[str, dict[str, Any]]:
    """The translation key (`doc_progress_pages` / `doc_progress_ocr`) and its params for a
    live progress line; `doc_progress_left` wraps it with the seconds left when known."""
    params = {
        "name": step.name,
        "done": step.done,
        "total": step.total,
        "page": step.page or step.done,
        "percent": step.percent,
    }
    return f"doc_progress_{step.stage}", params


def note_message(note: DocumentNote) -> tuple[str, dict[str, Any]]:
    """The translation key (`doc_note_<code>`) and params of a note to the user."""
    return f"doc_note_{note.code}", dict(note.params)
