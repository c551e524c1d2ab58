"""Extraction keeps the structure of a generated corpus (tests/fixtures/documents.py).

One test per structural feature: PDF columns, tables, headers/footers, CJK line joins, OCR of
scanned pages, DOCX headings/lists/merged and nested tables, HTML main content and `<pre>`
indentation, CSV rows with their header, legacy Chinese and Japanese encodings.
"""

from __future__ import annotations

import importlib.util
import logging
import re

import pytest

from app.documents.document import note_message, page_ranges, progress_message
from app.documents.extraction import (
    Document,
    DocumentError,
    ParseLimits,
    extract_bytes,
    extract_file_async,
)
from app.documents.layout import drop_repeated_lines, join_lines
from tests.app_helpers import make_pdf
from tests.fixtures import documents as corpus

MB = 1024 * 1024
# rapidocr-onnxruntime has no wheel beyond Python 3.12 (pyproject installs it below 3.13).
needs_ocr = pytest.mark.skipif(
    importlib.util.find_spec("rapidocr_onnxruntime") is None,
    reason="rapidocr-onnxruntime not installed",
)


@pytest.fixture(scope="module")
def report() -> Document:
    return extract_bytes("report.pdf", corpus.two_column_pdf(), 50 * MB)


@pytest.fixture(scope="module")
def scanned() -> tuple[Document, list]:
    steps: list = []
    doc = extract_bytes("scan.pdf", corpus.scanned_pdf(), 50 * MB, progress=steps.append)
    return doc, steps


@pytest.fixture(scope="module")
def plan() -> Document:
    return extract_bytes("plan.docx", corpus.structured_docx(), 50 * MB)


@pytest.fixture(scope="module")
def article() -> Document:
    return extract_bytes("log.html", corpus.article_html(), 50 * MB)


# ---- PDF -----------------------------------------------------------------------------------


def test_pdf_pages_marked_and_exposed(report):
    assert report.kind == "pdf" and report.pages == 4 and len(report.page_texts) == 4
    markers = [int(n) for n in re.findall(r"^\[page (\d+)\]$", report.text, re.M)]
    assert markers == [1, 2, 3, 4]
    assert "leftp3" in report.page_texts[2] and "leftp3" not in report.page_texts[1]


def test_pdf_two_columns_are_not_interleaved(report):
    page = report.page_texts[0]
    last_left = max(page.index(w) for w in corpus.LEFT_COLUMN_WORDS)
    first_right = min(page.index(w) for w in corpus.RIGHT_COLUMN_WORDS)
    assert last_left < first_right
    # Each paragraph opens and closes with its word: nothing of the other column in between.
    albatross = page[page.index("albatross") : page.index("albatross.") + 10]
    assert not any(w in albatross for w in corpus.RIGHT_COLUMN_WORDS)


def test_pdf_paragraphs_separated_by_blank_lines(report):
    page = report.page_texts[0]
    assert "albatross.\n\nbergamot" in page and "bergamot.\n\ncinnabar" in page
    assert "cinnabar.\n\ndromedary" in page  # the next column starts a paragraph too
    first = page.split("\n\n")[0]
    assert first.startswith("albatross") and first.endswith("albatross.") and first.count("\n") > 3


def test_pdf_table_becomes_a_markdown_table(report):
    page = report.page_texts[1]
    lines = page.splitlines()
    start = lines.index("| Region | Revenue | Growth |")
    assert lines[start + 1] == "|---|---|---|"
    assert lines[start + 2 : start + 5] == [
        "| North | 1,204 | +4.1% |",
        "| South | 877 | -2.3% |",
        "| Lighthouse | 5,310 | +12.0% |",
    ]
    assert "Lighthouse 5,310" not in page  # the cells are not repeated as loose text
    assert page.index("leftp2.") < page.index("| Region") < page.index("rightp2")
    assert "leftp2.\n\nmorep2" in page  # paragraphs are kept on a page with a table too


def test_pdf_repeated_header_and_footer_dropped(report):
    assert corpus.HEADER not in report.text and corpus.FOOTER not in report.text
    assert report.notes == [report.notes[0]] and report.notes[0].code == "repeated_lines"
    assert report.notes[0].params["count"] == 2 * 4


