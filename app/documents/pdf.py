"""PDF text through PDFium (pypdfium2), ruled tables as Markdown, scans through OCR.

PDFium reads the text layer in content order (a two-column page comes out column by column),
faster than pure-Python parsers (2-2.5x pypdf on bench/extraction.py's files) and without their
warning floods. Paragraph starts come from the baselines (app.documents.pdf_paragraphs). Pages
that draw ruling lines are searched for tables (app.documents.pdf_tables); a table found
replaces its characters in the page's text by a Markdown table at the same place. Pages
without a text layer but with an image are rendered and OCR'd (app.documents.ocr). Then lines
of CJK text are joined and repeated headers and footers dropped (app.documents.layout).
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Callable

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c

from app.documents.document import (
    Document,
    DocumentError,
    DocumentNote,
    ExtractionProgress,
    page_ranges,
)
from app.documents.layout import drop_repeated_lines, join_lines
from app.documents.ocr import OcrUnavailable, PageReader
from app.documents.pdf_paragraphs import paragraph_starts, with_paragraphs
from app.documents.pdf_tables import page_text_with_tables

MAX_PDF_PAGES = 5000
# A page with fewer visible characters than this and an image on it is treated as a scan.
MIN_TEXT_CHARS = 20
# Pages drawing at least this many paths (lines, rectangles) are searched for ruled tables.
MIN_TABLE_PATHS = 4
# OCR renders the page so that its longer side has about this many pixels (~150 dpi on A4).
OCR_LONG_SIDE_PX = 1700

Progress = Callable[[ExtractionProgress], None]


def extract_pdf(
    name: str,
    data: bytes,
    progress: Progress | None = None,
    ocr: bool = True,
    ocr_deadline: float | None = None,
) -> Document:
    """Text of every page, `[page N]`-marked; raises DocumentError for unreadable PDFs.

    OCR starts no page after `ocr_deadline` (time.monotonic()): the pages left are named in
    an `ocr_skipped` note, and the document keeps what was read, instead of the whole read
    running into the worker's time limit."""
    if b"%PDF-" not in data[:1024]:
        raise _corrupt(name)
    try:
        pdf = pdfium.PdfDocument(data)
    except pdfium.PdfiumError as exc:
        if getattr(exc, "err_code", None) == pdfium_c.FPDF_ERR_PASSWORD:
            raise DocumentError(
                "encrypted",
                f"{name}: this PDF is password-protected; remove the password first",
                name=name,
            ) from exc
        raise _corrupt(name) from exc
    try:
        return _extract(name, data, pdf, progress or (lambda _: None), ocr, ocr_deadline)
    finally:
        pdf.close()


def _extract(
    name: str,
    data: bytes,
    pdf: pdfium.PdfDocument,
    progress: Progress,
    ocr: bool,
    ocr_deadline: float | None = None,
) -> Document:
    total = len(pdf)
    if total > MAX_PDF_PAGES:
        raise DocumentError(
            "too_many_pages",
            f"{name}: {total:,} pages is more than the {MAX_PDF_PAGES:,} allowed",
            name=name,
            pages=total,
            limit=MAX_PDF_PAGES,
        )
    texts: list[str] = []
    scans: list[int] = []  # 0-based pages to OCR
    start = time.monotonic()
    for i in range(total):
        text, scanned = _page_text(pdf, i)
        texts.append(text)
        if scanned:
            scans.append(i)
        progress(ExtractionProgress(name, "pages", i + 1, total, time.monotonic() - start, i + 1))
    notes: list[DocumentNote] = []
    ocr_pages: list[int] = []
    unread: list[int] = []  # scanned pages OCR could not read (unavailable, out of time)
    if scans and ocr:
        ocr_pages, unread = _ocr_pages(name, pdf, scans, texts, progress, notes, ocr_deadline)
    elif scans:
        unread = [i + 1 for i in scans]
        notes.append(_note("ocr_unavailable", name, unread))
    cleaned, dropped = drop_repeated_lines([_tidy(join_lines(t)) for t in texts])
    if dropped:
        notes.append(DocumentNote("repeated_lines", {"name": name, "count": dropped}))
    blank = [i + 1 for i, t in enumerate(cleaned) if not t.strip()]
    if len(blank) == total:
        raise DocumentError(
            "pdf_no_text",
            f"{name}: no text found in this PDF, neither in a text layer nor by OCR",
            name=name,
        )
    empty = [n for n in blank if n not in unread]  # the unread have their own note
    if empty:
        notes.append(_note("empty_pages", name, empty))
    text = "\n\n".join(f"[page {n}]\n{t}" for n, t in enumerate(cleaned, start=1))
    return Document(
        name=name,
        kind="pdf",
        text=text,
        pages=total,
        size_bytes=len(data),
        page_texts=cleaned,
        ocr_pages=ocr_pages,
        empty_pages=empty,
        notes=notes,
    )


