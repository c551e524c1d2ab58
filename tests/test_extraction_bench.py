"""bench/extraction.py runs end to end on a few pages and records what it measured."""

from __future__ import annotations

import json

from bench import extraction


def test_extraction_bench_smoke(tmp_path):
    extraction.main(
        ["--pages", "3", "--chinese-pages", "2", "--repeat", "1", "--out-dir", str(tmp_path)]
    )
    record = json.loads((tmp_path / "extraction-cpu.json").read_text())
    assert record["commit"] and record["device"]
    report, chinese = record["results"]["report"], record["results"]["chinese"]
    assert report["pages"] >= 3 and chinese["pages"] == 2
    for result in (report, chinese):
        assert (
            result["old_pypdf"]["seconds_p50"] > 0 and result["new_in_process"]["seconds_p50"] > 0
        )
        assert result["new_worker_process"]["seconds_p50"] > 0
        # both sides read the same text, give or take headers, footers and joined lines
        assert 0.8 < result["new_in_process"]["chars"] / result["old_pypdf"]["chars"] < 1.2
    assert report["new_in_process"]["header_footer_lines_dropped"] >= 2 * 3
    assert report["new_in_process"]["warnings_logged"] == 0
