"""Plain text and CSV: bytes to text with the right encoding, CSV kept row by row.

Encodings: a byte-order mark decides; else strict UTF-8; else charset-normalizer picks among
the legacy encodings (GBK/GB18030, Big5, Shift-JIS, EUC-KR, Windows code pages). On short texts
several decode cleanly with the same "chaos"; ties go to the more coherent language, then to the
more common encoding (GB18030 before Korean, Windows-1252 before Central European).
"""

from __future__ import annotations

import csv
import io

from charset_normalizer import CharsetMatch, from_bytes

from app.documents.document import Document, DocumentError

_BOMS = (
    (b"\xef\xbb\xbf", "utf-8-sig"),
    (b"\xff\xfe\x00\x00", "utf-32"),
    (b"\x00\x00\xfe\xff", "utf-32"),
    (b"\xff\xfe", "utf-16"),
    (b"\xfe\xff", "utf-16"),
)
# Without a BOM, UTF-16/32 guesses are wrong far more often than right.
_EXCLUDED = ["utf_16", "utf_16_be", "utf_16_le", "utf_32", "utf_32_be", "utf_32_le", "utf_7"]
_PREFERRED = [
    "gb18030",
    "gbk",
    "gb2312",
    "big5",
    "big5hkscs",
    "cp932",
    "shift_jis",
    "euc_jp",
    "cp949",
    "euc_kr",
    "cp1252",
    "latin_1",
    "cp1251",
    "koi8_r",
    "cp1250",
]
SNIFF_BYTES = 256 * 1024  # charset-normalizer looks at this much of a large file
CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}


def decode_text(name: str, data: bytes) -> tuple[str, str]:
    """(text, encoding) of text bytes; binary data raises DocumentError("binary")."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(encoding), encoding
            except UnicodeDecodeError:
                break
    if b"\x00" in data[:65536]:
        raise _binary(name)
    try:
        text, encoding = data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        encoding = _guess(data)
        text = data.decode(encoding, errors="replace")
    head = text[:65536]
    controls = sum(1 for c in head if ord(c) < 32 and c not in "\n\r\t\f\v")
    if controls > max(8, len(head) // 50):
        raise _binary(name)
    return text, encoding


def _guess(data: bytes) -> str:
    matches = list(from_bytes(data[:SNIFF_BYTES], cp_exclusion=_EXCLUDED))
    if not matches:
        return "gb18030" if _decodes(data, "gb18030") else "latin-1"

    def rank(match: CharsetMatch) -> tuple[float, float, int]:
        enc = match.encoding
        order = _PREFERRED.index(enc) if enc in _PREFERRED else len(_PREFERRED)
        return (round(match.chaos, 3), -round(match.coherence, 3), order)

    best = min(matches, key=rank).encoding
    # The sniffer saw only the head: make sure the whole file decodes, else fall back.
    return best if _decodes(data, best) else "gb18030" if _decodes(data, "gb18030") else best


def _decodes(data: bytes, encoding: str) -> bool:
    try:
        data.decode(encoding)
        return True
    except (UnicodeDecodeError, LookupError):
        return False


def _binary(name: str) -> DocumentError:
    return DocumentError("binary", f"{name}: this looks like a binary file, not text", name=name)


def csv_document(name: str, text: str, delimiter: str, encoding: str, size: int) -> Document:
    """A CSV/TSV file as its header and whole rows, one line per record.

    Records are re-written by Python's csv module with a newline inside a quoted field turned
    into a space, so every line of `text` is one whole row (passages cut on lines never split
    a record). A file that does not parse as CSV is kept as plain text.
    """
    try:
        records = list(csv.reader(io.StringIO(text), delimiter=delimiter))
    except csv.Error:
        return Document(name=name, kind="text", text=text, size_bytes=size, encoding=encoding)
    records = [r for r in records if any(cell.strip() for cell in r)]
    if not records:
        return Document(name=name, kind="text", text=text, size_bytes=size, encoding=encoding)
    lines = []
    for record in records:
        out = io.StringIO()
        cells = [" ".join(cell.splitlines()) for cell in record]
        csv.writer(out, delimiter=delimiter, lineterminator="").writerow(cells)
        lines.append(out.getvalue())
    return Document(
        name=name,
        kind="csv",
        text="\n".join(lines),
        size_bytes=size,
        header=lines[0],
        rows=lines[1:],
        encoding=encoding,
    )
