"""Text out of uploaded documents: PDF, DOCX, HTML, plain text, CSV and source files.

Everything here is blocking and meant for a worker thread (`extract_file_async`). Failures
raise `DocumentError` with a message code and numbers, so the chat can explain them in the
user's language. Libraries are permissively licensed (pypdf BSD, python-docx MIT, stdlib).
"""

from __future__ import annotations

import asyncio
import io
import re
import zipfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

PDF_EXTENSIONS = {".pdf"}
DOCX_EXTENSIONS = {".docx"}
HTML_EXTENSIONS = {".html", ".htm", ".xhtml"}
TEXT_EXTENSIONS = {
    ".txt", ".md", ".markdown", ".rst", ".csv", ".tsv", ".json", ".jsonl", ".yaml", ".yml",
    ".toml", ".ini", ".cfg", ".conf", ".log", ".xml", ".tex", ".srt", ".vtt", ".env",
    # source files
    ".py", ".pyi", ".ipynb", ".js", ".mjs", ".cjs", ".ts", ".tsx", ".jsx", ".java", ".kt",
    ".kts", ".scala", ".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".hh", ".cs", ".go", ".rs",
    ".rb", ".php", ".pl", ".lua", ".r", ".jl", ".swift", ".m", ".mm", ".dart", ".sh", ".bash",
    ".zsh", ".fish", ".ps1", ".bat", ".sql", ".css", ".scss", ".sass", ".less", ".vue",
    ".svelte", ".proto", ".graphql", ".gradle", ".cmake", ".mk", ".dockerfile", ".hs", ".ml",
    ".ex", ".exs", ".erl", ".clj", ".el", ".vim", ".zig", ".nim", ".v", ".sv", ".vhd",
}
TEXT_FILENAMES = {"makefile", "dockerfile", "readme", "license", "cmakelists.txt"}
SUPPORTED_EXTENSIONS = PDF_EXTENSIONS | DOCX_EXTENSIONS | HTML_EXTENSIONS | TEXT_EXTENSIONS

# A DOCX is a zip: refuse archives that would inflate beyond this before parsing them.
MAX_DOCX_UNCOMPRESSED = 256 * 1024 * 1024
MAX_DOCX_RATIO = 200
MAX_PDF_PAGES = 5000
# Extracted text beyond this many characters is refused (about 5M tokens: no context holds it).
MAX_TEXT_CHARS = 20_000_000


class DocumentError(ValueError):
    """A document that cannot be read. `code` names the message, `params` fill it in."""

    def __init__(self, code: str, message: str, **params: Any) -> None:
        super().__init__(message)
        self.code = code
        self.params = params


@dataclass
class Document:
    """Extracted text of one file; `pages` is set for PDFs."""

    name: str
    kind: str  # pdf | docx | html | text
    text: str
    pages: int | None = None
    size_bytes: int = 0


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