def test_header_detection_keeps_lines_that_do_not_repeat():
    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    body = ["{w} one", "{w} two", "A line on every page", "{w} three", "{w} four"]
    pages = ["\n".join(["Title", *body, f"- {i} -"]).format(w=w) for i, w in enumerate(words, 1)]
    cleaned, dropped = drop_repeated_lines(pages)
    assert dropped == 10 and cleaned == ["\n".join(body).format(w=w) for w in words]
    assert drop_repeated_lines(pages[:2]) == (pages[:2], 0)  # two pages: too few to tell


def test_pdf_chinese_lines_joined_without_breaking_words():
    doc = extract_bytes("zh.pdf", corpus.chinese_pdf(), 50 * MB)
    assert "会说话的鹦鹉，它每天早上都在图书馆门口" in doc.text
    assert "English words stay apart\nacross lines too." in doc.text  # other breaks stay


def test_cjk_join_rules():
    assert join_lines("鹦\r\n鹉") == "鹦鹉"
    assert join_lines("中文\nEnglish") == "中文\nEnglish"
    assert join_lines("word\nword") == "word\nword"


@needs_ocr
def test_pdf_scanned_page_is_ocrd(scanned):
    doc, _ = scanned
    assert doc.ocr_pages == [2]
    words = doc.page_texts[1].lower()
    assert all(w.lower() in words for w in corpus.SCANNED_WORDS), doc.page_texts[1]
    assert doc.page_texts[0] == "Cover letter with a real text layer."


@needs_ocr
def test_pdf_scanned_chinese_page_is_ocrd():
    font = corpus.cjk_font()
    if font is None:
        pytest.skip("no CJK font to render a Chinese scan: apt-get install fonts-wqy-microhei")
    doc = extract_bytes("扫描.pdf", corpus.scanned_chinese_pdf(font), MB)
    assert doc.ocr_pages == [1]
    text = doc.text.replace(" ", "")
    assert "鹦鹉在图书馆门口问好" in text and "港口货运" in text, doc.text


@needs_ocr
def test_pdf_user_told_which_pages_were_ocrd(scanned):
    doc, _ = scanned
    notes = [n for n in doc.notes if n.code == "ocr_pages"]
    assert notes and notes[0].params == {"name": "scan.pdf", "pages": "2", "count": 1}
    assert note_message(notes[0]) == ("doc_note_ocr_pages", notes[0].params)


@needs_ocr
def test_pdf_progress_per_page_and_per_ocr_page(scanned):
    _, steps = scanned
    assert [(s.stage, s.done, s.total) for s in steps] == [
        ("pages", 1, 2),
        ("pages", 2, 2),
        ("ocr", 1, 1),
    ]
    assert steps[-1].page == 2 and steps[-1].percent == 100
    key, params = progress_message(steps[0])
    assert key == "doc_progress_pages" and params["percent"] == 50


def test_ocr_out_of_time_keeps_what_was_read_and_names_the_rest():
    # A time limit already spent: the text layer is read, the scanned page is not OCR'd.
    doc = extract_bytes("scan.pdf", corpus.scanned_pdf(), MB, limits=ParseLimits(timeout_s=1e-6))
    assert doc.ocr_pages == [] and doc.page_texts == ["Cover letter with a real text layer.", ""]
    assert [(n.code, n.params["pages"]) for n in doc.notes] == [("ocr_skipped", "2")]
    assert doc.empty_pages == []  # unread, not empty: its own note says so


def test_pdf_empty_page_noted():
    doc = extract_bytes("gap.pdf", make_pdf(["first page", "", "third page"]), MB)
    assert doc.empty_pages == [2]
    assert [n.params for n in doc.notes if n.code == "empty_pages"] == [
        {"name": "gap.pdf", "pages": "2", "count": 1}
    ]


def test_pdf_extraction_logs_no_warning_flood(caplog):
    with caplog.at_level(logging.WARNING):
        extract_bytes("zh.pdf", corpus.chinese_pdf(), 50 * MB)
        extract_bytes("report.pdf", corpus.two_column_pdf(pages=3), 50 * MB)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_page_ranges():
    assert page_ranges([9, 2, 7, 8]) == "2, 7-9"
    assert page_ranges([]) == ""


# ---- DOCX ----------------------------------------------------------------------------------


