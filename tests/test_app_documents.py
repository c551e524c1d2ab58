"""Document extraction: the text we wrote comes back; bad files fail with a clear code."""

from __future__ import annotations

import io
import zipfile

import pytest

from app.documents import extraction as documents
from app.documents.extraction import DocumentError, ParseLimits, extract_bytes, extract_file_async
from tests.app_helpers import encrypt_pdf, make_docx, make_pdf

MB = 1024 * 1024


def test_pdf_pages_are_marked():
    data = make_pdf(["Hello page one", "The second page (with parentheses)"])
    doc = extract_bytes("report.pdf", data, 10 * MB)
    assert doc.kind == "pdf" and doc.pages == 2
    assert doc.text.index("[page 1]") < doc.text.index("Hello page one")
    assert doc.text.index("Hello page one") < doc.text.index("[page 2]")
    assert doc.text.index("[page 2]") < doc.text.index("The second page (with parentheses)")


def test_pdf_encrypted_with_password_is_refused_but_empty_password_opens():
    plain = make_pdf(["secret content"])
    with pytest.raises(DocumentError) as err:
        extract_bytes("locked.pdf", encrypt_pdf(plain, "hunter2"), 10 * MB)
    assert err.value.code == "encrypted"
    doc = extract_bytes("owner-only.pdf", encrypt_pdf(plain, ""), 10 * MB)
    assert "secret content" in doc.text


@pytest.mark.parametrize(
    "data",
    [b"%PDF-1.4\n garbage garbage", b"not a pdf at all", make_pdf(["x"])[:60]],
)
def test_pdf_corrupt(data):
    with pytest.raises(DocumentError) as err:
        extract_bytes("broken.pdf", data, 10 * MB)
    assert err.value.code in {"corrupt", "pdf_no_text"}


def test_pdf_without_text_layer():
    with pytest.raises(DocumentError) as err:
        extract_bytes("scan.pdf", make_pdf([""]), 10 * MB)
    assert err.value.code == "pdf_no_text"


def test_docx_paragraphs_and_tables_in_order():
    data = make_docx(
        ["First paragraph.", "第二段：中文。"], table=[["name", "qty"], ["apple", "3"]]
    )
    doc = extract_bytes("notes.docx", data, 10 * MB)
    assert doc.kind == "docx"
    blocks = doc.text.split("\n\n")
    assert blocks[:2] == ["First paragraph.", "第二段：中文。"]
    assert blocks[2].splitlines() == ["| name | qty |", "|---|---|", "| apple | 3 |"]


def test_docx_zip_bomb_refused_before_parsing(monkeypatch):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("word/document.xml", b"<" + b"a" * (3 * MB))
        z.writestr("[Content_Types].xml", b"<Types/>")
    import docx

    def must_not_parse(*a, **k):
        raise AssertionError("parsed a zip bomb")

    monkeypatch.setattr(docx, "Document", must_not_parse)
    with pytest.raises(DocumentError) as err:
        extract_bytes("bomb.docx", buf.getvalue(), 10 * MB, limits=ParseLimits(max_unpacked_mb=1))
    assert err.value.code == "too_much_unpacked"
    assert "PAGECHAT_MAX_UNPACKED_MB" in str(err.value) and err.value.params["limit_mb"] == 1


def test_docx_corrupt():
    with pytest.raises(DocumentError) as err:
        extract_bytes("bad.docx", b"PK\x03\x04 not really a zip", 10 * MB)
    assert err.value.code == "corrupt"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("hello.txt", "not a word document")
    with pytest.raises(DocumentError) as err:
        extract_bytes("fake.docx", buf.getvalue(), 10 * MB)
    assert err.value.code == "corrupt"


def test_html_text_without_scripts_or_tags():
    html = (
        "<html><head><title>T</title><style>p{color:red}</style></head><body>"
        "<h1>Title &amp; more</h1><p>Hello <b>world</b></p>"
        "<script>alert('x')</script><table><tr><td>a</td><td>b</td></tr></table>"
        "<p>caf&eacute; &lt;tag&gt;</p></body></html>"
    )
    doc = extract_bytes("page.html", html.encode(), 10 * MB)
    assert "Title & more" in doc.text
    assert "Hello world" in doc.text
    assert "café <tag>" in doc.text
    assert "alert" not in doc.text and "color:red" not in doc.text and "<b>" not in doc.text


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("a.txt", "plain ünïcode\r\nline two".encode(), "plain ünïcode\nline two"),
        ("b.md", "\ufeff# Title\n\ntext".encode(), "# Title\n\ntext"),
        ("c.csv", b"a,b\n1,2\n", "a,b\n1,2"),
        ("d.py", b"def f():\n    return 1\n", "def f():\n    return 1"),
        ("e.txt", "中文文本，GB18030 编码".encode("gb18030"), "中文文本，GB18030 编码"),
        ("f.txt", "utf16 text".encode("utf-16"), "utf16 text"),
        ("Makefile", b"all:\n\techo hi\n", "all:\n\techo hi"),
    ],
)
def test_text_like_files(name, data, expected):
    assert extract_bytes(name, data, 10 * MB).text == expected


@pytest.mark.parametrize(
    ("name", "data", "code"),
    [
        ("empty.txt", b"", "empty"),
        ("image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), "binary"),
        ("photo.jpg", b"\xff\xd8\xff", "unsupported"),
        ("old.doc", b"\xd0\xcf\x11\xe0", "unsupported"),
        ("blank.txt", b"   \n\n  ", "no_text"),
    ],
)
def test_bad_files(name, data, code):
    with pytest.raises(DocumentError) as err:
        extract_bytes(name, data, 10 * MB)
    assert err.value.code == code
    assert name in str(err.value)


def test_size_limit_checked_before_reading(tmp_path):
    path = tmp_path / "big.txt"
    path.write_bytes(b"x" * 2048)
    with pytest.raises(DocumentError) as err:
        documents.extract_file(path, "big.txt", max_bytes=1024)
    assert err.value.code == "too_large"


async def test_extraction_runs_in_a_worker_process(tmp_path):
    import psutil

    workers = []

    def seen(step):
        workers.extend(
            child.pid
            for child in psutil.Process().children()
            if "app.documents.worker" in " ".join(child.cmdline())
        )

    path = tmp_path / "x.pdf"
    path.write_bytes(make_pdf(["hello from page one"]))
    doc = await extract_file_async(path, "x.pdf", MB, progress=seen)
    assert "hello from page one" in doc.text and workers