def extract_file(path: str | Path, name: str, max_bytes: int) -> Document:
    """Read a file from disk and extract its text; checks the size before reading it."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DocumentError("unreadable", f"{name}: cannot read the file ({exc})", name=name) from exc
    _check_size(name, size, max_bytes)
    return extract_bytes(name, path.read_bytes(), max_bytes)


async def extract_file_async(path: str | Path, name: str, max_bytes: int) -> Document:
    """`extract_file` in a worker thread, so parsing never blocks the event loop."""
    return await asyncio.to_thread(extract_file, path, name, max_bytes)


def extract_bytes(name: str, data: bytes, max_bytes: int) -> Document:
    """Extract the text of one document given its bytes."""
    _check_size(name, len(data), max_bytes)
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
    pages = None
    if kind == "pdf":
        text, pages = _pdf_text(name, data)
    elif kind == "docx":
        text = _docx_text(name, data)
    elif kind == "html":
        text = html_to_text(decode_text(name, data))
    else:
        text = decode_text(name, data)
    text = normalize_text(text)
    if not text.strip():
        raise DocumentError("no_text", f"{name}: no text found in this file", name=name)
    if len(text) > MAX_TEXT_CHARS:
        raise DocumentError(
            "too_much_text",
            f"{name}: {len(text):,} characters of text is more than the {MAX_TEXT_CHARS:,} allowed",
            name=name,
            chars=len(text),
            limit=MAX_TEXT_CHARS,
        )
    return Document(name=name, kind=kind, text=text, pages=pages, size_bytes=len(data))


def _check_size(name: str, size: int, max_bytes: int) -> None:
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


# ---- plain text ----------------------------------------------------------------------------


def decode_text(name: str, data: bytes) -> str:
    """Decode text bytes (UTF-8/16 with BOM, UTF-8, GB18030); refuse binary data."""
    for bom, encoding in (
        (b"\xef\xbb\xbf", "utf-8-sig"),
        (b"\xff\xfe\x00\x00", "utf-32"),
        (b"\x00\x00\xfe\xff", "utf-32"),
        (b"\xff\xfe", "utf-16"),
        (b"\xfe\xff", "utf-16"),
    ):
        if data.startswith(bom):
            try:
                return data.decode(encoding)
            except UnicodeDecodeError:
                break
    sample = data[:65536]
    if b"\x00" in sample:
        raise _binary(name)
    for encoding in ("utf-8", "gb18030"):
        try:
            text = data.decode(encoding)
            break
        except UnicodeDecodeError:
            continue
    else:
        text = data.decode("latin-1")
    head = text[:65536]
    controls = sum(1 for c in head if ord(c) < 32 and c not in "\n\r\t\f\v")
    if controls > max(8, len(head) // 50):
        raise _binary(name)
    return text


def _binary(name: str) -> DocumentError:
    return DocumentError(
        "binary", f"{name}: this looks like a binary file, not text", name=name
    )


# ---- HTML ----------------------------------------------------------------------------------

_BLOCK_TAGS = {
    "p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article", "header",
    "footer", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "dd", "dt", "hr",
    "main", "nav", "aside", "figure", "figcaption", "form", "title",
}
_SKIP_TAGS = {"script", "style", "noscript", "template", "svg", "head", "iframe", "object"}


class _TextExtractor(HTMLParser):
    """Keeps visible text; drops scripts, styles and markup. Entities are decoded."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_depth = 0
        self.title: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP_TAGS:
            self.skip_depth += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")
        elif tag in ("td", "th"):
            self.parts.append(" | ")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS:
            self.skip_depth = max(0, self.skip_depth - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skip_depth:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """Visible text of an HTML page (stdlib parser: no network, no script execution)."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    text = "".join(parser.parts)
    lines = [re.sub(r"[ \t\u00a0]+", " ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines))


# ---- PDF -----------------------------------------------------------------------------------


def _pdf_text(name: str, data: bytes) -> tuple[str, int]:
    import pypdf
    from pypdf.errors import FileNotDecryptedError, PyPdfError

    if b"%PDF-" not in data[:1024]:
        raise _corrupt(name, "pdf")
    try:
        reader = pypdf.PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            # Many PDFs are "encrypted" with an empty user password: they open without one.
            try:
                ok = reader.decrypt("")
            except (PyPdfError, NotImplementedError, ValueError) as exc:
                raise _encrypted(name) from exc
            if not ok:
                raise _encrypted(name)
        num_pages = len(reader.pages)
        if num_pages > MAX_PDF_PAGES:
            raise DocumentError(
                "too_many_pages",
                f"{name}: {num_pages:,} pages is more than the {MAX_PDF_PAGES:,} allowed",
                name=name,
                pages=num_pages,
                limit=MAX_PDF_PAGES,
            )
        parts = []
        for number, page in enumerate(reader.pages, start=1):
            try:
                page_text = page.extract_text() or ""
            except (PyPdfError, KeyError, ValueError, TypeError, AttributeError):
                page_text = ""  # one damaged page should not lose the whole document
            parts.append(f"[page {number}]\n{page_text.strip()}")
    except DocumentError:
        raise
    except FileNotDecryptedError as exc:
        raise _encrypted(name) from exc
    except (PyPdfError, OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise _corrupt(name, "pdf") from exc
    text = "\n\n".join(parts)
    if not re.sub(r"\[page \d+\]", "", text).strip():
        raise DocumentError(
            "pdf_no_text",
            f"{name}: this PDF has no text layer (a scan?); run OCR on it first",
            name=name,
        )
    return text, num_pages


def _encrypted(name: str) -> DocumentError:
    return DocumentError(
        "encrypted", f"{name}: this PDF is password-protected; remove the password first", name=name
    )


def _corrupt(name: str, kind: str) -> DocumentError:
    return DocumentError(
        "corrupt", f"{name}: this file is damaged or is not a real {kind.upper()}", name=name, kind=kind
    )


# ---- DOCX ----------------------------------------------------------------------------------


def _docx_text(name: str, data: bytes) -> str:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise _corrupt(name, "docx") from exc
    total = sum(info.file_size for info in infos)
    if total > MAX_DOCX_UNCOMPRESSED or total > MAX_DOCX_RATIO * max(len(data), 1) + 10_000_000:
        raise DocumentError(
            "zip_bomb",
            f"{name}: this DOCX would unpack to {total / 1e6:,.0f} MB; refused",
            name=name,
            size_mb=round(total / 1e6),
        )
    if "word/document.xml" not in {info.filename for info in infos}:
        raise _corrupt(name, "docx")
    try:
        import docx
        from docx.table import Table

        document = docx.Document(io.BytesIO(data))
        parts: list[str] = []
        for block in document.iter_inner_content():
            if isinstance(block, Table):
                for row in block.rows:
                    cells = [cell.text.strip() for cell in row.cells]
                    parts.append(" | ".join(cells))
                parts.append("")
            else:
                parts.append(block.text)
    except Exception as exc:  # python-docx raises many types for a damaged package
        raise _corrupt(name, "docx") from exc
    return "\n".join(parts)