def _tidy(text: str) -> str:
    """No trailing spaces, at most one blank line in a row (tables leave gaps around them)."""
    return re.sub(r"\n{3,}", "\n\n", re.sub(r"[ \t]+\n", "\n", text)).strip()


def _note(code: str, name: str, pages: list[int]) -> DocumentNote:
    return DocumentNote(code, {"name": name, "pages": page_ranges(pages), "count": len(pages)})


def _page_text(pdf: pdfium.PdfDocument, index: int) -> tuple[str, bool]:
    """(text, looks scanned) of one page; a damaged page reads as empty, not as a failure."""
    try:
        page = pdf[index]
    except pdfium.PdfiumError:
        return "", False
    try:
        textpage = page.get_textpage()
        try:
            plain = textpage.get_text_range()
            starts = paragraph_starts(textpage, plain)
            with_tables = (
                page_text_with_tables(page, textpage, starts) if _draws_lines(page) else None
            )
            text = with_tables if with_tables is not None else with_paragraphs(plain, starts)
        finally:
            textpage.close()
        scanned = len("".join(text.split())) < MIN_TEXT_CHARS and _has_image(page)
        return text, scanned
    except pdfium.PdfiumError:
        return "", False
    finally:
        page.close()


def _draws_lines(page: pdfium.PdfPage) -> bool:
    """At least MIN_TABLE_PATHS path objects, counted with PDFium's raw calls (no wrapper
    object per text object); a page with form XObjects is searched through them too."""
    paths = forms = 0
    for i in range(pdfium_c.FPDFPage_CountObjects(page.raw)):
        kind = pdfium_c.FPDFPageObj_GetType(pdfium_c.FPDFPage_GetObject(page.raw, i))
        paths += kind == pdfium_c.FPDF_PAGEOBJ_PATH
        forms += kind == pdfium_c.FPDF_PAGEOBJ_FORM
        if paths >= MIN_TABLE_PATHS:
            return True
    if not forms:
        return False
    nested = page.get_objects(filter=(pdfium_c.FPDF_PAGEOBJ_PATH,), max_depth=2)
    return sum(1 for _ in itertools.islice(nested, MIN_TABLE_PATHS)) >= MIN_TABLE_PATHS


def _has_image(page: pdfium.PdfPage) -> bool:
    images = page.get_objects(filter=(pdfium_c.FPDF_PAGEOBJ_IMAGE,), max_depth=3)
    return next(iter(images), None) is not None


def _ocr_pages(
    name: str,
    pdf: pdfium.PdfDocument,
    scans: list[int],
    texts: list[str],
    progress: Progress,
    notes: list[DocumentNote],
    deadline: float | None = None,
) -> tuple[list[int], list[int]]:
    """OCR the scanned pages in place in `texts`; returns the 1-based pages read by OCR and
    those left unread (OCR unavailable, or `deadline` passed)."""
    reader = PageReader()
    done: list[int] = []
    start = time.monotonic()
    for n, index in enumerate(scans, start=1):
        if deadline is not None and time.monotonic() > deadline:
            unread = [i + 1 for i in scans[n - 1 :]]
            notes.append(_note("ocr_skipped", name, unread))
            return _ocr_noted(name, done, notes), unread
        page = pdf[index]
        try:
            width, height = page.get_size()
            scale = min(3.0, OCR_LONG_SIDE_PX / max(width, height, 1.0))
            image = page.render(scale=scale).to_numpy()[:, :, :3]
            text = reader.read(image)
        except OcrUnavailable:
            unread = [i + 1 for i in scans[n - 1 :]]
            notes.append(_note("ocr_unavailable", name, unread))
            return _ocr_noted(name, done, notes), unread
        finally:
            page.close()
        if len(text.strip()) > len(texts[index].strip()):
            texts[index] = text
            done.append(index + 1)
        progress(
            ExtractionProgress(name, "ocr", n, len(scans), time.monotonic() - start, index + 1)
        )
    return _ocr_noted(name, done, notes), []


def _ocr_noted(name: str, done: list[int], notes: list[DocumentNote]) -> list[int]:
    if done:
        notes.insert(0, _note("ocr_pages", name, done))
    return done


def _corrupt(name: str) -> DocumentError:
    return DocumentError(
        "corrupt", f"{name}: this file is damaged or is not a real PDF", name=name, kind="PDF"
    )
