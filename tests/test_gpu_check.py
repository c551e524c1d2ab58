"""The one-command GPU check (bench/gpu_check.py) runs end to end in its CPU smoke mode.

The smoke mode takes the same path as the GPU run (environment, wheels, checkpoint writing,
`pytest -m gpu`, the engine benchmarks, transformers `generate`, one JSON and one log) on the
tiny shape, so the script cannot rot between the rare runs on a GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from bench import gpu_check

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["env", "wheels", "checkpoint", "pytest", "decode", "prefill", "nano-vllm", "hf"]


@pytest.mark.timeout(600)
def test_smoke_runs_every_step_and_writes_json_and_log(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu-check.json").read_text())
    log = (out / "gpu-check.log").read_text()
    assert report["mode"] == "smoke" and report["passed"] is True
    assert [s["name"] for s in report["steps"]] == STEPS
    for step in report["steps"]:
        assert step["status"] == "ok", step
        assert 0 < step["seconds"] <= step["cap_s"]
        assert f"==== {step['name']}: ok in" in log  # each step's time is printed
    assert report["total_s"] < report["budget_s"]
    r = report["results"]
    assert r["env"]["torch"] and r["env"]["transformers"]
    assert (Path(report["checkpoint"]) / "model.safetensors").is_file()
    # On a CPU every gpu test is collected, then skipped: the same command, nothing run.
    assert r["pytest_gpu"]["tests"] > 0 and r["pytest_gpu"]["failures"] == r["pytest_gpu"]["errors"] == 0
    assert [d["batch"] for d in r["decode"]] == [1, 4]
    assert all(d["tokens_per_s"] > 0 and d["decode_tokens"] == d["batch"] * 7 for d in r["decode"])
    for d in r["decode"]:  # the profile of 3 more steps (CPU ops here; kernels on a GPU)
        prof = d["profile"]
        assert prof["steps"] == 3 and prof["profiled_ms_per_step"] > 0
        assert prof["top_ms_per_step"] and "gpu_kernels_ms_per_step" not in prof
        phases = d["host_phases"]["median_ms"]  # where the host's part of a step goes
        assert phases["step"] > 0 and {"schedule", "build_inputs", "read", "postprocess"} <= set(phases)
        ab = d["async_output_ab"]  # async output off and on, alternating, twice each
        assert [len(ab["runs"]["off"]), len(ab["runs"]["on"])] == [2, 2]
        assert ab["on_over_off"] == pytest.approx(ab["on_tokens_per_s"] / ab["off_tokens_per_s"])
    assert [p["prompt_tokens"] for p in r["prefill"]] == [64, 256]
    assert all(p["tokens_per_s"] > 0 and p["cached_tokens"] == 0 for p in r["prefill"])
    nano = r["nano_vllm"]
    assert nano["complete"] and nano["output_tokens"] == nano["wanted_output_tokens"] > 0
    assert nano["finished_seqs"] == nano["num_seqs"] == 6
    assert [h["batch"] for h in r["hf"]] == [1, 4] and all(h["tokens_per_s"] > 0 for h in r["hf"])
    assert set(r["pagechat_over_hf"]) == {"decode_batch_1", "decode_batch_4"}
    assert r["pagechat_over_hf"]["decode_batch_1"] == pytest.approx(
        r["decode"][0]["tokens_per_s"] / r["hf"][0]["tokens_per_s"], rel=1e-2)


def test_the_gpu_tests_are_found_without_collecting_the_app():
    files = gpu_check.gpu_test_files()
    assert "tests/test_gpu.py" in files
    assert all(not f.startswith("tests/test_app") for f in files)


def test_a_step_over_its_cap_is_killed_and_the_check_goes_on(tmp_path):
    log = gpu_check.Log(tmp_path / "log")
    slow = gpu_check.Step("slow", [sys.executable, "-c", "import time; print('started', flush=True); "
                                   "time.sleep(60)"], cap_s=2)
    start = time.perf_counter()
    record = gpu_check.run_step(slow, 2, {}, log)
    assert record["status"] == "timeout" and time.perf_counter() - start < 20
    assert record["output_tail"] == ["started"]
    failing = gpu_check.Step("bad", [sys.executable, "-c", "raise SystemExit(3)"], cap_s=30)
    assert gpu_check.run_step(failing, 30, {}, log)["status"] == "failed"
    log.close()
    assert "==== slow: timeout in" in (tmp_path / "log").read_text()


def test_out_of_budget_steps_are_skipped_and_the_check_fails(tmp_path):
    rc = gpu_check.main(["--smoke", "--out", str(tmp_path), "--budget-s", "2"])
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert rc == 1 and report["passed"] is False
    assert {s["status"] for s in report["steps"]} == {"skipped"}


def _fake_wheel(folder: Path, module: str) -> Path:
    """A minimal pure-Python wheel holding `module` (what pip needs and nothing more)."""
    dist = f"{module}-1.0"
    path = folder / f"{module}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{module}/__init__.py", "VALUE = 42\n")
        z.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
        z.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                   "Tag: py3-none-any\n")
        z.writestr(f"{dist}.dist-info/RECORD", "")
    return path


def test_wheels_install_offline_into_a_target_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    module = "pagechat_gpu_check_fake"
    monkeypatch.setattr(gpu_check, "NEEDED_MODULES", ("json", module))
    wheels = tmp_path / "whl"
    assert gpu_check.install_wheels(wheels, tmp_path / "site") == 1  # no wheels: a clear failure
    wheels.mkdir()
    _fake_wheel(wheels, module)
    assert gpu_check.install_wheels(wheels, tmp_path / "site") == 0
    assert (tmp_path / "site" / module / "__init__.py").is_file()


def test_wheels_install_into_a_site_already_on_the_path_before_it_existed(tmp_path, monkeypatch):
    """As on the GPU machine: the check puts the site on PYTHONPATH before the wheels step makes it,
    so Python has cached that the missing folder holds nothing."""
    site = tmp_path / "site"
    monkeypatch.setattr(sys, "path", [str(site), *sys.path])
    monkeypatch.setattr(sys, "path_importer_cache", dict(sys.path_importer_cache))
    module = "pagechat_gpu_check_fake_early"
    monkeypatch.setattr(gpu_check, "NEEDED_MODULES", ("json", module))
    assert gpu_check._missing_modules() == [module]  # caches "nothing here" for the missing site
    wheels = tmp_path / "whl"
    wheels.mkdir()
    _fake_wheel(wheels, module)
    assert gpu_check.install_wheels(wheels, site) == 0
    assert gpu_check._missing_modules() == []


def test_a_gpu_report_is_stored_under_the_gpus_name(tmp_path):
    report = tmp_path / "gpu-check.json"
    report.write_text(json.dumps({"device": "cuda", "results": {"env": {"gpu": "NVIDIA H100 80GB HBM3"}}}))
    stored = gpu_check.store(report, tmp_path)
    assert stored.name == "gpu-check-h100.json"
    assert json.loads(stored.read_text())["results"]["env"]["gpu"].startswith("NVIDIA H100")


def test_wheels_are_pinned_to_the_versions_installed_here():
    """The GPU machine gets the versions the suite ran with; pydantic-core is the exact one that
    the pinned pydantic requires (read from pydantic's own metadata, not from our list)."""
    import importlib.metadata

    pins = dict(spec.split("==") for spec in gpu_check.pinned_packages())
    assert set(pins) == set(gpu_check.NEEDED_PACKAGES)
    for name, version in pins.items():
        assert version == importlib.metadata.version(name)
    required = [r for r in importlib.metadata.requires("pydantic") or [] if r.startswith("pydantic-core")]
    assert required and required[0].replace(" ", "") == f"pydantic-core=={pins['pydantic-core']}"
