"""The benchmarks run end to end on the tiny checkpoint, and their numbers mean what they say.

CI-sized: each script's main() in-process with tiny settings and --out-dir tmp_path. Beyond the
JSON's fields and the PNG, the checks use the transformers peers as the reference: on the
float32 tiny model every peer must produce the same greedy answers (so all ran the same
workload), and pagechat's prefix-cache hits must be every full block of the previous turn.
"""

from __future__ import annotations

import json

import pytest

from bench import long_doc, multi_turn, serving

BLOCK = 16  # EngineConfig.block_size default
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _provenance(record: dict) -> None:
    assert record["date"] and record["commit"] and record["device"] and record["torch"]
    assert record["machine"]["elapsed_s"] > 0 and "shared" in record["machine"]


def _png(path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_multi_turn(tiny_checkpoint, tmp_path):
    payload = multi_turn.main([
        "--model", str(tiny_checkpoint), "--out-dir", str(tmp_path), "--conversations", "2",
        "--turns", "3", "--system-len", "24", "--user-len", "5", "20", "--answer-len", "4", "12",
    ])
    record = json.loads((tmp_path / "multi_turn-cpu.json").read_text())
    _provenance(record)
    _png(tmp_path / "multi_turn-cpu.png")
    results = record["results"]
    assert set(results) == set(multi_turn.DEFAULTS["cpu"]["peers"].split(","))
    assert record["errors"] == {}
    assert record["same_answers_across_peers"] is True
    assert payload["same_answers_across_peers"] is True

    turns = results["pagechat"]["turns"]
    assert len(turns) == 2 * 3
    for t in turns:
        assert t["ttft_s"] > 0 and t["output_tokens"] >= 4
        if t["turn"] > 1:  # every full block of the previous prompt + answer (its last token's KV
            # is never computed) comes from the cache, and nothing more
            assert t["cached_tokens"] == (t["previous_history_tokens"] - 1) // BLOCK * BLOCK
    assert all(t["cached_tokens"] == 0 for t in results["pagechat-no-prefix-cache"]["turns"])
    assert all(t["cached_tokens"] == 0 for t in results["hf-generate"]["turns"])
    # DynamicCache keeps every computed token: the previous history less its last token.
    for t in results["hf-generate-cache"]["turns"]:
        if t["turn"] > 1:
            assert t["cached_tokens"] == t["previous_history_tokens"] - 1

    summary = results["pagechat"]["summary"]
    assert summary["output_tokens"] == sum(t["output_tokens"] for t in turns)
    assert [p["turn"] for p in summary["per_turn"]] == [1, 2, 3]
    assert 0.5 < summary["follow_up_hit_rate_of_previous_history"] <= 1.0
    assert record["goals"]["follow_up_hit_rate_of_previous_history"] == pytest.approx(
        summary["follow_up_hit_rate_of_previous_history"])
    assert record["comparison"]["best_hf_by_wall_time"].startswith("hf-")


def test_long_doc(tiny_checkpoint, tmp_path):
    long_doc.main([
        "--model", str(tiny_checkpoint), "--out-dir", str(tmp_path), "--doc-lens", "200", "600",
        "--follow-ups", "2", "--answer-len", "4", "--recompute-max-doc", "200",
        "--peers", "pagechat,hf-generate,hf-generate-cache",
    ])
    record = json.loads((tmp_path / "long_doc-cpu.json").read_text())
    _provenance(record)
    _png(tmp_path / "long_doc-cpu.png")
    results = record["results"]
    assert set(results["pagechat"]) == {"what", "200", "600"}
    assert set(results["hf-generate"]) == {"what", "200"}  # recomputing peers stop at 200
    for doc in ("200", "600"):
        ours = results["pagechat"][doc]
        assert ours["answers_digest"] == results["hf-generate-cache"][doc]["answers_digest"]
        s = ours["summary"]
        assert s["first_question_prompt_tokens"] > int(doc)
        assert len(s["follow_up_ttft_s"]) == 2
        assert all(c > int(doc) - BLOCK for c in s["follow_up_cached_tokens"])
        assert s["follow_up_over_first_ttft"] == pytest.approx(
            s["follow_up_ttft_s_p50"] / s["first_question_ttft_s"])
    assert results["hf-generate"]["200"]["summary"]["follow_up_cached_tokens"] == [0, 0]
    assert record["goals"]["doc_tokens"] is None  # no 8K document in this run
    assert set(record["comparison"]) == {"200", "600"}


def test_serving(tiny_checkpoint, tmp_path):
    record = serving.main([
        "--model", str(tiny_checkpoint), "--out-dir", str(tmp_path), "--levels", "1", "3",
        "--input-len", "16", "--output-len", "6", "--servers", "pagechat",
    ])
    _png(tmp_path / "serving-cpu.png")
    stored = json.loads((tmp_path / "serving-cpu.json").read_text())
    _provenance(stored)
    levels = stored["results"]["pagechat"]["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 3]
    for lv in levels:
        assert lv["completed"] == lv["requests"] == max(lv["concurrency"], 4)
        assert lv["failed"] == lv["cut_by_timeout"] == 0
        assert lv["output_tokens"] == 6 * lv["requests"]  # ignore_eos: exactly max_tokens each
        assert 0 < lv["ttft_s"]["p50"] <= lv["ttft_s"]["p99"] < lv["e2e_s"]["p99"]
        assert lv["itl_s"]["n"] > 0 and lv["output_tokens_per_s"] > 0
    assert record["results"]["pagechat"]["model_id"]
