"""Text out of uploaded documents: PDF, DOCX, HTML, plain text, CSV and source files.

`extract_file_async` is what the chat calls: the file is parsed in a worker process under
memory, time and unpacked-size limits (app.documents.worker, app.documents.limits), with
per-page progress. `extract_bytes` and `extract_file` do the same work in the calling thread
(the worker runs them; tests and benchmarks call them directly). Failures raise
`DocumentError` with a message code and numbers, so the chat can explain them in the user's
language. One module per format: pdf, word, html, text.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from app.documents.document import Document, DocumentError, DocumentNote, ExtractionProgress
from app.documents.limits import ParseLimits

__all__ = [
    "Document",
    "DocumentError",
    "DocumentNote",
    "ExtractionProgress",
    "ParseLimits",
    "SUPPORTED_EXTENSIONS",
    "extract_bytes",
    "extract_file",
    "extract_file_async",
    "kind_of",
]

PDF_EXTENSIONS = {".pdf"}
DOCX_EXTENSIONS = {".docx"}
HTML_EXTENSIONS = {".html", ".htm", ".xhtml"}
TEXT_EXTENSIONS = {
    ".txt",
    ".md",
    ".markdown",
    ".rst",
    ".csv",
    ".tsv",
    ".json",
    ".jsonl",
    ".yaml",
    ".yml",
    ".toml",
    ".ini",
    ".cfg",
    ".conf",
    ".log",
    ".xml",
    ".tex",
    ".srt",
    ".vtt",
    ".env",
    # source files
    ".py",
    ".pyi",
    ".ipynb",
    ".js",
    ".mjs",
    ".cjs",
    ".ts",
    ".tsx",
    ".jsx",
    ".java",
    ".kt",
    ".kts",
    ".scala",
    ".c",
    ".h",
    ".cc",
    ".cpp",
    ".cxx",
    ".hpp",
    ".hh",
    ".cs",
    ".go",
    ".rs",
    ".rb",
    ".php",
    ".pl",
    ".lua",
    ".r",
    ".jl",
    ".swift",
    ".m",
    ".mm",
    ".dart",
    ".sh",
    ".bash",
    ".zsh",
    ".fish",
    ".ps1",
    ".bat",
    ".sql",
    ".css",
    ".scss",
    ".sass",
    ".less",
    ".vue",
    ".svelte",
    ".proto",
    ".graphql",
    ".gradle",
    ".cmake",
    ".mk",
    ".dockerfile",
    ".hs",
    ".ml",
    ".ex",
    ".exs",
    ".erl",
    ".clj",
    ".el",
    ".vim",
    ".zig",
    ".nim",
    ".v",
    ".sv",
    ".vhd",
}
TEXT_FILENAMES = {"makefile", "dockerfile", "readme", "license", "cmakelists.txt"}
SUPPORTED_EXTENSIONS = PDF_EXTENSIONS | DOCX_EXTENSIONS | HTML_EXTENSIONS | TEXT_EXTENSIONS

# Extracted text beyond this many characters is refused (about 5M tokens: no context holds it).
MAX_TEXT_CHARS = 20_000_000
# OCR starts no page after this share of the parse time limit: a long scan ends with the pages
# read so far and a note naming the rest, not with the time limit's refusal.
OCR_TIME_SHARE = 0.8

Progress = Callable[[ExtractionProgress], None]
AsyncProgress = Callable[[ExtractionProgress], Awaitable[None] | None]


def kind_of(name: str) -> str | None:
    """The extractor for a file name, or None when the type is not supported."""
    path = Path(name.lower())
    suffix = path.suffix
    if suffix in PDF_EXTENSIONS:
        return "pdf"
    if suffix in DOCX_EXTENSIONS:
        return "docx"
    if suffix in HTML_EXTENSIONS:
        return "html"
    if suffix in TEXT_EXTENSIONS or path.name in TEXT_FILENAMES:
        return "text"
    return None


def extract_file(
    path: str | Path,
    name: str,
    max_bytes: int,
    *,
    progress: Progress | None = None,
    limits: ParseLimits | None = None,
) -> Document:
    """Read a file from disk and extract its text (in this thread); checks the size first."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DocumentError(
            "unreadable", f"{name}: cannot read the file ({exc})", name=name
        ) from exc
    check_size(name, size, max_bytes)
    return extract_bytes(name, path.read_bytes(), max_bytes, progress=progress, limits=limits)


