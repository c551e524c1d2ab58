"""Document extraction, old vs new, on two generated PDFs: a 300-page two-column report with
tables and running headers, and 100 pages of Chinese text in a CID font.

Old: the previous extractor, pypdf's `extract_text` page by page. New: app.documents (PDFium
text, tables from the pages that draw ruling lines, header/footer removal, CJK line joins), in
this process and through the worker process the chat uses. Per document and side: wall time
(median of --repeat runs), the characters extracted and the warnings logged; for the new side
also the Markdown tables found and the header/footer lines dropped.

    python -m bench.extraction                  # 300 + 100 pages, 3 runs each
    python -m bench.extraction --pages 30 --chinese-pages 10 --repeat 1
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import median, write_result

MB = 1024 * 1024


class _Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def old_pypdf(data: bytes) -> str:
    import pypdf

    reader = pypdf.PdfReader(io.BytesIO(data), strict=False)
    return "\n\n".join(
        f"[page {n}]\n{(page.extract_text() or '').strip()}"
        for n, page in enumerate(reader.pages, 1)
    )


def _timed(run: Callable[[], Any], repeat: int) -> tuple[list[float], Any, int]:
    """Wall times of `repeat` runs, the last result, and warnings logged per run."""
    counter = _Count()
    logging.getLogger().addHandler(counter)
    times, result = [], None
    try:
        for _ in range(repeat):
            start = time.perf_counter()
            result = run()
            times.append(time.perf_counter() - start)
    finally:
        logging.getLogger().removeHandler(counter)
    return times, result, counter.count // max(repeat, 1)


def compare(name: str, data: bytes, repeat: int) -> dict[str, Any]:
    from app.documents.extraction import extract_bytes, extract_file_async

    old_times, old_text, old_warnings = _timed(lambda: old_pypdf(data), repeat)
    new_times, doc, new_warnings = _timed(lambda: extract_bytes(name, data, 500 * MB), repeat)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        worker_times, _, _ = _timed(
            lambda: asyncio.run(extract_file_async(path, name, 500 * MB)), repeat
        )
    dropped = next((n.params["count"] for n in doc.notes if n.code == "repeated_lines"), 0)
    result = {
        "pages": doc.pages,
        "pdf_mb": round(len(data) / MB, 2),
        "old_pypdf": {
            "seconds": old_times,
            "seconds_p50": median(old_times),
            "chars": len(old_text),
            "warnings_logged": old_warnings,
        },
        "new_in_process": {
            "seconds": new_times,
            "seconds_p50": median(new_times),
            "chars": len(doc.text),
            "warnings_logged": new_warnings,
            "markdown_tables": sum(1 for line in doc.text.splitlines() if line.startswith("|---")),
            "header_footer_lines_dropped": dropped,
        },
        "new_worker_process": {"seconds": worker_times, "seconds_p50": median(worker_times)},
        "speedup_in_process": median(old_times) / median(new_times),
        "speedup_worker": median(old_times) / median(worker_times),
    }
    print(
        f"{name}: {doc.pages} pages, pypdf {median(old_times):.2f} s, new {median(new_times):.2f} s "
        f"in process ({result['speedup_in_process']:.1f}x), {median(worker_times):.2f} s through "
        f"the worker ({result['speedup_worker']:.1f}x); warnings {old_warnings} vs {new_warnings}"
    )
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pages", type=int, default=300)
    parser.add_argument("--chinese-pages", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args(argv)

    from tests.fixtures.documents import long_chinese_pdf, long_pdf

    results = {
        "report": compare("report.pdf", long_pdf(args.pages), args.repeat),
        "chinese": compare("chinese.pdf", long_chinese_pdf(args.chinese_pages), args.repeat),
    }
    payload = {"repeat": args.repeat, "results": results}
    write_result("extraction-cpu", payload, "cpu", args.out_dir)
    return payload


if __name__ == "__main__":
    main()