def test_docx_headings(plan):
    lines = plan.text.splitlines()
    assert lines[0] == "# Annual Plan"
    assert "## Goals" in lines and "## Budget" in lines


def test_docx_bulleted_list(plan):
    assert "- Grow the harbour trade\n- Open a second warehouse" in plan.text


def test_docx_numbered_list(plan):
    assert "1. Hire staff\n2. Train staff" in plan.text


def test_docx_merged_cell_written_once(plan):
    assert "| Spending 2026 |  | Owner |" in plan.text.splitlines()


def test_docx_nested_table_inside_its_cell(plan):
    assert "| Cranes | 250 | Deputy / Share; Tomas / 30% |" in plan.text.splitlines()


def test_docx_body_order(plan):
    text = plan.text
    assert (
        text.index("## Budget")
        < text.index("| Spending 2026")
        < text.index("Closing words after the table.")
    )


# ---- HTML ----------------------------------------------------------------------------------


def test_html_navigation_banner_script_and_footer_dropped(article):
    for junk in (
        "NAVSHOP",
        "NAVABOUT",
        "COOKIEBANNER",
        "TRACKER-SCRIPT",
        "FOOTERLINKS",
        "color:red",
    ):
        assert junk not in article.text


def test_html_main_content_kept(article):
    assert "# The keeper's log" in article.text
    assert all(f"season of {1900 + i}" in article.text for i in range(8))
    assert "the final entry" in article.text


def test_html_pre_indentation_kept(article):
    assert corpus.PRE_CODE in article.text


def test_html_without_main_content_keeps_full_text_and_pre():
    html = "<html><body><nav>Menu</nav><p>Short <b>note</b>.</p><pre>if x:\n    y()</pre></body></html>"
    doc = extract_bytes("tiny.html", html.encode(), MB)
    assert doc.text == "Menu\n\nShort note.\n\nif x:\n    y()"
    assert [n.code for n in doc.notes] == ["html_full_text"]


# ---- CSV and encodings ---------------------------------------------------------------------


def test_csv_header_and_whole_rows():
    doc = extract_bytes("cities.csv", corpus.big_csv(3000), 50 * MB)
    assert doc.kind == "csv" and doc.header == "id,city,population,note"
    assert len(doc.rows) == 3000 and doc.rows[0] == "1,city-1,1007,inland"
    assert doc.rows[9] == '10,city-10,1070,"port, river"'
    assert doc.rows[96] == "97,city-97,1679,two lines"  # a quoted newline stays in its row
    assert doc.text.splitlines() == [doc.header, *doc.rows]


@pytest.mark.parametrize(
    ("text", "encoding"),
    [
        (corpus.GBK_TEXT, "gbk"),
        (corpus.BIG5_TEXT, "big5"),
        ("東京の会議は明日の午後三時に始まります。" * 3, "shift_jis"),
    ],
)
def test_legacy_encodings(text, encoding):
    doc = extract_bytes("notes.txt", text.encode(encoding), MB)
    assert doc.text == text


def test_short_gb18030_text_is_not_taken_for_korean():
    assert (
        extract_bytes("a.txt", "中文文本，GB18030 编码".encode("gb18030"), MB).text
        == "中文文本，GB18030 编码"
    )


# ---- through the worker process ------------------------------------------------------------


@needs_ocr
async def test_fully_scanned_pdf_read_in_the_worker_with_progress(tmp_path):
    path = tmp_path / "scan.pdf"
    path.write_bytes(corpus.scanned_pdf(text_page=False))
    steps = []

    async def on_progress(step):
        steps.append((step.stage, step.done, step.total))

    doc = await extract_file_async(path, "scan.pdf", 50 * MB, progress=on_progress)
    assert doc.ocr_pages == [1] and "harbour" in doc.text.lower()
    assert steps == [("pages", 1, 1), ("ocr", 1, 1)]
    assert doc.notes[0].code == "ocr_pages"


async def test_worker_errors_keep_their_code(tmp_path):
    path = tmp_path / "locked.pdf"
    path.write_bytes(b"%PDF-1.4\n garbage garbage")
    with pytest.raises(DocumentError) as err:
        await extract_file_async(path, "locked.pdf", MB)
    assert err.value.code == "corrupt" and err.value.params["name"] == "locked.pdf"