async def extract_file_async(
    path: str | Path,
    name: str,
    max_bytes: int,
    *,
    progress: AsyncProgress | None = None,
    limits: ParseLimits | None = None,
) -> Document:
    """`extract_file` in a worker process under `limits` (default: the PAGECHAT_* settings).

    `progress` is called on the event loop for each page read or OCR'd (it may be async).
    Over a limit, or if the worker dies, a DocumentError names what happened.
    """
    from app.documents.worker import parse_in_worker

    try:
        size = Path(path).stat().st_size
    except OSError as exc:
        raise DocumentError(
            "unreadable", f"{name}: cannot read the file ({exc})", name=name
        ) from exc
    check_size(name, size, max_bytes)
    return await parse_in_worker(
        path, name, max_bytes, limits or ParseLimits.from_settings(), progress
    )


def extract_bytes(
    name: str,
    data: bytes,
    max_bytes: int,
    *,
    progress: Progress | None = None,
    limits: ParseLimits | None = None,
) -> Document:
    """Extract the text of one document given its bytes (in this thread)."""
    check_size(name, len(data), max_bytes)
    limits = limits or ParseLimits()
    kind = kind_of(name)
    if kind is None:
        suffix = Path(name).suffix or name
        raise DocumentError(
            "unsupported",
            f"{name}: files of type {suffix} are not supported "
            "(PDF, DOCX, TXT, MD, HTML, CSV and source files are)",
            name=name,
            suffix=suffix,
        )
    if kind == "pdf":
        from app.documents.pdf import extract_pdf

        # OCR stops in time for the worker to answer with what it read (OCR_TIME_SHARE).
        deadline = time.monotonic() + limits.timeout_s * OCR_TIME_SHARE
        document = extract_pdf(name, data, progress, ocr_deadline=deadline)
    elif kind == "docx":
        from app.documents.word import docx_markdown

        document = Document(name, "docx", docx_markdown(name, data, limits.max_unpacked_bytes))
    elif kind == "html":
        document = _html_document(name, data)
    else:
        document = _text_document(name, data)
    document.size_bytes = len(data)
    document.text = normalize_text(document.text)
    if not document.text.strip():
        raise DocumentError("no_text", f"{name}: no text found in this file", name=name)
    if len(document.text) > MAX_TEXT_CHARS:
        raise DocumentError(
            "too_much_text",
            f"{name}: {len(document.text):,} characters of text is more than the {MAX_TEXT_CHARS:,} allowed",
            name=name,
            chars=len(document.text),
            limit=MAX_TEXT_CHARS,
        )
    return document


def _html_document(name: str, data: bytes) -> Document:
    from app.documents.html import html_to_text, main_content
    from app.documents.text import decode_text

    html, encoding = decode_text(name, data)
    text = main_content(html)
    notes = []
    if text is None:
        text = html_to_text(html)
        notes.append(DocumentNote("html_full_text", {"name": name}))
    return Document(name, "html", text, encoding=encoding, notes=notes)


def _text_document(name: str, data: bytes) -> Document:
    from app.documents.text import CSV_SUFFIXES, csv_document, decode_text

    text, encoding = decode_text(name, data)
    delimiter = CSV_SUFFIXES.get(Path(name.lower()).suffix)
    if delimiter is not None:
        return csv_document(name, normalize_text(text), delimiter, encoding, len(data))
    return Document(name, "text", text, encoding=encoding)


def check_size(name: str, size: int, max_bytes: int) -> None:
    if size == 0:
        raise DocumentError("empty", f"{name}: the file is empty (0 bytes)", name=name)
    if size > max_bytes:
        raise DocumentError(
            "too_large",
            f"{name}: {size / 1e6:.1f} MB is over the {max_bytes / 1e6:.0f} MB upload limit",
            name=name,
            size_mb=round(size / 1e6, 1),
            limit_mb=round(max_bytes / 1e6),
        )


def normalize_text(text: str) -> str:
    """Unix newlines, no NULs, no trailing spaces, at most two blank lines in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    text = re.sub(r"[ \t]+\n", "\n", text)
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.strip()
