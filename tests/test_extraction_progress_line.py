"""The chat's live line while a document is read, and the notes it says afterwards (issue 16
items 5 and 6, the extraction part), with a mocked Chainlit context (no browser, no engine)."""

from __future__ import annotations

import asyncio
import uuid
from types import SimpleNamespace
from unittest.mock import AsyncMock, Mock

import pytest

from app.chat.i18n import t
from app.documents import progress_line
from app.documents.document import Document, DocumentNote
from app.documents.extraction import extract_file_async
from app.documents.progress_line import ExtractionLine
from app.serving.runtime import Runtime
from app.settings import AppSettings
from tests.app_helpers import make_pdf
from tests.fixtures import documents as corpus

MB = 1024 * 1024


@pytest.fixture
async def emitter():
    from chainlit.context import ChainlitContext, context_var
    from chainlit.emitter import BaseChainlitEmitter
    from chainlit.session import WebsocketSession

    session = Mock(spec=WebsocketSession)
    session.id = str(uuid.uuid4())
    session.thread_id = str(uuid.uuid4())
    session.user, session.user_env, session.chat_settings = None, {}, {}
    session.files, session.has_first_interaction, session.language = {}, True, "zh-CN"
    session.chat_profile, session.client_type = None, "webapp"
    emitter = Mock(spec=BaseChainlitEmitter)
    for name in ("send_step", "update_step", "delete_step", "emit", "send_element"):
        setattr(emitter, name, AsyncMock())
    context_var.set(ChainlitContext(session, emitter=emitter))
    return emitter


def _zh(key: str, **params: object) -> str:
    return t(key, "zh-CN", **params)


def _en(key: str, **params: object) -> str:
    return t(key, "en-US", **params)


async def test_line_shows_pages_read_then_what_it_took(emitter, tmp_path, monkeypatch):
    monkeypatch.setattr(progress_line, "OPEN_AFTER_S", 0.0)
    monkeypatch.setattr(progress_line, "INTERVAL_S", 0.0)
    path = tmp_path / "report.pdf"
    path.write_bytes(corpus.two_column_pdf(pages=4))
    line = ExtractionLine(_en, "report.pdf")
    doc = await extract_file_async(path, "report.pdf", 50 * MB, progress=line.update)
    said = await line.close(doc)
    sent = [call.args[0]["name"] for call in emitter.send_step.call_args_list]
    updated = [call.args[0]["name"] for call in emitter.update_step.call_args_list]
    assert sent == ["📄 Reading **report.pdf**: page 1 of 4 (25%)"]
    assert "📄 Reading **report.pdf**: page 4 of 4 (100%)" in updated
    assert (
        updated[-1].startswith("📄 Read **report.pdf** in ")
        and "(4 pages, 0 by OCR)" in updated[-1]
    )
    # headers and footers dropped: told in the line's output, not said in the chat
    assert (
        "8 repeated header and footer lines"
        in emitter.update_step.call_args_list[-1].args[0]["output"]
    )
    assert said == []


async def test_fast_document_shows_no_line(emitter, tmp_path):
    path = tmp_path / "short.pdf"
    path.write_bytes(make_pdf(["one page"]))
    line = ExtractionLine(_en, "short.pdf")
    doc = await extract_file_async(path, "short.pdf", MB, progress=line.update)
    assert await line.close(doc) == []
    assert emitter.send_step.call_args_list == []


async def test_ocr_opens_the_line_at_once_with_seconds_left(emitter):
    from app.documents.document import ExtractionProgress

    line = ExtractionLine(_zh, "扫描.pdf")
    await line.update(ExtractionProgress("扫描.pdf", "ocr", 1, 4, 6.0, page=7))
    [step] = [call.args[0] for call in emitter.send_step.call_args_list]
    assert step["name"] == "🔎 正在 OCR 识别 **扫描.pdf**：扫描页 1 / 4（第 7 页，25%），约剩 18 秒"


async def test_notes_said_in_the_users_language(emitter):
    doc = Document(
        "扫描.pdf",
        "pdf",
        "text",
        pages=9,
        ocr_pages=[7, 8, 9],
        notes=[
            DocumentNote("ocr_pages", {"name": "扫描.pdf", "pages": "7-9", "count": 3}),
            DocumentNote("empty_pages", {"name": "扫描.pdf", "pages": "2", "count": 1}),
            DocumentNote("repeated_lines", {"name": "扫描.pdf", "count": 18}),
        ],
    )
    said = await ExtractionLine(_zh, "扫描.pdf").close(doc)
    assert said == [
        "**扫描.pdf**：3 页没有文本层，已通过 OCR 识别（第 7-9 页）；OCR 文本可能有错误。",
        "**扫描.pdf**：1 页没有文字，OCR 也未识别出文字（第 2 页）。",
    ]
    english = await ExtractionLine(_en, "scan.pdf").close(doc)
    assert english[0].startswith(
        "**扫描.pdf**: 3 page(s) without a text layer were read by OCR (pages 7-9)"
    )


async def test_chat_reads_uploads_with_the_line_and_notes(emitter, tmp_path):
    """ChatSession._read_documents: an empty page is said; a refused file gets its message."""
    from app.chat.session import ChatSession

    runtime = Runtime(settings=AppSettings(data_dir=tmp_path), model_name="tiny-qwen3")
    runtime.bind_loop(asyncio.get_running_loop())
    chat = ChatSession(runtime, "en-US")
    gap = tmp_path / "gap.pdf"
    gap.write_bytes(make_pdf(["first page", "", "third page"]))
    bomb = tmp_path / "bomb.docx"
    bomb.write_bytes(corpus.docx_bomb(120))
    files = [
        SimpleNamespace(name="gap.pdf", path=str(gap)),
        SimpleNamespace(name="bomb.docx", path=str(bomb)),
    ]
    docs = await chat._read_documents(files)
    assert [d.name for d in docs] == ["gap.pdf"] and docs[0].empty_pages == [2]
    said = [call.args[0]["output"] for call in emitter.send_step.call_args_list]
    assert "**gap.pdf**: 1 page(s) have no text, even by OCR (pages 2)." in said
    assert any("**bomb.docx** unpacks to more than the 100 MB limit" in s for s in said)


@pytest.mark.parametrize("language", ["en-US", "zh-CN"])
def test_every_document_error_and_note_has_a_text(language):
    """Each DocumentError code raised in app/documents and each note code has its text in
    both languages (a missing key would turn a clear message into a KeyError)."""
    import re
    from pathlib import Path

    documents = Path(__file__).resolve().parents[1] / "app" / "documents"
    source = "\n".join(p.read_text() for p in documents.glob("*.py"))
    errors = set(re.findall(r'DocumentError\(\s*"([a-z_]+)"', source))
    notes = set(re.findall(r'_note\(\s*"([a-z_]+)"', source)) | {"repeated_lines", "html_full_text"}
    assert {"corrupt", "too_much_unpacked", "parse_memory", "parse_timeout"} <= errors
    assert {"ocr_pages", "empty_pages", "ocr_skipped"} <= notes
    for code in errors:
        assert t(f"doc_error_{code}", language, name="x.pdf", **_PARAMS)
    for code in notes:
        assert t(f"doc_note_{code}", language, name="x.pdf", pages="2", count=1)


_PARAMS = dict(
    suffix=".exe",
    kind="PDF",
    size_mb=1,
    limit_mb=1,
    pages=1,
    limit=1,
    chars=1,
    count=1,
    limit_s=1.0,
    exit_code=-9,
)
