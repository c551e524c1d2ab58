"""The peers harness (bench/peers.py + bench/peer_worker.py) end to end, without installing peers.

pagechat and transformers run as worker processes on the tiny checkpoint with tiny workloads;
vLLM and llama.cpp, whose venvs `python -m bench.peers install` creates, are reported as not
installed. The converter extraction is checked on a fake llama-cpp-python sdist.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile

import pytest

from bench import peers

TINY = ["--repeats", "2", "--decode-prompt-len", "8", "--decode-tokens", "6", "--prefill-len", "64",
        "--batch-requests", "3", "--batch-input-len", "8", "--batch-output-len", "5", "--doc-len", "96",
        "--question-len", "8", "--answer-len", "4", "--kv-gb", "0.05", "--bandwidth-mb", "16",
        "--timeout", "120", "--start-timeout", "120"]


@pytest.mark.timeout(600)
def test_peers_side_by_side(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(peers, "VENVS", tmp_path / "no-venvs")
    peers.main(["run", "--model", str(tiny_checkpoint), "--out-dir", str(tmp_path), "--log-dir",
                str(tmp_path / "logs"), "--peers", "pagechat-f32,hf-f32,vllm-bf16,llama-bf16", *TINY])
    record = json.loads((tmp_path / "peers-cpu.json").read_text())
    assert record["date"] and record["commit"] and record["torch"]
    machine = record["machine"]
    assert machine["cpu"]["cpu_count"] >= 1 and machine["cpu"]["torch_cpu_capability"]
    assert machine["bandwidth_start"]["copy_gb_per_s"] > 0 and machine["bandwidth_end"]["sum_gb_per_s"] > 0
    assert len(machine["load_average_end"]) == 3
    got = record["peers"]
    assert got["vllm-bf16"]["skipped"].startswith("not installed")
    assert got["llama-bf16"]["skipped"].startswith("not installed")
    order = []
    for name in ("pagechat-f32", "hf-f32"):
        entry = got[name]
        assert "error" not in entry, entry.get("error")
        assert set(entry["median"]) == set(peers.METRICS)
        for workload, runs in entry["runs"].items():
            assert [r["rep"] for r in runs] == [0, 1], workload
            for r in runs:
                assert r["machine"]["load_average_before"] and r["machine"]["peer_cpu_s"] >= 0
                order.append((r["sequence"], name, workload, r["rep"]))
        doc = entry["runs"]["doc"]
        assert all(r["follow_up_prompt_tokens"] == 96 + 8 + 4 + 8 for r in doc)
    # A B, A B: each repetition of a workload has every peer before the next repetition starts.
    order.sort()
    assert [(n, w, rep) for _, n, w, rep in order[:4]] == [
        ("pagechat-f32", "decode", 0), ("hf-f32", "decode", 0),
        ("pagechat-f32", "decode", 1), ("hf-f32", "decode", 1)]
    # pagechat's prefix cache serves the document in the follow-up; transformers recomputes.
    assert all(r["follow_up_cached_tokens"] >= 96 for r in got["pagechat-f32"]["runs"]["doc"])
    assert all(r["follow_up_cached_tokens"] == 0 for r in got["hf-f32"]["runs"]["doc"])
    comparison = record["comparison"]
    assert comparison["reference"] == "pagechat-f32"
    assert set(comparison["decode_tokens_per_s"]) == {"hf-f32"}


def test_a_peer_that_cannot_start_is_reported(tiny_checkpoint, tmp_path, monkeypatch):
    # llama's worker in this venv: llama_cpp is not installed, so the worker says why and exits.
    broken = peers.PeerSpec("llama-here", "llama", "bf16", "llama without its venv")
    monkeypatch.setitem(peers.PEERS, "llama-here", broken)
    fake_gguf = tmp_path / "model.gguf"
    fake_gguf.write_bytes(b"GGUF")
    peers.main(["run", "--model", str(tiny_checkpoint), "--out-dir", str(tmp_path), "--log-dir",
                str(tmp_path / "logs"), "--peers", "llama-here", "--gguf", str(fake_gguf),
                "--workloads", "decode", *TINY])
    entry = json.loads((tmp_path / "peers-cpu.json").read_text())["peers"]["llama-here"]
    assert "llama_cpp" in entry["error"] and entry.get("median", {}) == {}


def test_converter_is_extracted_from_the_sdist(tmp_path):
    sdist = tmp_path / "llama_cpp_python-0.3.99.tar.gz"
    files = {
        "llama_cpp_python-0.3.99/vendor/llama.cpp/convert_hf_to_gguf.py": b"print('convert')\n",
        "llama_cpp_python-0.3.99/vendor/llama.cpp/gguf-py/gguf/__init__.py": b"",
        "llama_cpp_python-0.3.99/vendor/llama.cpp/conversion/qwen.py": b"",
        "llama_cpp_python-0.3.99/vendor/llama.cpp/src/llama.cpp": b"// not needed\n",
        "llama_cpp_python-0.3.99/llama_cpp/__init__.py": b"",
    }
    with tarfile.open(sdist, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    converter = peers.extract_converter(sdist, tmp_path / "converter")
    assert converter.read_text() == "print('convert')\n"
    assert (tmp_path / "converter" / "gguf-py" / "gguf" / "__init__.py").is_file()
    assert (tmp_path / "converter" / "conversion" / "qwen.py").is_file()  # `from conversion import ...`
    assert not (tmp_path / "converter" / "src").exists()


WORKER_WITH_NOISE = """
import os, sys
sys.path.insert(0, os.path.dirname(sys.argv[1]))
import peer_worker

class Noisy(peer_worker.PagechatPeer):
    def __init__(self, args):
        print("python noise on stdout")
        os.write(1, b"C-level noise on fd 1\\n")
        super().__init__(args)

peer_worker.PEERS["pagechat"] = Noisy
sys.exit(peer_worker.main(sys.argv[2:]))
"""


def test_worker_keeps_stdout_for_the_protocol(tiny_checkpoint):
    """Whatever a library prints (from Python or C) goes to stderr, never into the JSON lines."""
    import subprocess

    request = json.dumps({"op": "run", "prompts": [[5, 6, 7]], "max_tokens": 3}) + "\n" + '{"op": "quit"}\n'
    proc = subprocess.run(
        [sys.executable, "-c", WORKER_WITH_NOISE, str(peers.WORKER), "--peer", "pagechat", "--model",
         str(tiny_checkpoint), "--kv-gb", "0.05", "--threads", "1"],
        input=request, text=True, capture_output=True, timeout=120, cwd=peers.ROOT,
        env=peers.peer_env(peers.PEERS["pagechat-f32"], 1))
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines()]
    assert lines[0]["event"] == "ready"
    assert lines[1]["ok"] and lines[1]["tokens"] == [3] and len(lines) == 2
    assert "python noise on stdout" in proc.stderr and "C-level noise on fd 1" in proc.stderr
